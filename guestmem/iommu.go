//go:build linux

package guestmem

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/internal/invariant"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

// Attachment is one IOMMU space kept equal to the shared, plugged pages of
// every block: a dma.Mapper per block, IOVA = GPA. Its methods are safe for
// concurrent use; Memory.Close detaches it.
type Attachment struct {
	m       *Memory
	space   iommu.Space
	mu      sync.Mutex // guards mappers and blocks
	mappers []*dma.Mapper
	blocks  []*Block
}

// AttachIOMMU registers a dma.Mapper for each block, mapping into space
// with IOVA = GPA and the host memory of the block's backing (nil for a
// ModelBacking: a real Space then refuses the first map with EINVAL, an
// iommu.Model maps and faults every DMA). The shared, plugged pages of each
// block are mapped at once. If a block's mapper cannot be registered, the
// blocks already attached are detached again and the error returned. The
// Memory keeps the attachment until Detach or Close.
func (m *Memory) AttachIOMMU(space iommu.Space, opts dma.Options) (*Attachment, error) {
	if err := m.enter(); err != nil {
		return nil, err
	}
	defer m.exit()
	a := &Attachment{m: m, space: space}
	for _, b := range m.blocks {
		mp, err := dma.New(space, b.host, opts)
		if err == nil {
			err = b.mgr.Register(mp, b.Section())
		}
		if err != nil {
			derr := a.detach()
			return nil, errors.Join(fmt.Errorf("guestmem: attach IOMMU to block %s at GPA %#x: %w", b.name, b.gpa, err), derr)
		}
		a.mappers = append(a.mappers, mp)
		a.blocks = append(a.blocks, b)
	}
	m.attMu.Lock()
	m.atts = append(m.atts, a)
	m.attMu.Unlock()
	return a, nil
}

// Detach unregisters every mapper, which unmaps what it mapped. It keeps
// going after a failure and returns every error; calling it again retries
// what failed. After everything is detached, and after Memory.Close, it
// returns nil.
func (a *Attachment) Detach() error {
	m := a.m
	if err := m.enter(); err != nil {
		return nil // Close detached it
	}
	defer m.exit()
	err := a.detach()
	if err == nil {
		m.attMu.Lock()
		m.atts = slices.DeleteFunc(m.atts, func(x *Attachment) bool { return x == a })
		m.attMu.Unlock()
	}
	return err
}

// detach unregisters the mappers, newest first.
func (a *Attachment) detach() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var errs []error
	for i := len(a.mappers) - 1; i >= 0; i-- {
		if err := a.blocks[i].mgr.Unregister(a.mappers[i]); err != nil {
			errs = append(errs, fmt.Errorf("guestmem: detach IOMMU from block %s at GPA %#x: %w", a.blocks[i].name, a.blocks[i].gpa, err))
			continue
		}
		a.mappers = slices.Delete(a.mappers, i, i+1)
		a.blocks = slices.Delete(a.blocks, i, i+1)
	}
	return errors.Join(errs...)
}

// Space returns the IOMMU space.
func (a *Attachment) Space() iommu.Space { return a.space }

// Mappers returns the mappers still registered, one per block in ascending
// GPA order (none after Detach or Close).
func (a *Attachment) Mappers() []*dma.Mapper {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.mappers)
}

// Stats returns the counters of the mappers still registered, summed over
// blocks. PeakEntries is the sum of each mapper's peak, an upper bound of
// the space's peak.
func (a *Attachment) Stats() dma.Stats {
	var s dma.Stats
	for _, mp := range a.Mappers() {
		s.Add(mp.Stats())
	}
	return s
}

// Violation is a broken invariant found by Attachment.Check: I1 (a shared,
// plugged page no entry maps) or I2 (an entry over a private, unplugged or
// non-RAM page).
type Violation struct {
	// Invariant is "I1" or "I2".
	Invariant string
	// Block is the block the pages belong to, "" outside guest RAM.
	Block string
	// GPA is the pages in question (IOVA = GPA).
	GPA span.Range
	// Detail says what is wrong.
	Detail string
}

// Error implements error.
func (v *Violation) Error() string {
	where := "outside guest RAM"
	if v.Block != "" {
		where = "in block " + v.Block
	}
	return fmt.Sprintf("guestmem: %s violated at GPA %v %s: %s", v.Invariant, v.GPA, where, v.Detail)
}

// Check verifies invariants I1 and I2 for every block: entries (the IOMMU
// space's mappings, ascending IOVA, such as iommu.Model.Mappings returns)
// must cover exactly the shared, plugged pages. It returns the first
// violation as a *Violation (an entry outside every block breaks I2 too),
// or ErrClosed after Close.
func (a *Attachment) Check(entries []iommu.Mapping) error {
	m := a.m
	if err := m.enter(); err != nil {
		return err
	}
	defer m.exit()
	a.mu.Lock()
	blocks := slices.Clone(a.blocks)
	a.mu.Unlock()
	for _, e := range entries {
		r := e.Range()
		for _, b := range blocks {
			r = minusFront(r, b.Range())
		}
		if !r.Empty() {
			return &Violation{Invariant: "I2", GPA: r, Detail: "mapped outside the attached guest RAM"}
		}
	}
	for _, b := range blocks {
		err := invariant.Mapped(b.mgr, b.Section(), invariant.Within(entries, b.Range()))
		var v *invariant.Violation
		if errors.As(err, &v) {
			return &Violation{Invariant: v.Invariant, Block: b.name, GPA: v.IOVA, Detail: v.Detail}
		}
		if err != nil {
			return fmt.Errorf("guestmem: block %s: %w", b.name, err)
		}
	}
	return nil
}

// minusFront removes b from the front or back of r when b covers that end;
// blocks are visited in ascending order, so an entry that spans adjacent
// blocks is consumed from the front block by block. What is left is not RAM
// of an attached block.
func minusFront(r, b span.Range) span.Range {
	if r.Empty() {
		return r
	}
	if b.Contains(r.Start) {
		r.Start = min(b.End, r.End)
	}
	if !r.Empty() && b.Contains(r.End-1) {
		r.End = max(b.Start, r.Start)
	}
	if r.Empty() {
		return span.Range{}
	}
	return r
}
