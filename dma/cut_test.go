package dma_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/internal/randtest"
	"github.com/gmemproject/gmem/iommu"
)

// cutCaps are the capabilities of an iommufd IOAS that cuts.
var cutCaps = iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}

// TestCutDiscard checks the Cut policy's discards: one cut request each,
// no unmap and no map, the remainders left in place (no window, nothing
// re-pinned), splits counted, and the table equal to the IOMMU's areas.
func TestCutDiscard(t *testing.T) {
	f := newFixture(t, cutCaps, dma.Options{})
	if f.mapper.Policy() != dma.Cut {
		t.Fatalf("policy %v on a space that cuts, want cut", f.mapper.Policy())
	}
	f.populate(sec(0, 16))
	f.discard(sec(4, 4))
	f.entries(ent(0, 4), ent(8, 8))
	f.reach(append(rangeOf(0, 4), rangeOf(8, 8)...)...)
	want := dma.Stats{Entries: 2, PeakEntries: 2, MappedBytes: 12 * pg, MapCalls: 1, CutCalls: 1, Splits: 1,
		PinnedBytes: 16 * pg, UnpinnedBytes: 4 * pg}
	if diff := cmp.Diff(want, f.mapper.Stats()); diff != "" {
		t.Fatalf("stats (-want +got):\n%s", diff)
	}
	// A whole entry and part of the next: one cut, one split.
	f.discard(sec(0, 10))
	f.entries(ent(10, 6))
	f.reach(rangeOf(10, 6)...)
	if st := f.mapper.Stats(); st.CutCalls != 2 || st.Splits != 2 || st.Entries != 1 || st.MappedBytes != 6*pg || st.UnpinnedBytes != 10*pg {
		t.Fatalf("stats after the second discard: %+v", st)
	}
	// Nothing mapped, or an empty section inside an entry: no call.
	f.discard(sec(40, 4))
	f.discard(sec(12, 0))
	// Exactly an entry: a cut, no split.
	f.discard(sec(10, 6))
	f.entries()
	st := f.mapper.Stats()
	if st.CutCalls != 3 || st.Splits != 2 || st.MapCalls != 1 || st.UnmapCalls != 0 || st.WindowBytes != 0 || st.RepinnedBytes != 0 {
		t.Fatalf("stats at the end: %+v", st)
	}
	if f.model.CutCalls() != 3 {
		t.Fatalf("the model answered %d cuts, the mapper sent %d", f.model.CutCalls(), st.CutCalls)
	}
	if pins := f.model.Pins(); pins.Pinned*pg != st.PinnedBytes || pins.Unpinned*pg != st.UnpinnedBytes {
		t.Fatalf("model pins %+v, mapper %d / %d bytes", pins, st.PinnedBytes, st.UnpinnedBytes)
	}
}

