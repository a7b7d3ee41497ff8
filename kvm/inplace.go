//go:build linux

package kvm

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/span"
)

// PinnedError is KVM_SET_MEMORY_ATTRIBUTES2 refusing to make a range of a
// guest_memfd private because a page of it is still in use outside
// guest_memfd: a long-term pin (a VFIO type1 or iommufd DMA mapping of the
// host mapping, io_uring fixed buffers), O_DIRECT in flight, or any other
// extra reference. The kernel checks every page before it changes any
// attribute, so nothing changed; it answers EAGAIN with error_offset set to
// the first such page. errors.Is(err, unix.EAGAIN) holds.
type PinnedError struct {
	// Offset is the guest_memfd offset of the first page in use
	// (error_offset).
	Offset uint64
	// Request is the refused request.
	Request MemoryAttributes2
}

// Error names the page in use and the refused range.
func (e *PinnedError) Error() string {
	return fmt.Sprintf("kvm: KVM_SET_MEMORY_ATTRIBUTES2(offset %#x, size %#x, attrs %#x): page at offset %#x is in use (pinned): %v",
		e.Request.Offset, e.Request.Size, e.Request.Attributes, e.Offset, unix.EAGAIN)
}

// Unwrap returns unix.EAGAIN, the kernel's answer.
func (e *PinnedError) Unwrap() error { return unix.EAGAIN }

// GuestMemfdAttributes reads an answer to
// KVM_CHECK_EXTENSION(CapGuestMemfdMemoryAttributes): the attributes
// KVM_SET_MEMORY_ATTRIBUTES2 accepts. The capability's number is provisional
// (see [CapGuestMemfdMemoryAttributes]), so an answer with bits other than
// MemoryAttributePrivate is taken to be another capability's and read as 0.
func GuestMemfdAttributes(answer int) uint64 {
	if a := uint64(answer); answer > 0 && a&^MemoryAttributePrivate == 0 {
		return a
	}
	return 0
}

// SetMemoryAttributes2 sets the attributes of a range of the file
// (KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fd), the conversion of a
// guest_memfd that keeps its own attributes (in-place conversion, Linux
// 7.4). To make pages private the kernel zaps the host's mappings of them
// and refuses, with a *PinnedError and no attribute changed, if any page is
// still in use (pinned by a device mapping, for one): unmap devices first.
// To make pages shared it checks nothing. KVM neither zeroes nor copies the
// contents. A host access to a private page through the mmap gets SIGBUS.
//
// The range is checked first (page aligned, not empty, inside the file:
// errors wrapping the span errors), and for a file created by
// [VM.CreateGuestMemfd] the VM's CapGuestMemfdMemoryAttributes must include
// every requested bit, or the answer is an *UnsupportedError without the
// ioctl (matching unix.ENOTTY when the VM has none, the kernel's answer
// when in-place conversion is off). A file adopted with NewGuestMemfd has no
// VM to ask, so the kernel answers for it.
func (g *GuestMemfd) SetMemoryAttributes2(a MemoryAttributes2) error {
	if g.fd.Fd() < 0 {
		return ErrClosed
	}
	if _, err := span.Checked(a.Offset, a.Size, PageSize, g.size); err != nil {
		return fmt.Errorf("kvm: KVM_SET_MEMORY_ATTRIBUTES2: %w", err)
	}
	if g.attrsKnown {
		if g.attrs&MemoryAttributePrivate == 0 {
			return &UnsupportedError{Op: "KVM_SET_MEMORY_ATTRIBUTES2", Cap: CapGuestMemfdMemoryAttributes,
				Have: g.attrs, Want: MemoryAttributePrivate, Errno: unix.ENOTTY}
		}
		if a.Attributes&^g.attrs != 0 {
			return &UnsupportedError{Op: "KVM_SET_MEMORY_ATTRIBUTES2", Cap: CapGuestMemfdMemoryAttributes,
				Have: g.attrs, Want: a.Attributes, Errno: unix.EINVAL}
		}
	}
	return g.setMemoryAttributes2(a)
}

// setMemoryAttributes2 issues KVM_SET_MEMORY_ATTRIBUTES2 without checks.
func (g *GuestMemfd) setMemoryAttributes2(a MemoryAttributes2) error {
	a.ErrorOffset = 0
	_, err := ioctlPtr(g.fd, kvmSetMemoryAttributes2, &a)
	if err == nil {
		return nil
	}
	if err != ErrClosed && errors.Is(err, unix.EAGAIN) {
		return &PinnedError{Offset: a.ErrorOffset, Request: a}
	}
	return ioctlError(fmt.Sprintf("KVM_SET_MEMORY_ATTRIBUTES2(offset %#x, size %#x, attrs %#x)",
		a.Offset, a.Size, a.Attributes), err)
}

