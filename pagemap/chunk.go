package pagemap

import "slices"

// chunk holds the pages of one chunk that is not uniform, in one of two
// forms:
//
//   - runs form (dense == nil): starts holds the offset of every run in
//     ascending order, starts[0] == 0; a run ends where the next one starts
//     or at the chunk's size. With 2 bits per page, vals holds each run's
//     value. With 1 bit per page vals is nil: adjacent runs differ, so values
//     alternate and run i holds first ^ (i & 1). A run costs 2 bytes (1 bit)
//     or 3 bytes (2 bits).
//   - dense form: width bits per page in dense, and nruns the number of runs,
//     kept up to date by every Set so that the switch back to runs needs no
//     scan.
//
// The runs form is kept only while its allocations are no larger than an
// eighth of the dense form's data (runsLimit); a chunk that would outgrow
// that becomes dense, and a dense chunk becomes runs again once its runs
// would take less than half of that, so that a pattern oscillating around the
// limit does not convert on every Set. Hence a chunk never costs more than its
// dense form plus the chunk header. An eighth, not the whole: an edit of the
// runs form costs a search and a move of the slices behind it, which
// past about 500 runs (1 KiB) costs many times the dense form's constant-time
// write, while the memory the runs form would still save is at most 7 KiB per
// 2^16 pages (256 MiB of guest memory).
//
// A chunk holds a single run only as its owner's lingering chunk (see
// Runs.setPartial); otherwise the owner turns it back into a uniform
// segment. The chunk's size (pages) and width are passed in by the owner.
type chunk struct {
	starts []uint16
	vals   []uint8
	dense  []uint64
	nruns  uint32
	first  uint8
}

// chunkStructBytes is the allocation size of a chunk header (checked against
// the type by a test).
const chunkStructBytes = 80

// entry is a run start and its value, used while editing the runs form.
type entry struct {
	start int
	v     uint8
}

// runBytes returns what one run costs in the runs form.
func runBytes(width uint) int {
	if width == 1 {
		return 2
	}
	return 3
}

// denseLimit returns the size of the dense form's data for a chunk of size
// pages.
func denseLimit(size int, width uint) int { return denseWords(size, width) * 8 }

// runsLimit returns the most the runs form of a chunk of size pages may
// allocate: an eighth of the dense form's data.
func runsLimit(size int, width uint) int { return denseLimit(size, width) / 8 }

// newChunk returns a chunk in runs form holding one run of value v; the
// caller is about to change part of it.
func newChunk(v uint8, width uint) *chunk {
	c := &chunk{first: v}
	c.starts = append(slices.Grow([]uint16(nil), 1), 0)
	if width == 2 {
		c.vals = append(slices.Grow([]uint8(nil), 1), v)
	}
	return c
}

// bytes returns the memory the chunk holds: its header and the capacity of
// its slices. The slices are always allocated by append or slices.Grow, which
// round the capacity up to the allocation's real size.
func (c *chunk) bytes() uint64 {
	return chunkStructBytes + uint64(cap(c.starts))*2 + uint64(cap(c.vals)) + uint64(cap(c.dense))*8
}

// numRuns returns the number of runs of the chunk.
func (c *chunk) numRuns() int {
	if c.dense != nil {
		return int(c.nruns)
	}
	return len(c.starts)
}

// val returns the value of run i (runs form).
func (c *chunk) val(i int, width uint) uint8 {
	if width == 1 {
		return c.first ^ uint8(i&1)
	}
	return c.vals[i]
}

// runEnd returns the end of run i (runs form).
func (c *chunk) runEnd(i, size int) int {
	if i+1 < len(c.starts) {
		return int(c.starts[i+1])
	}
	return size
}

// runAt returns the index of the run holding offset off (runs form).
func (c *chunk) runAt(off int) int { return runAt(c.starts, off) }

// runAt returns the index of the last of starts (ascending, starts[0] == 0)
// at or before off < 2^16. It starts where the runs would be if they were
// spread evenly over the chunk and gallops from there, so that in a chunk of
// scattered runs it reads one or two cache lines of starts, where a binary
// search over a few hundred would miss on nearly every step; a skewed
// chunk costs at most about twice a binary search.
func runAt(starts []uint16, off int) int {
	n := len(starts)
	o := uint16(off)
	lo := off * n >> chunkShift
	hi := lo // the answer is in [lo, hi)
	step := 1
	if starts[lo] <= o {
		for lo+step < n && starts[lo+step] <= o {
			lo += step
			step *= 2
		}
		hi = min(lo+step, n)
	} else {
		// starts[0] == 0 <= off, so hi > 0.
		for hi-step > 0 && starts[hi-step] > o {
			hi -= step
			step *= 2
		}
		lo = max(hi-step, 0)
	}
	return lo + searchStarts(starts[lo:hi], o)
}

