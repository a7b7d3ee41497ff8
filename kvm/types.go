package kvm

// Struct layouts written from the uAPI for x86-64. Go lays out these fields
// exactly as C does (natural alignment, no reordering); layout tests pin every
// size and offset.

// UserspaceMemoryRegion2 is struct kvm_userspace_memory_region2 (160 bytes),
// the argument of KVM_SET_USER_MEMORY_REGION2.
type UserspaceMemoryRegion2 struct {
	// Slot is (address space << 16) | slot id.
	Slot uint32
	// Flags is a combination of MemLogDirtyPages, MemReadonly, MemGuestMemfd.
	Flags uint32
	// GuestPhysAddr is the slot's first guest physical address.
	GuestPhysAddr uint64
	// MemorySize is the slot's length in bytes; 0 deletes the slot.
	MemorySize uint64
	// UserspaceAddr is the host virtual address of the slot's memory. For a
	// slot bound to an mmap-able guest_memfd it must be the mmap of that same
	// guest_memfd: KVM's own accessors (instruction emulation, PV features)
	// still go through it, and anything else makes two copies of the memory.
	UserspaceAddr uint64
	// GuestMemfdOffset is the page-aligned offset into GuestMemfd.
	GuestMemfdOffset uint64
	// GuestMemfd is the guest_memfd file descriptor when Flags has
	// MemGuestMemfd.
	GuestMemfd uint32
	_          uint32     // pad1
	_          [14]uint64 // pad2
}

// createGuestMemfd is struct kvm_create_guest_memfd (64 bytes).
type createGuestMemfd struct {
	Size  uint64
	Flags uint64
	_     [6]uint64 // reserved
}

// MemoryAttributes is struct kvm_memory_attributes (32 bytes), the argument
// of KVM_SET_MEMORY_ATTRIBUTES.
type MemoryAttributes struct {
	// Address is the page-aligned first guest physical address.
	Address uint64
	// Size is the page-aligned length in bytes, not 0.
	Size uint64
	// Attributes is MemoryAttributePrivate or 0 (shared).
	Attributes uint64
	// Flags must be 0.
	Flags uint64
}

// MemoryAttributes2 is struct kvm_memory_attributes2 (128 bytes), the
// argument of KVM_SET_MEMORY_ATTRIBUTES2, which is issued on a guest_memfd
// fd and names a range of that file, not of guest physical memory. The
// first four fields are laid out as in [MemoryAttributes].
type MemoryAttributes2 struct {
	// Offset is the page-aligned first byte of the range in the file (the
	// uAPI's union of address and offset).
	Offset uint64
	// Size is the page-aligned length in bytes, not 0, inside the file.
	Size uint64
	// Attributes is MemoryAttributePrivate or 0 (shared).
	Attributes uint64
	// Flags must be 0.
	Flags uint64
	// ErrorOffset is written by the kernel when it refuses the request
	// with EAGAIN: the offset of the first page still in use. Its value on
	// input is ignored.
	ErrorOffset uint64
	_           [11]uint64 // reserved, must be 0
}

// EnableCap is struct kvm_enable_cap (104 bytes), the argument of
// KVM_ENABLE_CAP.
type EnableCap struct {
	// Cap is the capability to enable.
	Cap Cap
	// Flags must be 0 for every capability gmem enables.
	Flags uint32
	// Args are the capability's arguments.
	Args [4]uint64
	_    [64]uint8 // pad
}

// Regs is struct kvm_regs for x86-64 (144 bytes): KVM_GET_REGS and
// KVM_SET_REGS.
type Regs struct {
	RAX, RBX, RCX, RDX uint64
	RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11   uint64
	R12, R13, R14, R15 uint64
	RIP, RFLAGS        uint64
}

// Segment is struct kvm_segment (24 bytes): a segment register as the CPU
// caches it, descriptor fields unpacked.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	// Type is the descriptor's 4-bit type field.
	Type uint8
	// Present, DPL, DB, S, L, G, AVL are the descriptor bits of the same
	// names; Unusable marks a null or unusable selector.
	Present, DPL, DB, S, L, G, AVL, Unusable uint8
	_                                        uint8 // padding
}

// DTable is struct kvm_dtable (16 bytes): GDTR or IDTR.
type DTable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16 // padding
}

// Sregs is struct kvm_sregs for x86-64 (312 bytes): KVM_GET_SREGS and
// KVM_SET_SREGS.
type Sregs struct {
	CS, DS, ES, FS, GS, SS Segment
	TR, LDT                Segment
	GDT, IDT               DTable
	CR0, CR2, CR3, CR4     uint64
	CR8                    uint64
	EFER                   uint64
	APICBase               uint64
	// InterruptBitmap has one bit per pending external interrupt vector
	// (KVM_NR_INTERRUPTS = 256).
	InterruptBitmap [4]uint64
}
