//go:build linux

package kvm

import "fmt"

// CPUIDEntry2 is struct kvm_cpuid_entry2 (40 bytes): what CPUID answers for
// one function (leaf) and index (subleaf).
type CPUIDEntry2 struct {
	Function, Index, Flags uint32
	EAX, EBX, ECX, EDX     uint32
	_                      [3]uint32
}

// maxCPUIDEntries bounds the entries gmem asks for and sets; KVM keeps at
// most 256 per vCPU (KVM_MAX_CPUID_ENTRIES).
const maxCPUIDEntries = 256

// cpuid2 is struct kvm_cpuid2 (nent, padding) followed by its entries, as
// KVM_GET_SUPPORTED_CPUID and KVM_SET_CPUID2 take it. The ioctl numbers
// encode the 8-byte header only; the kernel reads nent entries after it.
type cpuid2 struct {
	Nent    uint32
	_       uint32
	Entries [maxCPUIDEntries]CPUIDEntry2
}

// GetSupportedCPUID returns the CPUID entries KVM can offer a guest on this
// host (KVM_GET_SUPPORTED_CPUID), the usual starting point for a vCPU's
// KVM_SET_CPUID2.
func (s *System) GetSupportedCPUID() ([]CPUIDEntry2, error) {
	c := &cpuid2{Nent: maxCPUIDEntries}
	if _, err := ioctlPtr(s.fd, kvmGetSupportedCPUID, c); err != nil {
		return nil, ioctlError("KVM_GET_SUPPORTED_CPUID", err)
	}
	if c.Nent > maxCPUIDEntries {
		return nil, fmt.Errorf("kvm: KVM_GET_SUPPORTED_CPUID answered %d entries, more than %d", c.Nent, maxCPUIDEntries)
	}
	return append([]CPUIDEntry2(nil), c.Entries[:c.Nent]...), nil
}

// SetCPUID2 sets what CPUID answers inside the guest (KVM_SET_CPUID2). KVM
// also checks the vCPU's control registers and EFER against it: without
// long mode (0x80000001 EDX bit 29) in the guest's CPUID, KVM_SET_SREGS
// refuses a 64-bit EFER with EINVAL. It must come before the first KVM_RUN.
func (v *VCPU) SetCPUID2(entries []CPUIDEntry2) error {
	if len(entries) > maxCPUIDEntries {
		return fmt.Errorf("kvm: KVM_SET_CPUID2: %d entries, at most %d", len(entries), maxCPUIDEntries)
	}
	c := &cpuid2{Nent: uint32(len(entries))}
	copy(c.Entries[:], entries)
	if _, err := ioctlPtr(v.fd, kvmSetCPUID2, c); err != nil {
		return ioctlError(fmt.Sprintf("KVM_SET_CPUID2(%d entries)", len(entries)), err)
	}
	return nil
}
