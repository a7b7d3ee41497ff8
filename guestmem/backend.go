//go:build linux

package guestmem

import (
	"errors"
	"fmt"
	"time"

	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// backend carries a block's conversions to the kernel: the memattr.Backend
// of the block's Attributes. Runs are block byte offsets.
type backend struct{ b *Block }

var _ memattr.Backend = backend{}

// SetAttributes sets the runs' attributes where the kernel keeps them
// (KVM_SET_MEMORY_ATTRIBUTES where the VM has private memory,
// KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd in place with
// per-guest_memfd attributes), and in the user-space record in any case. It
// is all or nothing: when a run fails, the runs already set are set back.
// In place, memattr calls it to make runs private only after the listeners
// have unmapped them, so gmem's own device pins are gone and a refusal
// (*PinnedError) means someone else pins a page.
func (be backend) SetAttributes(runs []span.Range, to memattr.State) error {
	b, m := be.b, be.b.m
	for i, r := range runs {
		g := b.toGPA(r)
		err := m.fault(Fault{Op: OpSetAttributes, Block: b.name, GPA: g, To: to})
		if err == nil && m.closed.Load() {
			err = ErrClosed
		}
		if err == nil && m.enforcement != EnforceUserSpace {
			start := time.Now()
			err = b.setKernelAttributes(r, to)
			m.attrNanos.Add(int64(time.Since(start)))
		}
		if err != nil {
			if uerr := be.restoreKVM(runs[:i], to); uerr != nil {
				m.undoFailures.Add(1)
				m.log.Error("guestmem: restoring KVM attributes failed", "block", b.name, "err", uerr)
				err = errors.Join(err, uerr)
			}
			return fmt.Errorf("set attributes of GPA %v to %v: %w", g, to, err)
		}
	}
	b.setRecord(runs, to)
	m.attrCalls.Add(1)
	return nil
}

// setKernelAttributes sets run r (block offsets) to `to` where the kernel
// keeps the attributes, if it does.
func (b *Block) setKernelAttributes(r span.Range, to memattr.State) error {
	switch b.m.enforcement {
	case EnforceKVM:
		return b.m.vm.SetMemoryAttributes(kvmAttributes(b.toGPA(r), to))
	case EnforceGuestMemfd:
		return b.setFileAttributes(r, to)
	}
	return nil
}

// restoreKVM sets runs back to the state opposite to `to` in the kernel.
func (be backend) restoreKVM(runs []span.Range, to memattr.State) error {
	var errs []error
	for _, r := range runs {
		if err := be.b.setKernelAttributes(r, opposite(to)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func kvmAttributes(g span.Range, to memattr.State) kvm.MemoryAttributes {
	a := kvm.MemoryAttributes{Address: g.Start, Size: g.Len()}
	if to == memattr.Private {
		a.Attributes = kvm.MemoryAttributePrivate
	}
	return a
}

func opposite(s memattr.State) memattr.State {
	if s == memattr.Private {
		return memattr.Shared
	}
	return memattr.Private
}

// Release frees the side of a split block the runs no longer use: the
// shared side of runs made private, the private side of runs made shared.
// In-place memory has one side and frees nothing. memattr calls it only
// after the listeners have unmapped (to private), so no device pin keeps a
// discarded page alive.
func (be backend) Release(runs []span.Range, to memattr.State) error {
	b := be.b
	if b.backing.InPlace() {
		return nil
	}
	side := SharedSide
	if to == memattr.Shared {
		side = PrivateSide
	}
	for _, r := range runs {
		if err := b.discard(side, r, to); err != nil {
			return err
		}
	}
	return nil
}

// discard discards run r (block offsets) of one side of the backing.
func (b *Block) discard(side Side, r span.Range, to memattr.State) error {
	m := b.m
	g := b.toGPA(r)
	if err := m.fault(Fault{Op: OpPunch, Block: b.name, GPA: g, To: to, File: side.String()}); err != nil {
		return fmt.Errorf("discard %v side at GPA %v: %w", side, g, err)
	}
	if m.closed.Load() {
		return fmt.Errorf("discard %v side at GPA %v: %w", side, g, ErrClosed)
	}
	start := time.Now()
	err := b.backing.Discard(side, r.Start, r.Len())
	m.punchNanos.Add(int64(time.Since(start)))
	if err != nil {
		return fmt.Errorf("block %s: discard %v side at GPA %v (offset %#x): %w", b.name, side, g, r.Start, err)
	}
	m.punches.Add(1)
	m.punchedBytes.Add(r.Len())
	return nil
}

// fault runs the injection hook, if any.
func (m *Memory) fault(f Fault) error {
	if m.inject == nil {
		return nil
	}
	return m.inject(f)
}

// setRecord writes the attribute record of runs.
func (b *Block) setRecord(runs []span.Range, to memattr.State) {
	v := uint8(0)
	if to == memattr.Private {
		v = 1
	}
	b.recMu.Lock()
	defer b.recMu.Unlock()
	for _, r := range runs {
		if err := b.record.Set(span.Range{Start: r.Start / PageSize, End: r.End / PageSize}, v); err != nil {
			panic(fmt.Sprintf("guestmem: attribute record rejected checked run %v: %v", r, err))
		}
	}
}
