// Package dma keeps an IOMMU address space equal to the populated pages of a
// section of guest memory: Mapper is a discard.Listener that maps what
// becomes populated and unmaps what is discarded, with IOVA = GPA.
//
// Three policies shape the mappings and what a discard inside one costs:
//
//   - Cut maps each populated section as notified with one entry, cut at
//     multiples of Options.MaxExtent (2 MiB by default), and makes a discard
//     one cut request over the discarded range (iommu.Cutter): the kernel
//     splits the entries at both ends and unmaps only the range, and the
//     remainders stay mapped and pinned throughout. Nothing is unmapped
//     that stays shared, nothing is re-pinned, and a device never loses
//     memory it still owns: the window is 0 by construction. It needs a
//     space that can cut (Caps().Cut: an iommufd IOAS with huge pages off,
//     set as its file's compat IOAS), which then maps with 4 KiB IOPTEs
//     only, the IOTLB reach of QEMU's 4 KiB mappings.
//   - Extent maps entries as Cut does, but the kernels cannot split a
//     mapping (type1 v2 answers EINVAL, iommufd's native unmap ENOENT), so
//     a discard that cuts an entry unmaps it and maps what remains, which
//     is counted as a split. Between that unmap and the remap the remainder
//     is unreachable for a moment, so a device DMAing there then faults,
//     and the kernel unpins and pins it again; the bound keeps that to the
//     chunks the cut falls in.
//   - Granule is QEMU's: one entry per granule (4 KiB by default), so any
//     granule can be unmapped alone and nothing is ever split, at the cost of
//     one entry and one map call per granule. It is the baseline.
//
// The zero Policy is Auto: Cut wherever the space can cut, Extent elsewhere,
// so cutting is the default wherever the kernel offers it and a space that
// does not falls back to the bounded extent; Mapper.Policy says which.
// Cut and Extent never merge separate notifications into one entry, so a
// guest that converts back exactly what it converted (bounce buffers,
// coherent buffers) never causes a split.
//
// A Mapper knows the IOMMU's entry budget (type1's dma_entry_limit): a
// populate that would need more entries than are left fails with ENOSPC
// before any mapping is made, and a discard that must split an entry with no
// entry left fails the same way, leaving everything as it was. So that the
// second happens only in extremes, Extent populates leave
// Options.SplitReserve entries free for splits: with at most that many
// splits outstanding (one per vCPU converting, say), a conversion to private
// is never refused; conversions to shared are refused earlier instead.
// (Spaces that cut are iommufd's, which have no entry limit: Cut keeps no
// reserve.)
//
// Populate and Discard are all or nothing: on any failure the mapper restores
// the pages it had mapped before the call (Extent and Granule: the very
// entries). A Mapper is safe for concurrent use; calls on sections far
// enough apart run in parallel (see Mapper).
package dma

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/google/btree"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

// Policy says how a Mapper shapes its IOMMU entries and splits them.
type Policy int

const (
	// Auto (the zero value) is Cut where the space can cut (Caps().Cut),
	// else Extent. New resolves it; Mapper.Policy never returns it.
	Auto Policy = iota
	// Extent maps each notified section with one entry, bounded by
	// MaxExtent, and splits an entry by unmapping it and mapping the
	// remainders.
	Extent
	// Granule maps one entry per granule, as QEMU does.
	Granule
	// Cut maps as Extent does and splits an entry with one cut request
	// (iommu.Cutter): the remainders are never unmapped.
	Cut
)

// String returns "auto", "extent", "granule" or "cut".
func (p Policy) String() string {
	switch p {
	case Auto:
		return "auto"
	case Extent:
		return "extent"
	case Granule:
		return "granule"
	case Cut:
		return "cut"
	}
	return fmt.Sprintf("policy(%d)", int(p))
}

// ParsePolicy parses "auto", "extent", "granule" or "cut".
func ParsePolicy(s string) (Policy, error) {
	for _, p := range []Policy{Auto, Extent, Granule, Cut} {
		if s == p.String() {
			return p, nil
		}
	}
	return 0, fmt.Errorf("dma: unknown policy %q (want auto, extent, granule or cut): %w", s, ErrOptions)
}

// ErrOptions is wrapped by every error New returns for Options it cannot
// use: an unknown policy, a granularity or MaxExtent that is not a power of
// two of the right size, Cut on a space that cannot cut.
var ErrOptions = errors.New("dma: invalid mapper options")

