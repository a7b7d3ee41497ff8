package trace

import (
	"sort"

	"gmem/span"
)

// rangeSet is a set of addresses kept as sorted, disjoint, non-adjacent
// ranges. Its memory and the cost of an operation grow with the number of
// ranges, not with the addresses covered, so a generator or validator can
// follow a 1 TiB guest in a few kilobytes.
//
// Insertion and removal shift the slice, which is fine for the sizes the
// generators and the validator keep (thousands of ranges); it is not meant
// for millions.
type rangeSet struct {
	rs []span.Range
}

// first returns the index of the first range whose End is after x.
func (s *rangeSet) first(x uint64) int {
	return sort.Search(len(s.rs), func(i int) bool { return s.rs[i].End > x })
}

// add inserts r, merging it with the ranges it overlaps or touches.
func (s *rangeSet) add(r span.Range) {
	if r.Empty() {
		return
	}
	// Ranges that overlap or touch r: End >= r.Start and Start <= r.End.
	i := sort.Search(len(s.rs), func(i int) bool { return s.rs[i].End >= r.Start })
	j := i
	for j < len(s.rs) && s.rs[j].Start <= r.End {
		r.Start = min(r.Start, s.rs[j].Start)
		r.End = max(r.End, s.rs[j].End)
		j++
	}
	switch {
	case i == j:
		s.rs = append(s.rs, span.Range{})
		copy(s.rs[i+1:], s.rs[i:])
		s.rs[i] = r
	default:
		s.rs[i] = r
		s.rs = append(s.rs[:i+1], s.rs[j:]...)
	}
}

// remove deletes r from the set, splitting a range that contains it.
func (s *rangeSet) remove(r span.Range) {
	if r.Empty() {
		return
	}
	i := s.first(r.Start)
	if i < len(s.rs) && s.rs[i].Start < r.Start && s.rs[i].End > r.End {
		// r is strictly inside one range: split it.
		tail := span.Range{Start: r.End, End: s.rs[i].End}
		s.rs[i].End = r.Start
		s.rs = append(s.rs, span.Range{})
		copy(s.rs[i+2:], s.rs[i+1:])
		s.rs[i+1] = tail
		return
	}
	if i < len(s.rs) && s.rs[i].Start < r.Start {
		s.rs[i].End = r.Start
		i++
	}
	j := i
	for j < len(s.rs) && s.rs[j].End <= r.End {
		j++
	}
	if j < len(s.rs) && s.rs[j].Start < r.End {
		s.rs[j].Start = r.End
	}
	s.rs = append(s.rs[:i], s.rs[j:]...)
}

// covers reports whether every address of r is in the set (true for an
// empty r).
func (s *rangeSet) covers(r span.Range) bool {
	if r.Empty() {
		return true
	}
	i := s.first(r.Start)
	return i < len(s.rs) && s.rs[i].Start <= r.Start && s.rs[i].End >= r.End
}

// overlaps reports whether any address of r is in the set.
func (s *rangeSet) overlaps(r span.Range) bool {
	if r.Empty() {
		return false
	}
	i := s.first(r.Start)
	return i < len(s.rs) && s.rs[i].Start < r.End
}

// inside returns the parts of the set inside r, in order.
func (s *rangeSet) inside(r span.Range) []span.Range {
	var out []span.Range
	if r.Empty() {
		return nil
	}
	for i := s.first(r.Start); i < len(s.rs) && s.rs[i].Start < r.End; i++ {
		out = append(out, s.rs[i].Intersect(r))
	}
	return out
}
