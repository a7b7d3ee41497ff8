//go:build linux

package kvm

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

// VM is a KVM virtual machine fd. Its methods are safe for concurrent use,
// Close included; after Close they return ErrClosed.
type VM struct {
	fd           *fdio.FD
	vcpuMmapSize int
	vmType       uint64
}

// Fd returns the file descriptor, or -1 after Close. The number is lent,
// not given: Close and the garbage collector (once the VM is unreachable)
// close it, and it may then name another file. Where Close may race, use
// Control.
func (vm *VM) Fd() int { return vm.fd.Fd() }

// Control runs fn with the descriptor, which stays open until fn returns
// even if Close runs meanwhile (Close waits for fn); after Close it returns
// ErrClosed without running fn. fn must not Close the VM.
func (vm *VM) Control(fn func(fd uintptr)) error { return vm.fd.Control(fn) }

// Close closes the VM fd, after waiting for the calls in flight. The
// kernel keeps the VM alive while vCPUs, guest_memfd files or memslots
// refer to it. A second Close returns ErrClosed.
func (vm *VM) Close() error { return closeFd(vm.fd) }

// CheckExtension asks this VM about a capability (KVM_CHECK_EXTENSION on the
// VM fd). Several answers depend on the VM type, so gmem asks here rather
// than on the system fd.
func (vm *VM) CheckExtension(c Cap) (int, error) {
	return checkExtension(vm.fd, c)
}

// EnableCap enables a VM capability (KVM_ENABLE_CAP). For
// [CapExitHypercall], Args[0] is the set of hypercalls that exit to
// userspace (1 << [HCMapGPARange]) and must be a subset of what
// CheckExtension(CapExitHypercall) answers.
func (vm *VM) EnableCap(c EnableCap) error {
	if _, err := ioctlPtr(vm.fd, kvmEnableCap, &c); err != nil {
		return ioctlError("KVM_ENABLE_CAP("+c.Cap.String()+")", err)
	}
	return nil
}

// CreateGuestMemfd creates a guest_memfd file of size bytes bound to this VM
// (KVM_CREATE_GUEST_MEMFD). size must be a positive multiple of [PageSize];
// the size never changes afterwards. The VM's CapGuestMemfdMemoryAttributes
// is recorded with the file (see [GuestMemfd.SetMemoryAttributes2]). flags
// are checked against
// CheckExtension(CapGuestMemfdFlags) first; bits the VM does not accept give
// an *UnsupportedError matching unix.EINVAL without issuing the ioctl. The
// new fd is made close-on-exec, which the kernel does not do.
func (vm *VM) CreateGuestMemfd(size, flags uint64) (*GuestMemfd, error) {
	if have, err := vm.CheckExtension(CapGuestMemfd); err != nil {
		return nil, err
	} else if have == 0 {
		return nil, &UnsupportedError{Op: "KVM_CREATE_GUEST_MEMFD", Cap: CapGuestMemfd, Want: 1}
	}
	if flags != 0 {
		have, err := vm.CheckExtension(CapGuestMemfdFlags)
		if err != nil {
			return nil, err
		}
		if flags&^uint64(have) != 0 {
			return nil, &UnsupportedError{Op: "KVM_CREATE_GUEST_MEMFD", Cap: CapGuestMemfdFlags,
				Have: uint64(have), Want: flags, Errno: unix.EINVAL}
		}
	}
	attrs, err := vm.CheckExtension(CapGuestMemfdMemoryAttributes)
	if err != nil {
		return nil, err
	}
	fd, err := vm.createGuestMemfd(size, flags)
	if err != nil {
		return nil, err
	}
	g := &GuestMemfd{fd: newFD(fd, "guest_memfd"), size: size, flags: flags, attrs: GuestMemfdAttributes(attrs), attrsKnown: true}
	if err := g.fd.Do(func(fd int) error {
		_, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC)
		return err
	}); err != nil {
		g.fd.Close()
		return nil, fmt.Errorf("kvm: guest_memfd: set FD_CLOEXEC: %w", err)
	}
	return g, nil
}

// createGuestMemfd issues KVM_CREATE_GUEST_MEMFD without checking flags.
func (vm *VM) createGuestMemfd(size, flags uint64) (int, error) {
	arg := createGuestMemfd{Size: size, Flags: flags}
	r, err := ioctlPtr(vm.fd, kvmCreateGuestMemfd, &arg)
	if err != nil {
		return -1, ioctlError(fmt.Sprintf("KVM_CREATE_GUEST_MEMFD(size %#x, flags %#x)", size, flags), err)
	}
	return int(r), nil
}

// SetUserMemoryRegion2 creates, changes or (MemorySize 0) deletes a memslot
// (KVM_SET_USER_MEMORY_REGION2). Slots bound to a guest_memfd cannot be
// changed, only deleted and created again, and refuse MemLogDirtyPages and
// MemReadonly.
func (vm *VM) SetUserMemoryRegion2(r UserspaceMemoryRegion2) error {
	if _, err := ioctlPtr(vm.fd, kvmSetUserMemoryRegion2, &r); err != nil {
		return ioctlError(fmt.Sprintf("KVM_SET_USER_MEMORY_REGION2(slot %d, gpa %#x, size %#x)",
			r.Slot, r.GuestPhysAddr, r.MemorySize), err)
	}
	return nil
}

