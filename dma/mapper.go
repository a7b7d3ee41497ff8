// Package dma keeps an IOMMU address space equal to the populated pages of a
// section of guest memory: Mapper is a discard.Listener that maps what
// becomes populated and unmaps what is discarded, with IOVA = GPA.
//
// Two policies shape the mappings:
//
//   - Extent (the default) maps each populated section as notified with one
//     entry, cut at multiples of Options.MaxExtent (2 MiB by default). A
//     discard that cuts an entry unmaps it and maps what remains (the kernel
//     cannot split a mapping: type1 v2 answers EINVAL, iommufd ENOENT),
//     which is counted as a split. Between that unmap and the remap the
//     remainder is unreachable for a moment, so a device DMAing there then
//     faults, and the kernel unpins and pins it again; the bound keeps that
//     to the chunks the cut falls in. Extent never merges separate
//     notifications into one entry, so a guest that converts back exactly
//     what it converted (bounce buffers, coherent buffers) never causes a
//     split.
//   - Granule is QEMU's: one entry per granule (4 KiB by default), so any
//     granule can be unmapped alone and nothing is ever split, at the cost of
//     one entry and one map call per granule. It is the baseline.
//
// A Mapper knows the IOMMU's entry budget (type1's dma_entry_limit): a
// populate that would need more entries than are left fails with ENOSPC
// before any mapping is made, and a discard that must split an entry with no
// entry left fails the same way, leaving everything as it was. So that the
// second happens only in extremes, Extent populates leave
// Options.SplitReserve entries free for splits: with at most that many
// splits outstanding (one per vCPU converting, say), a conversion to private
// is never refused; conversions to shared are refused earlier instead.
//
// Populate and Discard are all or nothing: on any failure the mapper restores
// the entries it had before the call. A Mapper is safe for concurrent use; its
// calls are serialised.
package dma

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"

	"github.com/google/btree"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

// Policy says how a Mapper shapes its IOMMU entries.
type Policy int

const (
	// Extent maps each notified section with one entry (the default).
	Extent Policy = iota
	// Granule maps one entry per granule, as QEMU does.
	Granule
)

// String returns "extent" or "granule".
func (p Policy) String() string {
	if p == Granule {
		return "granule"
	}
	return "extent"
}

// ParsePolicy parses "extent" or "granule".
func ParsePolicy(s string) (Policy, error) {
	switch s {
	case "extent":
		return Extent, nil
	case "granule":
		return Granule, nil
	}
	return 0, fmt.Errorf("dma: unknown policy %q (want extent or granule)", s)
}

// Options configure a Mapper.
type Options struct {
	// Policy shapes the entries (default Extent).
	Policy Policy
	// Granularity is the granule of the Granule policy in bytes, a power of
	// two (default 4096).
	Granularity uint64
	// MaxExtent bounds the entries of the Extent policy: no entry crosses a
	// multiple of MaxExtent (in region offsets), so a split unmaps, re-pins
	// and hides from the device at most one chunk of MaxExtent bytes at each
	// end of the discarded range, and the rest of a large extent stays
	// mapped. A power of two; 0 means DefaultMaxExtent, Unbounded none.
	MaxExtent uint64
	// SplitReserve is the number of IOMMU entries a populate must leave free
	// in a limited space, so that a discard that splits an entry finds one:
	// populates are refused (ENOSPC) while the space is that close to full,
	// discards may use the reserve. 0 means DefaultSplitReserve of the
	// space's limit for Extent, none for Granule (whose discards of whole
	// granules never split, as in QEMU); NoReserve none.
	SplitReserve uint64
	// Logger receives splits and failures (default: discard).
	Logger *slog.Logger
}

// DefaultMaxExtent is the default Options.MaxExtent: 2 MiB, the largest
// IOMMU page below 1 GiB. A 4 KiB cut then re-pins and blinds at most
// 4 MiB (two chunks), which real type1 unmaps and maps again in about a
// millisecond, instead of a whole extent (262,143 pages for 1 GiB); the
// generators' traces need at most one entry per 2 MiB of shared memory
// (8,192 for 16 GiB shared), well inside type1's 65,535.
const DefaultMaxExtent = 2 << 20

