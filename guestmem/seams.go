//go:build linux

package guestmem

import (
	"github.com/gmemproject/gmem/kvm"
)

// VM is what guestmem needs from the kernel for one VM: its capabilities
// (KVM_CHECK_EXTENSION on the VM fd, to learn whether it has private
// memory) and the attributes of GPA ranges (KVM_SET_MEMORY_ATTRIBUTES).
// *kvm.VM implements it; a VMM with its own KVM package adapts with two
// methods. SetMemoryAttributes is called only when CheckExtension
// (kvm.CapMemoryAttributes) includes kvm.MemoryAttributePrivate.
// Implementations must be safe for concurrent use.
type VM interface {
	CheckExtension(kvm.Cap) (int, error)
	SetMemoryAttributes(kvm.MemoryAttributes) error
}

// MemslotBinder is what guestmem needs to provision memory itself: create
// guest_memfd files (KVM_CREATE_GUEST_MEMFD) and bind memslots
// (KVM_SET_USER_MEMORY_REGION2). *kvm.VM implements it. It is used only
// when Config.VM implements it too: for a block without a Backing (gmem
// creates a KVMBacking) and for binding the memslot of a block whose
// backing is a GuestMemfdBacking, unless Config.ExternalMemslots is set.
type MemslotBinder interface {
	CreateGuestMemfd(size, flags uint64) (*kvm.GuestMemfd, error)
	SetUserMemoryRegion2(kvm.UserspaceMemoryRegion2) error
}

var (
	_ VM            = (*kvm.VM)(nil)
	_ MemslotBinder = (*kvm.VM)(nil)
)

// Side is one half of a block's memory: what shared pages live in, or what
// private pages live in. An in-place backing has one file for both.
type Side uint8

const (
	// SharedSide is the memory of shared pages: the host view, what devices
	// reach.
	SharedSide Side = iota + 1
	// PrivateSide is the memory of private pages (guest_memfd).
	PrivateSide
)

// String returns "shared" or "private".
func (s Side) String() string {
	switch s {
	case SharedSide:
		return "shared"
	case PrivateSide:
		return "private"
	}
	return "side(?)"
}

// Backing is the memory behind one RAM block: gmem's own ([KVMBacking],
// [MemfdBacking], [ModelBacking]) or a VMM's. guestmem never closes a
// Backing it was given in BlockConfig.Backing; it closes only the backings
// it creates. backingtest.Run checks an implementation against this
// contract.
type Backing interface {
	// Size is the block's length in bytes, a positive multiple of
	// PageSize. It never changes.
	Size() uint64
	// InPlace reports whether shared and private are states of the same
	// page (one mmap-able guest_memfd); it selects the order of a
	// conversion's steps and must agree with Config.Mode.
	InPlace() bool
	// Host is the host mapping of the shared side, Size bytes: what
	// devices DMA to and ReadAt copies from. It must be mmap'ed memory
	// (never the Go heap: an IOMMU pins it), must stay mapped and
	// unchanged while the Memory is open, and is nil for a backing without
	// host memory (ModelBacking), whose host accessors then answer
	// ErrNoHostMemory.
	Host() []byte
	// Discard frees [off, off+n) of side s (block offsets, page aligned)
	// so that the next access reads zeros (fallocate
	// PUNCH_HOLE|KEEP_SIZE). guestmem calls it only after every device has
	// let go of the range. In place, both sides name the one file.
	Discard(s Side, off, n uint64) error
}

// GuestMemfdBacking is a Backing whose private side (in place: whole
// memory) is a guest_memfd range: what a memslot's guest_memfd and
// guest_memfd_offset take. guestmem binds a memslot for such a block when
// Config.VM is a MemslotBinder and Config.ExternalMemslots is false.
type GuestMemfdBacking interface {
	Backing
	GuestMemfd() (fd int, offset uint64)
}

// AttributeFile is a guest_memfd that keeps the attributes of its pages
// (KVM_SET_MEMORY_ATTRIBUTES2 on the file: in-place conversion with private
// memory, Linux 7.4). *kvm.GuestMemfd implements it. Offsets are the
// file's. A conversion to private that the kernel refuses because a page is
// still in use answers a *kvm.PinnedError (EAGAIN, the first such offset).
// Implementations must be safe for concurrent use.
type AttributeFile interface {
	SetMemoryAttributes2(kvm.MemoryAttributes2) error
}

// AttributeBacking is an in-place Backing whose memory is a guest_memfd
// that keeps its own attributes. Where Config.VM answers
// kvm.CapGuestMemfdMemoryAttributes with kvm.MemoryAttributePrivate, every
// in-place block's backing must be one: guestmem converts its pages with
// the file's KVM_SET_MEMORY_ATTRIBUTES2 (EnforceGuestMemfd).
type AttributeBacking interface {
	Backing
	// AttributeFile returns the guest_memfd and the block's offset in it.
	AttributeFile() (AttributeFile, uint64)
}

var _ AttributeFile = (*kvm.GuestMemfd)(nil)