// searchStarts returns the index of the last of s at or before o, given that
// s[0] is.
func searchStarts(s []uint16, o uint16) int {
	lo, hi := 0, len(s)
	for hi-lo > 1 {
		m := int(uint(lo+hi) >> 1)
		if s[m] <= o {
			lo = m
		} else {
			hi = m
		}
	}
	return lo
}

// get returns the value at offset off.
func (c *chunk) get(width uint, off int) uint8 {
	if c.dense != nil {
		return denseGet(c.dense, width, off)
	}
	return c.val(c.runAt(off), width)
}

// uniformValue returns the value of a chunk that holds a single run.
func (c *chunk) uniformValue(width uint) uint8 { return c.get(width, 0) }

// set gives offsets [a, b) the value v, 0 <= a < b <= size, switching form
// where the size rules above require it.
func (c *chunk) set(width uint, size, a, b int, v uint8) {
	if c.dense != nil {
		c.setDense(width, size, a, b, v)
		return
	}
	if width == 1 && b == a+1 && c.setOne(size, a, v) {
		return
	}
	c.setRuns(width, size, a, b, v)
}

// setRuns is set for a chunk in runs form: it replaces the runs [a, b) meets
// and switches to the dense form if the result would pass runsLimit.
func (c *chunk) setRuns(width uint, size, a, b int, v uint8) {
	i := c.runAt(a)
	j := i
	if b-1 >= c.runEnd(i, size) {
		j = c.runAt(b - 1)
	}
	// The runs i..j are replaced by at most three: what is left of run i
	// before a, the new run, what is left of run j after b.
	var e [3]entry
	k := 0
	if si := int(c.starts[i]); si < a {
		e[k] = entry{si, c.val(i, width)}
		k++
	}
	e[k] = entry{a, v}
	k++
	if end := c.runEnd(j, size); b < end {
		e[k] = entry{b, c.val(j, width)}
		k++
	}
	w := 0
	for x := range k {
		if w > 0 && e[w-1].v == e[x].v {
			continue // merges into the previous entry, which starts earlier
		}
		e[w] = e[x]
		w++
	}
	es := e[:w]
	lo, hi := i, j+1
	if lo > 0 && c.val(lo-1, width) == es[0].v {
		es = es[1:] // the new run extends run lo-1
	}
	var last uint8
	if len(es) > 0 {
		last = es[len(es)-1].v
	} else {
		last = c.val(lo-1, width) // es can only be empty if lo > 0
	}
	if hi < len(c.starts) && c.val(hi, width) == last {
		hi++ // run hi merges into what precedes it
	}
	if !c.splice(width, size, lo, hi, es) {
		c.toDense(width, size)
		c.setDense(width, size, a, b, v)
	}
}

// setOne gives offset a the value v in a 1-bit chunk in runs form, the
// commonest edit (one page converted), in place: with values alternating, a
// page that changes either joins its run's neighbours, moves one boundary,
// or splits its run in three. It reports false, changing nothing, when the
// edit would need the slices reallocated (to grow, or to shrink as splice
// does), which is left to setRuns.
func (c *chunk) setOne(size, a int, v uint8) bool {
	s := c.starts
	n := len(s)
	i := runAt(s, a)
	if c.first^uint8(i&1) == v {
		return true // already v
	}
	start, end := int(s[i]), size
	if i+1 < n {
		end = int(s[i+1])
	}
	// The runs either side of run i hold v. The edit removes del starts at
	// index at, or inserts the first len(ins) of ins there.
	var at, del int
	var ins []uint16
	switch {
	case start == a && end == a+1: // the page is run i: it and its neighbours merge
		switch {
		case n == 1: // a one-page chunk
		case i == 0: // run 1 now starts at 0
			at, del = 1, 1
		case i+1 < n:
			at, del = i, 2
		default:
			at, del = i, 1
		}
	case start == a: // run i-1 (or, for run 0, a new first run) takes the page
		if i > 0 {
			s[i]++
			return true
		}
		at, ins = 1, []uint16{uint16(a + 1)}
	case end == a+1: // run i+1 (or a new last run) takes the page
		if i+1 < n {
			s[i+1]--
			return true
		}
		at, ins = n, []uint16{uint16(a)}
	default: // run i splits around the page
		at, ins = i+1, []uint16{uint16(a), uint16(a + 1)}
	}
	n2 := n - del + len(ins)
	if n2 > cap(s) || oversized(n2, cap(s)) || cap(s)*2 > runsLimit(size, 1) {
		return false
	}
	if del > 0 {
		copy(s[at:], s[at+del:])
	}
	s = s[:n2]
	if len(ins) > 0 {
		copy(s[at+len(ins):], s[at:n])
		copy(s[at:], ins)
	}
	if i == 0 && start == a {
		c.first = v // the chunk now starts with a run of v
	}
	c.starts = s
	return true
}