// Unbounded as Options.MaxExtent lets an entry be as large as the section
// notified.
const Unbounded = ^uint64(0)

// NoReserve as Options.SplitReserve keeps no entries for splits.
const NoReserve = ^uint64(0)

// DefaultSplitReserve returns the split reserve for a space of limit
// entries: one in sixteen, rounded up, so 4,096 of type1's default 65,535,
// and never all of them.
func DefaultSplitReserve(limit uint64) uint64 {
	if limit <= 1 {
		return 0
	}
	return min((limit+15)/16, limit-1)
}

// Stats counts what a Mapper did.
//
// Pinned and unpinned bytes are what the kernel pins for the map requests and
// unpins for the unmap requests. An operation is one Populate, Discard or
// Revert; its window is the memory whose state it does not change that the
// device cannot reach at some moment during it (iommu.Window), and re-pinned
// bytes are what it mapped again after unmapping them itself. A split's
// remainders are both; with MaxExtent they are bounded by two chunks.
type Stats struct {
	Entries       uint64 // IOMMU entries held now
	PeakEntries   uint64 // most entries held at once
	MappedBytes   uint64 // bytes mapped now
	MapCalls      uint64 // map requests sent to the IOMMU
	UnmapCalls    uint64 // unmap requests sent to the IOMMU
	Splits        uint64 // entries cut by a discard and remapped in pieces
	Failures      uint64 // Populate or Discard calls that failed
	PinnedBytes   uint64 // bytes pinned by successful map requests
	UnpinnedBytes uint64 // bytes unpinned by successful unmap requests
	RepinnedBytes uint64 // bytes an operation mapped again after unmapping them
	WindowBytes   uint64 // the windows of all operations, summed
	MaxWindow     uint64 // the largest window of one operation
}

// Mapper is a discard.Listener that mirrors its section's populated pages
// into an IOMMU space.
type Mapper struct {
	space iommu.Space
	host  []byte
	opts  Options
	log   *slog.Logger

	mu      sync.Mutex
	entries *btree.BTreeG[entry]
	stats   Stats
	// op measures the window of the running operation.
	op iommu.Window
	// journal holds, for each section notified in an operation that has not
	// ended, what the last notification of it changed, so Revert can restore
	// it exactly.
	journal map[discard.Section]change
}

// change is what one notification did to the entries.
type change struct {
	removed, added []entry
	splits         uint64
}

var (
	_ discard.Listener = (*Mapper)(nil)
	_ discard.Journal  = (*Mapper)(nil)
)

// entry is one IOMMU mapping: IOVA range and the region offset behind it.
type entry struct {
	iova, size, off uint64
}

func (e entry) end() uint64 { return e.iova + e.size }

// New returns a Mapper that maps into space. host is the region's memory
// (region offset 0 is host[0]); it may be nil for a Model used without DMA.
func New(space iommu.Space, host []byte, opts Options) (*Mapper, error) {
	if opts.Granularity == 0 {
		opts.Granularity = 4096
	}
	if !span.IsPowerOfTwo(opts.Granularity) {
		return nil, fmt.Errorf("dma: granularity %#x is not a power of two", opts.Granularity)
	}
	if opts.Policy != Extent && opts.Policy != Granule {
		return nil, fmt.Errorf("dma: unknown policy %d", opts.Policy)
	}
	if opts.MaxExtent == 0 {
		opts.MaxExtent = DefaultMaxExtent
	}
	if opts.MaxExtent != Unbounded && (!span.IsPowerOfTwo(opts.MaxExtent) || opts.MaxExtent < 4096) {
		return nil, fmt.Errorf("dma: maximum extent %#x is not a power of two of at least 4 KiB", opts.MaxExtent)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Mapper{
		space:   space,
		host:    host,
		opts:    opts,
		log:     log,
		entries: btree.NewG(32, func(a, b entry) bool { return a.iova < b.iova }),
		journal: make(map[discard.Section]change),
	}, nil
}

// Policy returns the mapper's policy.
func (m *Mapper) Policy() Policy { return m.opts.Policy }

// Stats returns the counters.
func (m *Mapper) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stats
}

