//go:build linux

package kvm

import (
	"errors"
	"fmt"
	"io/fs"

	"golang.org/x/sys/unix"
)

// ErrClosed is returned by methods called on a closed fd wrapper.
// errors.Is(err, fs.ErrClosed) holds for it too.
var ErrClosed = fmt.Errorf("kvm: %w", fs.ErrClosed)

// UnsupportedError reports that a probed capability rules a request out, so
// the ioctl was not issued. errors.Is(err, errors.ErrUnsupported) is true;
// so is errors.Is(err, Errno) when Errno is set, for callers that expect the
// kernel's own answer.
type UnsupportedError struct {
	// Op names the ioctl that was not issued.
	Op string
	// Cap is the capability that was probed and Have its answer.
	Cap  Cap
	Have uint64
	// Want is the bits the request needed.
	Want uint64
	// Errno is what the kernel documents for the same request, or 0.
	Errno unix.Errno
}

// Error describes the request and the capability that ruled it out.
func (e *UnsupportedError) Error() string {
	return fmt.Sprintf("kvm: %s: %#x not supported (%s = %#x)", e.Op, e.Want, e.Cap, e.Have)
}

// Is makes errors.Is match errors.ErrUnsupported and e.Errno.
func (e *UnsupportedError) Is(target error) bool {
	if target == errors.ErrUnsupported {
		return true
	}
	if errno, ok := target.(unix.Errno); ok && e.Errno != 0 {
		return errno == e.Errno
	}
	return false
}

// ioctlError wraps the errno of a failed ioctl with the ioctl's uAPI name;
// ErrClosed, which reached no kernel, is returned as it is.
func ioctlError(name string, err error) error {
	if err == ErrClosed {
		return err
	}
	return fmt.Errorf("kvm: %s: %w", name, err)
}
