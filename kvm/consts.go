package kvm

import "fmt"

// DevicePath is the KVM system device.
const DevicePath = "/dev/kvm"

// PageSize is the x86-64 base page size: the unit of guest_memfd offsets,
// memslot addresses and KVM_HC_MAP_GPA_RANGE page counts.
const PageSize = 4096

// APIVersion is the only KVM_GET_API_VERSION answer this package works with;
// the value has been frozen since Linux 2.6.22.
const APIVersion = 12

// Cap is a KVM capability number, asked with KVM_CHECK_EXTENSION.
type Cap uint32

// Capabilities gmem probes (include/uapi/linux/kvm.h).
const (
	// CapExitHypercall (KVM_CAP_EXIT_HYPERCALL) answers the bitmask of
	// hypercall numbers that may exit to userspace; enable with
	// [VM.EnableCap] and args[0] a subset of it.
	CapExitHypercall Cap = 201
	// CapUserMemory2 (KVM_CAP_USER_MEMORY2): KVM_SET_USER_MEMORY_REGION2.
	CapUserMemory2 Cap = 231
	// CapMemoryFaultInfo (KVM_CAP_MEMORY_FAULT_INFO): KVM_EXIT_MEMORY_FAULT.
	CapMemoryFaultInfo Cap = 232
	// CapMemoryAttributes (KVM_CAP_MEMORY_ATTRIBUTES) answers the bitmask of
	// memory attributes KVM_SET_MEMORY_ATTRIBUTES accepts on this VM.
	CapMemoryAttributes Cap = 233
	// CapGuestMemfd (KVM_CAP_GUEST_MEMFD): KVM_CREATE_GUEST_MEMFD.
	CapGuestMemfd Cap = 234
	// CapVMTypes (KVM_CAP_VM_TYPES) answers a bitmask of VM types: bit n set
	// means KVM_CREATE_VM(n) is supported.
	CapVMTypes Cap = 235
	// CapPreFaultMemory (KVM_CAP_PRE_FAULT_MEMORY): KVM_PRE_FAULT_MEMORY.
	CapPreFaultMemory Cap = 236
	// CapGuestMemfdFlags (KVM_CAP_GUEST_MEMFD_FLAGS) answers, on a VM fd, the
	// bitmask of KVM_CREATE_GUEST_MEMFD flags that VM accepts. Kernels that
	// only had the boolean KVM_CAP_GUEST_MEMFD_MMAP under this number answered
	// 1, which reads correctly as "MMAP only".
	CapGuestMemfdFlags Cap = 244
	// CapGuestMemfdMemoryAttributes (KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES)
	// answers, on a VM fd, the attributes KVM_SET_MEMORY_ATTRIBUTES2 accepts
	// on that VM's guest_memfd files: MemoryAttributePrivate when the kernel
	// keeps attributes per guest_memfd (in-place conversion, Linux 7.4 with
	// kvm.gmem_in_place_conversion=1 or CONFIG_KVM_VM_MEMORY_ATTRIBUTES=n)
	// and the VM has private memory, else 0.
	//
	// The number is provisional: 252 is the number of the series as applied
	// for Linux 7.4, and every earlier revision of the series used another
	// one (245 to 250). Kernels that do not know a capability answer 0, so an
	// unknown number reads as "absent"; an answer with any bit other than
	// MemoryAttributePrivate is taken to belong to another capability and is
	// treated as absent too (see [GuestMemfdAttributes]).
	CapGuestMemfdMemoryAttributes Cap = 252
)

var capNames = map[Cap]string{
	CapExitHypercall:    "KVM_CAP_EXIT_HYPERCALL",
	CapUserMemory2:      "KVM_CAP_USER_MEMORY2",
	CapMemoryFaultInfo:  "KVM_CAP_MEMORY_FAULT_INFO",
	CapMemoryAttributes: "KVM_CAP_MEMORY_ATTRIBUTES",
	CapGuestMemfd:       "KVM_CAP_GUEST_MEMFD",
	CapVMTypes:          "KVM_CAP_VM_TYPES",
	CapPreFaultMemory:   "KVM_CAP_PRE_FAULT_MEMORY",
	CapGuestMemfdFlags:  "KVM_CAP_GUEST_MEMFD_FLAGS",

	CapGuestMemfdMemoryAttributes: "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES",
}

// String returns the uAPI name of c, or its number.
func (c Cap) String() string {
	if n, ok := capNames[c]; ok {
		return n
	}
	return fmt.Sprintf("KVM_CAP(%d)", uint32(c))
}