// Entries returns the IOVA ranges the mapper has mapped, ascending.
func (m *Mapper) Entries() []iommu.Mapping {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]iommu.Mapping, 0, m.entries.Len())
	m.entries.Ascend(func(e entry) bool {
		out = append(out, iommu.Mapping{IOVA: e.iova, Size: e.size})
		return true
	})
	return out
}

// Populate implements discard.Listener: it maps the parts of s not mapped yet.
func (m *Mapper) Populate(s discard.Section) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.op.Reset()
	defer m.endOp()
	if err := m.populate(s); err != nil {
		m.stats.Failures++
		m.log.Warn("dma populate failed", "section", s, "err", err)
		return err
	}
	return nil
}

func (m *Mapper) populate(s discard.Section) error {
	if s.Size == 0 {
		return nil
	}
	var pieces []entry
	at := s.GPA
	unit := m.opts.MaxExtent
	if m.opts.Policy == Granule {
		unit = m.opts.Granularity
	}
	emit := func(from, to uint64) {
		for from < to {
			n := to - from
			if unit != Unbounded {
				off := s.Offset + (from - s.GPA)
				if next := (off | (unit - 1)) + 1; next > off {
					n = min(n, next-off)
				}
			}
			pieces = append(pieces, entry{iova: from, size: n, off: s.Offset + (from - s.GPA)})
			from += n
		}
	}
	for _, e := range m.overlapping(s.GPARange()) {
		if e.iova > at {
			emit(at, e.iova)
		}
		at = max(at, e.end())
	}
	if end := s.GPA + s.Size; at < end {
		emit(at, end)
	}
	if len(pieces) == 0 {
		// Nothing to map, but still a notification a failed operation may
		// revert, as for a discard of nothing.
		m.journal[s] = change{}
		return nil
	}
	if err := m.budget(uint64(len(pieces)), m.reserve(), "mapping GPA "+s.GPARange().String()); err != nil {
		return err
	}
	for i, p := range pieces {
		if err := m.mapEntry(p); err != nil {
			for j := i - 1; j >= 0; j-- {
				if uerr := m.unmapEntries(pieces[j : j+1]); uerr != nil {
					err = errors.Join(err, uerr)
				}
			}
			return err
		}
	}
	m.journal[s] = change{added: pieces}
	return nil
}

// Discard implements discard.Listener: it unmaps everything inside s,
// splitting entries that stick out of it.
func (m *Mapper) Discard(s discard.Section) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.op.Reset()
	defer m.endOp()
	if err := m.discard(s); err != nil {
		m.stats.Failures++
		m.log.Warn("dma discard failed", "section", s, "err", err)
		return err
	}
	return nil
}