// oversized reports whether a starts slice of capacity c is too large for n
// runs: four times what they need, and more than 64 bytes. splice then
// shrinks it, so a chunk in runs form never holds one.
func oversized(n, c int) bool { return 4*n <= c && c*2 > 64 }

// splice replaces runs [lo, hi) by es (runs form), reallocating to grow or
// to shrink when the slices are four times larger than needed. It reports
// false, changing nothing, if the result would allocate more than runsLimit.
func (c *chunk) splice(width uint, size, lo, hi int, es []entry) bool {
	n := len(c.starts)
	n2 := n - (hi - lo) + len(es)
	limit := runsLimit(size, width)
	capBytes := func(s []uint16, v []uint8) int { return cap(s)*2 + cap(v) }
	fits := n2 <= cap(c.starts) && (width == 1 || n2 <= cap(c.vals)) && capBytes(c.starts, c.vals) <= limit
	shrink := oversized(n2, cap(c.starts))
	starts, vals := c.starts, c.vals
	if !fits || shrink {
		if n2*runBytes(width) > limit {
			return false
		}
		want := max(n2, 2*cap(c.starts), 4)
		if shrink {
			want = 2 * n2
		}
		alloc := func(n int) ([]uint16, []uint8) {
			s := slices.Grow([]uint16(nil), n)
			var v []uint8
			if width == 2 {
				v = slices.Grow([]uint8(nil), n)
			}
			return s, v
		}
		starts, vals = alloc(want)
		if capBytes(starts, vals) > limit && want > n2 {
			starts, vals = alloc(n2)
		}
		if capBytes(starts, vals) > limit {
			return false
		}
		starts = append(starts, c.starts[:lo]...)
		if width == 2 {
			vals = append(vals, c.vals[:lo]...)
		}
	}
	// Move the tail first: copy handles the overlap when editing in place.
	tail := c.starts[hi:n]
	starts = starts[:n2]
	copy(starts[lo+len(es):], tail)
	if width == 2 {
		vtail := c.vals[hi:n]
		vals = vals[:n2]
		copy(vals[lo+len(es):], vtail)
	}
	for x, en := range es {
		starts[lo+x] = uint16(en.start)
		if width == 2 {
			vals[lo+x] = en.v
		}
	}
	if lo == 0 && width == 1 {
		c.first = es[0].v // lo == 0 means nothing precedes, so es is not empty
	}
	c.starts, c.vals = starts, vals
	return true
}

// setDense gives offsets [a, b) the value v (dense form) and updates the run
// count from the boundaries the write can change: those at a..b.
func (c *chunk) setDense(width uint, size, a, b int, v uint8) {
	if b-a == 1 {
		c.setDenseOne(width, size, a, v)
		return
	}
	lo, hi := max(a, 1), min(b+1, size)
	before := 0
	if lo < hi {
		before = denseBoundaries(c.dense, width, lo, hi)
	}
	denseFill(c.dense, width, a, b, v)
	after := 0
	if lo < hi {
		after = denseBoundaries(c.dense, width, lo, hi)
	}
	c.nruns = uint32(int(c.nruns) - before + after)
	c.maybeRuns(width, size)
}

// setDenseOne is setDense for the single page a, the most common edit: only
// the boundaries with its two neighbours can change.
func (c *chunk) setDenseOne(width uint, size, a int, v uint8) {
	old := denseGet(c.dense, width, a)
	if old == v {
		return
	}
	n := int(c.nruns)
	if a > 0 {
		l := denseGet(c.dense, width, a-1)
		n += b2i(l != v) - b2i(l != old)
	}
	if a+1 < size {
		r := denseGet(c.dense, width, a+1)
		n += b2i(r != v) - b2i(r != old)
	}
	bit := uint(a) * width
	w := &c.dense[bit/64]
	*w = *w&^((1<<width-1)<<(bit%64)) | uint64(v)<<(bit%64)
	c.nruns = uint32(n)
	c.maybeRuns(width, size)
}

