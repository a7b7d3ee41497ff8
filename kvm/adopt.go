//go:build linux

package kvm

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

// FdError is a descriptor a constructor refused because it is not of the
// kind it adopts. The descriptor was not taken: it is still the caller's.
type FdError struct {
	// Kind is what was expected: "/dev/kvm", "KVM VM", "guest_memfd".
	Kind string
	Fd   int
	Err  error
}

// Error implements error.
func (e *FdError) Error() string {
	return fmt.Sprintf("kvm: fd %d is not a %s: %v", e.Fd, e.Kind, e.Err)
}

// Unwrap returns the reason, the kernel's errno where it gave one.
func (e *FdError) Unwrap() error { return e.Err }

// NewSystem returns a System for fd, an open /dev/kvm, and takes ownership
// of fd: Close closes it. It checks the kind with KVM_GET_API_VERSION, which
// must answer APIVersion; otherwise it fails with an *FdError and fd stays
// the caller's.
func NewSystem(fd int) (*System, error) {
	d, err := fdio.Own(fd, DevicePath, ErrClosed, func(view *fdio.FD) error {
		r, err := ioctl(view, kvmGetAPIVersion, 0)
		if err != nil {
			return ioctlError("KVM_GET_API_VERSION", err)
		}
		if r != APIVersion {
			return fmt.Errorf("KVM_GET_API_VERSION answers %d, not %d", r, APIVersion)
		}
		return nil
	})
	if err != nil {
		return nil, &FdError{Kind: "/dev/kvm", Fd: fd, Err: err}
	}
	return &System{fd: d}, nil
}

// SystemFromFile returns a System for a duplicate of f's descriptor. f
// remains the caller's: closing the System does not close f, nor the
// reverse.
func SystemFromFile(f *os.File) (*System, error) {
	return fdio.Adopt(f, NewSystem)
}

// NewVM returns a VM for fd, a VM fd created from any /dev/kvm (by the VMM,
// another library or a parent process), and takes ownership of fd: Close
// closes it. It is a method of System because a VM's vCPUs need
// KVM_GET_VCPU_MMAP_SIZE. The kind is checked with KVM_CHECK_EXTENSION,
// which a VM fd answers and a vCPU fd or any other file refuses, and
// KVM_GET_API_VERSION, which only the system fd answers; a wrong kind
// gives an *FdError and fd stays the caller's. The kernel does not tell a
// VM fd's type, so the VM's Type is VMTypeUnknown.
func (s *System) NewVM(fd int) (*VM, error) {
	mmapSize, err := s.GetVCPUMmapSize()
	if err != nil {
		return nil, err
	}
	if mmapSize < runSize {
		return nil, fmt.Errorf("kvm: KVM_GET_VCPU_MMAP_SIZE %d is smaller than kvm_run (%d)", mmapSize, runSize)
	}
	d, err := fdio.Own(fd, "kvm-vm", ErrClosed, func(view *fdio.FD) error {
		if _, err := ioctl(view, kvmCheckExtension, uintptr(CapUserMemory2)); err != nil {
			return ioctlError("KVM_CHECK_EXTENSION", err)
		}
		if _, err := ioctl(view, kvmGetAPIVersion, 0); err == nil {
			return errors.New("it answers KVM_GET_API_VERSION: a /dev/kvm fd")
		}
		return nil
	})
	if err != nil {
		return nil, &FdError{Kind: "KVM VM", Fd: fd, Err: err}
	}
	return &VM{fd: d, vcpuMmapSize: mmapSize, vmType: VMTypeUnknown}, nil
}

// VMFromFile returns a VM for a duplicate of f's descriptor, as NewVM. f
// remains the caller's: closing the VM does not close f, nor the reverse;
// the kernel keeps the VM until both are closed.
func (s *System) VMFromFile(f *os.File) (*VM, error) {
	return fdio.Adopt(f, s.NewVM)
}

// NewGuestMemfd returns a GuestMemfd for fd, a guest_memfd created with
// flags (the kernel cannot be asked for them), and takes ownership of fd:
// Close closes it. The size is read back with fstat and must be a positive
// multiple of PageSize; otherwise it fails with an *FdError and fd stays
// the caller's. guest_memfd has no ioctl of its own to check the kind with:
// a descriptor of another kind is refused by the first memslot bound to it
// (EINVAL).
func NewGuestMemfd(fd int, flags uint64) (*GuestMemfd, error) {
	var st unix.Stat_t
	d, err := fdio.Own(fd, "guest_memfd", ErrClosed, func(view *fdio.FD) error {
		if err := view.Do(func(fd int) error { return unix.Fstat(fd, &st) }); err != nil {
			return fmt.Errorf("fstat: %w", err)
		}
		if st.Size <= 0 || st.Size%PageSize != 0 {
			return fmt.Errorf("size %d is not a positive multiple of the page size", st.Size)
		}
		return nil
	})
	if err != nil {
		return nil, &FdError{Kind: "guest_memfd", Fd: fd, Err: err}
	}
	return &GuestMemfd{fd: d, size: uint64(st.Size), flags: flags}, nil
}

// GuestMemfdFromFile returns a GuestMemfd for a duplicate of f's
// descriptor, as NewGuestMemfd. f remains the caller's.
func GuestMemfdFromFile(f *os.File, flags uint64) (*GuestMemfd, error) {
	return fdio.Adopt(f, func(fd int) (*GuestMemfd, error) { return NewGuestMemfd(fd, flags) })
}
