package pagemap

import "fmt"

// checkInvariants verifies the whole structure of m: the treap's order and
// heap property, segments tiling [0, chunks) with equal uniform neighbours
// merged, every chunk's form within its size rules, and Bytes' accounting.
func checkInvariants(m *Runs) error {
	var segs []*seg
	var walk func(n *seg, lo, hi uint64) error
	walk = func(n *seg, lo, hi uint64) error {
		if n == nil {
			return nil
		}
		if n.start < lo || n.start >= hi {
			return fmt.Errorf("segment [%d, %d) out of order (key range [%d, %d))", n.start, n.end, lo, hi)
		}
		for _, ch := range []*seg{n.left, n.right} {
			if ch != nil && ch.prio > n.prio {
				return fmt.Errorf("segment [%d, %d): child priority %d above %d", n.start, n.end, ch.prio, n.prio)
			}
		}
		if err := walk(n.left, lo, n.start); err != nil {
			return err
		}
		segs = append(segs, n)
		return walk(n.right, n.start+1, hi)
	}
	if err := walk(m.root, 0, ^uint64(0)); err != nil {
		return err
	}
	if uint64(len(segs)) != m.segs {
		return fmt.Errorf("%d segments in the tree, %d counted", len(segs), m.segs)
	}
	pos := uint64(0)
	var chunkBytes, chunkSegs uint64
	lingers := false
	for i, s := range segs {
		if s.start != pos || s.end <= s.start {
			return fmt.Errorf("segment %d is [%d, %d), expected to start at %d", i, s.start, s.end, pos)
		}
		pos = s.end
		if s.c == nil {
			if s.val >= 1<<m.bits {
				return fmt.Errorf("segment [%d, %d) holds value %d", s.start, s.end, s.val)
			}
			if i > 0 && segs[i-1].c == nil && segs[i-1].val == s.val {
				return fmt.Errorf("uniform segments [%d, %d) and [%d, %d) both hold %d", segs[i-1].start, segs[i-1].end, s.start, s.end, s.val)
			}
			continue
		}
		if s.end != s.start+1 {
			return fmt.Errorf("chunk segment [%d, %d) spans several chunks", s.start, s.end)
		}
		if s.c == m.linger && s.start != m.lingerCI {
			return fmt.Errorf("chunk %d lingers as chunk %d", s.start, m.lingerCI)
		}
		if s.c == m.linger {
			lingers = true
		}
		// The lingering chunk is the one a map may leave holding a single
		// run.
		if err := checkChunk(s.c, m.bits, m.chunkSize(s.start), s.c == m.linger); err != nil {
			return fmt.Errorf("chunk %d: %w", s.start, err)
		}
		chunkBytes += s.c.bytes()
		chunkSegs++
	}
	if chunkSegs != m.chunkSegs {
		return fmt.Errorf("%d chunk segments in the tree, %d counted", chunkSegs, m.chunkSegs)
	}
	// The hot cache: a power of two, firstHot(chunks) to maxHot entries, doubled only
	// while chunk segments outnumbered it, and every valid entry the chunk
	// segment of its chunk.
	if h := uint64(len(m.hot)); h&(h-1) != 0 || h < uint64(firstHot(m.chunks)) || h > maxHot || (h > minHot && h/2 >= m.chunks) {
		return fmt.Errorf("hot cache of %d entries for %d chunks", h, m.chunks)
	}
	for i, e := range m.hot {
		if e.c == nil {
			continue
		}
		ci := e.ci
		if ci >= m.chunks || ci&uint64(len(m.hot)-1) != uint64(i) || m.find(ci).c != e.c {
			return fmt.Errorf("hot entry %d holds a chunk that is not that of chunk %d in the index, or not in its slot", i, ci)
		}
		c := e.c
		if len(e.starts) != len(c.starts) || cap(e.starts) != cap(c.starts) || (len(c.starts) > 0 && &e.starts[0] != &c.starts[0]) {
			return fmt.Errorf("hot entry %d holds starts that are not its chunk's", i)
		}
	}
	if m.linger != nil && !lingers {
		return fmt.Errorf("the lingering chunk (of chunk %d) is not in the index", m.lingerCI)
	}
	if pos != m.chunks {
		return fmt.Errorf("segments end at chunk %d, map has %d", pos, m.chunks)
	}
	if chunkBytes != m.chunkBytes {
		return fmt.Errorf("chunks hold %d bytes, %d counted", chunkBytes, m.chunkBytes)
	}
	return nil
}

// checkChunk checks c's form; single allows it a single run in runs form
// (the map's lingering chunk).
func checkChunk(c *chunk, width uint, size int, single bool) error {
	limit := runsLimit(size, width)
	if c.dense != nil {
		if c.starts != nil || c.vals != nil {
			return fmt.Errorf("dense chunk keeps run slices")
		}
		if len(c.dense) != denseWords(size, width) {
			return fmt.Errorf("dense chunk has %d words, want %d", len(c.dense), denseWords(size, width))
		}
		if tail := size * int(width) % 64; tail != 0 && c.dense[len(c.dense)-1]>>tail != 0 {
			return fmt.Errorf("dense chunk has bits set past its %d pages", size)
		}
		if n := denseBoundaries(c.dense, width, 1, size) + 1; n != int(c.nruns) {
			return fmt.Errorf("dense chunk has %d runs, %d counted", n, c.nruns)
		}
		if c.nruns < 2 {
			return fmt.Errorf("dense chunk with %d runs was not collapsed", c.nruns)
		}
		if _, _, fits := runsAlloc(int(c.nruns), width, limit); fits && 2*int(c.nruns)*runBytes(width) < limit {
			return fmt.Errorf("dense chunk with only %d runs (limit %d bytes) was not turned into runs", c.nruns, limit)
		}
		return nil
	}
	n := len(c.starts)
	if n < 2 && !(single && n == 1) {
		return fmt.Errorf("runs chunk with %d runs was not collapsed", n)
	}
	if c.starts[0] != 0 {
		return fmt.Errorf("first run starts at %d", c.starts[0])
	}
	for i := 1; i < n; i++ {
		if c.starts[i] <= c.starts[i-1] || int(c.starts[i]) >= size {
			return fmt.Errorf("run %d starts at %d after %d (size %d)", i, c.starts[i], c.starts[i-1], size)
		}
	}
	if width == 1 {
		if c.vals != nil || c.first > 1 {
			return fmt.Errorf("1-bit runs chunk: vals %v, first %d", c.vals != nil, c.first)
		}
	} else {
		if len(c.vals) != n {
			return fmt.Errorf("%d values for %d runs", len(c.vals), n)
		}
		for i, v := range c.vals {
			if v > 3 || (i > 0 && v == c.vals[i-1]) {
				return fmt.Errorf("run %d holds %d after %d", i, v, c.vals[max(i-1, 0)])
			}
		}
	}
	if b := cap(c.starts)*2 + cap(c.vals); b > limit {
		return fmt.Errorf("runs chunk holds %d bytes, more than the runs limit %d", b, limit)
	}
	if oversized(n, cap(c.starts)) {
		return fmt.Errorf("runs chunk has capacity %d for %d runs", cap(c.starts), n)
	}
	return nil
}

// forms returns, for each chunk segment of m, whether it is dense.
func forms(m *Runs) map[uint64]bool {
	out := map[uint64]bool{}
	ascend(m.root, 0, func(s *seg) bool {
		if s.c != nil {
			out[s.start] = s.c.dense != nil
		}
		return true
	})
	return out
}
