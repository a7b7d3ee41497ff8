package span

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// TestSet compares Set with a per-unit model under random operations.
func TestSet(t *testing.T) {
	const n = 64
	rng := rand.New(rand.NewPCG(1, 2))
	var s Set
	var model [n]bool
	runsOf := func(r Range, want bool) []Range {
		var out []Range
		for i := r.Start; i < r.End; i++ {
			if model[i] != want {
				continue
			}
			if k := len(out) - 1; k >= 0 && out[k].End == i {
				out[k].End++
			} else {
				out = append(out, Range{Start: i, End: i + 1})
			}
		}
		return out
	}
	for step := range 20000 {
		a, b := uint64(rng.IntN(n+1)), uint64(rng.IntN(n+1))
		r := Range{Start: min(a, b), End: max(a, b)}
		switch rng.IntN(4) {
		case 0, 1:
			s.Add(r)
			for i := r.Start; i < r.End; i++ {
				model[i] = true
			}
		case 2:
			s.Remove(r)
			for i := r.Start; i < r.End; i++ {
				model[i] = false
			}
		case 3:
			covers, overlaps := true, false
			for i := r.Start; i < r.End; i++ {
				covers = covers && model[i]
				overlaps = overlaps || model[i]
			}
			if s.Covers(r) != covers || s.Overlaps(r) != overlaps {
				t.Fatalf("step %d: %v covers %v overlaps %v; model %v %v", step, r, s.Covers(r), s.Overlaps(r), covers, overlaps)
			}
			if got, want := s.Inside(r), runsOf(r, true); !slices.Equal(got, want) {
				t.Fatalf("step %d: Inside(%v) = %v, model %v", step, r, got, want)
			}
			if got, want := s.Minus(r), runsOf(r, false); !slices.Equal(got, want) {
				t.Fatalf("step %d: Minus(%v) = %v, model %v", step, r, got, want)
			}
		}
		// The representation stays canonical (sorted, disjoint, not
		// adjacent, not empty) and equal to the model.
		if want := runsOf(Range{End: n}, true); !slices.Equal(s.Ranges(), want) {
			t.Fatalf("step %d: ranges %v, model %v", step, s.Ranges(), want)
		}
		var count uint64
		for _, m := range model {
			if m {
				count++
			}
		}
		if s.Len() != count {
			t.Fatalf("step %d: Len %d, model %d", step, s.Len(), count)
		}
		if i := s.Index(r.Start); i < len(s.Ranges()) && s.Ranges()[i].End <= r.Start || i > 0 && s.Ranges()[i-1].End > r.Start {
			t.Fatalf("step %d: Index(%d) = %d in %v", step, r.Start, i, s.Ranges())
		}
	}
}
