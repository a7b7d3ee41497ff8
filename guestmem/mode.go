package guestmem

import (
	"errors"
	"fmt"
)

// ErrLayout is a Config whose blocks or holes are misplaced, or whose
// backings do not fit them (a nil pointer among them), and a backing
// constructor's or ParseMode's argument that no block could use: a size
// that is not a positive multiple of PageSize, an unknown mode, no VM.
var ErrLayout = errors.New("guestmem: bad memory layout")

// Mode is how a block is backed.
type Mode int

const (
	// Split backs a block with a guest_memfd for the private side and a memfd
	// for the shared side. It is the zero Mode, as in QEMU (10.1) and in
	// gmem's trace generators.
	Split Mode = iota
	// InPlace backs a block with one mmap-able guest_memfd (MMAP|INIT_SHARED)
	// that the memslot and the host both use.
	InPlace
)

// String returns "inplace" or "split", the names ParseMode accepts.
func (m Mode) String() string {
	switch m {
	case InPlace:
		return "inplace"
	case Split:
		return "split"
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// ParseMode parses "inplace" (or "in-place") and "split".
func ParseMode(s string) (Mode, error) {
	switch s {
	case "inplace", "in-place":
		return InPlace, nil
	case "split":
		return Split, nil
	}
	return 0, fmt.Errorf("%w: unknown mode %q (want inplace or split)", ErrLayout, s)
}

// Enforcement names who keeps the private/shared attributes.
type Enforcement string

const (
	// EnforceKVM: KVM holds the attributes (KVM_SET_MEMORY_ATTRIBUTES) and
	// keeps the guest's private accesses out of the host's memory.
	EnforceKVM Enforcement = "kvm-attributes"
	// EnforceGuestMemfd: each in-place block's guest_memfd holds the
	// attributes of its pages (KVM_SET_MEMORY_ATTRIBUTES2 on the file,
	// in-place conversion with private memory, Linux 7.4): KVM keeps the
	// guest's private accesses to itself, the host's mapping of a private
	// page faults, and the kernel refuses to make a page private while
	// anything still pins it.
	EnforceGuestMemfd Enforcement = "guest_memfd-attributes"
	// EnforceUserSpace: the VM has no private memory; the attributes live in
	// user space only and bind the host accessor and the IOMMU mappings.
	EnforceUserSpace Enforcement = "user-space"
)

// Kernel reports whether the kernel enforces the attributes (KVM's or the
// guest_memfd's), so that the host cannot reach a private page.
func (e Enforcement) Kernel() bool { return e == EnforceKVM || e == EnforceGuestMemfd }

// Describe says in a few words how the attributes are kept and set, for
// reports.
func (e Enforcement) Describe() string {
	switch e {
	case EnforceKVM:
		return "KVM keeps the VM's attributes (KVM_SET_MEMORY_ATTRIBUTES)"
	case EnforceGuestMemfd:
		return "in place with private memory: each guest_memfd keeps its attributes (KVM_SET_MEMORY_ATTRIBUTES2)"
	case EnforceUserSpace:
		return "the VM has no private memory: gmem keeps the attributes; host access and DMA follow them"
	}
	return string(e)
}
