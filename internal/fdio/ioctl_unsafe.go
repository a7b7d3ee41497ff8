//go:build linux

package fdio

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Ioctl issues ioctl(d, req, arg) with an integer argument inside
// [FD.Control]. A failure is the kernel's bare unix.Errno; after Close it
// is d's closed error and nothing is issued.
func Ioctl(d *FD, req, arg uintptr) (uintptr, error) {
	var r uintptr
	var errno unix.Errno
	if err := d.Control(func(fd uintptr) {
		r, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, req, arg)
	}); err != nil {
		return 0, err
	}
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

// IoctlPtr issues ioctl(d, req, p) as Ioctl does; the kernel reads and
// writes *p. Converting the pointer inside the Syscall argument list keeps
// *p alive and unmoved for the duration of the call.
func IoctlPtr[T any](d *FD, req uintptr, p *T) (uintptr, error) {
	var r uintptr
	var errno unix.Errno
	if err := d.Control(func(fd uintptr) {
		r, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(p)))
	}); err != nil {
		return 0, err
	}
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

// IoctlBuf issues ioctl(d, req, &buf[0]) as Ioctl does, for ioctls whose
// argument is a variable-length buffer (a struct followed by a capability
// chain or an array). An empty buf passes a nil pointer.
func IoctlBuf(d *FD, req uintptr, buf []byte) (uintptr, error) {
	var r uintptr
	var errno unix.Errno
	if err := d.Control(func(fd uintptr) {
		r, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(unsafe.SliceData(buf))))
	}); err != nil {
		return 0, err
	}
	if errno != 0 {
		return r, errno
	}
	return r, nil
}
