//go:build linux

package guestmem

import (
	"errors"
	"fmt"
	"iter"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// ErrUnplugged is an access to, or a conversion of, unplugged memory of a
// hot-pluggable block, and a Plug or Unplug of memory that is not
// hot-pluggable.
var ErrUnplugged = errors.New("memory is not plugged")

// ErrPlugged is a Plug of memory that is plugged already, in part or whole.
// virtio-mem refuses such a request (VIRTIO_MEM_RESP_ERROR), and so does
// Plug: plugged memory starts private, which plugging shared memory again
// could not honour.
var ErrPlugged = errors.New("memory is plugged already")

// Kind is what a migration or a dump does with an extent of guest RAM.
type Kind uint8

const (
	// KindShared is plugged, shared RAM: the host reads it (send, dump).
	KindShared Kind = iota + 1
	// KindPrivate is plugged, private RAM: guest data the host must not
	// read through its mapping (a confidential migration sends it through
	// the platform).
	KindPrivate
	// KindUnplugged is unplugged RAM of a hot-pluggable block: skip it.
	KindUnplugged
)

// String returns "shared", "private" or "unplugged".
func (k Kind) String() string {
	switch k {
	case KindShared:
		return "shared"
	case KindPrivate:
		return "private"
	case KindUnplugged:
		return "unplugged"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// Extent is a maximal GPA range of one block in one Kind.
type Extent struct {
	Block *Block
	GPA   span.Range
	Kind  Kind
}

// PlugError is a failed Plug or Unplug. Nothing changed.
type PlugError struct {
	Plug      bool   // Plug (true) or Unplug
	GPA, Size uint64 // the request
	Block     string // "" when refused before touching a block
	Err       error
}

// Error implements error.
func (e *PlugError) Error() string {
	verb := "unplug"
	if e.Plug {
		verb = "plug"
	}
	if e.Block != "" {
		return fmt.Sprintf("guestmem: %s GPA [%#x, +%#x): block %s: %v", verb, e.GPA, e.Size, e.Block, e.Err)
	}
	return fmt.Sprintf("guestmem: %s GPA [%#x, +%#x): %v", verb, e.GPA, e.Size, e.Err)
}

// Unwrap returns the cause.
func (e *PlugError) Unwrap() error { return e.Err }

// Plug plugs [gpa, gpa+size) of one hot-pluggable block (virtio-mem
// VIRTIO_MEM_REQ_PLUG), aligned to its plug granularity. Plugged memory
// starts private, as it was while unplugged, so plugging maps nothing into
// any IOMMU; the guest converts what it shares.
//
// The error is a *PlugError, and nothing changed. The request is checked
// in this order, the first failure answering:
//
//  1. the range itself: ErrInvalid wrapping span.ErrEmpty (size 0),
//     span.ErrOverflow (wraps), span.ErrAlign (not page aligned) or
//     span.ErrBounds (past MaxGPA);
//  2. where it starts: ErrUnplugged if not in a hot-pluggable block;
//  3. its fit to that block: ErrInvalid wrapping span.ErrAlign (not
//     aligned to the plug granularity) or span.ErrBounds (past the
//     block's end);
//  4. the state: ErrPlugged if part of it is plugged already (for Unplug,
//     ErrUnplugged if part of it is not plugged).
//
// So a malformed request is ErrInvalid whatever the state of the memory.
func (m *Memory) Plug(gpa, size uint64) error {
	return m.plug(gpa, size, true)
}

// Unplug unplugs [gpa, gpa+size) of one hot-pluggable block (virtio-mem
// VIRTIO_MEM_REQ_UNPLUG): devices lose what they mapped of it, the range
// becomes private, and both sides of its memory are discarded. It is all or
// nothing, like Convert. The request is checked as Plug's is; its state
// error is ErrUnplugged if part of the range is not plugged (virtio-mem
// refuses that request too).
func (m *Memory) Unplug(gpa, size uint64) error {
	return m.plug(gpa, size, false)
}

func (m *Memory) plug(gpa, size uint64, plug bool) error {
	fail := func(block string, err error) error {
		return &PlugError{Plug: plug, GPA: gpa, Size: size, Block: block, Err: err}
	}
	if err := m.enter(); err != nil {
		return fail("", err)
	}
	defer m.exit()
	r, err := span.Checked(gpa, size, PageSize, m.maxGPA)
	if err != nil {
		return fail("", fmt.Errorf("%w: %w", ErrInvalid, err))
	}
	b := m.Block(gpa)
	if b == nil {
		return fail("", fmt.Errorf("%w: GPA %#x is not hot-pluggable RAM (%s)", ErrUnplugged, gpa, m.describe(span.Range{Start: gpa, End: gpa + 1})))
	}
	if b.vmem == nil {
		return fail(b.name, fmt.Errorf("%w: block is not hot-pluggable", ErrUnplugged))
	}
	off, err := span.Checked(r.Start-b.gpa, r.Len(), b.vmem.BlockSize(), b.size)
	if err != nil {
		return fail(b.name, fmt.Errorf("%w: plug granularity %#x, block size %#x: %w", ErrInvalid, b.vmem.BlockSize(), b.size, err))
	}
	m.convMu.Lock()
	defer m.convMu.Unlock()
	if plug && !b.vmem.IsUnplugged(off) {
		return fail(b.name, fmt.Errorf("%w: offset %v", ErrPlugged, off))
	}
	if !plug && !b.vmem.IsPlugged(off) {
		return fail(b.name, fmt.Errorf("%w: offset %v is not all plugged", ErrUnplugged, off))
	}
	if plug {
		if err := b.vmem.Plug(off.Start, off.Len()); err != nil {
			return fail(b.name, err)
		}
		m.plugs.Add(1)
		return nil
	}
	if err := b.vmem.Unplug(off.Start, off.Len()); err != nil {
		return fail(b.name, err)
	}
	// Unplugged memory reaches no device whatever its state, so making it
	// private notifies no listener: only the kernel and the backing act.
	changed, err := b.attrs.ConvertRuns(off.Start, off.Len(), memattr.Private)
	if err != nil {
		if uerr := b.vmem.Plug(off.Start, off.Len()); uerr != nil {
			m.undoFailures.Add(1)
			m.log.Error("guestmem: re-plugging after a failed unplug failed", "block", b.name, "gpa", r, "err", uerr)
			err = errors.Join(err, fmt.Errorf("undo: re-plug: %w", uerr))
		}
		return fail(b.name, err)
	}
	for _, c := range changed {
		m.pagesPrivate.Add(c.Len() / PageSize)
	}
	m.unplugs.Add(1)
	return nil
}

// releaseUnplugged discards both sides of unplugged runs (block offsets),
// once no device reaches them.
func (b *Block) releaseUnplugged(runs []span.Range) error {
	sides := []Side{SharedSide, PrivateSide}
	if b.backing.InPlace() {
		sides = sides[:1]
	}
	for _, r := range runs {
		for _, s := range sides {
			if err := b.discard(s, r, memattr.Private); err != nil {
				return err
			}
		}
	}
	return nil
}

// unplugged reports whether any part of r (block offsets) is unplugged.
func (b *Block) unplugged(r span.Range) bool {
	return b.vmem != nil && !b.vmem.IsPlugged(r)
}

// Walk yields the extents of guest RAM in [gpa, gpa+size), ascending, each
// with its Kind: what a migration or a dump sends, sends through the
// platform, or skips. MMIO holes and unbacked addresses yield nothing. It
// costs O(runs); the state of each block is one snapshot, and the loop body
// runs with nothing locked. It fails with ErrClosed after Close and with
// ErrInvalid for a malformed range.
func (m *Memory) Walk(gpa, size uint64) (iter.Seq[Extent], error) {
	if err := m.enter(); err != nil {
		return nil, err
	}
	defer m.exit()
	r, err := span.Checked(gpa, size, PageSize, m.maxGPA)
	if err != nil {
		return nil, fmt.Errorf("guestmem: walk GPA [%#x, +%#x): %w: %w", gpa, size, ErrInvalid, err)
	}
	var all []Extent
	for _, p := range m.split(r) {
		if p.b == nil {
			continue
		}
		off := span.Range{Start: p.r.Start - p.b.gpa, End: p.r.End - p.b.gpa}
		for e := range p.b.extents(off) {
			all = append(all, e)
		}
	}
	return func(yield func(Extent) bool) {
		for _, e := range all {
			if !yield(e) {
				return
			}
		}
	}, nil
}

// extents yields the block's extents in r (block offsets), merged by Kind.
func (b *Block) extents(r span.Range) iter.Seq[Extent] {
	return func(yield func(Extent) bool) {
		var cur Extent
		var srcs []discard.Source
		walk := b.mgr.Walk(r, &srcs)
		plugBit := uint64(0)
		for i, s := range srcs {
			if b.vmem != nil && s == b.vmem.Source() {
				plugBit = 1 << i
			}
		}
		for e := range walk {
			k := KindShared
			switch {
			case e.DiscardedBy&plugBit != 0:
				k = KindUnplugged
			case e.DiscardedBy != 0:
				k = KindPrivate
			}
			g := b.toGPA(e.Range)
			if cur.Block != nil && cur.Kind == k && cur.GPA.End == g.Start {
				cur.GPA.End = g.End
				continue
			}
			if cur.Block != nil && !yield(cur) {
				return
			}
			cur = Extent{Block: b, GPA: g, Kind: k}
		}
		if cur.Block != nil {
			yield(cur)
		}
	}
}