func (m *Mapper) discard(s discard.Section) error {
	r := s.GPARange()
	var inside, cut []entry
	for _, e := range m.overlapping(r) {
		if e.iova >= r.Start && e.end() <= r.End {
			inside = append(inside, e)
		} else {
			cut = append(cut, e)
		}
	}
	if len(inside) == 0 && len(cut) == 0 {
		m.journal[s] = change{}
		return nil
	}
	// The remainders of cut entries need entries of their own; each cut
	// entry and each inside one gives one back.
	var rest []entry
	for _, e := range cut {
		if e.iova < r.Start {
			rest = append(rest, entry{iova: e.iova, size: r.Start - e.iova, off: e.off})
		}
		if e.end() > r.End {
			rest = append(rest, entry{iova: r.End, size: e.end() - r.End, off: e.off + (r.End - e.iova)})
		}
	}
	if freed := uint64(len(cut) + len(inside)); uint64(len(rest)) > freed {
		if err := m.budget(uint64(len(rest))-freed, 0, "unmapping GPA "+r.String()+" splits entries and"); err != nil {
			return err
		}
	}
	// Splits first: they are what may fail for want of an entry.
	var doneCut, doneRest []entry
	undo := func(err error) error {
		var errs []error
		for _, e := range doneRest {
			if uerr := m.unmapEntries([]entry{e}); uerr != nil {
				errs = append(errs, uerr)
			}
		}
		for _, e := range doneCut {
			if merr := m.mapEntry(e); merr != nil {
				errs = append(errs, merr)
			}
		}
		if len(errs) > 0 {
			m.log.Error("dma: restoring entries after a failed discard failed", "err", errors.Join(errs...))
		}
		return errors.Join(append([]error{err}, errs...)...)
	}
	for _, e := range cut {
		if err := m.unmapEntries([]entry{e}); err != nil {
			return undo(err)
		}
		doneCut = append(doneCut, e)
		for _, p := range rest {
			if p.iova >= e.iova && p.end() <= e.end() {
				if err := m.mapEntry(p); err != nil {
					return undo(err)
				}
				doneRest = append(doneRest, p)
			}
		}
		m.log.Debug("dma entry split", "iova", e.iova, "size", e.size, "discard", r)
	}
	if len(inside) > 0 {
		if err := m.unmapEntries(inside); err != nil {
			return undo(err)
		}
	}
	// Counted only now: a discard that failed and was undone split nothing.
	m.stats.Splits += uint64(len(cut))
	m.journal[s] = change{removed: append(cut, inside...), added: rest, splits: uint64(len(cut))}
	return nil
}

// Revert implements discard.Journal: it restores the entries the last
// Populate or Discard of exactly s replaced, so a failed operation leaves the
// IOMMU with the entries it had, not merely the same pages mapped. The
// restored entries were held before, so the entry budget suffices.
//
// A discard that split entries replaced them with remainders outside s,
// which a concurrent operation on a neighbouring range may have changed
// since (its pages may even have become private). Restoring the old entries
// would then map stale pages, so in that case Revert takes back s alone: it
// maps s again as a populate would.
func (m *Mapper) Revert(s discard.Section) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, ok := m.journal[s]
	if !ok {
		return fmt.Errorf("dma: nothing to revert for %v", s)
	}
	delete(m.journal, s)
	m.op.Reset()
	defer m.endOp()
	var err error
	if m.holds(c.added) {
		err = m.restore(c)
	} else {
		m.log.Info("dma revert: entries around the section changed since; mapping the section anew", "section", s)
		err = m.populate(s)
		delete(m.journal, s)
	}
	if err != nil {
		m.stats.Failures++
		m.log.Error("dma revert failed", "section", s, "err", err)
		return err
	}
	return nil
}

// holds reports whether every entry of es is in the table, unchanged.
func (m *Mapper) holds(es []entry) bool {
	for _, e := range es {
		if got, ok := m.entries.Get(e); !ok || got != e {
			return false
		}
	}
	return true
}

// restore undoes change c: it removes the entries c added and maps again the
// ones it removed.
func (m *Mapper) restore(c change) error {
	var errs []error
	for _, e := range c.added {
		if err := m.unmapEntries([]entry{e}); err != nil {
			errs = append(errs, err)
		}
	}
	slices.SortFunc(c.removed, func(a, b entry) int { return cmp.Compare(a.iova, b.iova) })
	for _, e := range c.removed {
		if err := m.mapEntry(e); err != nil {
			errs = append(errs, err)
		}
	}
	m.stats.Splits -= c.splits
	return errors.Join(errs...)
}

// Settle implements discard.Journal.
func (m *Mapper) Settle(s discard.Section) {
	m.mu.Lock()
	delete(m.journal, s)
	m.mu.Unlock()
}

// budget fails with ENOSPC when the space has fewer than n entries left
// beyond reserve, for what (one notification: the count is this section's,
// not the whole conversion's).
func (m *Mapper) budget(n, reserve uint64, what string) error {
	avail, limited, err := m.space.Avail()
	if err != nil {
		return fmt.Errorf("dma: reading the entry budget: %w", err)
	}
	if limited && (avail < n || avail-n < reserve) {
		entries := "entries"
		if n == 1 {
			entries = "entry"
		}
		if reserve > 0 {
			return fmt.Errorf("dma: %s needs %d more IOMMU %s, %d left, %d of them kept for splits: %w", what, n, entries, avail, reserve, unix.ENOSPC)
		}
		return fmt.Errorf("dma: %s needs %d more IOMMU %s, %d left: %w", what, n, entries, avail, unix.ENOSPC)
	}
	return nil
}

