// Package guestmem is the guest RAM of a confidential VM on KVM: RAM blocks
// placed in a guest physical address (GPA) map with MMIO holes between them,
// their backing files, a checked accessor for host code, and the conversion
// executor that turns a guest's request ("make this GPA range private" or
// "shared") into an all-or-nothing transaction across blocks.
//
// # Backings
//
// A block's memory is a [Backing]. Without one in [BlockConfig.Backing],
// guestmem creates one for [Config.Mode]:
//
//   - InPlace: one guest_memfd created with GUEST_MEMFD_FLAG_MMAP and
//     GUEST_MEMFD_FLAG_INIT_SHARED. Its mmap is both the memslot's
//     userspace_addr and the host's view; shared and private are states of
//     the same page, so a conversion frees nothing.
//   - Split (the zero Mode): a guest_memfd holds the private side and a
//     memfd the shared side, as QEMU does for SEV-SNP and TDX today. A
//     conversion frees the side the range no longer uses with
//     fallocate(PUNCH_HOLE|KEEP_SIZE): the memfd pages of a range made
//     private, the guest_memfd pages of a range made shared.
//
// With a VM that is a [MemslotBinder] that is a [KVMBacking]; without a VM
// a [MemfdBacking] (memfds only). A [ModelBacking] has no memory at all,
// for replaying the conversions of guests of any size.
//
// On a VM that has no private memory (the default x86 VM type, the only one
// a shadow-paging host offers) KVM serves every guest access from the
// memslot's userspace_addr in split mode, so the memslot points at the shared
// memfd mapping and the guest_memfd only stands for the private side. Guest
// accesses to a "private" page then reach the memfd page too; a real
// confidential VM would see a fresh page there.
//
// # Embedding
//
// A VMM uses guestmem in one of three ways:
//
//  1. guestmem provisions everything: Config.VM is a *kvm.VM, blocks have
//     no Backing. guestmem creates the guest_memfd files, memfds and
//     mappings and binds the memslots; Close deletes and closes them. The
//     VMM closes the VM after Close.
//  2. The VMM brings backings and guestmem binds memslots: each
//     BlockConfig.Backing is the VMM's (a GuestMemfdBacking for the
//     memslot). guestmem binds and deletes the memslots and never closes a
//     backing; the VMM closes its backings and the VM after Close.
//  3. The VMM owns its memslots and guestmem only converts: set
//     Config.ExternalMemslots, or pass a VM that is no MemslotBinder (any
//     type with the two methods of [VM]). guestmem sets attributes, punches
//     through the backings and keeps the IOMMU mappings; it creates and
//     closes nothing.
//
// A VMM's fds enter through the adopting constructors of kvm, vfio and
// iommufd (NewX takes ownership of an fd, XFromFile duplicates an
// *os.File), and its own IOMMU stack through iommu.Space.
//
// # Lifecycle
//
// Every method of Memory, Attachment and Block is safe for concurrent use,
// Close included. Close waits for the calls in flight, detaches the live
// attachments and closes what guestmem created; a block whose attachment
// cannot be detached stays mapped, since a device may still reach it. After
// Close every method with an error result returns an error matching
// [ErrClosed] (and fs.ErrClosed); nothing panics.
//
// # Errors
//
//	question               test with                  examples
//	what kind of failure   errors.Is(err, sentinel)   ErrInvalid, ErrNotRAM, ErrUnplugged, ErrPrivate,
//	                                                  ErrNoRAM, ErrNoHostMemory, ErrAddress, ErrLayout,
//	                                                  ErrOptions, ErrIOMMUPage, ErrTooLarge,
//	                                                  ErrNoAttributeFile, ErrClosed;
//	                                                  span.ErrAlign etc.; unix.ENOSPC etc.
//	the details            errors.As(err, &ptr)       *ConvertError, *AccessError, *PlugError,
//	                                                  *Violation, *PinnedError, *pagemap.SizeError,
//	                                                  *kvm.UnsupportedError
//	what to tell the guest HypercallRet(err)          0, EAGAIN, EINVAL
//	retry or not           Transient(err)             ENOSPC, ENOMEM, EBUSY, EAGAIN, EINTR
//
// Messages say whether a number is a GPA or an offset into a block. No
// argument makes a call panic: nil and zero arguments (a nil pointer in an
// interface among them) answer an error matching a sentinel, or nil where
// zero is valid, such as an empty read.
//
// # Enforcement
//
// Where the VM accepts KVM_MEMORY_ATTRIBUTE_PRIVATE (KVM_CAP_MEMORY_ATTRIBUTES
// on the VM fd), the executor sets KVM's attributes with
// KVM_SET_MEMORY_ATTRIBUTES ([EnforceKVM]). In place, where the kernel keeps
// attributes per guest_memfd (kvm.CapGuestMemfdMemoryAttributes reports
// PRIVATE: Linux 7.4's in-place conversion on a VM with private memory), it
// sets them on each block's guest_memfd with KVM_SET_MEMORY_ATTRIBUTES2
// ([EnforceGuestMemfd], [AttributeBacking]). The kernel then refuses to make
// a page private while anything pins it; gmem's own device mappings are gone
// by then (the listeners unmap first), so a refusal is someone else's pin:
// the conversion is undone, the guest gets EAGAIN and the error is a
// [PinnedError] naming the GPA. Otherwise the attributes are kept
// in user space only ([EnforceUserSpace]): the host accessor and the IOMMU
// mappings follow them, but nothing stops the guest itself from touching a
// page it calls private. [Memory.Enforcement] says which one the host gave.
//
// # Host access
//
// Host code reads and writes guest memory only through [Memory.ReadAt] and
// [Memory.WriteAt], which refuse private and unplugged pages, MMIO holes
// and unbacked addresses, and hold the pages' state steady while they copy. [GuestView]
// is the guest's own path (what a vCPU reaches); it is for loading the boot
// image and for software vCPUs, not for host code.
//
// # Conversions
//
// [Memory.Convert] validates a request (size 0, overflow, alignment, bounds)
// before touching anything, splits it across blocks, and converts each piece
// with the block's memattr.Attributes, whose backend ([memattr.Backend]) sets
// the attributes and punches the old side. Converting an MMIO hole or an
// unbacked range to shared is accepted and ignored; converting it to private
// is an error, as in QEMU. A request spanning blocks is all or nothing: when
// a later block fails, the blocks already converted are converted back.
// [HypercallRet] maps the outcome to the value a guest's KVM_HC_MAP_GPA_RANGE
// receives.
//
// Devices are attached with [Memory.AttachIOMMU]: one dma.Mapper per block,
// all mapping into one IOMMU space with IOVA = GPA.
//
// # Hot-plug
//
// A block with [BlockConfig.Hotplug] is virtio-mem memory, unplugged at
// first. [Memory.Plug] and [Memory.Unplug] are the executor's calls for the
// device's requests: plugged memory starts private, an unplug drops the
// devices' mappings, makes the range private and discards its memory.
// Conversions of unplugged memory are refused (ErrUnplugged).
// [Memory.Walk] yields shared, private and unplugged extents for migration
// and dumps.
package guestmem
