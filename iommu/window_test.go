package iommu_test

import (
	"math/rand/v2"
	"testing"

	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

// windowOracle follows the same calls page by page.
type windowOracle struct {
	mapped, atStart, lost []bool
	repinned              uint64
}

func newWindowOracle(pages int) *windowOracle {
	return &windowOracle{mapped: make([]bool, pages), atStart: make([]bool, pages), lost: make([]bool, pages)}
}

func (o *windowOracle) begin() {
	copy(o.atStart, o.mapped)
	clear(o.lost)
	o.repinned = 0
}

// window returns the pages mapped at the start, unmapped since and mapped now.
func (o *windowOracle) window() (n uint64) {
	for p := range o.mapped {
		if o.lost[p] && o.mapped[p] {
			n++
		}
	}
	return n
}

// runWindowOps applies ops (pairs of bytes: kind and page) to a model of
// pages pages and to the oracle, measuring one operation between each
// begin byte, and fails on the first disagreement.
func runWindowOps(t *testing.T, ops []byte) (windows uint64) {
	const pages = 32
	m := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
	o := newWindowOracle(pages)
	m.BeginOp()
	o.begin()
	var pins iommu.Pins
	end := func() {
		ranges, repinned := m.EndOp()
		var got uint64
		for _, r := range ranges {
			got += r.Len() / pg
		}
		if want := o.window(); got != want || repinned/pg != o.repinned {
			t.Fatalf("window %d pages, re-pinned %d; oracle %d, %d", got, repinned/pg, want, o.repinned)
		}
		windows += got
	}
	for i := 0; i+2 < len(ops); i += 3 {
		first, n := int(ops[i+1])%pages, 1+int(ops[i+2])%4
		n = min(n, pages-first)
		iova, size := uint64(first)*pg, uint64(n)*pg
		switch ops[i] % 3 {
		case 0: // map, if nothing there
			free := true
			for p := first; p < first+n; p++ {
				free = free && !o.mapped[p]
			}
			err := m.Map(iova, size, nil)
			if (err == nil) != free {
				t.Fatalf("map %d+%d: %v, oracle free=%v", first, n, err, free)
			}
			if err == nil {
				pins.Pinned += uint64(n)
				for p := first; p < first+n; p++ {
					o.mapped[p] = true
					if o.lost[p] {
						o.repinned++
					}
				}
			}
		case 1: // unmap the mapping that holds page first, whole
			for _, x := range m.Mappings() {
				if r := x.Range(); r.Contains(iova) {
					if _, err := m.Unmap(x.IOVA, x.Size); err != nil {
						t.Fatal(err)
					}
					pins.Unpinned += x.Size / pg
					for p := r.Start / pg; p < r.End/pg; p++ {
						o.mapped[p] = false
						if o.atStart[p] {
							o.lost[p] = true
						}
					}
				}
			}
		default: // a new operation
			end()
			m.BeginOp()
			o.begin()
		}
	}
	end()
	if got := m.Pins(); got != pins {
		t.Fatalf("pins %+v, want %+v", got, pins)
	}
	return windows
}

// TestWindowOracle compares the model's window, re-pins and pins with a
// per-page oracle over random map and unmap sequences.
func TestWindowOracle(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	var windows uint64
	for range 200 {
		ops := make([]byte, 3*200)
		for i := range ops {
			ops[i] = byte(rng.IntN(256))
		}
		windows += runWindowOps(t, ops)
	}
	if windows == 0 {
		t.Fatal("no operation had a window: the test measures nothing")
	}
}

// FuzzWindow is TestWindowOracle on fuzzed sequences.
func FuzzWindow(f *testing.F) {
	f.Add([]byte{0, 0, 3, 1, 1, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, ops []byte) { runWindowOps(t, ops) })
}

// TestWindowUnmapOnly checks that an operation that only unmapped has no
// window and asks nothing of the caller's lookup, while one that also mapped
// asks it about what it lost.
func TestWindowUnmapOnly(t *testing.T) {
	var w iommu.Window
	w.Unmapped(span.Range{Start: 0, End: 2 * pg})
	asked := 0
	lookup := func(r span.Range) uint64 { asked++; return r.Len() }
	if got := w.Bytes(lookup); got != 0 || asked != 0 {
		t.Fatalf("unmap only: window %d, lookups %d; want 0, 0", got, asked)
	}
	w.Mapped(span.Range{Start: 4 * pg, End: 5 * pg})
	if got := w.Bytes(lookup); got != 2*pg || asked != 1 {
		t.Fatalf("unmap, then map elsewhere: window %d, lookups %d; want %d (as the lookup says), 1", got, asked, 2*pg)
	}
	w.Reset()
	w.Unmapped(span.Range{Start: 0, End: pg})
	if got := w.Bytes(lookup); got != 0 || asked != 1 {
		t.Fatalf("after Reset, unmap only: window %d, lookups %d; want 0, 1", got, asked)
	}
}
