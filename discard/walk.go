package discard

import (
	"iter"
	"slices"

	"github.com/gmemproject/gmem/span"
)

// Extent is a maximal part of a region whose state is the same in every
// source: populated, or discarded by the sources named in DiscardedBy.
type Extent struct {
	span.Range
	// DiscardedBy has bit i set when Sources()[i] (at the time of the walk)
	// has the extent discarded. Zero means populated.
	DiscardedBy uint64
}

// Populated reports whether every source has the extent populated.
func (e Extent) Populated() bool { return e.DiscardedBy == 0 }

// Sources returns the sources in the order Walk numbers them.
func (m *Manager) Sources() []Source {
	defer m.mu.runlock(m.mu.rlock(0))
	return slices.Clone(m.sources)
}

// Walk yields the extents of r in ascending order, each with the set of
// sources that discard it: what a migration or a memory dump needs to decide
// what to send or read (populated), what holds guest data it must not read
// through the host (discarded only by the shared/private source: private
// memory), and what to skip (unplugged). It costs O(runs x sources); the
// extents are taken as one snapshot, and the loop body runs with nothing
// locked. sources, when not nil, receives the sources the bits refer to.
func (m *Manager) Walk(r span.Range, sources *[]Source) iter.Seq[Extent] {
	var exts []Extent
	if m.checkRange(r) == nil && !r.Empty() {
		g := m.mu.rlock(m.locks.stripeOf(r.Start))
		m.locks.lock(r)
		exts = m.extents(r)
		if sources != nil {
			*sources = slices.Clone(m.sources)
		}
		m.locks.unlock(r)
		m.mu.runlock(g)
	}
	return func(yield func(Extent) bool) {
		for _, e := range exts {
			if !yield(e) {
				return
			}
		}
	}
}

// extents sweeps the boundaries of every source's runs in r.
func (m *Manager) extents(r span.Range) []Extent {
	type cursor struct {
		runs []span.Range
		i    int
	}
	cs := make([]cursor, len(m.sources))
	for i, s := range m.sources {
		cs[i].runs = s.AppendPopulated(nil, r)
	}
	var out []Extent
	for at := r.Start; at < r.End; {
		var set uint64
		next := r.End
		for i := range cs {
			c := &cs[i]
			for c.i < len(c.runs) && c.runs[c.i].End <= at {
				c.i++
			}
			if c.i < len(c.runs) && c.runs[c.i].Start <= at {
				next = min(next, c.runs[c.i].End)
			} else {
				set |= 1 << i
				if c.i < len(c.runs) {
					next = min(next, c.runs[c.i].Start)
				}
			}
		}
		if n := len(out); n > 0 && out[n-1].DiscardedBy == set && out[n-1].End == at {
			out[n-1].End = next
		} else {
			out = append(out, Extent{span.Range{Start: at, End: next}, set})
		}
		at = next
	}
	return out
}
