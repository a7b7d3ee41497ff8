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

// Errors of AttachIOMMU. Neither is transient: the same call fails again.
var (
	// ErrOptions is an AttachIOMMU whose arguments cannot make a mapper: no
	// space (nil, or a nil pointer), or dma.Options that dma.New refuses
	// (an unknown policy, a granularity or maximum extent that is not a
	// power of two, ...). It wraps dma's error, so errors.Is also matches
	// any sentinel dma gives its refusals.
	ErrOptions = errors.New("bad IOMMU attachment")
	// ErrIOMMUPage is an IOMMU space whose smallest page (Caps.PageSize)
	// is larger than PageSize, or does not divide it. A conversion changes
	// 4 KiB pages, and such an IOMMU cannot map or unmap one: every
	// conversion would fail, to private included, so the guest could not
	// give memory back. VFIO type1 and iommufd never offer a page smaller
	// than the host kernel's, so every space of a host built with 16 or
	// 64 KiB pages is one: arm64 kernels with 64 KiB pages (an Arm SMMU
	// then uses its 64 KiB granule), ppc64 (64 KiB pages), Apple silicon
	// (16 KiB, DART).
	ErrIOMMUPage = errors.New("IOMMU page larger than the conversion page")
)

// Attachment is one IOMMU space kept equal to the shared, plugged pages of
// every block: a dma.Mapper per block, IOVA = GPA. Its methods are safe for
// concurrent use; Memory.Close detaches it.
type Attachment struct {
	m       *Memory
	space   iommu.Space
	policy  dma.Policy // what dma.New resolved, the same for every block
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
// Memory keeps the attachment until Detach or Close. A nil space or
// options dma refuses answer ErrOptions, a space whose pages are larger
// than PageSize ErrIOMMUPage, both before anything is mapped.
func (m *Memory) AttachIOMMU(space iommu.Space, opts dma.Options) (*Attachment, error) {
	if err := m.enter(); err != nil {
		return nil, err
	}
	defer m.exit()
	if space == nil {
		return nil, fmt.Errorf("guestmem: attach IOMMU: %w: the space is nil", ErrOptions)
	}
	if isNil(space) {
		return nil, fmt.Errorf("guestmem: attach IOMMU: %w: the space is a nil %T", ErrOptions, space)
	}
	if ps := space.Caps().PageSize; ps != 0 && (ps > PageSize || PageSize%ps != 0) {
		return nil, fmt.Errorf("guestmem: attach IOMMU: %w: the space's smallest page is %#x bytes; a conversion changes %#x", ErrIOMMUPage, ps, uint64(PageSize))
	}
	// Every mapper first, so that options dma refuses map nothing.
	mps := make([]*dma.Mapper, len(m.blocks))
	for i, b := range m.blocks {
		mp, err := dma.New(space, b.host, opts)
		if err != nil {
			// dma.New refuses nothing but its options.
			return nil, fmt.Errorf("guestmem: attach IOMMU: %w: %w", ErrOptions, err)
		}
		mps[i] = mp
	}
	a := &Attachment{m: m, space: space, policy: mps[0].Policy()}
	for i, b := range m.blocks {
		mp := mps[i]
		if err := b.mgr.Register(mp, b.Section()); err != nil {
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

// Policy returns the policy the attachment's mappers map with, as dma.New
// resolved it from the options and the space: Extent, Granule or Cut, never
// Auto. It is the attach's answer, and stays so after Detach.
func (a *Attachment) Policy() dma.Policy { return a.policy }

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

// Lister is an iommu.Space that can list its own mappings: iommu.Model, or a
// VMM's fake. A real IOMMU cannot (neither VFIO type1 nor iommufd lists its
// mappings), so Attachment.Check compares such a space against the mappers'
// bookkeeping only.
type Lister interface {
	// Mappings returns the space's mappings in ascending IOVA order.
	Mappings() []iommu.Mapping
}

var _ Lister = (*iommu.Model)(nil)

// Violation is a broken invariant found by Attachment.Check: I1 (a shared,
// plugged page no entry maps) or I2 (an entry over a private, unplugged or
// non-RAM page).
type Violation struct {
	// Invariant is "I1" or "I2".
	Invariant string
	// Table is the table that breaks it: "mapper" (a dma.Mapper's
	// bookkeeping of what it mapped) or "space" (the space's own listing,
	// for a space that is a Lister).
	Table string
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
	return fmt.Sprintf("guestmem: %s violated by the %s table at GPA %v %s: %s", v.Invariant, v.Table, v.GPA, where, v.Detail)
}

// Check verifies invariants I1 and I2 for every attached block: the IOMMU
// entries must cover exactly the shared, plugged pages. It compares the
// state with two tables: each block's dma.Mapper's bookkeeping (what the
// mapper mapped and has not unmapped: Mappers()[i].Entries()), and, where
// the space is a Lister (iommu.Model), the space's own mappings. With a
// real IOMMU only the first exists: the kernel cannot list its mappings,
// so Check proves that gmem asked for the right mappings, and what the
// device reaches is proved by DMA (the rig's checks do that).
//
// Check may be called at any time: it holds off conversions, plugs and
// unplugs while it reads the state and the tables, so it sees one
// consistent moment (it waits for the operations in flight, and they wait
// for it). Changes made through a block's Manager or Attributes directly
// bypass the executor and are not held off. It returns the first violation
// as a *Violation (an entry outside every block breaks I2 too), or
// ErrClosed after Close.
func (a *Attachment) Check() error {
	m := a.m
	if err := m.enter(); err != nil {
		return err
	}
	defer m.exit()
	// Conversions within one block hold convMu for reading, the others and
	// plugs for writing: holding it for writing is a moment without any.
	m.convMu.Lock()
	defer m.convMu.Unlock()
	// a.mu keeps a Detach from unregistering mappers half way through.
	a.mu.Lock()
	defer a.mu.Unlock()
	for i, mp := range a.mappers {
		if err := checkTable("mapper", mp.Entries(), a.blocks[i:i+1]); err != nil {
			return err
		}
	}
	if l, ok := a.space.(Lister); ok {
		return checkTable("space", l.Mappings(), a.blocks)
	}
	return nil
}

// checkTable checks I1 and I2 of entries (ascending) against blocks
// (ascending GPA): every entry inside a block, every block's populated
// pages mapped exactly.
func checkTable(table string, entries []iommu.Mapping, blocks []*Block) error {
	for _, e := range entries {
		r := e.Range()
		for _, b := range blocks {
			r = minusFront(r, b.Range())
		}
		if !r.Empty() {
			return &Violation{Invariant: "I2", Table: table, GPA: r, Detail: "mapped outside the attached guest RAM"}
		}
	}
	for _, b := range blocks {
		err := invariant.Mapped(b.mgr, b.Section(), invariant.Within(entries, b.Range()))
		var v *invariant.Violation
		if errors.As(err, &v) {
			return &Violation{Invariant: v.Invariant, Table: table, Block: b.name, GPA: v.IOVA, Detail: v.Detail}
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
