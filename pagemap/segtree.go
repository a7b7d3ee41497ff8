package pagemap

// The segment index of a Runs: a treap (a binary search tree on the first
// chunk of each segment that is also a heap on random priorities), so that
// its expected depth is O(log S) for S segments whatever order segments are
// created in. Every node is one allocation of segBytes; nothing else is
// allocated, so the index costs exactly S*segBytes.
//
// Priorities come from a per-map generator seeded at random, so that a
// sequence of conversions chosen by a guest cannot aim at a degenerate shape.

// seg is a segment: chunks [start, end), either uniform (c == nil, every page
// holds val) or a single chunk (end == start+1) with its own representation.
type seg struct {
	start, end  uint64
	c           *chunk
	left, right *seg
	prio        uint32
	val         uint8
}

// segBytes is the allocation size of a seg (checked against the type by a
// test).
const segBytes = 48

// newSeg returns a new uniform segment, counted in m's size.
func (m *Runs) newSeg(start, end uint64, v uint8) *seg {
	// splitmix64: a cheap, well-mixed sequence from the per-map seed.
	m.rng += 0x9e3779b97f4a7c15
	z := m.rng
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	z ^= z >> 31
	m.segs++
	if s := m.spareSeg; s != nil {
		m.spareSeg = nil
		*s = seg{start: start, end: end, val: v, prio: uint32(z)}
		return s
	}
	return &seg{start: start, end: end, val: v, prio: uint32(z)}
}

// drop removes a segment that is no longer in the tree from m's size,
// keeping it, and its chunk if small, for reuse. Its links stay intact until
// it is reused, so a caller may still walk them.
func (m *Runs) drop(s *seg) {
	m.segs--
	if c := s.c; c != nil {
		if e := &m.hot[s.start&uint64(len(m.hot)-1)]; e.c == c {
			*e = hotEntry{} // c may be reused for another chunk
		}
		if m.linger == c {
			m.linger = nil
		}
		m.chunkBytes -= c.bytes()
		m.chunkSegs--
		s.c = nil
		if m.spareChunk == nil && c.dense == nil && cap(c.starts) <= spareChunkRuns {
			m.spareChunk = c
		}
	}
	if m.spareSeg == nil {
		m.spareSeg = s
	}
}

// spareChunkRuns bounds the run capacity of a chunk kept for reuse.
const spareChunkRuns = 64

// takeChunk returns a chunk in runs form holding one run of value v, the
// spare one if there is one.
func (m *Runs) takeChunk(v uint8) *chunk {
	c := m.spareChunk
	if c == nil {
		return newChunk(v, m.bits)
	}
	m.spareChunk = nil
	*c = chunk{starts: append(c.starts[:0], 0), vals: c.vals[:0], first: v}
	if m.bits == 2 {
		c.vals = append(c.vals, v)
	}
	return c
}

// find returns the segment holding chunk ci < m.chunks.
func (m *Runs) find(ci uint64) *seg {
	n := m.root
	for {
		switch {
		case ci < n.start:
			n = n.left
		case ci >= n.end:
			n = n.right
		default:
			return n
		}
	}
}

// split cuts the tree n into the segments starting before chunk k and the
// others.
func split(n *seg, k uint64) (l, r *seg) {
	if n == nil {
		return nil, nil
	}
	if n.start < k {
		n.right, r = split(n.right, k)
		return n, r
	}
	l, n.left = split(n.left, k)
	return l, n
}

// merge joins two trees, every segment of l before every segment of r.
func merge(l, r *seg) *seg {
	switch {
	case l == nil:
		return r
	case r == nil:
		return l
	case l.prio > r.prio:
		l.right = merge(l.right, r)
		return l
	default:
		r.left = merge(l, r.left)
		return r
	}
}

// insert adds s, whose chunks are not covered by any segment of the tree.
func (m *Runs) insert(s *seg) {
	l, r := split(m.root, s.start)
	m.root = merge(merge(l, s), r)
}

// remove takes s out of the tree (it stays counted; see drop).
func (m *Runs) remove(s *seg) {
	l, r := split(m.root, s.start)
	_, r = split(r, s.start+1)
	m.root = merge(l, r)
}

// ascend calls fn for every segment of n that ends after chunk ci, in
// order, until fn returns false; it reports whether fn never did.
func ascend(n *seg, ci uint64, fn func(*seg) bool) bool {
	for n != nil {
		if n.end <= ci {
			n = n.right // n and its left subtree lie before ci
			continue
		}
		if !ascend(n.left, ci, fn) || !fn(n) {
			return false
		}
		n = n.right
	}
	return true
}

// cut makes chunk k, 0 < k < m.chunks, the start of a segment, splitting the
// uniform segment that spans it if needed.
func (m *Runs) cut(k uint64) {
	s := m.find(k)
	if s.start == k {
		return
	}
	// s spans more than one chunk, so it is uniform.
	t := m.newSeg(k, s.end, s.val)
	s.end = k
	m.insert(t)
}

// putUniform covers chunks [start, end), which no segment covers, with a
// uniform segment of value v, merged with equal uniform neighbours.
func (m *Runs) putUniform(start, end uint64, v uint8) {
	var p *seg
	if start > 0 {
		if x := m.find(start - 1); x.c == nil && x.val == v {
			p = x
		}
	}
	if end < m.chunks {
		if q := m.find(end); q.c == nil && q.val == v {
			end = q.end
			m.remove(q)
			m.drop(q)
		}
	}
	if p != nil {
		p.end = end // p keeps its start, so the tree's order holds
		return
	}
	m.insert(m.newSeg(start, end, v))
}

// dropAll removes a detached tree from m's size.
func (m *Runs) dropAll(n *seg) {
	for n != nil {
		m.dropAll(n.left)
		m.drop(n)
		n = n.right
	}
}
