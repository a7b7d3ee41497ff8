package iommu_test

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/randtest"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

// cutCaps are the capabilities of an iommufd IOAS that cuts.
var cutCaps = iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}

// TestCutRules checks every answer of the Model's cut table: returned size,
// error, the areas left (split ones included), the area count and the pages
// unpinned.
func TestCutRules(t *testing.T) {
	big := mk(1, 8) // [0x1000, 0x9000)
	top := iommu.Mapping{IOVA: math.MaxUint64 - 4*pg + 1, Size: 4 * pg}
	for _, c := range []struct {
		name       string
		setup      []iommu.Mapping
		iova, size uint64
		n          uint64
		err        error
		left       []iommu.Mapping
	}{
		{name: "page inside an area", setup: []iommu.Mapping{big}, iova: 3 * pg, size: pg, n: pg, left: []iommu.Mapping{mk(1, 2), mk(4, 5)}},
		{name: "head page", setup: []iommu.Mapping{big}, iova: pg, size: pg, n: pg, left: []iommu.Mapping{mk(2, 7)}},
		{name: "tail page", setup: []iommu.Mapping{big}, iova: 8 * pg, size: pg, n: pg, left: []iommu.Mapping{mk(1, 7)}},
		{name: "whole area", setup: []iommu.Mapping{big}, iova: pg, size: 8 * pg, n: 8 * pg},
		{name: "superset of an area", setup: []iommu.Mapping{big}, iova: 0, size: 16 * pg, n: 8 * pg},
		{
			name: "several areas and gaps", setup: []iommu.Mapping{mk(1, 4), mk(6, 4), mk(12, 2)}, iova: 3 * pg, size: 10 * pg,
			n: 7 * pg, left: []iommu.Mapping{mk(1, 2), mk(13, 1)},
		},
		{name: "nothing mapped", setup: []iommu.Mapping{mk(1, 1)}, iova: 5 * pg, size: 2 * pg, left: []iommu.Mapping{mk(1, 1)}},
		{name: "page already cut", setup: []iommu.Mapping{mk(1, 2), mk(4, 5)}, iova: 3 * pg, size: pg, left: []iommu.Mapping{mk(1, 2), mk(4, 5)}},
		{name: "at IOVA 0", setup: []iommu.Mapping{mk(0, 4)}, iova: 0, size: pg, n: pg, left: []iommu.Mapping{mk(1, 3)}},
		{name: "last page of the IOVA space", setup: []iommu.Mapping{top}, iova: math.MaxUint64 - pg + 1, size: pg, n: pg, left: []iommu.Mapping{{IOVA: top.IOVA, Size: 3 * pg}}},
		// The end is split first: it fails, nothing changes.
		{name: "unaligned end inside an area", setup: []iommu.Mapping{big}, iova: 3 * pg, size: pg + 1, err: unix.EINVAL, left: []iommu.Mapping{big}},
		// The end split succeeds, the start one fails: one more area, every
		// page still mapped.
		{name: "unaligned start inside an area", setup: []iommu.Mapping{big}, iova: 3*pg + 1, size: pg - 1, err: unix.EINVAL, left: []iommu.Mapping{mk(1, 3), mk(4, 5)}},
		{name: "size 0 inside an area", setup: []iommu.Mapping{big}, iova: 3 * pg, err: unix.EINVAL, left: []iommu.Mapping{mk(1, 2), mk(3, 6)}},
		{name: "size 0 at IOVA 0", setup: []iommu.Mapping{big}, err: unix.EINVAL, left: []iommu.Mapping{big}},
		// [top of the space, 0x5000) wraps: the split at 0x4fff is made first.
		{name: "wrapping", setup: []iommu.Mapping{big}, iova: math.MaxUint64 - pg + 1, size: 6 * pg, err: unix.EOVERFLOW, left: []iommu.Mapping{mk(1, 4), mk(5, 4)}},
		// Alignment is checked only where an area is split.
		{name: "unaligned ends in no area", setup: []iommu.Mapping{mk(4, 2)}, iova: 2*pg + 5, size: 6 * pg, n: 2 * pg},
		// The last byte is an area's first IOVA: no split there, and the area
		// sticks out: ENOENT after the whole area before it went.
		{name: "end on an area's first byte", setup: []iommu.Mapping{mk(2, 1), mk(4, 2)}, iova: 2 * pg, size: 2*pg + 1, n: pg, err: unix.ENOENT, left: []iommu.Mapping{mk(4, 2)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := newModel(t, cutCaps, c.setup)
			n, err := m.Cut(c.iova, c.size)
			if !errors.Is(err, c.err) || (c.err == nil) != (err == nil) || n != c.n {
				t.Fatalf("Cut(%#x, %#x) = %#x, %s; want %#x, %s", c.iova, c.size, n, errString(err), c.n, errString(c.err))
			}
			if diff := cmp.Diff(c.left, m.Mappings(), cmpEmpty); diff != "" {
				t.Fatalf("areas left (-want +got):\n%s", diff)
			}
			if m.Len() != len(c.left) {
				t.Fatalf("Len = %d, want %d", m.Len(), len(c.left))
			}
			var setup uint64
			for _, x := range c.setup {
				setup += x.Size / pg
			}
			if p := m.Pins(); p.Pinned != setup || p.Unpinned != c.n/pg {
				t.Fatalf("pins %+v after a cut of %#x bytes: want %d pinned, %d unpinned", p, c.n, setup, c.n/pg)
			}
			if m.CutCalls() != 1 {
				t.Fatalf("CutCalls = %d, want 1", m.CutCalls())
			}
		})
	}
}

