package vfio

import (
	"fmt"
	"io/fs"
	"os"

	"github.com/gmemproject/gmem/internal/fdio"
)

// ErrClosed is returned by methods called on a closed Container, Group or
// Device, and by a second Close. errors.Is(err, fs.ErrClosed) holds for it
// too.
var ErrClosed = fmt.Errorf("vfio: %w", fs.ErrClosed)

// FdError is a descriptor a constructor refused because it is not of the
// kind it adopts. The descriptor was not taken: it is still the caller's.
type FdError struct {
	// Kind is what was expected: "VFIO container", "VFIO group", "VFIO
	// device".
	Kind string
	Fd   int
	Err  error
}

// Error implements error.
func (e *FdError) Error() string {
	return fmt.Sprintf("vfio: fd %d is not a %s: %v", e.Fd, e.Kind, e.Err)
}

// Unwrap returns the reason, the kernel's errno where it gave one.
func (e *FdError) Unwrap() error { return e.Err }

// newFD wraps a descriptor the package owns; its calls answer ErrClosed
// after Close.
func newFD(fd int, name string) *fdio.FD { return fdio.New(fd, name, ErrClosed) }

// closeFd closes fd once, after the calls in flight: a second call returns
// ErrClosed.
func closeFd(fd *fdio.FD) error {
	if err := fd.Close(); err != nil {
		if err == ErrClosed {
			return err
		}
		return fmt.Errorf("vfio: close: %w", err)
	}
	return nil
}

// NewContainer returns a Container for fd, an open /dev/vfio/vfio (or an
// iommufd in VFIO compatibility mode), and takes ownership of fd: Close
// closes it. The kind is checked with VFIO_GET_API_VERSION, which must
// answer APIVersion; otherwise it fails with an *FdError and fd stays the
// caller's.
func NewContainer(fd int) (*Container, error) {
	d, err := fdio.Own(fd, ContainerPath, ErrClosed, func(view *fdio.FD) error {
		r, err := ioctlVal(view, ioctlGetAPIVersion, 0)
		if err != nil {
			return fmt.Errorf("VFIO_GET_API_VERSION: %w", err)
		}
		if r != APIVersion {
			return fmt.Errorf("VFIO_GET_API_VERSION answers %d, not %d", r, APIVersion)
		}
		return nil
	})
	if err != nil {
		return nil, &FdError{Kind: "VFIO container", Fd: fd, Err: err}
	}
	return &Container{fd: d}, nil
}

// ContainerFromFile returns a Container for a duplicate of f's descriptor.
// f remains the caller's: closing the Container does not close f, nor the
// reverse; the kernel keeps the container until both are closed.
func ContainerFromFile(f *os.File) (*Container, error) {
	return fdio.Adopt(f, NewContainer)
}

// NewGroup returns a Group for fd, an open /dev/vfio/<id>, and takes
// ownership of fd: Close closes it. The kind is checked with
// VFIO_GROUP_GET_STATUS; a wrong kind gives an *FdError and fd stays the
// caller's.
func NewGroup(fd, id int) (*Group, error) {
	d, err := fdio.Own(fd, fmt.Sprintf("/dev/vfio/%d", id), ErrClosed, func(view *fdio.FD) error {
		_, err := (&Group{fd: view, id: id}).GetStatus()
		return err
	})
	if err != nil {
		return nil, &FdError{Kind: "VFIO group", Fd: fd, Err: err}
	}
	return &Group{fd: d, id: id}, nil
}

// GroupFromFile returns a Group for a duplicate of f's descriptor. f
// remains the caller's.
func GroupFromFile(f *os.File, id int) (*Group, error) {
	return fdio.Adopt(f, func(fd int) (*Group, error) { return NewGroup(fd, id) })
}

// NewDevice returns a Device for fd, a VFIO device fd (from
// VFIO_GROUP_GET_DEVICE_FD or an opened cdev) that name identifies in
// errors, and takes ownership of fd: Close closes it. The kind is checked
// with VFIO_DEVICE_GET_INFO, which a cdev answers even before it is bound
// to an iommufd; a wrong kind gives an *FdError and fd stays the caller's.
func NewDevice(fd int, name string) (*Device, error) {
	d, err := fdio.Own(fd, name, ErrClosed, func(view *fdio.FD) error {
		_, err := (&Device{fd: view, name: name}).GetInfo()
		return err
	})
	if err != nil {
		return nil, &FdError{Kind: "VFIO device", Fd: fd, Err: err}
	}
	return &Device{fd: d, name: name}, nil
}

// DeviceFromFile returns a Device for a duplicate of f's descriptor. f
// remains the caller's; a cdev stays bound to its iommufd until both are
// closed.
func DeviceFromFile(f *os.File, name string) (*Device, error) {
	return fdio.Adopt(f, func(fd int) (*Device, error) { return NewDevice(fd, name) })
}