// Options configure a Mapper.
type Options struct {
	// Policy shapes the entries (default Auto: Cut where the space can
	// cut, else Extent).
	Policy Policy
	// Granularity is the granule of the Granule policy in bytes, a power of
	// two (default 4096).
	Granularity uint64
	// MaxExtent bounds the entries of the Extent and Cut policies: no
	// entry crosses a multiple of MaxExtent (in region offsets). For
	// Extent it bounds the cost of a split, which unmaps, re-pins and hides
	// from the device at most one chunk of MaxExtent bytes at each end of
	// the discarded range, while the rest of a large extent stays mapped.
	// A cut hides nothing outside its range, so for Cut the bound limits
	// no window: it only shapes the entries (2 MiB ones, by default) and
	// the lock shards (see Mapper), and Unbounded is as good. A power of
	// two of at least 4 KiB; 0 means DefaultMaxExtent, Unbounded none.
	MaxExtent uint64
	// SplitReserve is the number of IOMMU entries a populate must leave free
	// in a limited space, so that a discard that splits an entry finds one:
	// populates are refused (ENOSPC) while the space is that close to full,
	// discards may use the reserve. 0 means DefaultSplitReserve of the
	// space's limit for Extent, none for Granule (whose discards of whole
	// granules never split, as in QEMU) and Cut (whose spaces, iommufd's,
	// have no limit); NoReserve none.
	SplitReserve uint64
	// RegionSize is the size of the region whose sections the mapper is
	// told about (0: len(host), if host is given). It only spreads the lock
	// shards: each window is then at least RegionSize/64, so every shard
	// holds one contiguous part of the region and operations on distant
	// parts of it touch no common lock or table. Without it windows are
	// 64 MiB, and a region of more than 64 of them meets every shard from
	// each of its parts.
	RegionSize uint64
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
// unpins for the unmap and cut requests. An operation is one Populate,
// Discard or Revert; its window is the memory whose state it does not change
// that the device cannot reach at some moment during it (iommu.Window), and
// re-pinned bytes are what it mapped again after unmapping them itself. An
// Extent split's remainders are both; with MaxExtent they are bounded by two
// chunks. A Cut split's remainders are neither: its window and re-pinned
// bytes are 0.
type Stats struct {
	Entries     uint64 // IOMMU entries held now
	PeakEntries uint64 // most entries held at once
	MappedBytes uint64 // bytes mapped now
	MapCalls    uint64 // map requests sent to the IOMMU
	UnmapCalls  uint64 // unmap requests sent to the IOMMU
	CutCalls    uint64 // cut requests sent to the IOMMU (Cut policy)
	// Splits counts the entries a discard cut while keeping their pages
	// outside it mapped: Extent and Granule unmap such an entry and map the
	// remainders again, Cut leaves them in place. A discard that failed, or
	// was reverted, splits nothing.
	Splits        uint64
	Failures      uint64 // Populate or Discard calls that failed
	PinnedBytes   uint64 // bytes pinned by successful map requests
	UnpinnedBytes uint64 // bytes unpinned by successful unmap requests
	RepinnedBytes uint64 // bytes an operation mapped again after unmapping them
	WindowBytes   uint64 // the windows of all operations, summed
	MaxWindow     uint64 // the largest window of one operation
}

// Add adds x's counters to s: every count and byte total is summed, and
// MaxWindow is the larger of the two. Entries and PeakEntries are summed too:
// for Mappers sharing one space the summed peak bounds the space's peak from
// above.
func (s *Stats) Add(x Stats) {
	s.Entries += x.Entries
	s.PeakEntries += x.PeakEntries
	s.MappedBytes += x.MappedBytes
	s.MapCalls += x.MapCalls
	s.UnmapCalls += x.UnmapCalls
	s.CutCalls += x.CutCalls
	s.Splits += x.Splits
	s.Failures += x.Failures
	s.PinnedBytes += x.PinnedBytes
	s.UnpinnedBytes += x.UnpinnedBytes
	s.RepinnedBytes += x.RepinnedBytes
	s.WindowBytes += x.WindowBytes
	s.MaxWindow = max(s.MaxWindow, x.MaxWindow)
}

// Mapper is a discard.Listener that mirrors its section's populated pages
// into an IOMMU space.
//
// Its table holds an entry per IOMMU mapping it made. Under Cut the kernel
// may hold one entry as several areas (a failed cut may have split it before
// failing); the pages always agree, and every request the mapper makes
// covers whole entries or is a cut, so that never matters.
//
// Its entry table is kept in windows of IOVA (64 MiB, a 64th of the
// region, or the bound, whichever is largest) spread over a fixed set of
// shards, each with its own lock. Every
// entry lies inside one chunk of the bound in region offsets (MaxExtent for
// Extent and Cut, the granule for Granule: splits, cuts and reverts only
// make parts of entries), so an operation on a section touches only entries
// that start less than one bound below or above the section's IOVA range.
// It locks the shards of those windows in ascending order for its whole
// run, table and IOMMU calls together (they must change in step), so
// operations on sections a window apart take different locks. An Unbounded
// mapper has a single shard: an entry may be as large as the region.
type Mapper struct {
	space iommu.Space
	// cutter is space as a Cutter under the Cut policy, else nil.
	cutter iommu.Cutter
	host   []byte
	opts   Options
	log    *slog.Logger

	// bound is the size no entry exceeds; 1<<shift the bytes of a window.
	bound uint64
	shift uint
	// limited says a space answered limited once, so later budget checks
	// lock budgetMu before reading Avail; an unlimited space never takes
	// the lock. Set once, read by every populate: it sits with the fields
	// above, away from the counters every map and unmap writes.
	limited atomic.Bool
	// The padding keeps the first shard's lock off the line of the fields
	// above, which every operation reads.
	_      [64]byte
	shards [shardCount]shard

	entries atomic.Uint64 // entries held now, across shards
	peak    atomic.Uint64 // most entries held at once

	// budgetMu makes checking a limited space's entry budget and taking
	// the entries one step: an operation that needs entries holds it from
	// reading Avail to its last map call, so concurrent operations cannot
	// both count the same free entries (or the split reserve).
	budgetMu sync.Mutex
}

// shardCount is the number of lock shards of a Mapper; 64, so that a set of
// shards is a bit mask.
const shardCount = 64

// windowShift is the log2 of the smallest window of a shard: 64 MiB.
const windowShift = 26

// shard is one lock shard: the entries of the windows it holds, the journal
// and the counters of the operations whose section starts in them.
type shard struct {
	mu      sync.Mutex
	entries *btree.BTreeG[entry]
	// journal holds, for each section notified in an operation that has
	// not ended, what the last notification of it changed, so Revert can
	// restore it exactly.
	journal map[discard.Section]change
	// free holds entry lists of settled notifications for reuse (take,
	// give).
	free [][]entry
	// stats are this shard's counters; Entries and PeakEntries are the
	// Mapper's.
	stats Stats
	// w measures the window of the operation whose section starts here.
	w iommu.Window
	_ [64]byte // keeps neighbouring shards' locks off one cache line
}

// take returns an empty slice for a journal entry list, reusing one a
// settled notification gave back, so that steady conversions allocate none.
// The shard's lock must be held.
func (sh *shard) take() []entry {
	n := len(sh.free)
	if n == 0 {
		return nil
	}
	es := sh.free[n-1]
	sh.free = sh.free[:n-1]
	return es[:0]
}

// give returns es, which nothing refers to any more, for reuse by take.
// Small lists only, and a bounded number of them: a rare large one is left
// to the collector.
func (sh *shard) give(es []entry) {
	if c := cap(es); c > 0 && c <= maxFreeEntries && len(sh.free) < maxFreeLists {
		sh.free = append(sh.free, es[:0])
	}
}

// The free lists of a shard: at most maxFreeLists lists of at most
// maxFreeEntries entries.
const (
	maxFreeLists   = 32
	maxFreeEntries = 8
)

// op is one running operation: the shards it holds, the shard of its
// section (journal and counters), and its window (the home shard's, reused
// from operation to operation so that measuring it allocates nothing).
type op struct {
	mask uint64
	home *shard
	w    *iommu.Window
}

// change is what one notification did to the entries. A cut discard
// (cut) removed the parts of removed inside its section and left added,
// the remainders, in place.
type change struct {
	removed, added []entry
	splits         uint64
	cut            bool
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

// inside returns the part of e's IOVA range inside r.
func (e entry) inside(r span.Range) span.Range {
	return span.Range{Start: e.iova, End: e.end()}.Intersect(r)
}

// outside appends to dst the parts of e outside r, its head before r and
// its tail after it, each an entry of its own, and returns the extended
// slice.
func (e entry) outside(dst []entry, r span.Range) []entry {
	if e.iova < r.Start {
		dst = append(dst, entry{iova: e.iova, size: r.Start - e.iova, off: e.off})
	}
	if e.end() > r.End {
		dst = append(dst, entry{iova: r.End, size: e.end() - r.End, off: e.off + (r.End - e.iova)})
	}
	return dst
}

// New returns a Mapper that maps into space. host is the region's memory
// (region offset 0 is host[0]); it may be nil for a Model used without DMA.
// Options it cannot use are an error wrapping ErrOptions; Auto is resolved
// here, from space.Caps().Cut.
func New(space iommu.Space, host []byte, opts Options) (*Mapper, error) {
	if opts.Granularity == 0 {
		opts.Granularity = 4096
	}
	if !span.IsPowerOfTwo(opts.Granularity) {
		return nil, fmt.Errorf("dma: granularity %#x is not a power of two: %w", opts.Granularity, ErrOptions)
	}
	cutter, canCut := space.(iommu.Cutter)
	canCut = canCut && space.Caps().Cut
	switch opts.Policy {
	case Auto:
		opts.Policy = Extent
		if canCut {
			opts.Policy = Cut
		}
	case Cut:
		if !canCut {
			return nil, fmt.Errorf("dma: the cut policy needs a space that can cut a mapping (an iommufd IOAS with huge pages off, set as the compat IOAS): %w", ErrOptions)
		}
	case Extent, Granule:
	default:
		return nil, fmt.Errorf("dma: unknown policy %d: %w", opts.Policy, ErrOptions)
	}
	if opts.MaxExtent == 0 {
		opts.MaxExtent = DefaultMaxExtent
	}
	if opts.MaxExtent != Unbounded && (!span.IsPowerOfTwo(opts.MaxExtent) || opts.MaxExtent < 4096) {
		return nil, fmt.Errorf("dma: maximum extent %#x is not a power of two of at least 4 KiB: %w", opts.MaxExtent, ErrOptions)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Mapper{space: space, host: host, opts: opts, log: log}
	if opts.Policy == Cut {
		m.cutter = cutter
	}
	m.bound = opts.MaxExtent
	if opts.Policy == Granule {
		m.bound = opts.Granularity
	}
	switch {
	case m.bound == Unbounded:
		m.shift = 64 // one window: every address is in shard 0
	default:
		m.shift = max(windowShift, uint(bits.TrailingZeros64(m.bound)))
		size := opts.RegionSize
		if size == 0 {
			size = uint64(len(host))
		}
		m.shift = span.PieceShift(size, shardCount, m.shift)
	}
	for i := range m.shards {
		m.shards[i].entries = btree.NewG(16, func(a, b entry) bool { return a.iova < b.iova })
		m.shards[i].journal = make(map[discard.Section]change)
	}
	return m, nil
}

// window returns the window of IOVA a; first and last its bounds.
func (m *Mapper) window(a uint64) uint64 { return a >> m.shift }
func (m *Mapper) first(w uint64) uint64  { return w << m.shift }
func (m *Mapper) last(w uint64) uint64   { return m.first(w) + (uint64(1)<<m.shift - 1) }

func (m *Mapper) shardOf(w uint64) *shard { return &m.shards[w%shardCount] }

func bit(w uint64) uint64 { return 1 << (w % shardCount) }

// mask returns the shards of the windows [first, last] meets.
func (m *Mapper) mask(first, last uint64) uint64 {
	w0, w1 := m.window(first), m.window(last)
	if w1-w0 >= shardCount-1 {
		return ^uint64(0)
	}
	var mask uint64
	for w := w0; ; w++ {
		mask |= bit(w)
		if w == w1 {
			return mask
		}
	}
}

func (m *Mapper) lock(mask uint64) {
	for b := mask; b != 0; b &= b - 1 {
		m.shards[bits.TrailingZeros64(b)].mu.Lock()
	}
}

func (m *Mapper) unlock(mask uint64) {
	for b := mask; b != 0; b &= b - 1 {
		m.shards[bits.TrailingZeros64(b)].mu.Unlock()
	}
}

// begin locks what an operation on s may touch: the windows of every entry
// that starts less than one bound below or above s's IOVA range. Any entry
// that meets s, the remainders of one it cuts, and the entries a revert
// restores lie there.
func (m *Mapper) begin(s discard.Section) op {
	lo := s.GPA - min(s.GPA, m.bound-1)
	end := s.GPA + s.Size
	hi := end + min(^uint64(0)-end, m.bound-1) // one past, saturated
	mask := bit(m.window(s.GPA))
	if hi > lo {
		mask |= m.mask(lo, hi-1)
	}
	m.lock(mask)
	home := m.shardOf(m.window(s.GPA))
	home.w.Reset()
	return op{mask: mask, home: home, w: &home.w}
}

// end ends the measurement of o's window and releases its shards.
func (m *Mapper) end(o *op) {
	st := &o.home.stats
	w := o.w.Bytes(func(r span.Range) uint64 { return m.mappedIn(o, r) })
	st.WindowBytes += w
	st.MaxWindow = max(st.MaxWindow, w)
	st.RepinnedBytes += o.w.Repinned()
	m.unlock(o.mask)
}

// Policy returns the mapper's policy: Extent, Granule or Cut (Auto
// resolved).
func (m *Mapper) Policy() Policy { return m.opts.Policy }

// Stats returns the counters, as one snapshot.
func (m *Mapper) Stats() Stats {
	m.lock(^uint64(0))
	defer m.unlock(^uint64(0))
	var t Stats
	for i := range m.shards {
		t.Add(m.shards[i].stats)
	}
	t.Entries = m.entries.Load()
	t.PeakEntries = m.peak.Load()
	return t
}

// Entries returns the IOVA ranges the mapper has mapped, ascending.
func (m *Mapper) Entries() []iommu.Mapping {
	m.lock(^uint64(0))
	defer m.unlock(^uint64(0))
	out := make([]iommu.Mapping, 0, m.entries.Load())
	for i := range m.shards {
		m.shards[i].entries.Ascend(func(e entry) bool {
			out = append(out, iommu.Mapping{IOVA: e.iova, Size: e.size})
			return true
		})
	}
	slices.SortFunc(out, func(a, b iommu.Mapping) int { return cmp.Compare(a.IOVA, b.IOVA) })
	return out
}

// Populate implements discard.Listener: it maps the parts of s not mapped yet.
func (m *Mapper) Populate(s discard.Section) error {
	o := m.begin(s)
	defer m.end(&o)
	if err := m.populate(&o, s); err != nil {
		o.home.stats.Failures++
		m.log.Warn("dma populate failed", "section", s, "err", err)
		return err
	}
	return nil
}

func (m *Mapper) populate(o *op, s discard.Section) error {
	if s.Size == 0 {
		return nil
	}
	pieces := o.home.take()
	at := s.GPA
	unit := m.bound
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
	var buf [2]entry
	for _, e := range m.overlapping(buf[:0], o, s.GPARange()) {
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
		o.home.give(pieces)
		o.home.journal[s] = change{}
		return nil
	}
	held, err := m.budget(uint64(len(pieces)), true, s.GPARange())
	if err != nil {
		o.home.give(pieces)
		return err
	}
	if held {
		defer m.budgetMu.Unlock()
	}
	for i, p := range pieces {
		if err := m.mapEntry(o, p); err != nil {
			for j := i - 1; j >= 0; j-- {
				if uerr := m.unmapEntries(o, pieces[j:j+1]); uerr != nil {
					err = errors.Join(err, uerr)
				}
			}
			o.home.give(pieces)
			return err
		}
	}
	o.home.journal[s] = change{added: pieces}
	return nil
}

// Discard implements discard.Listener: it unmaps everything inside s,
// splitting entries that stick out of it (under Cut, with one cut request).
func (m *Mapper) Discard(s discard.Section) error {
	o := m.begin(s)
	defer m.end(&o)
	if s.Size == 0 {
		// Nothing to discard (and an empty range inside an entry must not
		// split it), but a notification a failed operation may revert.
		o.home.journal[s] = change{}
		return nil
	}
	var buf [2]entry
	met := m.overlapping(buf[:0], &o, s.GPARange())
	if len(met) == 0 {
		// Nothing mapped meets s: no call, and a change of nothing to revert.
		o.home.journal[s] = change{}
		return nil
	}
	var err error
	if m.cutter != nil {
		err = m.cut(&o, s, met)
	} else {
		err = m.discard(&o, s, met)
	}
	if err != nil {
		o.home.stats.Failures++
		m.log.Warn("dma discard failed", "section", s, "err", err)
		return err
	}
	return nil
}

// discard is Discard under the other policies, over met, the entries s
// meets (at least one): it unmaps them and maps again the remainders of
// those that stick out of s, the splits first.
func (m *Mapper) discard(o *op, s discard.Section, met []entry) error {
	r := s.GPARange()
	// removed is what the journal keeps: the cut entries, then the inside
	// ones (the slices below are views of it).
	removed := o.home.take()
	for _, e := range met {
		if e.iova < r.Start || e.end() > r.End {
			removed = append(removed, e)
		}
	}
	ncut := len(removed)
	for _, e := range met {
		if e.iova >= r.Start && e.end() <= r.End {
			removed = append(removed, e)
		}
	}
	cut, inside := removed[:ncut:ncut], removed[ncut:]
	// The remainders of cut entries need entries of their own; each cut
	// entry and each inside one gives one back.
	var rest []entry
	if len(cut) > 0 {
		rest = o.home.take()
	}
	for _, e := range cut {
		rest = e.outside(rest, r)
	}
	held, err := m.splitBudget(o, r, len(cut)+len(inside), removed, rest)
	if err != nil {
		return err
	}
	if held {
		defer m.budgetMu.Unlock()
	}
	// Splits first: they are what may fail for want of an entry.
	var doneCut, doneRest []entry
	undo := func(err error) error {
		var errs []error
		for _, e := range doneRest {
			if uerr := m.unmapEntries(o, []entry{e}); uerr != nil {
				errs = append(errs, uerr)
			}
		}
		for _, e := range doneCut {
			if merr := m.mapEntry(o, e); merr != nil {
				errs = append(errs, merr)
			}
		}
		if len(errs) > 0 {
			m.log.Error("dma: restoring entries after a failed discard failed", "err", errors.Join(errs...))
		}
		o.home.give(removed)
		o.home.give(rest)
		return errors.Join(append([]error{err}, errs...)...)
	}
	for _, e := range cut {
		if err := m.unmapEntries(o, []entry{e}); err != nil {
			return undo(err)
		}
		doneCut = append(doneCut, e)
		for _, p := range rest {
			if p.iova >= e.iova && p.end() <= e.end() {
				if err := m.mapEntry(o, p); err != nil {
					return undo(err)
				}
				doneRest = append(doneRest, p)
			}
		}
		m.log.Debug("dma entry split", "iova", e.iova, "size", e.size, "discard", r)
	}
	if len(inside) > 0 {
		if err := m.unmapEntries(o, inside); err != nil {
			return undo(err)
		}
	}
	// Counted only now: a discard that failed and was undone split nothing.
	o.home.stats.Splits += uint64(len(cut))
	o.home.journal[s] = change{removed: removed, added: rest, splits: uint64(len(cut))}
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
//
// A cut cannot be taken back whole: the kernel does not join areas. Revert
// of a cut discard maps again the parts of s it removed, each as a new
// entry, and leaves the remainders as they are: the same pages are mapped
// as before, as more entries, and nothing outside s is touched.
func (m *Mapper) Revert(s discard.Section) error {
	o := m.begin(s)
	defer m.end(&o)
	c, ok := o.home.journal[s]
	if !ok {
		return fmt.Errorf("dma: nothing to revert for %v", s)
	}
	delete(o.home.journal, s)
	var err error
	if c.cut {
		err = m.uncut(&o, s, c)
	} else if m.holds(&o, c.added) {
		err = m.restore(&o, c)
	} else {
		m.log.Info("dma revert: entries around the section changed since; mapping the section anew", "section", s)
		err = m.populate(&o, s)
		if pc, ok := o.home.journal[s]; ok {
			o.home.give(pc.removed)
			o.home.give(pc.added)
			delete(o.home.journal, s)
		}
	}
	o.home.give(c.removed)
	o.home.give(c.added)
	if err != nil {
		o.home.stats.Failures++
		m.log.Error("dma revert failed", "section", s, "err", err)
		return err
	}
	return nil
}

// holds reports whether every entry of es is in the table, unchanged.
func (m *Mapper) holds(o *op, es []entry) bool {
	for _, e := range es {
		if got, ok := m.locked(o, e.iova).entries.Get(e); !ok || got != e {
			return false
		}
	}
	return true
}

// splitBudget takes from the entry budget what a discard of r that leaves
// the entries rest needs beyond the freed ones it removes, as budget does
// (held: the caller unlocks budgetMu when done). Where the budget refuses,
// it gives removed and rest back to the op's pool.
func (m *Mapper) splitBudget(o *op, r span.Range, freed int, removed, rest []entry) (held bool, err error) {
	if len(rest) <= freed {
		return false, nil
	}
	held, err = m.budget(uint64(len(rest)-freed), false, r)
	if err != nil {
		o.home.give(removed)
		o.home.give(rest)
	}
	return held, err
}

// restore undoes change c: it removes the entries c added and maps again the
// ones it removed.
func (m *Mapper) restore(o *op, c change) error {
	var errs []error
	for _, e := range c.added {
		if err := m.unmapEntries(o, []entry{e}); err != nil {
			errs = append(errs, err)
		}
	}
	slices.SortFunc(c.removed, func(a, b entry) int { return cmp.Compare(a.iova, b.iova) })
	for _, e := range c.removed {
		if err := m.mapEntry(o, e); err != nil {
			errs = append(errs, err)
		}
	}
	o.home.stats.Splits -= c.splits
	return errors.Join(errs...)
}

// cut is Discard under the Cut policy, over met, the entries s meets (at
// least one): one cut request over s removes the pages of s from each of
// them, and the table replaces them by their remainders without any other
// call.
func (m *Mapper) cut(o *op, s discard.Section, met []entry) error {
	r := s.GPARange()
	removed := append(o.home.take(), met...)
	var rest []entry
	var splits, want uint64
	for _, e := range met {
		if e.iova < r.Start || e.end() > r.End {
			splits++
			if rest == nil {
				rest = o.home.take()
			}
		}
		rest = e.outside(rest, r)
		want += e.inside(r).Len()
	}
	// Generic budget logic; the spaces that cut have no limit.
	held, err := m.splitBudget(o, r, len(met), removed, rest)
	if err != nil {
		return err
	}
	if held {
		defer m.budgetMu.Unlock()
	}
	st := &o.home.stats
	st.CutCalls++
	n, err := m.cutter.Cut(r.Start, r.Len())
	if err != nil {
		err = fmt.Errorf("dma: cut iova %#x size %#x: %w", r.Start, r.Len(), err)
		if n > 0 {
			err = m.recut(o, met, r, n, err)
		}
		o.home.give(removed)
		o.home.give(rest)
		return err
	}
	if n != want {
		m.log.Error("dma: cut removed an unexpected size", "iova", r.Start, "size", r.Len(), "unmapped", n, "expected", want)
	}
	for _, e := range met {
		m.locked(o, e.iova).entries.Delete(e)
		in := e.inside(r)
		o.w.Unmapped(in)
		st.MappedBytes -= in.Len()
		st.UnpinnedBytes += in.Len()
	}
	for _, p := range rest {
		m.locked(o, p.iova).entries.ReplaceOrInsert(p)
	}
	m.count(len(rest) - len(met))
	st.Splits += splits
	o.home.journal[s] = change{removed: removed, added: rest, splits: splits, cut: true}
	return nil
}

// recut handles a cut request that failed after unmapping n bytes (an
// unmap that stopped part way): the kernel had split the entries at both
// ends of r and removed areas in ascending order, so the pages gone are the
// first n mapped bytes of r. It maps them again, each part a new entry, and
// makes the table what the kernel now holds: the remainders, the parts
// mapped again and the parts never removed, each its own entry. A part that
// cannot be mapped again leaves the table (so it stays truthful about what
// is mapped) and its error is joined to err.
func (m *Mapper) recut(o *op, met []entry, r span.Range, n uint64, err error) error {
	st := &o.home.stats
	errs := []error{err}
	var pieces [3]entry
	for _, e := range met {
		in := e.inside(r)
		gone := min(n, in.Len())
		n -= gone
		ps := e.outside(pieces[:0], r)
		if kept := in.Len() - gone; kept > 0 {
			ps = append(ps, entry{iova: in.Start + gone, size: kept, off: e.off + (in.Start + gone - e.iova)})
		}
		m.locked(o, e.iova).entries.Delete(e)
		for _, p := range ps {
			m.locked(o, p.iova).entries.ReplaceOrInsert(p)
		}
		m.count(len(ps) - 1)
		if gone == 0 {
			continue
		}
		lost := entry{iova: in.Start, size: gone, off: e.off + (in.Start - e.iova)}
		o.w.Unmapped(span.Range{Start: lost.iova, End: lost.end()})
		st.MappedBytes -= gone
		st.UnpinnedBytes += gone
		if merr := m.mapEntry(o, lost); merr != nil {
			errs = append(errs, merr)
		}
	}
	if len(errs) > 1 {
		m.log.Error("dma: restoring pages after a failed cut failed", "err", errors.Join(errs[1:]...))
	}
	return errors.Join(errs...)
}

// uncut undoes a cut discard of s: it maps again, each as a new entry, the
// parts of s the cut removed. The remainders stay as the cut left them
// (whatever a neighbour has done to them since), and s is the caller's to
// change, so nothing else is looked at.
func (m *Mapper) uncut(o *op, s discard.Section, c change) error {
	r := s.GPARange()
	slices.SortFunc(c.removed, func(a, b entry) int { return cmp.Compare(a.iova, b.iova) })
	var errs []error
	for _, e := range c.removed {
		in := e.inside(r)
		if err := m.mapEntry(o, entry{iova: in.Start, size: in.Len(), off: e.off + (in.Start - e.iova)}); err != nil {
			errs = append(errs, err)
		}
	}
	o.home.stats.Splits -= c.splits
	return errors.Join(errs...)
}

// Settle implements discard.Journal.
func (m *Mapper) Settle(s discard.Section) {
	sh := m.shardOf(m.window(s.GPA))
	sh.mu.Lock()
	if c, ok := sh.journal[s]; ok {
		sh.give(c.removed)
		sh.give(c.added)
		delete(sh.journal, s)
	}
	sh.mu.Unlock()
}

// budget fails with ENOSPC when the space has fewer than n entries left
// (beyond the split reserve for a populate), for the notification of r (the
// count is this section's, not the whole conversion's). For a limited space
// it returns with budgetMu held (held true): the caller releases it after
// its last map call.
func (m *Mapper) budget(n uint64, populate bool, r span.Range) (held bool, err error) {
	locked := m.limited.Load()
	if locked {
		m.budgetMu.Lock()
	}
	avail, limited, err := m.space.Avail()
	if err == nil && limited && !locked {
		// The first answer of a limited space: check again under the lock.
		m.limited.Store(true)
		m.budgetMu.Lock()
		locked = true
		avail, limited, err = m.space.Avail()
	}
	if locked && (err != nil || !limited) {
		m.budgetMu.Unlock()
	}
	if err != nil {
		return false, fmt.Errorf("dma: reading the entry budget: %w", err)
	}
	if !limited {
		return false, nil
	}
	var reserve uint64
	if populate {
		reserve = m.reserve()
	}
	if avail < n || avail-n < reserve {
		m.budgetMu.Unlock()
		what := "mapping GPA " + r.String()
		if !populate {
			what = "unmapping GPA " + r.String() + " splits entries and"
		}
		entries := "entries"
		if n == 1 {
			entries = "entry"
		}
		if reserve > 0 {
			return false, fmt.Errorf("dma: %s needs %d more IOMMU %s, %d left, %d of them kept for splits: %w", what, n, entries, avail, reserve, unix.ENOSPC)
		}
		return false, fmt.Errorf("dma: %s needs %d more IOMMU %s, %d left: %w", what, n, entries, avail, unix.ENOSPC)
	}
	return true, nil
}

// reserve returns the entries a populate must leave free.
func (m *Mapper) reserve() uint64 {
	switch r := m.opts.SplitReserve; r {
	case NoReserve:
		return 0
	case 0:
		if m.opts.Policy != Extent {
			return 0
		}
		return DefaultSplitReserve(m.space.Caps().EntryLimit)
	default:
		return r
	}
}

// mappedIn returns how many bytes of r the mapper has mapped.
func (m *Mapper) mappedIn(o *op, r span.Range) uint64 {
	var n uint64
	var buf [2]entry
	for _, e := range m.overlapping(buf[:0], o, r) {
		n += span.Range{Start: e.iova, End: e.end()}.Intersect(r).Len()
	}
	return n
}

// locked returns the shard of IOVA a, which o must hold.
func (m *Mapper) locked(o *op, a uint64) *shard {
	w := m.window(a)
	if o.mask&bit(w) == 0 {
		panic(fmt.Sprintf("dma: IOVA %#x outside the shards the operation holds", a))
	}
	return m.shardOf(w)
}

// mapEntry maps e and records it.
func (m *Mapper) mapEntry(o *op, e entry) error {
	var host []byte
	if m.host != nil {
		if e.off+e.size > uint64(len(m.host)) || e.off+e.size < e.off {
			return fmt.Errorf("dma: region offset %#x size %#x beyond the host memory: %w", e.off, e.size, unix.EINVAL)
		}
		host = m.host[e.off : e.off+e.size : e.off+e.size]
	}
	sh := m.locked(o, e.iova)
	st := &o.home.stats
	st.MapCalls++
	if err := m.space.Map(e.iova, e.size, host); err != nil {
		return fmt.Errorf("dma: map iova %#x size %#x: %w", e.iova, e.size, err)
	}
	sh.entries.ReplaceOrInsert(e)
	o.w.Mapped(span.Range{Start: e.iova, End: e.end()})
	st.MappedBytes += e.size
	st.PinnedBytes += e.size
	m.count(1)
	return nil
}

// count adds d to the entries held, and keeps the peak.
func (m *Mapper) count(d int) {
	if d <= 0 {
		m.entries.Add(-uint64(-d))
		return
	}
	n := m.entries.Add(uint64(d))
	for p := m.peak.Load(); n > p && !m.peak.CompareAndSwap(p, n); p = m.peak.Load() {
	}
}

// unmapEntries removes es with one unmap request from the first to the end
// of the last. es must be ascending and hold every entry of the mapper in
// that span, so the request covers only whole entries, which both kernels
// accept.
func (m *Mapper) unmapEntries(o *op, es []entry) error {
	if len(es) == 0 {
		return nil
	}
	first, last := es[0], es[len(es)-1]
	size := last.end() - first.iova
	st := &o.home.stats
	st.UnmapCalls++
	n, err := m.space.Unmap(first.iova, size)
	if err != nil {
		return fmt.Errorf("dma: unmap iova %#x size %#x: %w", first.iova, size, err)
	}
	var want uint64
	for _, e := range es {
		want += e.size
	}
	for _, e := range es {
		m.locked(o, e.iova).entries.Delete(e)
		o.w.Unmapped(span.Range{Start: e.iova, End: e.end()})
		st.MappedBytes -= e.size
		st.UnpinnedBytes += e.size
	}
	m.count(-len(es))
	if n != want {
		m.log.Error("dma: unmap removed an unexpected size", "iova", first.iova, "size", size, "unmapped", n, "expected", want)
	}
	return nil
}

// overlapping appends to out the entries that meet r, ascending, and
// returns the extended slice (callers pass a buffer on their stack). r must
// lie in the range o locked.
func (m *Mapper) overlapping(out []entry, o *op, r span.Range) []entry {
	if e, ok := m.before(o, r.Start); ok && e.end() > r.Start {
		out = append(out, e)
	}
	m.ascend(o, r.Start, r.End, func(e entry) { out = append(out, e) })
	return out
}

// before returns the entry with the highest IOVA below a, among those that
// could reach a (starting less than one bound below it) in the shards o
// holds. Entries do not overlap, so it is the only one below a that may
// hold a.
func (m *Mapper) before(o *op, a uint64) (entry, bool) {
	if a == 0 {
		return entry{}, false
	}
	lo := a - min(a, m.bound-1)
	for w := m.window(a - 1); o.mask&bit(w) != 0; w-- {
		// The windows down to lo's are all held (begin locks them); one
		// that is not lies below lo.
		from := max(m.first(w), lo)
		var hit entry
		found := false
		m.shardOf(w).entries.DescendLessOrEqual(entry{iova: a - 1}, func(e entry) bool {
			if e.iova >= from {
				hit, found = e, true
			}
			return false
		})
		if found {
			return hit, true
		}
		if m.first(w) <= lo || w == 0 {
			break
		}
	}
	return entry{}, false
}

// ascend calls fn for each entry whose IOVA lies in [from, to), ascending.
func (m *Mapper) ascend(o *op, from, to uint64, fn func(entry)) {
	if from >= to {
		return
	}
	w0, w1 := m.window(from), m.window(to-1)
	if w1-w0 < shardCount {
		for w := w0; ; w++ {
			lo, hi := max(from, m.first(w)), min(to-1, m.last(w))
			m.locked(o, lo).entries.AscendGreaterOrEqual(entry{iova: lo}, func(e entry) bool {
				if e.iova > hi {
					return false
				}
				fn(e)
				return true
			})
			if w == w1 {
				return
			}
		}
	}
	// More windows than shards: o holds every shard; merge them.
	if o.mask != ^uint64(0) {
		panic(fmt.Sprintf("dma: IOVA %#x-%#x outside the shards the operation holds", from, to))
	}
	var all []entry
	for i := range m.shards {
		m.shards[i].entries.AscendGreaterOrEqual(entry{iova: from}, func(e entry) bool {
			if e.iova >= to {
				return false
			}
			all = append(all, e)
			return true
		})
	}
	slices.SortFunc(all, func(a, b entry) int { return cmp.Compare(a.iova, b.iova) })
	for _, e := range all {
		fn(e)
	}
}
