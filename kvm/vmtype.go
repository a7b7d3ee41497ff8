//go:build linux

package kvm

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// VMTypes returns the VM types KVM_CREATE_VM accepts on this host: bit n set
// means type n (KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) on the system fd).
// Kernels without the capability answer 0; only [VMTypeDefault] is then
// known to work, and VMTypes reports it alone.
func (s *System) VMTypes() (uint64, error) {
	have, err := s.CheckExtension(CapVMTypes)
	if err != nil {
		return 0, err
	}
	if have == 0 {
		return 1 << VMTypeDefault, nil
	}
	return uint64(have), nil
}

// SupportsVMType reports whether KVM_CREATE_VM(vmType) can succeed here, by
// [System.VMTypes].
func (s *System) SupportsVMType(vmType uint64) (bool, error) {
	if vmType >= 64 {
		return false, nil
	}
	types, err := s.VMTypes()
	if err != nil {
		return false, err
	}
	return types&(1<<vmType) != 0, nil
}

// checkVMType refuses, without the ioctl, a type the host does not offer.
func (s *System) checkVMType(vmType uint64) error {
	if vmType == VMTypeDefault {
		return nil
	}
	types, err := s.VMTypes()
	if err != nil {
		return err
	}
	if vmType >= 64 || types&(1<<vmType) == 0 {
		want := uint64(0)
		if vmType < 64 {
			want = 1 << vmType
		}
		return &UnsupportedError{Op: fmt.Sprintf("KVM_CREATE_VM(%d)", vmType), Cap: CapVMTypes,
			Have: types, Want: want, Errno: unix.EINVAL}
	}
	return nil
}

// VMTypeUnknown is the Type of a VM adopted with System.NewVM or
// VMFromFile: the kernel does not tell a VM fd's type, so capabilities
// (VM.CheckExtension) are what an adopted VM is judged by.
const VMTypeUnknown = ^uint64(0)

// Type returns the type the VM was created with by CreateVM, or
// VMTypeUnknown for an adopted VM.
func (vm *VM) Type() uint64 { return vm.vmType }

// EnableExitHypercall makes the hypercalls in nrs (a bitmask of hypercall
// numbers, such as 1 << [HCMapGPARange]) exit to userspace as
// KVM_EXIT_HYPERCALL (KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)). It probes
// the capability first: bits this VM does not offer give an
// *UnsupportedError matching unix.EINVAL without the ioctl. The VMM answers
// each exit by writing the hypercall's return value ([SetHypercallRet])
// before the next KVM_RUN.
func (vm *VM) EnableExitHypercall(nrs uint64) error {
	have, err := vm.CheckExtension(CapExitHypercall)
	if err != nil {
		return err
	}
	if nrs == 0 || nrs&^uint64(have) != 0 {
		return &UnsupportedError{Op: "KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)", Cap: CapExitHypercall,
			Have: uint64(have), Want: nrs, Errno: unix.EINVAL}
	}
	return vm.EnableCap(EnableCap{Cap: CapExitHypercall, Args: [4]uint64{nrs}})
}
