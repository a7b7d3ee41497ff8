package vfio

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

// GroupStatus is the answer of VFIO_GROUP_GET_STATUS.
type GroupStatus struct {
	// Flags are GroupViable and GroupContainerSet.
	Flags uint32
}

// Viable reports whether every device of the group is bound to a VFIO
// driver (or to none), so the group may be used.
func (s GroupStatus) Viable() bool { return s.Flags&GroupViable != 0 }

// ContainerSet reports whether the group is set to a container.
func (s GroupStatus) ContainerSet() bool { return s.Flags&GroupContainerSet != 0 }

// Group is an open VFIO group (/dev/vfio/N): the unit of isolation the IOMMU
// provides, and the way into a container. Its methods are safe for
// concurrent use, Close included; after Close they return ErrClosed.
type Group struct {
	fd *fdio.FD
	id int
}

// OpenGroup opens /dev/vfio/<id>.
func OpenGroup(id int) (*Group, error) {
	path := fmt.Sprintf("/dev/vfio/%d", id)
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return &Group{fd: newFD(fd, path), id: id}, nil
}

// Fd returns the group's file descriptor, or -1 after Close. The number is
// lent, not given: Close and the garbage collector (once the Group is
// unreachable) close it, and it may then name another file. Where Close
// may race, use Control.
func (g *Group) Fd() int { return g.fd.Fd() }

// Control runs fn with the descriptor, which stays open until fn returns
// even if Close runs meanwhile (Close waits for fn); after Close it returns
// ErrClosed without running fn. fn must not Close the Group.
func (g *Group) Control(fn func(fd uintptr)) error { return g.fd.Control(fn) }

// ID returns the IOMMU group number.
func (g *Group) ID() int { return g.id }

// Close closes the group, after waiting for the calls in flight. Device
// file descriptors obtained from it keep it in use until they are closed
// too. A second Close returns ErrClosed.
func (g *Group) Close() error { return closeFd(g.fd) }

// GetStatus returns the group's status (VFIO_GROUP_GET_STATUS).
func (g *Group) GetStatus() (GroupStatus, error) {
	s := groupStatus{Argsz: sizeofGroupStatus}
	if _, err := ioctlPtr(g.fd, ioctlGroupGetStatus, &s); err != nil {
		return GroupStatus{}, fmt.Errorf("VFIO_GROUP_GET_STATUS group %d: %w", g.id, err)
	}
	return GroupStatus{Flags: s.Flags}, nil
}

// SetContainer adds the group to c (VFIO_GROUP_SET_CONTAINER). c's
// descriptor is held open for the call, so a racing c.Close cannot make
// the kernel look up a recycled number.
func (g *Group) SetContainer(c *Container) error {
	var err error
	if cerr := c.fd.Control(func(cfd uintptr) {
		fd := int32(cfd)
		_, err = ioctlPtr(g.fd, ioctlGroupSetContainer, &fd)
	}); cerr != nil {
		return fmt.Errorf("VFIO_GROUP_SET_CONTAINER: container: %w", cerr)
	}
	if err != nil {
		return fmt.Errorf("VFIO_GROUP_SET_CONTAINER group %d: %w", g.id, err)
	}
	return nil
}

// UnsetContainer removes the group from its container
// (VFIO_GROUP_UNSET_CONTAINER). The device file descriptors must be closed
// first (EBUSY otherwise).
func (g *Group) UnsetContainer() error {
	if _, err := ioctlVal(g.fd, ioctlGroupUnsetContainer, 0); err != nil {
		return fmt.Errorf("VFIO_GROUP_UNSET_CONTAINER group %d: %w", g.id, err)
	}
	return nil
}

// GetDeviceFD opens the device named name (a PCI address such as
// "0000:00:03.0") in the group (VFIO_GROUP_GET_DEVICE_FD). The group must be
// set to a container whose IOMMU is set.
func (g *Group) GetDeviceFD(name string) (*Device, error) {
	r, err := ioctlString(g.fd, ioctlGroupGetDeviceFD, name)
	if err != nil {
		return nil, fmt.Errorf("VFIO_GROUP_GET_DEVICE_FD %q: %w", name, err)
	}
	fd := int(r)
	// Whatever flags the kernel gave the new fd, no exec may inherit the
	// device. Nothing else has the number yet.
	unix.CloseOnExec(fd)
	return &Device{fd: newFD(fd, name), name: name}, nil
}