// TestCutThousandPages makes 1,000 single pages private, at random, out of
// one mapped 8 MiB extent: each is one cut request with no window and
// nothing re-pinned, as the mapper counts and the model measures; the
// pinned pages fall by exactly the pages cut; a device's write to a cut
// page is blocked and leaves memory untouched while writes near it and far
// from it land. Reverting a cut gives the device the page back.
func TestCutThousandPages(t *testing.T) {
	const pages = 2048
	model := iommu.NewModel(cutCaps)
	host := make([]byte, pages*pg)
	m, err := dma.New(model, host, dma.Options{MaxExtent: dma.Unbounded})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Populate(sec(0, pages)); err != nil {
		t.Fatal(err)
	}
	m.Settle(sec(0, pages))
	if n := model.Len(); n != 1 {
		t.Fatalf("%d areas for one 8 MiB extent", n)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	order := rng.Perm(pages)[:1000]
	cut := make([]bool, pages)
	var firstSplits uint64
	for i, p := range order {
		s := sec(uint64(p), 1)
		model.BeginOp()
		if err := m.Discard(s); err != nil {
			t.Fatalf("cut %d (page %d): %v", i, p, err)
		}
		window, repinned := model.EndOp()
		if i > 0 {
			m.Settle(s)
		}
		cut[p] = true
		st := m.Stats()
		if i == 0 {
			firstSplits = st.Splits
		}
		if len(window) != 0 || repinned != 0 || st.WindowBytes != 0 || st.RepinnedBytes != 0 || st.MaxWindow != 0 {
			t.Fatalf("cut %d: window %v (mapper %d), re-pinned %d (mapper %d)", i, window, st.WindowBytes, repinned, st.RepinnedBytes)
		}
		if st.CutCalls != uint64(i+1) || st.MapCalls != 1 || st.UnmapCalls != 0 {
			t.Fatalf("cut %d: %d cut, %d map, %d unmap calls", i, st.CutCalls, st.MapCalls, st.UnmapCalls)
		}
		if pins := model.Pins(); pins.Pinned-pins.Unpinned != uint64(pages-i-1) || st.UnpinnedBytes != uint64(i+1)*pg {
			t.Fatalf("cut %d: pins %+v, mapper unpinned %#x", i, pins, st.UnpinnedBytes)
		}
		randtest.CheckCutPage(t, model, gpa, host, cut, p, rng, fmt.Sprintf("cut %d", i))
	}
	st := m.Stats()
	if st.Entries != uint64(model.Len()) || !cmp.Equal(model.Mappings(), m.Entries()) {
		t.Fatalf("table of %d entries, IOMMU %d areas", st.Entries, model.Len())
	}
	// The first cut was left unsettled: revert it.
	p := order[0]
	if err := m.Revert(sec(uint64(p), 1)); err != nil {
		t.Fatal(err)
	}
	if err := model.DMAWrite(gpa+uint64(p)*pg, []byte("back")); err != nil || string(host[p*pg:p*pg+4]) != "back" {
		t.Fatalf("DMA to a page whose cut was reverted: %v", err)
	}
	after := m.Stats()
	if after.WindowBytes != 0 || after.RepinnedBytes != 0 || after.Splits != st.Splits-firstSplits || after.Entries != st.Entries+1 {
		t.Fatalf("stats after the revert: %+v, before it %+v", after, st)
	}
	if pins := model.Pins(); pins.Pinned-pins.Unpinned != pages-999 {
		t.Fatalf("pins after the revert: %+v", pins)
	}
}

// TestCutRevert checks that Revert of a cut maps the discarded pieces again
// as entries of their own, leaves the remainders alone, and gives the
// device its access back, with no window.
func TestCutRevert(t *testing.T) {
	f := newFixture(t, cutCaps, dma.Options{})
	f.populate(sec(0, 16))
	f.populate(sec(16, 4))
	f.mapper.Settle(sec(0, 16))
	f.mapper.Settle(sec(16, 4))
	f.discard(sec(4, 4))
	f.entries(ent(0, 4), ent(8, 8), ent(16, 4))
	if err := f.mapper.Revert(sec(4, 4)); err != nil {
		t.Fatal(err)
	}
	f.entries(ent(0, 4), ent(4, 4), ent(8, 8), ent(16, 4))
	f.reach(rangeOf(0, 20)...)
	// Over the seam of two entries and into the revert's piece.
	f.discard(sec(6, 12))
	f.entries(ent(0, 4), ent(4, 2), ent(18, 2))
	if err := f.mapper.Revert(sec(6, 12)); err != nil {
		t.Fatal(err)
	}
	f.entries(ent(0, 4), ent(4, 2), ent(6, 2), ent(8, 8), ent(16, 2), ent(18, 2))
	f.reach(rangeOf(0, 20)...)
	st := f.mapper.Stats()
	if st.Splits != 0 || st.Entries != 6 || st.MappedBytes != 20*pg || st.WindowBytes != 0 || st.RepinnedBytes != 0 || st.UnmapCalls != 0 {
		t.Fatalf("stats after the reverts: %+v", st)
	}
	// Revert of a cut of nothing changes nothing.
	f.discard(sec(40, 4))
	if err := f.mapper.Revert(sec(40, 4)); err != nil {
		t.Fatal(err)
	}
	f.entries(ent(0, 4), ent(4, 2), ent(6, 2), ent(8, 8), ent(16, 2), ent(18, 2))
}

// failingCutter is a Model whose next cut fails as a kernel's can: after
// splitting the area at the range's end (split), or after also removing
// the first gone bytes of the range (an unmap stopped part way).
type failingCutter struct {
	*iommu.Model
	split bool
	gone  uint64
	// mapFails fails every map after the failed cut, to break the mapper's
	// repair.
	mapFails bool
	failed   bool
}

var errBusy = fmt.Errorf("cut stopped: %w", unix.EBUSY)

func (c *failingCutter) Cut(iova, size uint64) (uint64, error) {
	if c.failed {
		return c.Model.Cut(iova, size)
	}
	c.failed = true
	var n uint64
	if c.split || c.gone > 0 {
		// A cut of size 0 at the end splits there and is refused.
		if _, err := c.Model.Cut(iova+size, 0); !errors.Is(err, unix.EINVAL) {
			return 0, fmt.Errorf("test: split at the end: %w", err)
		}
	}
	if c.gone > 0 {
		var err error
		if n, err = c.Model.Cut(iova, c.gone); err != nil {
			return 0, fmt.Errorf("test: removing the first bytes: %w", err)
		}
	}
	return n, errBusy
}

func (c *failingCutter) Map(iova, size uint64, host []byte) error {
	if c.failed && c.mapFails {
		return unix.ENOMEM
	}
	return c.Model.Map(iova, size, host)
}

// TestCutFailure checks a cut request that fails: every page the device
// reached before it still reaches after it, the table stays true to the
// pages mapped (and to the areas, where the kernel's state is known), and
// the mapper counts a failure. A cut that fails before doing anything
// changes nothing at all.
func TestCutFailure(t *testing.T) {
	setup := []discard.Section{sec(0, 4), sec(4, 4), sec(8, 4)}
	all := rangeOf(0, 12)
	for _, c := range []struct {
		name    string
		space   failingCutter
		entries []iommu.Mapping // the IOMMU's areas after the failure
		table   []iommu.Mapping // the mapper's, if different
		reach   []uint64
		window  uint64
	}{
		{name: "refused", entries: []iommu.Mapping{ent(0, 4), ent(4, 4), ent(8, 4)}, reach: all},
		{
			// The kernel split at the end, then failed: one more area, the
			// same pages; the table keeps the entry whole.
			name: "split then refused", space: failingCutter{split: true},
			entries: []iommu.Mapping{ent(0, 4), ent(4, 4), ent(8, 2), ent(10, 2)},
			table:   []iommu.Mapping{ent(0, 4), ent(4, 4), ent(8, 4)}, reach: all,
		},
		{
			// [2,4) and [4,8) went before the unmap stopped: mapped again,
			// as new areas; the table follows the areas.
			name: "stopped part way", space: failingCutter{gone: 6 * pg},
			entries: []iommu.Mapping{ent(0, 2), ent(2, 2), ent(4, 4), ent(8, 2), ent(10, 2)}, reach: all, window: 6 * pg,
		},
		{
			// The repair itself fails: the pages it could not map again
			// leave the table, which stays true to what is mapped.
			name: "stopped part way, repair refused", space: failingCutter{gone: 2 * pg, mapFails: true},
			entries: []iommu.Mapping{ent(0, 2), ent(4, 4), ent(8, 2), ent(10, 2)}, reach: append(rangeOf(0, 2), rangeOf(4, 8)...),
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			space := c.space
			space.Model = iommu.NewModel(cutCaps)
			host := make([]byte, 64*pg)
			m, err := dma.New(&space, host, dma.Options{})
			if err != nil || m.Policy() != dma.Cut {
				t.Fatalf("New: %v, %v", m.Policy(), err)
			}
			f := &fixture{t: t, model: space.Model, mapper: m, host: host}
			for _, s := range setup {
				f.populate(s)
				m.Settle(s)
			}
			before := m.Stats()
			if c.name == "refused" {
				space.Model.SetFault(func(iommu.Call) error { return errBusy })
				space.failed = true
			}
			err = m.Discard(sec(2, 8))
			space.Model.SetFault(nil)
			if !errors.Is(err, unix.EBUSY) {
				t.Fatalf("Discard = %v, want EBUSY", err)
			}
			if diff := cmp.Diff(c.entries, space.Mappings()); diff != "" {
				t.Fatalf("IOMMU areas (-want +got):\n%s", diff)
			}
			table := c.table
			if table == nil {
				table = c.entries
			}
			if diff := cmp.Diff(table, m.Entries()); diff != "" {
				t.Fatalf("mapper table (-want +got):\n%s", diff)
			}
			f.reach(c.reach...)
			st := m.Stats()
			if st.Failures != before.Failures+1 || st.Splits != before.Splits || st.Entries != uint64(len(table)) {
				t.Fatalf("stats %+v after %+v", st, before)
			}
			var mapped uint64
			for _, x := range table {
				mapped += x.Size
			}
			if st.MappedBytes != mapped || st.PinnedBytes-st.UnpinnedBytes != mapped || st.WindowBytes != c.window || st.RepinnedBytes != c.window {
				t.Fatalf("stats %+v: want %#x mapped, window and re-pinned %#x", st, mapped, c.window)
			}
			if pins := space.Pins(); pins.Pinned*pg != st.PinnedBytes || pins.Unpinned*pg != st.UnpinnedBytes {
				t.Fatalf("model pins %+v, mapper %#x / %#x", pins, st.PinnedBytes, st.UnpinnedBytes)
			}
			// Whatever the failure left, the next cut of the same range
			// works on it.
			if c.space.mapFails {
				return
			}
			f.discard(sec(2, 8))
			f.entries(ent(0, 2), ent(10, 2))
			f.reach(0, 1, 10, 11)
		})
	}
}

