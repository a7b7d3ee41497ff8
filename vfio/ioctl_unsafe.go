package vfio

import (
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

// ioctlPtr issues ioctl(fd, req, p) inside the fd's Control. p must point
// to memory the kernel may read and write for the duration of the call;
// Go's heap does not move, and the pointer argument keeps the object alive
// until the call returns. After Close it answers ErrClosed and issues
// nothing.
func ioctlPtr[T any](fd *fdio.FD, req uintptr, p *T) (uintptr, error) {
	return fdio.IoctlPtr(fd, req, p)
}

// ioctlBuf issues ioctl(fd, req, &buf[0]) for ioctls whose argument is a
// variable-length buffer (a struct followed by a capability chain).
func ioctlBuf(fd *fdio.FD, req uintptr, buf []byte) (uintptr, error) {
	return fdio.IoctlBuf(fd, req, buf)
}

// ioctlVal issues ioctl(fd, req, arg) with an integer argument.
func ioctlVal(fd *fdio.FD, req, arg uintptr) (uintptr, error) {
	return fdio.Ioctl(fd, req, arg)
}

// ioctlString issues ioctl(fd, req, s) with s passed as a NUL-terminated C
// string (VFIO_GROUP_GET_DEVICE_FD).
func ioctlString(fd *fdio.FD, req uintptr, s string) (uintptr, error) {
	p, err := unix.BytePtrFromString(s)
	if err != nil {
		return 0, err
	}
	return fdio.IoctlPtr(fd, req, p)
}

// addrOf returns the user virtual address of b's first byte, or 0 for an
// empty b. The kernel pins the pages behind it (VFIO_IOMMU_MAP_DMA), so b
// should be memory from mmap, not the Go heap, whose pages the garbage
// collector may reuse once b is unreachable.
func addrOf(b []byte) uint64 {
	if len(b) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b))))
}