// TestCutRefused checks a model that cannot cut, the fault hook, and that a
// Type1v2 model cannot be made to cut.
func TestCutRefused(t *testing.T) {
	m := newModel(t, iommu.Caps{Rules: iommu.IOMMUFD}, []iommu.Mapping{mk(1, 8)})
	if n, err := m.Cut(3*pg, pg); !errors.Is(err, unix.EOPNOTSUPP) || n != 0 {
		t.Fatalf("Cut without Caps.Cut = %#x, %v; want EOPNOTSUPP", n, err)
	}
	if got := m.Mappings(); !cmp.Equal(got, []iommu.Mapping{mk(1, 8)}) {
		t.Fatalf("a refused cut changed the areas: %v", got)
	}

	m = newModel(t, cutCaps, []iommu.Mapping{mk(1, 8)})
	boom := errors.New("boom")
	var seen []iommu.Call
	m.SetFault(func(c iommu.Call) error {
		seen = append(seen, c)
		return boom
	})
	if n, err := m.Cut(3*pg, pg); !errors.Is(err, boom) || n != 0 {
		t.Fatalf("hooked cut = %#x, %v", n, err)
	}
	if want := []iommu.Call{{Op: iommu.OpCut, IOVA: 3 * pg, Size: pg}}; !cmp.Equal(want, seen) {
		t.Fatalf("hook saw %v, want %v", seen, want)
	}
	if got := m.Mappings(); !cmp.Equal(got, []iommu.Mapping{mk(1, 8)}) || m.Len() != 1 || m.Pins().Unpinned != 0 {
		t.Fatalf("a failed cut changed the model: %v, %d areas, %+v", got, m.Len(), m.Pins())
	}
	if m.CutCalls() != 1 {
		t.Fatalf("CutCalls = %d, want 1 (failed ones count)", m.CutCalls())
	}

	defer func() {
		if recover() == nil {
			t.Fatal("NewModel made a type1 model that cuts")
		}
	}()
	iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2, Cut: true})
}

