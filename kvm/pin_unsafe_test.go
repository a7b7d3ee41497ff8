//go:build linux

package kvm

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioringRegisterBuffers is IORING_REGISTER_BUFFERS.
const ioringRegisterBuffers = 0

// pinLongterm pins b as an io_uring fixed buffer: a FOLL_PIN|FOLL_LONGTERM
// pin of every page, the kind VFIO type1 and iommufd take for a DMA mapping
// by address. unpin closes the ring, which drops the pins. It skips the test
// where io_uring is not available.
func pinLongterm(t testing.TB, b []byte) (unpin func(), err error) {
	t.Helper()
	var params [120]byte // struct io_uring_params, all zero
	r, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, 4, uintptr(unsafe.Pointer(&params[0])), 0)
	if e != 0 {
		t.Skipf("needs io_uring to pin pages as a device mapping would (io_uring_setup: %v)", e)
	}
	ring := int(r)
	iov := unix.Iovec{Base: &b[0]}
	iov.SetLen(len(b))
	_, _, e = unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(ring), ioringRegisterBuffers,
		uintptr(unsafe.Pointer(&iov)), 1, 0, 0)
	if e != 0 {
		unix.Close(ring)
		return nil, e
	}
	return func() { unix.Close(ring) }, nil
}
