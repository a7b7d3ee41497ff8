package vfio

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctlPtr issues ioctl(fd, req, p). p must point to memory the kernel may
// read and write for the duration of the call; Go's heap does not move, and
// the pointer argument keeps the object alive until the call returns.
func ioctlPtr[T any](fd int, req uintptr, p *T) (uintptr, error) {
	if fd < 0 {
		return 0, ErrClosed
	}
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(p)))
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

// ioctlBuf issues ioctl(fd, req, &buf[0]) for ioctls whose argument is a
// variable-length buffer (a struct followed by a capability chain).
func ioctlBuf(fd int, req uintptr, buf []byte) (uintptr, error) {
	if fd < 0 {
		return 0, ErrClosed
	}
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(unsafe.SliceData(buf))))
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

// ioctlVal issues ioctl(fd, req, arg) with an integer argument.
func ioctlVal(fd int, req, arg uintptr) (uintptr, error) {
	if fd < 0 {
		return 0, ErrClosed
	}
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

// ioctlString issues ioctl(fd, req, s) with s passed as a NUL-terminated C
// string (VFIO_GROUP_GET_DEVICE_FD).
func ioctlString(fd int, req uintptr, s string) (uintptr, error) {
	if fd < 0 {
		return 0, ErrClosed
	}
	p, err := unix.BytePtrFromString(s)
	if err != nil {
		return 0, err
	}
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(p)))
	if errno != 0 {
		return r, errno
	}
	return r, nil
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
