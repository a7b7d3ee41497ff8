//go:build linux

package guestmem

import (
	"errors"
	"fmt"

	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// ErrNoAttributeFile is an in-place block on a VM whose kernel keeps the
// attributes per guest_memfd, whose backing does not offer its guest_memfd
// (AttributeBacking), and split memory on such a VM.
var ErrNoAttributeFile = errors.New("the VM keeps attributes per guest_memfd")

// enforcement asks the VM who keeps the attributes of memory in mode.
//
// In place, a VM that answers kvm.CapGuestMemfdMemoryAttributes with
// PRIVATE converts with the guest_memfd's own KVM_SET_MEMORY_ATTRIBUTES2.
// Otherwise a VM that accepts PRIVATE in KVM_SET_MEMORY_ATTRIBUTES keeps
// them VM-wide. A kernel with in-place conversion on has no VM-wide
// attributes and serves every guest fault of a guest_memfd memslot from the
// guest_memfd, shared pages included, so split memory cannot work there
// (one VM is all split or all in place): New refuses it.
func enforcement(vm VM, mode Mode) (Enforcement, error) {
	have, err := vm.CheckExtension(kvm.CapMemoryAttributes)
	if err != nil {
		return "", fmt.Errorf("guestmem: %w", err)
	}
	gm, err := vm.CheckExtension(kvm.CapGuestMemfdMemoryAttributes)
	if err != nil {
		return "", fmt.Errorf("guestmem: %w", err)
	}
	perFile := kvm.GuestMemfdAttributes(gm)&kvm.MemoryAttributePrivate != 0
	switch {
	case perFile && mode == InPlace:
		return EnforceGuestMemfd, nil
	case uint64(have)&kvm.MemoryAttributePrivate != 0:
		return EnforceKVM, nil
	case perFile:
		return "", fmt.Errorf("guestmem: %v memory: %w (in-place conversion is on: guest_memfd memslots serve shared pages too, and KVM_SET_MEMORY_ATTRIBUTES is gone); use %v",
			mode, ErrNoAttributeFile, InPlace)
	}
	return EnforceUserSpace, nil
}

// adoptAttributeFile takes the guest_memfd of an in-place block under
// EnforceGuestMemfd and makes the whole block private in it: an
// INIT_SHARED guest_memfd starts shared, a confidential block private.
// Nothing maps the block yet, so nothing can pin it.
func (b *Block) adoptAttributeFile() error {
	ab, ok := b.backing.(AttributeBacking)
	if !ok {
		return fmt.Errorf("guestmem: block %s: %w, and its backing (%T) does not offer its guest_memfd (AttributeBacking)", b.name, ErrNoAttributeFile, b.backing)
	}
	b.file, b.fileOff = ab.AttributeFile()
	if b.file == nil {
		return fmt.Errorf("guestmem: block %s: %w, and its backing offers no guest_memfd", b.name, ErrNoAttributeFile)
	}
	if err := b.setFileAttributes(span.Range{End: b.size}, memattr.Private); err != nil {
		return fmt.Errorf("guestmem: block %s: %w", b.name, err)
	}
	return nil
}

// setFileAttributes sets run r (block offsets) to `to` in the block's
// guest_memfd. A refusal because a page is in use becomes a *PinnedError
// naming its GPA.
func (b *Block) setFileAttributes(r span.Range, to memattr.State) error {
	a := kvm.MemoryAttributes2{Offset: b.fileOff + r.Start, Size: r.Len()}
	if to == memattr.Private {
		a.Attributes = kvm.MemoryAttributePrivate
	}
	err := b.file.SetMemoryAttributes2(a)
	var pe *kvm.PinnedError
	if errors.As(err, &pe) {
		return &PinnedError{Block: b.name, GPA: b.gpa + (pe.Offset - b.fileOff), Err: err}
	}
	return err
}

// PinnedError is a conversion to private that the kernel refused because a
// page of it is still in use although every device gmem keeps has let go of
// it: something else pins it (a DMA mapping gmem does not manage, io_uring
// fixed buffers, O_DIRECT in flight). Nothing changed; the guest is told
// EAGAIN (errors.Is(err, unix.EAGAIN) holds, so HypercallRet answers
// HypercallRetEAGAIN) and may retry once the pin is gone.
type PinnedError struct {
	Block string
	// GPA is the guest physical address of the first page in use.
	GPA uint64
	// Err is the kernel's answer, a *kvm.PinnedError.
	Err error
}

// Error names the page in use.
func (e *PinnedError) Error() string {
	return fmt.Sprintf("page at GPA %#x is in use outside gmem (pinned): %v", e.GPA, e.Err)
}

// Unwrap returns the kernel's answer.
func (e *PinnedError) Unwrap() error { return e.Err }