// maybeRuns turns a dense chunk back into runs once they would take less
// than half of runsLimit, and their slices, allocated, no more than it.
func (c *chunk) maybeRuns(width uint, size int) {
	if c.nruns > 1 && 2*int(c.nruns)*runBytes(width) < runsLimit(size, width) {
		if starts, vals, ok := runsAlloc(int(c.nruns), width, runsLimit(size, width)); ok {
			c.toRuns(width, size, starts, vals)
		}
	}
}

// runsAlloc returns empty slices with room for n runs, and whether they
// allocate no more than limit. An allocation is rounded up to its size
// class (at least 8 bytes a slice), which for a chunk of a few hundred
// pages, whose limit is a few words, can pass the limit that n runs' own
// bytes are well under.
func runsAlloc(n int, width uint, limit int) ([]uint16, []uint8, bool) {
	least := max(8, 2*n) // the smallest allocation, known without one
	if width == 2 {
		least += max(8, n)
	}
	if least > limit {
		return nil, nil, false
	}
	starts := slices.Grow([]uint16(nil), n)
	var vals []uint8
	if width == 2 {
		vals = slices.Grow([]uint8(nil), n)
	}
	return starts, vals, cap(starts)*2+cap(vals) <= limit
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// toDense converts the chunk from runs form to dense form.
func (c *chunk) toDense(width uint, size int) {
	n := denseWords(size, width)
	d := slices.Grow([]uint64(nil), n)[:n]
	clear(d)
	for i := range c.starts {
		if v := c.val(i, width); v != 0 { // d starts all 0
			denseFill(d, width, int(c.starts[i]), c.runEnd(i, size), v)
		}
	}
	c.nruns = uint32(len(c.starts))
	c.dense, c.starts, c.vals = d, nil, nil
}

// toRuns converts the chunk from dense form to runs form, in starts and
// vals (empty, with room for its runs).
func (c *chunk) toRuns(width uint, size int, starts []uint16, vals []uint8) {
	c.first = denseGet(c.dense, width, 0)
	for p := 0; p < size; {
		v := denseGet(c.dense, width, p)
		starts = append(starts, uint16(p))
		if width == 2 {
			vals = append(vals, v)
		}
		p = denseFind(c.dense, width, p, size, v, false)
	}
	c.starts, c.vals, c.dense, c.nruns = starts, vals, nil, 0
}

// count returns how many offsets of [a, b) hold v.
func (c *chunk) count(width uint, size, a, b int, v uint8) int {
	if c.dense != nil {
		return denseCount(c.dense, width, a, b, v)
	}
	n := 0
	for i := c.runAt(a); i < len(c.starts) && int(c.starts[i]) < b; i++ {
		if c.val(i, width) == v {
			n += min(b, c.runEnd(i, size)) - max(a, int(c.starts[i]))
		}
	}
	return n
}

// find returns the first offset >= from whose value equals v (want) or
// differs from v (!want), or size if there is none.
func (c *chunk) find(width uint, size, from int, v uint8, want bool) int {
	if c.dense != nil {
		return denseFind(c.dense, width, from, size, v, want)
	}
	for i := c.runAt(from); i < len(c.starts); i++ {
		if (c.val(i, width) == v) == want {
			return max(from, int(c.starts[i]))
		}
	}
	return size
}

// runs calls emit for the runs of offsets [a, b), clipped, in ascending
// order, with page numbers offset by base. It stops and returns false as soon
// as emit does.
func (c *chunk) runs(width uint, size, a, b int, base uint64, emit func(start, end uint64, v uint8) bool) bool {
	if c.dense != nil {
		for p := a; p < b; {
			v := denseGet(c.dense, width, p)
			e := denseFind(c.dense, width, p, b, v, false)
			if !emit(base+uint64(p), base+uint64(e), v) {
				return false
			}
			p = e
		}
		return true
	}
	for i := c.runAt(a); i < len(c.starts) && int(c.starts[i]) < b; i++ {
		s, e := max(a, int(c.starts[i])), min(b, c.runEnd(i, size))
		if !emit(base+uint64(s), base+uint64(e), c.val(i, width)) {
			return false
		}
	}
	return true
}
