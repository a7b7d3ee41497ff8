package kvm

import "testing"

// TestUAPINumbers checks the hand-written uAPI numbers the private-memory
// path uses against reference/kernel-uapi.md.
func TestUAPINumbers(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"KVM_CAP_EXIT_HYPERCALL", uint64(CapExitHypercall), 201},
		{"KVM_CAP_USER_MEMORY2", uint64(CapUserMemory2), 231},
		{"KVM_CAP_MEMORY_FAULT_INFO", uint64(CapMemoryFaultInfo), 232},
		{"KVM_CAP_MEMORY_ATTRIBUTES", uint64(CapMemoryAttributes), 233},
		{"KVM_CAP_GUEST_MEMFD", uint64(CapGuestMemfd), 234},
		{"KVM_CAP_VM_TYPES", uint64(CapVMTypes), 235},
		{"KVM_CAP_GUEST_MEMFD_FLAGS", uint64(CapGuestMemfdFlags), 244},
		// Provisional: the number of the in-place series as applied for 7.4.
		{"KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES", uint64(CapGuestMemfdMemoryAttributes), 252},
		{"GUEST_MEMFD_FLAG_MMAP", GuestMemfdFlagMmap, 1 << 0},
		{"GUEST_MEMFD_FLAG_INIT_SHARED", GuestMemfdFlagInitShared, 1 << 1},
		{"KVM_X86_DEFAULT_VM", VMTypeDefault, 0},
		{"KVM_X86_SW_PROTECTED_VM", VMTypeSWProtected, 1},
		{"KVM_MEM_GUEST_MEMFD", MemGuestMemfd, 1 << 2},
		{"KVM_MEMORY_ATTRIBUTE_PRIVATE", MemoryAttributePrivate, 1 << 3},
		{"KVM_HC_MAP_GPA_RANGE", HCMapGPARange, 12},
		{"KVM_MAP_GPA_RANGE_ENCRYPTED", MapGPARangeEncrypted, 1 << 4},
		{"KVM_EXIT_HYPERCALL", uint64(ExitHypercall), 3},
		{"KVM_EXIT_MEMORY_FAULT", uint64(ExitMemoryFault), 39},
		{"KVM_MEMORY_EXIT_FLAG_PRIVATE", MemoryExitFlagPrivate, 1 << 3},
		{"KVM_EINVAL", HypercallRetEINVAL, 22},
		{"KVM_EAGAIN", HypercallRetEAGAIN, 11},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
}