// SetMemoryAttributes sets the attributes of a GPA range
// (KVM_SET_MEMORY_ATTRIBUTES). It is issued only when
// CheckExtension(CapMemoryAttributes) on this VM includes
// MemoryAttributePrivate and every requested bit; otherwise it returns an
// *UnsupportedError (errors.Is(err, errors.ErrUnsupported)). Default VMs
// never have private memory, and kernels built without per-VM attributes
// answer the ioctl itself with ENOTTY.
func (vm *VM) SetMemoryAttributes(a MemoryAttributes) error {
	have, err := vm.CheckExtension(CapMemoryAttributes)
	if err != nil {
		return err
	}
	if uint64(have)&MemoryAttributePrivate == 0 {
		return &UnsupportedError{Op: "KVM_SET_MEMORY_ATTRIBUTES", Cap: CapMemoryAttributes,
			Have: uint64(have), Want: MemoryAttributePrivate}
	}
	if a.Attributes&^uint64(have) != 0 {
		return &UnsupportedError{Op: "KVM_SET_MEMORY_ATTRIBUTES", Cap: CapMemoryAttributes,
			Have: uint64(have), Want: a.Attributes, Errno: unix.EINVAL}
	}
	return vm.setMemoryAttributes(a)
}

// setMemoryAttributes issues KVM_SET_MEMORY_ATTRIBUTES without probing.
func (vm *VM) setMemoryAttributes(a MemoryAttributes) error {
	if _, err := ioctlPtr(vm.fd, kvmSetMemoryAttributes, &a); err != nil {
		return ioctlError(fmt.Sprintf("KVM_SET_MEMORY_ATTRIBUTES(gpa %#x, size %#x, attrs %#x)",
			a.Address, a.Size, a.Attributes), err)
	}
	return nil
}

// CreateVCPU creates vCPU id (KVM_CREATE_VCPU) and maps its kvm_run page.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	r, err := ioctl(vm.fd, kvmCreateVCPU, uintptr(id))
	if err != nil {
		return nil, ioctlError(fmt.Sprintf("KVM_CREATE_VCPU(%d)", id), err)
	}
	fd := newFD(int(r), "kvm-vcpu")
	run, err := fdio.Call(fd, func(fd int) ([]byte, error) {
		return unix.Mmap(fd, 0, vm.vcpuMmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	})
	if err != nil {
		fd.Close()
		return nil, fmt.Errorf("kvm: mmap kvm_run of vCPU %d: %w", id, err)
	}
	return &VCPU{fd: fd, id: id, run: run}, nil
}

// Capabilities is what a VM answers to the KVM_CHECK_EXTENSION queries gmem
// makes, gathered by [VM.ProbeCapabilities].
type Capabilities struct {
	// UserMemory2 is KVM_CAP_USER_MEMORY2 != 0.
	UserMemory2 bool
	// MemoryFaultInfo is KVM_CAP_MEMORY_FAULT_INFO != 0.
	MemoryFaultInfo bool
	// GuestMemfd is KVM_CAP_GUEST_MEMFD != 0.
	GuestMemfd bool
	// GuestMemfdFlags is the KVM_CREATE_GUEST_MEMFD flags this VM accepts.
	GuestMemfdFlags uint64
	// MemoryAttributes is the KVM_SET_MEMORY_ATTRIBUTES bits this VM accepts.
	MemoryAttributes uint64
	// GuestMemfdMemoryAttributes is the KVM_SET_MEMORY_ATTRIBUTES2 bits this
	// VM's guest_memfd files accept (read by GuestMemfdAttributes).
	GuestMemfdMemoryAttributes uint64
	// ExitHypercall is the set of hypercalls that may exit to userspace.
	ExitHypercall uint64
	// VMTypes has bit n set when VM type n can be created.
	VMTypes uint64
	// PreFaultMemory is KVM_CAP_PRE_FAULT_MEMORY != 0.
	PreFaultMemory bool
}

// ProbeCapabilities asks this VM every capability in [Capabilities].
func (vm *VM) ProbeCapabilities() (Capabilities, error) {
	var c Capabilities
	for _, q := range []struct {
		cap Cap
		set func(int)
	}{
		{CapUserMemory2, func(v int) { c.UserMemory2 = v != 0 }},
		{CapMemoryFaultInfo, func(v int) { c.MemoryFaultInfo = v != 0 }},
		{CapGuestMemfd, func(v int) { c.GuestMemfd = v != 0 }},
		{CapGuestMemfdFlags, func(v int) { c.GuestMemfdFlags = uint64(v) }},
		{CapMemoryAttributes, func(v int) { c.MemoryAttributes = uint64(v) }},
		{CapGuestMemfdMemoryAttributes, func(v int) { c.GuestMemfdMemoryAttributes = GuestMemfdAttributes(v) }},
		{CapExitHypercall, func(v int) { c.ExitHypercall = uint64(v) }},
		{CapVMTypes, func(v int) { c.VMTypes = uint64(v) }},
		{CapPreFaultMemory, func(v int) { c.PreFaultMemory = v != 0 }},
	} {
		v, err := vm.CheckExtension(q.cap)
		if err != nil {
			return Capabilities{}, err
		}
		q.set(v)
	}
	return c, nil
}
