package pagemap

import (
	"iter"
	"math/rand/v2"
	"slices"

	"github.com/gmemproject/gmem/span"
)

// Chunk geometry: chunks of 2^16 pages, so that an offset inside a chunk
// fits in a uint16 and a dense chunk is 8 KiB (1 bit) or 16 KiB (2 bits).
const (
	chunkShift = 16
	chunkPages = 1 << chunkShift
	chunkMask  = chunkPages - 1
)

// runsStructBytes is the allocation size of a Runs header (checked against
// the type by a test).
const runsStructBytes = 128

// Runs is a Map stored as runs; see the package documentation for its
// layout and costs.
type Runs struct {
	pages  uint64
	chunks uint64 // number of chunks, the last one possibly partial
	bits   uint
	root   *seg
	// segs and chunkBytes account for Bytes: the number of segments and the
	// bytes held by chunks, kept up to date by every change.
	segs       uint64
	chunkBytes uint64
	rng        uint64 // state of the treap's priority generator
	// spareSeg and spareChunk keep one dropped segment and one small chunk
	// for reuse: a page converted and converted back creates and drops a
	// chunk and segments each time, and reusing them saves the allocations.
	// Bytes counts them.
	spareSeg   *seg
	spareChunk *chunk
	// hot caches the chunks of chunk segments by chunk index modulo
	// len(hot), so that Get and Set of a page in a chunk edited before skip
	// the search of the index (a region converted page by page at random
	// keeps every chunk it touches as a chunk segment) and the load of the
	// segment: a cold Get is then the entry, then the chunk's header and its
	// runs at once (see hotEntry). Only Set
	// fills it, so Get stays read-only and callers may still run Gets at once
	// under a read lock. A chunk stays with its segment until the segment is
	// dropped, so drop is the one place that clears an entry; other changes
	// of the index leave the entries valid.
	hot []hotEntry
	// chunkSegs counts the chunk segments, for growHot.
	chunkSegs uint64
	// linger is the chunk (of chunk lingerCI) last left holding a single
	// run in runs form, which stays a chunk segment until another chunk is
	// left so (see setPartial); nil if none. drop clears it.
	linger   *chunk
	lingerCI uint64
}

// hotEntry is a cached chunk: c (nil: none) is the chunk of chunk ci. It
// also holds c.starts, so that a cold Get of a 1-bit runs chunk loads the
// starts and c's header at once, not one after the other; Set refreshes it
// after every change of c.
type hotEntry struct {
	c      *chunk
	starts []uint16
	ci     uint64
}

// newHotEntry returns the entry of chunk c of chunk ci.
func newHotEntry(c *chunk, ci uint64) hotEntry { return hotEntry{c: c, starts: c.starts, ci: ci} }

// holds reports whether e holds the chunk of chunk ci.
func (e *hotEntry) holds(ci uint64) bool { return e.c != nil && e.ci == ci }

// newHot returns an empty hot cache of n entries. Its capacity is what the
// allocation holds, so that Bytes, counting the capacity, is exact.
func newHot(n int) []hotEntry { return slices.Grow([]hotEntry(nil), n)[:n] }

// The hot cache grows with the chunk segments: it doubles, from minHot
// entries, whenever there are more chunk segments than entries, until it has
// one entry per chunk or maxHot entries (4,096 chunks are 1 TiB of 4 KiB
// pages, and 64 KiB of cache). Scattered single-page conversions across a
// large region otherwise walk the treap, a pointer chase of a dozen cache
// misses, on every Get and Set; and since every chunk segment costs more than
// the two entries it can add, the map's memory still grows with its runs, not
// its size. Past maxHot, chunks share entries.
const (
	minHot        = 64
	maxHot        = 4096
	hotEntryBytes = 40 // the size of a hotEntry (checked against the type by a test)
)

// firstHot is the size of a new map's hot cache: minHot, or for a map of
// fewer chunks the power of two that covers them (a part of a parted
// discard.StateSource is one to a few chunks and needs no more).
func firstHot(chunks uint64) int {
	n := 1
	for n < minHot && uint64(n) < chunks {
		n *= 2
	}
	return n
}

// growHot doubles the hot cache if the chunk segments outnumber its entries
// and it is smaller than both the chunks and maxHot, and reports whether it
// did. The new cache starts empty.
func (m *Runs) growHot() bool {
	n := uint64(len(m.hot))
	if m.chunkSegs <= n || n >= maxHot || n >= m.chunks {
		return false
	}
	m.hot = newHot(int(2 * n))
	return true
}

var _ Map = (*Runs)(nil)

