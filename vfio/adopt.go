package vfio

import (
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

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

// closeFd closes *fd once and marks it closed.
func closeFd(fd *int) error {
	if *fd < 0 {
		return ErrClosed
	}
	err := unix.Close(*fd)
	*fd = -1
	if err != nil {
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
	r, err := ioctlVal(fd, ioctlGetAPIVersion, 0)
	if err != nil {
		return nil, &FdError{Kind: "VFIO container", Fd: fd, Err: fmt.Errorf("VFIO_GET_API_VERSION: %w", err)}
	}
	if r != APIVersion {
		return nil, &FdError{Kind: "VFIO container", Fd: fd, Err: fmt.Errorf("VFIO_GET_API_VERSION answers %d, not %d", r, APIVersion)}
	}
	return &Container{fd: fd}, nil
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
	g := &Group{fd: fd, id: id}
	if _, err := g.GetStatus(); err != nil {
		return nil, &FdError{Kind: "VFIO group", Fd: fd, Err: err}
	}
	return g, nil
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
	d := &Device{fd: fd, name: name}
	if _, err := d.GetInfo(); err != nil {
		return nil, &FdError{Kind: "VFIO device", Fd: fd, Err: err}
	}
	return d, nil
}

// DeviceFromFile returns a Device for a duplicate of f's descriptor. f
// remains the caller's; a cdev stays bound to its iommufd until both are
// closed.
func DeviceFromFile(f *os.File, name string) (*Device, error) {
	return fdio.Adopt(f, func(fd int) (*Device, error) { return NewDevice(fd, name) })
}
