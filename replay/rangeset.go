package replay

import (
	"sort"

	"gmem/span"
)

// rangeSet is a set of addresses kept as sorted, disjoint, non-adjacent
// ranges; its memory grows with the number of ranges, not the addresses.
// The replay uses it for the parts of guest memory where the baseline and
// gmem legitimately differ (one accepted an event the other refused).
type rangeSet struct {
	rs []span.Range
}

// add inserts r, merging it with the ranges it overlaps or touches.
func (s *rangeSet) add(r span.Range) {
	if r.Empty() {
		return
	}
	i := sort.Search(len(s.rs), func(i int) bool { return s.rs[i].End >= r.Start })
	j := i
	for j < len(s.rs) && s.rs[j].Start <= r.End {
		r.Start = min(r.Start, s.rs[j].Start)
		r.End = max(r.End, s.rs[j].End)
		j++
	}
	if i == j {
		s.rs = append(s.rs, span.Range{})
		copy(s.rs[i+1:], s.rs[i:])
		s.rs[i] = r
		return
	}
	s.rs[i] = r
	s.rs = append(s.rs[:i+1], s.rs[j:]...)
}

// remove deletes r from the set.
func (s *rangeSet) remove(r span.Range) {
	if r.Empty() {
		return
	}
	var out []span.Range
	i := sort.Search(len(s.rs), func(i int) bool { return s.rs[i].End > r.Start })
	j := i
	for j < len(s.rs) && s.rs[j].Start < r.End {
		x := s.rs[j]
		if x.Start < r.Start {
			out = append(out, span.Range{Start: x.Start, End: r.Start})
		}
		if x.End > r.End {
			out = append(out, span.Range{Start: r.End, End: x.End})
		}
		j++
	}
	if i == j {
		return
	}
	tail := append(out, s.rs[j:]...)
	s.rs = append(s.rs[:i], tail...)
}

// minus returns the parts of r not in the set, ascending.
func (s *rangeSet) minus(r span.Range) []span.Range {
	var out []span.Range
	at := r.Start
	i := sort.Search(len(s.rs), func(i int) bool { return s.rs[i].End > r.Start })
	for ; i < len(s.rs) && s.rs[i].Start < r.End; i++ {
		if s.rs[i].Start > at {
			out = append(out, span.Range{Start: at, End: s.rs[i].Start})
		}
		at = max(at, s.rs[i].End)
	}
	if at < r.End {
		out = append(out, span.Range{Start: at, End: r.End})
	}
	return out
}

// bytes returns the addresses the set covers.
func (s *rangeSet) bytes() uint64 {
	var n uint64
	for _, r := range s.rs {
		n += r.Len()
	}
	return n
}
