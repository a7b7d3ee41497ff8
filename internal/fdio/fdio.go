//go:build linux

// Package fdio holds what gmem's fd wrappers share when they adopt a
// descriptor: duplicating a borrowed *os.File without disturbing it.
package fdio

import (
	"os"

	"golang.org/x/sys/unix"
)

// Dup returns a close-on-exec duplicate of f's descriptor; f stays the
// caller's and keeps its mode (os.File.Fd would make it blocking). The
// duplicate shares the open file description: closing one leaves the other
// open.
func Dup(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	dup, derr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) {
		dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, derr
	}
	return dup, nil
}

// Adopt dups f and hands the duplicate to adopt, closing it again if adopt
// fails: the shape of every XFromFile constructor.
func Adopt[T any](f *os.File, adopt func(fd int) (T, error)) (T, error) {
	fd, err := Dup(f)
	if err != nil {
		var zero T
		return zero, err
	}
	x, err := adopt(fd)
	if err != nil {
		unix.Close(fd)
	}
	return x, err
}
