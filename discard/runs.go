package discard

import "github.com/gmemproject/gmem/span"

// Run lists are sorted, disjoint, non-empty ranges. These helpers combine
// them in one merge pass: O(len(a) + len(b)).

// intersectRuns returns the ranges covered by both a and b.
func intersectRuns(a, b []span.Range) []span.Range {
	var out []span.Range
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		if x := a[i].Intersect(b[j]); !x.Empty() {
			out = appendRun(out, x)
		}
		if a[i].End < b[j].End {
			i++
		} else {
			j++
		}
	}
	return out
}

// complementRuns returns the parts of r not covered by runs (which must lie
// inside r).
func complementRuns(r span.Range, runs []span.Range) []span.Range {
	var out []span.Range
	at := r.Start
	for _, x := range runs {
		if x.Start > at {
			out = append(out, span.Range{Start: at, End: x.Start})
		}
		at = max(at, x.End)
	}
	if at < r.End {
		out = append(out, span.Range{Start: at, End: r.End})
	}
	return out
}

// appendRun appends x to a sorted run list, merging it with the last run when
// they touch, so lists built from pieces stay maximal.
func appendRun(runs []span.Range, x span.Range) []span.Range {
	if n := len(runs); n > 0 && runs[n-1].End == x.Start {
		runs[n-1].End = x.End
		return runs
	}
	return append(runs, x)
}
