//go:build linux

package kvm

import (
	"sync/atomic"
	"unsafe"

	"github.com/gmemproject/gmem/internal/fdio"
)

// ioctl issues an ioctl whose argument is a plain integer, inside the fd's
// Control: after Close it answers ErrClosed and issues nothing.
func ioctl(fd *fdio.FD, req, arg uintptr) (uintptr, error) {
	return fdio.Ioctl(fd, req, arg)
}

// ioctlPtr issues an ioctl whose argument points at *p, as ioctl does.
func ioctlPtr[T any](fd *fdio.FD, req uintptr, p *T) (uintptr, error) {
	return fdio.IoctlPtr(fd, req, p)
}

// HostAddr returns the host virtual address of b[0], or 0 if b is empty: the
// value for [UserspaceMemoryRegion2].UserspaceAddr. b must be memory the Go
// collector does not move or free, such as a mapping from [GuestMemfd.Mmap]
// or unix.Mmap, and must stay mapped for as long as the memslot exists.
func HostAddr(b []byte) uint64 {
	if len(b) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(&b[0])))
}

// runWord returns the first 32-bit word of a kvm_run mapping, which holds
// request_interrupt_window (byte 0) and immediate_exit (byte 1). Other
// threads set immediate_exit to stop a vCPU, so the word is only touched
// atomically. The mapping is page aligned, so the word is aligned.
func runWord(run []byte) *uint32 {
	return (*uint32)(unsafe.Pointer(&run[0]))
}

// setRunByte atomically sets byte i (0..3) of the first kvm_run word to v,
// leaving the other bytes as they are. x86 is little endian: byte i is bits
// 8i..8i+7.
func setRunByte(run []byte, i uint, v uint8) {
	w := runWord(run)
	shift := 8 * i
	for {
		old := atomic.LoadUint32(w)
		nw := old&^(0xff<<shift) | uint32(v)<<shift
		if atomic.CompareAndSwapUint32(w, old, nw) {
			return
		}
	}
}

// runByte atomically reads byte i (0..3) of the first kvm_run word.
func runByte(run []byte, i uint) uint8 {
	return uint8(atomic.LoadUint32(runWord(run)) >> (8 * i))
}