// Attributes returns the attributes KVM_SET_MEMORY_ATTRIBUTES2 accepts on
// this file, as its VM answered CapGuestMemfdMemoryAttributes when it was
// created, and whether that is known (not for an adopted file).
func (g *GuestMemfd) Attributes() (attrs uint64, known bool) { return g.attrs, g.attrsKnown }

// InPlaceSupport says whether a VM can convert guest_memfd pages between
// shared and private in place with the kernel enforcing it: per-guest_memfd
// attributes (KVM_SET_MEMORY_ATTRIBUTES2) on a VM with private memory,
// whose guest_memfd can be mmapped and start shared.
type InPlaceSupport struct {
	// VMType is the type of the VM asked, VMTypeUnknown for an adopted VM.
	VMType uint64
	// Attributes is the VM's CapGuestMemfdMemoryAttributes, as
	// GuestMemfdAttributes reads it.
	Attributes uint64
	// GuestMemfdFlags is the VM's CapGuestMemfdFlags.
	GuestMemfdFlags uint64
	// Reason says why not; empty when the VM can.
	Reason string
}

// OK reports whether in-place conversion with private memory is possible.
func (s InPlaceSupport) OK() bool { return s.Reason == "" }

// InPlaceFlags are the guest_memfd flags of in-place memory: mmap-able and
// shared until converted.
const InPlaceFlags = GuestMemfdFlagMmap | GuestMemfdFlagInitShared

// noGuestMemfdAttributes is the reason given when the kernel keeps no
// attributes per guest_memfd.
const noGuestMemfdAttributes = "kernel has no KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES " +
	"(needs Linux 7.4 with kvm.gmem_in_place_conversion=1 or CONFIG_KVM_VM_MEMORY_ATTRIBUTES=n)"

// InPlaceSupport asks this VM whether it can convert in place with private
// memory: it must not be of the default type (which has no private memory),
// must offer guest_memfd with MMAP|INIT_SHARED, and must answer
// CapGuestMemfdMemoryAttributes with MemoryAttributePrivate. The Reason of a
// VM that cannot names what is missing.
func (vm *VM) InPlaceSupport() (InPlaceSupport, error) {
	s := InPlaceSupport{VMType: vm.vmType}
	ask := func(c Cap) (uint64, error) {
		v, err := vm.CheckExtension(c)
		if v < 0 {
			v = 0
		}
		return uint64(v), err
	}
	gmem, err := ask(CapGuestMemfd)
	if err != nil {
		return s, err
	}
	if s.GuestMemfdFlags, err = ask(CapGuestMemfdFlags); err != nil {
		return s, err
	}
	a, err := vm.CheckExtension(CapGuestMemfdMemoryAttributes)
	if err != nil {
		return s, err
	}
	s.Attributes = GuestMemfdAttributes(a)
	switch {
	case vm.vmType == VMTypeDefault:
		s.Reason = "a VM of the default type (KVM_X86_DEFAULT_VM) has no private memory"
	case gmem == 0:
		s.Reason = "KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD = 0)"
	case s.Attributes&MemoryAttributePrivate == 0:
		s.Reason = noGuestMemfdAttributes
	case s.GuestMemfdFlags&InPlaceFlags != InPlaceFlags:
		s.Reason = fmt.Sprintf("KVM_CAP_GUEST_MEMFD_FLAGS = %#x: in-place memory needs MMAP|INIT_SHARED (%#x) on a VM with private memory (Linux 7.4)",
			s.GuestMemfdFlags, uint64(InPlaceFlags))
	}
	return s, nil
}

// ProbeInPlace reports whether this host can convert in place with private
// memory: it creates a VM of the first type with private memory that
// KVM_CAP_VM_TYPES offers (KVM_X86_SW_PROTECTED_VM) and asks it with
// [VM.InPlaceSupport]. A host that offers no such type gets a Reason saying
// so and VMType VMTypeUnknown.
func (s *System) ProbeInPlace() (InPlaceSupport, error) {
	types, err := s.VMTypes()
	if err != nil {
		return InPlaceSupport{}, err
	}
	if types&(1<<VMTypeSWProtected) == 0 {
		return InPlaceSupport{VMType: VMTypeUnknown, Reason: fmt.Sprintf(
			"KVM offers no VM type with private memory (KVM_CAP_VM_TYPES = %#x; KVM_X86_SW_PROTECTED_VM needs CONFIG_KVM_SW_PROTECTED_VM and a TDP MMU)", types)}, nil
	}
	vm, err := s.CreateVM(VMTypeSWProtected)
	if err != nil {
		return InPlaceSupport{}, err
	}
	defer vm.Close()
	return vm.InPlaceSupport()
}