// VM types for [System.CreateVM] (arch/x86/include/uapi/asm/kvm.h).
const (
	// VMTypeDefault is KVM_X86_DEFAULT_VM.
	VMTypeDefault = 0
	// VMTypeSWProtected is KVM_X86_SW_PROTECTED_VM: private memory without
	// encryption; offered only with a TDP MMU (see [CapVMTypes]).
	VMTypeSWProtected = 1
)

// Memslot flags for [UserspaceMemoryRegion2].Flags.
const (
	// MemLogDirtyPages is KVM_MEM_LOG_DIRTY_PAGES (refused with MemGuestMemfd).
	MemLogDirtyPages = 1 << 0
	// MemReadonly is KVM_MEM_READONLY (refused with MemGuestMemfd).
	MemReadonly = 1 << 1
	// MemGuestMemfd is KVM_MEM_GUEST_MEMFD: the slot is bound to the
	// guest_memfd in GuestMemfd at GuestMemfdOffset.
	MemGuestMemfd = 1 << 2
)

// Flags for [VM.CreateGuestMemfd].
const (
	// GuestMemfdFlagMmap is GUEST_MEMFD_FLAG_MMAP: the file may be mmapped
	// (MAP_SHARED), and every guest fault in a slot bound to it is served from
	// the file.
	GuestMemfdFlagMmap = 1 << 0
	// GuestMemfdFlagInitShared is GUEST_MEMFD_FLAG_INIT_SHARED: the whole file
	// starts shared, so host faults on the mmap succeed instead of SIGBUS.
	GuestMemfdFlagInitShared = 1 << 1
)

// MemoryAttributePrivate is KVM_MEMORY_ATTRIBUTE_PRIVATE, the only memory
// attribute gmem sets.
const MemoryAttributePrivate = 1 << 3

// Hypercall constants (include/uapi/linux/kvm_para.h and the x86 uAPI).
const (
	// HCMapGPARange is KVM_HC_MAP_GPA_RANGE: the guest asks to convert a
	// range of guest physical pages between private and shared.
	HCMapGPARange = 12
	// ExitHypercallLongMode is KVM_EXIT_HYPERCALL_LONG_MODE, bit 0 of the
	// hypercall exit's flags: the caller was in 64-bit mode.
	ExitHypercallLongMode = 1 << 0

	// MapGPARangePageSize4K .. MapGPARangePageSize1G are the preferred page
	// size values of a KVM_HC_MAP_GPA_RANGE attributes word (bits 3:0).
	MapGPARangePageSize4K = 0
	// MapGPARangePageSize2M is KVM_MAP_GPA_RANGE_PAGE_SZ_2M.
	MapGPARangePageSize2M = 1
	// MapGPARangePageSize1G is KVM_MAP_GPA_RANGE_PAGE_SZ_1G.
	MapGPARangePageSize1G = 2
	// MapGPARangeEncrypted is KVM_MAP_GPA_RANGE_ENCRYPTED (bit 4): convert to
	// private. Clear means KVM_MAP_GPA_RANGE_DECRYPTED: convert to shared.
	MapGPARangeEncrypted = 1 << 4

	// HypercallRetOK is the hypercall result for success.
	HypercallRetOK = 0
	// HypercallRetEINVAL is KVM_EINVAL: the request is malformed or cannot
	// be done. The kernel accepts only 0, EINVAL and EAGAIN for exits it
	// synthesises from TDX and SEV-SNP requests, so gmem uses only those.
	HypercallRetEINVAL = 22
	// HypercallRetEAGAIN asks the guest to retry.
	HypercallRetEAGAIN = 11
	// HypercallRetENOSYS is -KVM_ENOSYS in two's complement, what KVM puts
	// in RAX for a hypercall that is not enabled.
	HypercallRetENOSYS = 1<<64 - 1000
)

// ExitReason is kvm_run.exit_reason.
type ExitReason uint32