// TestCutThousandPages cuts 1,000 single pages, at random, out of one 8 MiB
// area with host memory behind it, and after every cut checks what the
// kernel showed in the rig: the cut returns one page, unpins exactly that
// page, has no window and re-pins nothing; the device's write to the cut
// page is blocked and leaves memory untouched, while writes to the pages
// still mapped (near the cut and far from it) land where they belong; the
// areas are the runs of pages left. A page mapped again is reachable again.
func TestCutThousandPages(t *testing.T) {
	const (
		base  = 0x4000_0000
		pages = 2048
	)
	mem := make([]byte, pages*pg)
	m := iommu.NewModel(cutCaps)
	if err := m.Map(base, pages*pg, mem); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 8))
	order := rng.Perm(pages)[:1000]
	cut := make([]bool, pages)
	for i, p := range order {
		iova := base + uint64(p)*pg
		m.BeginOp()
		n, err := m.Cut(iova, pg)
		window, repinned := m.EndOp()
		if err != nil || n != pg {
			t.Fatalf("cut %d (page %d) = %#x, %v", i, p, n, err)
		}
		if len(window) != 0 || repinned != 0 {
			t.Fatalf("cut %d: window %v, re-pinned %d", i, window, repinned)
		}
		cut[p] = true
		if pins := m.Pins(); pins.Unpinned != uint64(i+1) || pins.Pinned != pages {
			t.Fatalf("cut %d: pins %+v, want %d unpinned of %d", i, pins, i+1, pages)
		}
		randtest.CheckCutPage(t, m, base, mem, cut, p, rng, fmt.Sprintf("cut %d", i))
	}
	var want []iommu.Mapping
	for p := 0; p < pages; {
		if cut[p] {
			p++
			continue
		}
		q := p
		for q < pages && !cut[q] {
			q++
		}
		want = append(want, iommu.Mapping{IOVA: base + uint64(p)*pg, Size: uint64(q-p) * pg})
		p = q
	}
	if diff := cmp.Diff(want, m.Mappings()); diff != "" {
		t.Fatalf("areas after 1,000 cuts (-want +got):\n%s", diff)
	}
	if m.Len() != len(want) {
		t.Fatalf("Len = %d, want %d", m.Len(), len(want))
	}
	if m.WindowBytes() != 0 {
		t.Fatalf("window bytes %d", m.WindowBytes())
	}
	// Undo one cut: a new area over the page, reachable again.
	p := order[0]
	if err := m.Map(base+uint64(p)*pg, pg, mem[p*pg:(p+1)*pg]); err != nil {
		t.Fatal(err)
	}
	if err := m.DMAWrite(base+uint64(p)*pg, []byte("back")); err != nil || string(mem[p*pg:p*pg+4]) != "back" {
		t.Fatalf("DMA to a page mapped again: %v", err)
	}
	if m.Len() != len(want)+1 {
		t.Fatalf("Len = %d after mapping a cut page again, want %d", m.Len(), len(want)+1)
	}
}

// TestCutSpansAndRange checks a cut spanning several areas and partly
// mapped ranges against Reaches, page by page.
func TestCutSpansAndRange(t *testing.T) {
	m := newModel(t, cutCaps, []iommu.Mapping{mk(0, 16), mk(16, 16), mk(40, 8)})
	if n, err := m.Cut(10*pg, 34*pg); err != nil || n != (6+16+4)*pg {
		t.Fatalf("cut = %#x, %v", n, err)
	}
	r := span.Range{Start: 10 * pg, End: 44 * pg}
	for p := uint64(0); p < 64; p++ {
		mapped := p < 32 || (p >= 40 && p < 48)
		want := mapped && !r.Contains(p*pg)
		if m.Reaches(p*pg) != want {
			t.Fatalf("page %d reachable = %v, want %v", p, !want, want)
		}
	}
	if diff := cmp.Diff([]iommu.Mapping{mk(0, 10), mk(44, 4)}, m.Mappings()); diff != "" {
		t.Fatalf("areas (-want +got):\n%s", diff)
	}
}
