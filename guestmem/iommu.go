//go:build linux

package guestmem

import (
	"errors"
	"fmt"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/internal/invariant"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

// Attachment is one IOMMU space kept equal to the shared pages of every
// block: a dma.Mapper per block, IOVA = GPA.
type Attachment struct {
	m       *Memory
	space   iommu.Space
	mappers []*dma.Mapper
	blocks  []*Block
}

// AttachIOMMU registers a dma.Mapper for each block, mapping into space
// with IOVA = GPA and the host memory the shared pages live in. The shared
// pages of each block are mapped at once (replay). If a block's mapper
// cannot be registered, the blocks already attached are detached again and
// the error returned.
func (m *Memory) AttachIOMMU(space iommu.Space, opts dma.Options) (*Attachment, error) {
	a := &Attachment{m: m, space: space}
	for _, b := range m.blocks {
		mp, err := dma.New(space, b.mem, opts)
		if err == nil {
			err = b.mgr.Register(mp, b.Section())
		}
		if err != nil {
			derr := a.Detach()
			return nil, errors.Join(fmt.Errorf("guestmem: attach IOMMU to block %s: %w", b.name, err), derr)
		}
		a.mappers = append(a.mappers, mp)
		a.blocks = append(a.blocks, b)
	}
	return a, nil
}

// Detach unregisters every mapper, which unmaps what it mapped. It keeps
// going after a failure and returns every error.
func (a *Attachment) Detach() error {
	var errs []error
	for i := len(a.mappers) - 1; i >= 0; i-- {
		if err := a.blocks[i].mgr.Unregister(a.mappers[i]); err != nil {
			errs = append(errs, fmt.Errorf("guestmem: detach IOMMU from block %s: %w", a.blocks[i].name, err))
			continue
		}
		a.mappers = a.mappers[:i]
		a.blocks = a.blocks[:i]
	}
	return errors.Join(errs...)
}

// Space returns the IOMMU space.
func (a *Attachment) Space() iommu.Space { return a.space }

// Mappers returns the mappers, one per block in ascending GPA order.
func (a *Attachment) Mappers() []*dma.Mapper { return append([]*dma.Mapper(nil), a.mappers...) }

// Stats returns the mappers' counters summed over blocks. PeakEntries is
// the sum of each mapper's peak, an upper bound of the space's peak.
func (a *Attachment) Stats() dma.Stats {
	var s dma.Stats
	for _, mp := range a.mappers {
		x := mp.Stats()
		s.Entries += x.Entries
		s.PeakEntries += x.PeakEntries
		s.MappedBytes += x.MappedBytes
		s.MapCalls += x.MapCalls
		s.UnmapCalls += x.UnmapCalls
		s.Splits += x.Splits
		s.Failures += x.Failures
	}
	return s
}

// Check verifies invariants I1 and I2 for every block: entries (the IOMMU
// space's mappings, ascending IOVA, such as iommu.Model.Mappings returns)
// must cover exactly the shared pages. It returns the first violation, an
// *invariant.Violation. An entry outside every block breaks I2 too.
func (a *Attachment) Check(entries []iommu.Mapping) error {
	for _, e := range entries {
		r := e.Range()
		for _, b := range a.blocks {
			r = minusFront(r, b.Range())
		}
		if !r.Empty() {
			return &invariant.Violation{Invariant: "I2", IOVA: r, Detail: "mapped outside guest RAM"}
		}
	}
	for _, b := range a.blocks {
		if err := invariant.Mapped(b.mgr, b.Section(), invariant.Within(entries, b.Range())); err != nil {
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
