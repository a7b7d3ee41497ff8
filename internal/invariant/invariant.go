// Package invariant checks gmem's invariants on live objects, in O(runs):
//
//   - I1: the IOVA pages mapped for a listener are exactly the populated pages
//     of its section;
//   - I2: no mapping covers a private or unplugged page (implied by I1, and
//     reported separately because it is the safety property);
//   - a mapper's own table agrees with the IOMMU.
//
// The randomized tests check them after every step against a naive per-page
// oracle; replay checks them after every event.
package invariant

import (
	"fmt"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

// Violation describes a broken invariant.
type Violation struct {
	Invariant string // "I1" or "I2"
	Section   discard.Section
	IOVA      span.Range // the pages in question
	Detail    string
}

// Error implements error.
func (v *Violation) Error() string {
	return fmt.Sprintf("%s violated for section %v at IOVA %v: %s", v.Invariant, v.Section, v.IOVA, v.Detail)
}

// Mapped checks I1 and I2 for one listener: mapped (the IOMMU's entries that
// lie in the section's GPA range, ascending) must cover exactly the populated
// runs of sec. It returns the first violation, an I2 one if any exists.
func Mapped(m *discard.Manager, sec discard.Section, mapped []iommu.Mapping) error {
	runs, err := m.PopulatedRuns(sec.Range())
	if err != nil {
		return err
	}
	want := make([]span.Range, 0, len(runs))
	for _, r := range runs {
		s, _ := sec.Intersect(r)
		want = append(want, s.GPARange())
	}
	var have []span.Range
	for _, x := range mapped {
		r := x.Range().Intersect(sec.GPARange())
		if r.Empty() {
			continue
		}
		if n := len(have); n > 0 && have[n-1].End == r.Start {
			have[n-1].End = r.End
		} else {
			have = append(have, r)
		}
	}
	// I2: every mapped range inside a populated run.
	for _, h := range have {
		if extra := minus(h, want); !extra.Empty() {
			return &Violation{"I2", sec, extra, "mapped but not populated"}
		}
	}
	for _, w := range want {
		if missing := minus(w, have); !missing.Empty() {
			return &Violation{"I1", sec, missing, "populated but not mapped"}
		}
	}
	return nil
}

// minus returns the first part of r not covered by runs (sorted, disjoint),
// or an empty range.
func minus(r span.Range, runs []span.Range) span.Range {
	at := r.Start
	for _, x := range runs {
		if x.End <= at {
			continue
		}
		if x.Start > at {
			return span.Range{Start: at, End: min(x.Start, r.End)}
		}
		at = x.End
		if at >= r.End {
			return span.Range{}
		}
	}
	if at < r.End {
		return span.Range{Start: at, End: r.End}
	}
	return span.Range{}
}

// Within returns the entries of ms that meet r.
func Within(ms []iommu.Mapping, r span.Range) []iommu.Mapping {
	var out []iommu.Mapping
	for _, x := range ms {
		if x.Range().Overlaps(r) {
			out = append(out, x)
		}
	}
	return out
}