// NewRuns returns a Runs of the given number of pages, every page 0, with
// bits (1 or 2) bits per page.
func NewRuns(pages uint64, bits uint) (*Runs, error) {
	if err := checkBits(bits); err != nil {
		return nil, err
	}
	m := &Runs{pages: pages, bits: bits, rng: rand.Uint64()}
	m.chunks = pages >> chunkShift
	if pages&chunkMask != 0 {
		m.chunks++
	}
	m.hot = newHot(firstHot(m.chunks))
	if m.chunks > 0 {
		m.root = m.newSeg(0, m.chunks, 0)
	}
	return m, nil
}

// Pages implements Map.
func (m *Runs) Pages() uint64 { return m.pages }

// Bits implements Map.
func (m *Runs) Bits() uint { return m.bits }

// Bytes implements Map. It counts the header, the hot cache, every segment
// of the index and every chunk's header and slice capacity.
func (m *Runs) Bytes() uint64 {
	n := runsStructBytes + uint64(cap(m.hot))*hotEntryBytes + m.segs*segBytes + m.chunkBytes
	if m.spareSeg != nil {
		n += segBytes
	}
	if m.spareChunk != nil {
		n += m.spareChunk.bytes()
	}
	return n
}

// pageAt returns the first page of chunk ci, or Pages() for ci >= m.chunks
// (the end of the last, possibly partial, chunk).
func (m *Runs) pageAt(ci uint64) uint64 {
	if ci >= m.chunks {
		return m.pages
	}
	return ci << chunkShift
}

// chunkSize returns the number of pages of chunk ci.
func (m *Runs) chunkSize(ci uint64) int { return int(m.pageAt(ci+1) - m.pageAt(ci)) }

// Get implements Map.
func (m *Runs) Get(p uint64) uint8 {
	if p >= m.pages {
		panic("pagemap: page out of range")
	}
	ci := p >> chunkShift
	if e := &m.hot[ci&uint64(len(m.hot)-1)]; e.holds(ci) {
		// A 1-bit runs chunk is read through e.starts, not c.starts, so
		// that the load of the starts does not wait for c's header. The
		// header is read too, at both ends (c.starts' length, c.first), so
		// that its one or two cache lines load alongside: the Set that
		// usually follows a Get of a page that changes needs all of it.
		if c := e.c; len(c.starts) > 0 && m.bits == 1 {
			return c.first ^ uint8(runAt(e.starts, int(p&chunkMask))&1)
		}
		return e.c.get(m.bits, int(p&chunkMask))
	}
	s := m.find(ci)
	if s.c == nil {
		return s.val
	}
	return s.c.get(m.bits, int(p&chunkMask))
}

// Set implements Map. Whole chunks of r become one uniform segment; the
// partial chunks at either end are edited in their own representation.
func (m *Runs) Set(r span.Range, v uint8) error {
	if err := checkSet(r, v, m.pages, m.bits); err != nil {
		return err
	}
	ca, cb := r.Start>>chunkShift, (r.End-1)>>chunkShift // first and last chunk
	fa, fb := ca, cb+1                                   // whole chunks: [fa, fb)
	if r.Start != m.pageAt(ca) {
		fa = ca + 1
	}
	if r.End != m.pageAt(cb+1) {
		fb = cb
	}
	if ca == cb {
		if fa < fb {
			m.setChunks(fa, fb, v)
		} else {
			m.setPartial(ca, int(r.Start-m.pageAt(ca)), int(r.End-m.pageAt(ca)), v)
		}
		return nil
	}
	if fa != ca {
		m.setPartial(ca, int(r.Start-m.pageAt(ca)), m.chunkSize(ca), v)
	}
	if fb != cb+1 {
		m.setPartial(cb, 0, int(r.End-m.pageAt(cb)), v)
	}
	if fa < fb {
		m.setChunks(fa, fb, v)
	}
	return nil
}

// setChunks gives every page of chunks [fa, fb) the value v: the segments
// there are replaced by one uniform segment.
func (m *Runs) setChunks(fa, fb uint64, v uint8) {
	if s := m.find(fa); s.c == nil && s.val == v && s.end >= fb {
		return // already so
	}
	if fa > 0 {
		m.cut(fa)
	}
	if fb < m.chunks {
		m.cut(fb)
	}
	l, rest := split(m.root, fa)
	mid, r := split(rest, fb)
	m.dropAll(mid)
	m.root = merge(l, r)
	m.putUniform(fa, fb, v)
}

