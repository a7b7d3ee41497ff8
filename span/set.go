package span

import "sort"

// Set is a set of addresses kept as sorted, disjoint, non-adjacent ranges.
// Its memory and the cost of an operation grow with the number of ranges, not
// with the addresses covered, so it can follow a 1 TiB guest in a few
// kilobytes. Insertion and removal shift a slice: it is meant for thousands
// of ranges, not millions. The zero Set is empty and ready to use.
type Set struct {
	rs []Range
}

// Ranges returns the set's ranges in ascending order. The slice belongs to
// the set: read it, do not change it, and do not keep it across changes.
func (s *Set) Ranges() []Range { return s.rs }

// Index returns the index in Ranges of the first range that ends after x
// (len(Ranges()) if none does).
func (s *Set) Index(x uint64) int {
	return sort.Search(len(s.rs), func(i int) bool { return s.rs[i].End > x })
}

// Add inserts r, merging it with the ranges it overlaps or touches.
func (s *Set) Add(r Range) {
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
	if i == j {
		s.rs = append(s.rs, Range{})
		copy(s.rs[i+1:], s.rs[i:])
		s.rs[i] = r
		return
	}
	s.rs[i] = r
	s.rs = append(s.rs[:i+1], s.rs[j:]...)
}

// Clear empties the set, keeping the memory of its ranges for reuse.
func (s *Set) Clear() { s.rs = s.rs[:0] }

// Remove deletes r from the set, splitting a range that contains it.
func (s *Set) Remove(r Range) {
	if r.Empty() {
		return
	}
	i := s.Index(r.Start)
	if i < len(s.rs) && s.rs[i].Start < r.Start && s.rs[i].End > r.End {
		// r is strictly inside one range: split it.
		tail := Range{Start: r.End, End: s.rs[i].End}
		s.rs[i].End = r.Start
		s.rs = append(s.rs, Range{})
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

// Covers reports whether every address of r is in the set (true for an
// empty r).
func (s *Set) Covers(r Range) bool {
	if r.Empty() {
		return true
	}
	i := s.Index(r.Start)
	return i < len(s.rs) && s.rs[i].Start <= r.Start && s.rs[i].End >= r.End
}

// Overlaps reports whether any address of r is in the set.
func (s *Set) Overlaps(r Range) bool {
	if r.Empty() {
		return false
	}
	i := s.Index(r.Start)
	return i < len(s.rs) && s.rs[i].Start < r.End
}

// Inside returns the parts of the set inside r, in ascending order.
func (s *Set) Inside(r Range) []Range {
	if r.Empty() {
		return nil
	}
	var out []Range
	for i := s.Index(r.Start); i < len(s.rs) && s.rs[i].Start < r.End; i++ {
		out = append(out, s.rs[i].Intersect(r))
	}
	return out
}

// Minus returns the parts of r not in the set, in ascending order.
func (s *Set) Minus(r Range) []Range {
	if r.Empty() {
		return nil
	}
	var out []Range
	at := r.Start
	for i := s.Index(r.Start); i < len(s.rs) && s.rs[i].Start < r.End; i++ {
		if s.rs[i].Start > at {
			out = append(out, Range{Start: at, End: s.rs[i].Start})
		}
		at = max(at, s.rs[i].End)
	}
	if at < r.End {
		out = append(out, Range{Start: at, End: r.End})
	}
	return out
}

// Len returns the number of addresses in the set.
func (s *Set) Len() uint64 {
	var n uint64
	for _, r := range s.rs {
		n += r.Len()
	}
	return n
}
