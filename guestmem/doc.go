// Package guestmem is the guest RAM of a confidential VM on KVM: RAM blocks
// placed in a guest physical address (GPA) map with MMIO holes between them,
// their backing files, a checked accessor for host code, and the conversion
// executor that turns a guest's request ("make this GPA range private" or
// "shared") into an all-or-nothing transaction across blocks.
//
// # Backings
//
// A block is backed in one of two ways ([Mode]):
//
//   - InPlace: one guest_memfd created with GUEST_MEMFD_FLAG_MMAP and
//     GUEST_MEMFD_FLAG_INIT_SHARED. Its mmap is both the memslot's
//     userspace_addr and the host's view; shared and private are states of
//     the same page, so a conversion frees nothing.
//   - Split: a guest_memfd holds the private side and a memfd the shared
//     side, as QEMU does for SEV-SNP and TDX today. A conversion frees the
//     side the range no longer uses with fallocate(PUNCH_HOLE|KEEP_SIZE):
//     the memfd pages of a range made private, the guest_memfd pages of a
//     range made shared.
//
// On a VM that has no private memory (the default x86 VM type, the only one
// a shadow-paging host offers) KVM serves every guest access from the
// memslot's userspace_addr in split mode, so the memslot points at the shared
// memfd mapping and the guest_memfd only stands for the private side. Guest
// accesses to a "private" page then reach the memfd page too; a real
// confidential VM would see a fresh page there.
//
// # Enforcement
//
// Where the VM accepts KVM_MEMORY_ATTRIBUTE_PRIVATE (KVM_CAP_MEMORY_ATTRIBUTES
// on the VM fd), the executor sets KVM's attributes with
// KVM_SET_MEMORY_ATTRIBUTES ([EnforceKVM]). Otherwise the attributes are kept
// in user space only ([EnforceUserSpace]): the host accessor and the IOMMU
// mappings follow them, but nothing stops the guest itself from touching a
// page it calls private. [Memory.Enforcement] says which one the host gave.
//
// # Host access
//
// Host code reads and writes guest memory only through [Memory.ReadAt] and
// [Memory.WriteAt], which refuse private pages, MMIO holes and unbacked
// addresses, and hold the pages' state steady while they copy. [GuestView]
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
package guestmem