// TestCutWindowsAgree checks, over random populates and discards of a
// cutting mapper with random extents, that the model's measure of every
// operation's window and re-pinned bytes is 0, as the mapper counts, and
// that only the discarded range's pages change.
func TestCutWindowsAgree(t *testing.T) {
	model := iommu.NewModel(cutCaps)
	m, err := dma.New(model, nil, dma.Options{MaxExtent: 16 * pg})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	mapped := make([]bool, 64)
	for i := range 2000 {
		first := uint64(rng.IntN(64))
		n := 1 + uint64(rng.IntN(64-int(first)))
		s := sec(first, n)
		populate := rng.IntN(2) == 0
		model.BeginOp()
		if populate {
			err = m.Populate(s)
		} else {
			err = m.Discard(s)
		}
		window, repinned := model.EndOp()
		if err != nil {
			t.Fatal(err)
		}
		m.Settle(s)
		if len(window) != 0 || repinned != 0 {
			t.Fatalf("op %d: the model measured window %v, re-pinned %d", i, window, repinned)
		}
		for p := first; p < first+n; p++ {
			mapped[p] = populate
		}
		for p := range uint64(64) {
			if model.Reaches(gpa+p*pg) != mapped[p] {
				t.Fatalf("op %d: page %d reachable %v, want %v", i, p, !mapped[p], mapped[p])
			}
		}
		if got := model.Mappings(); !cmp.Equal(got, m.Entries(), cmpopts.EquateEmpty()) {
			t.Fatalf("op %d: table %v, IOMMU %v", i, m.Entries(), got)
		}
	}
	if st := m.Stats(); st.WindowBytes != 0 || st.RepinnedBytes != 0 || st.Splits == 0 || st.UnmapCalls != 0 {
		t.Fatalf("stats %+v", st)
	}
}
