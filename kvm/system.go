//go:build linux

package kvm

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// System is an open /dev/kvm. Its methods may be called concurrently; Close
// must not race with them.
type System struct {
	fd int
}

// Open opens [DevicePath].
func Open() (*System, error) { return OpenPath(DevicePath) }

// OpenPath opens the KVM device at path, close-on-exec.
func OpenPath(path string) (*System, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("kvm: open %s: %w", path, err)
	}
	return &System{fd: fd}, nil
}

// Fd returns the file descriptor, or -1 after Close.
func (s *System) Fd() int { return s.fd }

// Close closes the device. VMs created from it stay usable.
func (s *System) Close() error { return closeFd(&s.fd) }

// GetAPIVersion returns the KVM API version (KVM_GET_API_VERSION); every
// kernel since 2.6.22 answers [APIVersion].
func (s *System) GetAPIVersion() (int, error) {
	if s.fd < 0 {
		return 0, ErrClosed
	}
	r, err := ioctl(s.fd, kvmGetAPIVersion, 0)
	if err != nil {
		return 0, ioctlError("KVM_GET_API_VERSION", err)
	}
	return int(r), nil
}

// CheckExtension asks the system fd about a capability
// (KVM_CHECK_EXTENSION). The answer is KVM-wide; ask the VM fd
// ([VM.CheckExtension]) for what a particular VM supports.
func (s *System) CheckExtension(c Cap) (int, error) {
	return checkExtension(s.fd, c)
}

// GetVCPUMmapSize returns the size of a vCPU's kvm_run mapping
// (KVM_GET_VCPU_MMAP_SIZE), including the PIO data page that follows the
// kvm_run structure.
func (s *System) GetVCPUMmapSize() (int, error) {
	if s.fd < 0 {
		return 0, ErrClosed
	}
	r, err := ioctl(s.fd, kvmGetVCPUMmapSize, 0)
	if err != nil {
		return 0, ioctlError("KVM_GET_VCPU_MMAP_SIZE", err)
	}
	return int(r), nil
}

// CreateVM creates a VM of the given type (KVM_CREATE_VM), such as
// [VMTypeDefault] or [VMTypeSWProtected]. A type other than the default is
// first looked up in [System.VMTypes]; one the host does not offer gives an
// *UnsupportedError matching unix.EINVAL without the ioctl. The kernel may
// answer EINTR when a signal arrives while it sets the VM up; the call is
// then repeated.
func (s *System) CreateVM(vmType uint64) (*VM, error) {
	if s.fd < 0 {
		return nil, ErrClosed
	}
	if err := s.checkVMType(vmType); err != nil {
		return nil, err
	}
	mmapSize, err := s.GetVCPUMmapSize()
	if err != nil {
		return nil, err
	}
	if mmapSize < runSize {
		return nil, fmt.Errorf("kvm: KVM_GET_VCPU_MMAP_SIZE %d is smaller than kvm_run (%d)", mmapSize, runSize)
	}
	for {
		r, err := ioctl(s.fd, kvmCreateVM, uintptr(vmType))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, ioctlError(fmt.Sprintf("KVM_CREATE_VM(%d)", vmType), err)
		}
		return &VM{fd: int(r), vcpuMmapSize: mmapSize, vmType: vmType}, nil
	}
}

// checkExtension is KVM_CHECK_EXTENSION on either kind of fd.
func checkExtension(fd int, c Cap) (int, error) {
	if fd < 0 {
		return 0, ErrClosed
	}
	r, err := ioctl(fd, kvmCheckExtension, uintptr(c))
	if err != nil {
		return 0, ioctlError("KVM_CHECK_EXTENSION("+c.String()+")", err)
	}
	return int(r), nil
}

// closeFd closes *fd once and marks it closed.
func closeFd(fd *int) error {
	if *fd < 0 {
		return ErrClosed
	}
	err := unix.Close(*fd)
	*fd = -1
	if err != nil {
		return fmt.Errorf("kvm: close: %w", err)
	}
	return nil
}