// reserve returns the entries a populate must leave free.
func (m *Mapper) reserve() uint64 {
	switch r := m.opts.SplitReserve; r {
	case NoReserve:
		return 0
	case 0:
		if m.opts.Policy == Granule {
			return 0
		}
		return DefaultSplitReserve(m.space.Caps().EntryLimit)
	default:
		return r
	}
}

// endOp ends the measurement of the running operation.
func (m *Mapper) endOp() {
	w := m.op.Bytes(m.mappedIn)
	m.stats.WindowBytes += w
	m.stats.MaxWindow = max(m.stats.MaxWindow, w)
	m.stats.RepinnedBytes += m.op.Repinned()
	m.op.Reset()
}

// mappedIn returns how many bytes of r the mapper has mapped.
func (m *Mapper) mappedIn(r span.Range) uint64 {
	var n uint64
	for _, e := range m.overlapping(r) {
		n += span.Range{Start: e.iova, End: e.end()}.Intersect(r).Len()
	}
	return n
}

// mapEntry maps e and records it.
func (m *Mapper) mapEntry(e entry) error {
	var host []byte
	if m.host != nil {
		if e.off+e.size > uint64(len(m.host)) || e.off+e.size < e.off {
			return fmt.Errorf("dma: region offset %#x size %#x beyond the host memory: %w", e.off, e.size, unix.EINVAL)
		}
		host = m.host[e.off : e.off+e.size : e.off+e.size]
	}
	m.stats.MapCalls++
	if err := m.space.Map(e.iova, e.size, host); err != nil {
		return fmt.Errorf("dma: map iova %#x size %#x: %w", e.iova, e.size, err)
	}
	m.entries.ReplaceOrInsert(e)
	m.op.Mapped(span.Range{Start: e.iova, End: e.end()})
	m.stats.Entries++
	m.stats.MappedBytes += e.size
	m.stats.PinnedBytes += e.size
	m.stats.PeakEntries = max(m.stats.PeakEntries, m.stats.Entries)
	return nil
}

// unmapEntries removes es with one unmap request from the first to the end
// of the last. es must be ascending and hold every entry of the mapper in
// that span, so the request covers only whole entries, which both kernels
// accept.
func (m *Mapper) unmapEntries(es []entry) error {
	if len(es) == 0 {
		return nil
	}
	first, last := es[0], es[len(es)-1]
	size := last.end() - first.iova
	m.stats.UnmapCalls++
	n, err := m.space.Unmap(first.iova, size)
	if err != nil {
		return fmt.Errorf("dma: unmap iova %#x size %#x: %w", first.iova, size, err)
	}
	var want uint64
	for _, e := range es {
		want += e.size
	}
	for _, e := range es {
		m.entries.Delete(e)
		m.op.Unmapped(span.Range{Start: e.iova, End: e.end()})
		m.stats.Entries--
		m.stats.MappedBytes -= e.size
		m.stats.UnpinnedBytes += e.size
	}
	if n != want {
		m.log.Error("dma: unmap removed an unexpected size", "iova", first.iova, "size", size, "unmapped", n, "expected", want)
	}
	return nil
}

// overlapping returns the entries that meet r, ascending.
func (m *Mapper) overlapping(r span.Range) []entry {
	var out []entry
	m.entries.DescendLessOrEqual(entry{iova: r.Start}, func(e entry) bool {
		if e.end() > r.Start {
			out = append(out, e)
		}
		return false
	})
	m.entries.AscendGreaterOrEqual(entry{iova: r.Start}, func(e entry) bool {
		if e.iova >= r.End {
			return false
		}
		if len(out) == 0 || out[len(out)-1] != e {
			out = append(out, e)
		}
		return true
	})
	return out
}
