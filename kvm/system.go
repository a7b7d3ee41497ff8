//go:build linux

package kvm

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

// System is an open /dev/kvm. Its methods are safe for concurrent use,
// Close included; after Close they return ErrClosed.
type System struct {
	fd *fdio.FD
}

// newFD wraps a descriptor the package owns; its calls answer ErrClosed
// after Close.
func newFD(fd int, name string) *fdio.FD { return fdio.New(fd, name, ErrClosed) }

// Open opens [DevicePath].
func Open() (*System, error) { return OpenPath(DevicePath) }

// OpenPath opens the KVM device at path, close-on-exec.
func OpenPath(path string) (*System, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("kvm: open %s: %w", path, err)
	}
	return &System{fd: newFD(fd, path)}, nil
}

// Fd returns the file descriptor, or -1 after Close. The number is lent,
// not given: Close and the garbage collector (once the System is
// unreachable) close it, and it may then name another file. Where Close
// may race, use Control.
func (s *System) Fd() int { return s.fd.Fd() }

// Control runs fn with the descriptor, which stays open until fn returns
// even if Close runs meanwhile (Close waits for fn); after Close it returns
// ErrClosed without running fn. fn must not Close the System.
func (s *System) Control(fn func(fd uintptr)) error { return s.fd.Control(fn) }

// Close closes the device, after waiting for the calls in flight. VMs
// created from it stay usable. A second Close returns ErrClosed.
func (s *System) Close() error { return closeFd(s.fd) }

// GetAPIVersion returns the KVM API version (KVM_GET_API_VERSION); every
// kernel since 2.6.22 answers [APIVersion].
func (s *System) GetAPIVersion() (int, error) {
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
		return &VM{fd: newFD(int(r), "kvm-vm"), vcpuMmapSize: mmapSize, vmType: vmType}, nil
	}
}

// checkExtension is KVM_CHECK_EXTENSION on either kind of fd.
func checkExtension(fd *fdio.FD, c Cap) (int, error) {
	r, err := ioctl(fd, kvmCheckExtension, uintptr(c))
	if err != nil {
		return 0, ioctlError("KVM_CHECK_EXTENSION("+c.String()+")", err)
	}
	return int(r), nil
}

// closeFd closes fd once: a second call returns ErrClosed.
func closeFd(fd *fdio.FD) error {
	if err := fd.Close(); err != nil {
		if err == ErrClosed {
			return err
		}
		return fmt.Errorf("kvm: close: %w", err)
	}
	return nil
}