// setPartial gives offsets [a, b) of chunk ci the value v.
func (m *Runs) setPartial(ci uint64, a, b int, v uint8) {
	slot := &m.hot[ci&uint64(len(m.hot)-1)]
	c := slot.c
	if !slot.holds(ci) {
		s := m.find(ci)
		if s.c == nil {
			if s.val == v {
				return
			}
			// Isolate chunk ci in a segment of its own and give it a chunk.
			if ci > 0 {
				m.cut(ci)
			}
			if ci+1 < m.chunks {
				m.cut(ci + 1)
			}
			s = m.find(ci)
			s.c = m.takeChunk(s.val)
			m.chunkBytes += s.c.bytes()
			m.chunkSegs++
			if m.growHot() {
				slot = &m.hot[ci&uint64(len(m.hot)-1)]
			}
		}
		c = s.c
	}
	before := c.bytes()
	c.set(m.bits, m.chunkSize(ci), a, b, v)
	m.chunkBytes += c.bytes()
	m.chunkBytes -= before
	if c.numRuns() == 1 {
		if c.dense != nil {
			m.collapse(ci)
			return
		}
		// A page converted and converted back is the commonest edit, and
		// it leaves its chunk a single run that the next conversion there
		// splits again. So the chunk stays, and only the one left so
		// before it becomes a uniform segment: at most one chunk per map
		// holds a single run, and its index is not rebuilt each time.
		if old := m.linger; old != nil && old != c && old.numRuns() == 1 {
			m.collapse(m.lingerCI)
		}
		m.linger, m.lingerCI = c, ci
	}
	*slot = newHotEntry(c, ci)
}

// collapse turns chunk segment ci, whose chunk holds a single run, into a
// uniform segment.
func (m *Runs) collapse(ci uint64) {
	s := m.find(ci)
	u := s.c.uniformValue(m.bits)
	m.remove(s)
	m.drop(s)
	m.putUniform(ci, ci+1, u)
}

// Runs implements Map.
func (m *Runs) Runs(r span.Range) iter.Seq[Run] {
	return func(yield func(Run) bool) {
		r := r.Intersect(span.Range{End: m.pages})
		if r.Empty() {
			return
		}
		// Segments and chunks yield pieces; equal neighbours (a chunk's last
		// run and the uniform segment after it, say) are joined here so that
		// the runs yielded are maximal.
		var pend Run
		have, stopped := false, false
		emit := func(s, e uint64, v uint8) bool {
			if have && pend.Value == v {
				pend.End = e
				return true
			}
			if have && !yield(pend) {
				stopped = true
				return false
			}
			pend, have = Run{span.Range{Start: s, End: e}, v}, true
			return true
		}
		ascend(m.root, r.Start>>chunkShift, func(s *seg) bool {
			base, end := m.pageAt(s.start), m.pageAt(s.end)
			lo, hi := max(r.Start, base), min(r.End, end)
			if lo >= hi {
				return false
			}
			if s.c == nil {
				if !emit(lo, hi, s.val) {
					return false
				}
			} else if !s.c.runs(m.bits, int(end-base), int(lo-base), int(hi-base), base, emit) {
				return false
			}
			return end < r.End
		})
		if have && !stopped {
			yield(pend)
		}
	}
}

// Count implements Map.
func (m *Runs) Count(r span.Range, v uint8) uint64 {
	r = r.Intersect(span.Range{End: m.pages})
	if r.Empty() || v >= 1<<m.bits {
		return 0
	}
	var n uint64
	ascend(m.root, r.Start>>chunkShift, func(s *seg) bool {
		base, end := m.pageAt(s.start), m.pageAt(s.end)
		lo, hi := max(r.Start, base), min(r.End, end)
		if lo >= hi {
			return false
		}
		if s.c == nil {
			if s.val == v {
				n += hi - lo
			}
		} else {
			n += uint64(s.c.count(m.bits, int(end-base), int(lo-base), int(hi-base), v))
		}
		return end < r.End
	})
	return n
}

// Next implements Map.
func (m *Runs) Next(from uint64, v uint8) (uint64, bool) { return m.next(from, v, true) }

// NextNot implements Map.
func (m *Runs) NextNot(from uint64, v uint8) (uint64, bool) { return m.next(from, v, false) }

// next finds the first page >= from whose value equals v (want) or differs
// from v (!want).
func (m *Runs) next(from uint64, v uint8, want bool) (uint64, bool) {
	if from >= m.pages {
		return 0, false
	}
	if v >= 1<<m.bits {
		// No page holds v, so every page differs from it.
		if want {
			return 0, false
		}
		return from, true
	}
	var p uint64
	found := false
	ascend(m.root, from>>chunkShift, func(s *seg) bool {
		base, end := m.pageAt(s.start), m.pageAt(s.end)
		lo := max(from, base)
		if s.c == nil {
			if (s.val == v) == want {
				p, found = lo, true
				return false
			}
			return true
		}
		size := int(end - base)
		if off := s.c.find(m.bits, size, int(lo-base), v, want); off < size {
			p, found = base+uint64(off), true
			return false
		}
		return true
	})
	return p, found
}