// Exit reasons gmem decodes (include/uapi/linux/kvm.h).
const (
	ExitUnknown       ExitReason = 0  // KVM_EXIT_UNKNOWN
	ExitException     ExitReason = 1  // KVM_EXIT_EXCEPTION
	ExitIO            ExitReason = 2  // KVM_EXIT_IO
	ExitHypercall     ExitReason = 3  // KVM_EXIT_HYPERCALL
	ExitDebug         ExitReason = 4  // KVM_EXIT_DEBUG
	ExitHLT           ExitReason = 5  // KVM_EXIT_HLT
	ExitMMIO          ExitReason = 6  // KVM_EXIT_MMIO
	ExitIRQWindowOpen ExitReason = 7  // KVM_EXIT_IRQ_WINDOW_OPEN
	ExitShutdown      ExitReason = 8  // KVM_EXIT_SHUTDOWN
	ExitFailEntry     ExitReason = 9  // KVM_EXIT_FAIL_ENTRY
	ExitIntr          ExitReason = 10 // KVM_EXIT_INTR
	ExitInternalError ExitReason = 17 // KVM_EXIT_INTERNAL_ERROR
	ExitSystemEvent   ExitReason = 24 // KVM_EXIT_SYSTEM_EVENT
	ExitMemoryFault   ExitReason = 39 // KVM_EXIT_MEMORY_FAULT
)

var exitNames = map[ExitReason]string{
	ExitUnknown:       "KVM_EXIT_UNKNOWN",
	ExitException:     "KVM_EXIT_EXCEPTION",
	ExitIO:            "KVM_EXIT_IO",
	ExitHypercall:     "KVM_EXIT_HYPERCALL",
	ExitDebug:         "KVM_EXIT_DEBUG",
	ExitHLT:           "KVM_EXIT_HLT",
	ExitMMIO:          "KVM_EXIT_MMIO",
	ExitIRQWindowOpen: "KVM_EXIT_IRQ_WINDOW_OPEN",
	ExitShutdown:      "KVM_EXIT_SHUTDOWN",
	ExitFailEntry:     "KVM_EXIT_FAIL_ENTRY",
	ExitIntr:          "KVM_EXIT_INTR",
	ExitInternalError: "KVM_EXIT_INTERNAL_ERROR",
	ExitSystemEvent:   "KVM_EXIT_SYSTEM_EVENT",
	ExitMemoryFault:   "KVM_EXIT_MEMORY_FAULT",
}

// String returns the uAPI name of r, or its number.
func (r ExitReason) String() string {
	if n, ok := exitNames[r]; ok {
		return n
	}
	return fmt.Sprintf("KVM_EXIT(%d)", uint32(r))
}

// MemoryExitFlagPrivate is KVM_MEMORY_EXIT_FLAG_PRIVATE: the faulting access
// was a private one.
const MemoryExitFlagPrivate = 1 << 3

// ioctl request numbers, _IOC(dir, 0xAE, nr, size) = dir<<30 | size<<16 |
// 0xAE<<8 | nr with dir none=0, write=1, read=2. Tests recompute each from
// the Go struct size and compare with the reference table.
const (
	kvmGetAPIVersion        = 0xAE00     // _IO(KVMIO, 0x00)
	kvmCreateVM             = 0xAE01     // _IO(KVMIO, 0x01)
	kvmCheckExtension       = 0xAE03     // _IO(KVMIO, 0x03)
	kvmGetVCPUMmapSize      = 0xAE04     // _IO(KVMIO, 0x04)
	kvmGetSupportedCPUID    = 0xC008AE05 // _IOWR(KVMIO, 0x05, struct kvm_cpuid2 header 8)
	kvmSetCPUID2            = 0x4008AE90 // _IOW(KVMIO, 0x90, struct kvm_cpuid2 header 8)
	kvmCreateVCPU           = 0xAE41     // _IO(KVMIO, 0x41)
	kvmSetUserMemoryRegion2 = 0x40A0AE49 // _IOW(KVMIO, 0x49, 160)
	kvmRun                  = 0xAE80     // _IO(KVMIO, 0x80)
	kvmGetRegs              = 0x8090AE81 // _IOR(KVMIO, 0x81, 144)
	kvmSetRegs              = 0x4090AE82 // _IOW(KVMIO, 0x82, 144)
	kvmGetSregs             = 0x8138AE83 // _IOR(KVMIO, 0x83, 312)
	kvmSetSregs             = 0x4138AE84 // _IOW(KVMIO, 0x84, 312)
	kvmEnableCap            = 0x4068AEA3 // _IOW(KVMIO, 0xa3, 104)
	kvmSetMemoryAttributes  = 0x4020AED2 // _IOW(KVMIO, 0xd2, 32)
	kvmSetMemoryAttributes2 = 0xC080AED2 // _IOWR(KVMIO, 0xd2, 128), on a guest_memfd fd
	kvmCreateGuestMemfd     = 0xC040AED4 // _IOWR(KVMIO, 0xd4, 64)
)
