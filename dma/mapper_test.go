package dma_test

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
)

const pg = 4096

// gpa is where region offset 0 appears in the tests: IOVA = GPA, so IOVAs
// differ from region offsets and a mix-up between them shows.
const gpa = 0x4000_0000

// sec returns the section of pages [first, first+n) of the region.
func sec(first, n uint64) discard.Section {
	return discard.Section{Offset: first * pg, Size: n * pg, GPA: gpa + first*pg}
}

// ent is an IOMMU entry over pages [first, first+n) of the region.
func ent(first, n uint64) iommu.Mapping {
	return iommu.Mapping{IOVA: gpa + first*pg, Size: n * pg}
}

type fixture struct {
	t      *testing.T
	model  *iommu.Model
	mapper *dma.Mapper
	host   []byte
}

func newFixture(t *testing.T, caps iommu.Caps, opts dma.Options) *fixture {
	t.Helper()
	model := iommu.NewModel(caps)
	host := make([]byte, 64*pg)
	m, err := dma.New(model, host, opts)
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{t: t, model: model, mapper: m, host: host}
}

// entries checks that the mapper's table and the IOMMU both hold want.
func (f *fixture) entries(want ...iommu.Mapping) {
	f.t.Helper()
	if want == nil {
		want = []iommu.Mapping{}
	}
	if diff := cmp.Diff(want, f.model.Mappings()); diff != "" {
		f.t.Fatalf("IOMMU entries (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(want, f.mapper.Entries()); diff != "" {
		f.t.Fatalf("mapper table (-want +got):\n%s", diff)
	}
}

// reach checks, page by page over [0, 64), which pages a device reaches.
func (f *fixture) reach(pages ...uint64) {
	f.t.Helper()
	want := map[uint64]bool{}
	for _, p := range pages {
		want[p] = true
	}
	for p := range uint64(64) {
		err := f.model.DMAWrite(gpa+p*pg+16, []byte{byte(p + 1)})
		switch {
		case want[p] && err != nil:
			f.t.Fatalf("page %d: DMA refused: %v", p, err)
		case !want[p] && err == nil:
			f.t.Fatalf("page %d: DMA reached a page that must be unmapped", p)
		case want[p] && f.host[p*pg+16] != byte(p+1):
			f.t.Fatalf("page %d: DMA did not land in the host page behind it", p)
		}
	}
}

func (f *fixture) populate(s discard.Section) {
	f.t.Helper()
	if err := f.mapper.Populate(s); err != nil {
		f.t.Fatalf("Populate(%v): %v", s, err)
	}
}

func (f *fixture) discard(s discard.Section) {
	f.t.Helper()
	if err := f.mapper.Discard(s); err != nil {
		f.t.Fatalf("Discard(%v): %v", s, err)
	}
}

func TestPolicy(t *testing.T) {
	for p, name := range map[dma.Policy]string{dma.Auto: "auto", dma.Extent: "extent", dma.Granule: "granule", dma.Cut: "cut"} {
		if p.String() != name {
			t.Errorf("%d.String() = %q, want %q", int(p), p.String(), name)
		}
		got, err := dma.ParsePolicy(name)
		if err != nil || got != p {
			t.Errorf("ParsePolicy(%q) = %v, %v", name, got, err)
		}
	}
	if _, err := dma.ParsePolicy("adaptive"); !errors.Is(err, dma.ErrOptions) {
		t.Errorf("ParsePolicy of an unknown policy = %v, want ErrOptions", err)
	}
	if got := dma.Policy(7).String(); got != "policy(7)" {
		t.Errorf("Policy(7).String() = %q", got)
	}
	model := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
	for name, opts := range map[string]dma.Options{
		"granularity not a power of two": {Granularity: 3 * pg},
		"unknown policy":                 {Policy: dma.Policy(7)},
		"maximum extent of 3 MiB":        {MaxExtent: 3 << 20},
		"maximum extent of 1 KiB":        {MaxExtent: 1 << 10},
		"cut on a space that cannot cut": {Policy: dma.Cut},
	} {
		if _, err := dma.New(model, nil, opts); !errors.Is(err, dma.ErrOptions) {
			t.Errorf("New with %s = %v, want ErrOptions", name, err)
		}
	}
	// Auto is Cut where the space can cut, Extent elsewhere; explicit
	// policies stay as asked.
	for _, c := range []struct {
		caps iommu.Caps
		opts dma.Options
		want dma.Policy
	}{
		{iommu.Caps{Rules: iommu.Type1v2}, dma.Options{}, dma.Extent},
		{iommu.Caps{Rules: iommu.IOMMUFD}, dma.Options{}, dma.Extent},
		{iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}, dma.Options{}, dma.Cut},
		{iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}, dma.Options{Policy: dma.Cut, MaxExtent: dma.Unbounded}, dma.Cut},
		{iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}, dma.Options{Policy: dma.Extent}, dma.Extent},
		{iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}, dma.Options{Policy: dma.Granule}, dma.Granule},
	} {
		m, err := dma.New(iommu.NewModel(c.caps), nil, c.opts)
		if err != nil || m.Policy() != c.want {
			t.Errorf("policy %v on %+v = %v, %v; want %v", c.opts.Policy, c.caps, m.Policy(), err, c.want)
		}
	}
	// A space that says it cuts but is no Cutter cannot take Cut.
	if _, err := dma.New(noCutter{iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD, Cut: true})}, nil, dma.Options{Policy: dma.Cut}); !errors.Is(err, dma.ErrOptions) {
		t.Errorf("Cut on a space without a Cut method = %v, want ErrOptions", err)
	}
	if m, err := dma.New(noCutter{iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD, Cut: true})}, nil, dma.Options{}); err != nil || m.Policy() != dma.Extent {
		t.Errorf("Auto on a space without a Cut method = %v, %v; want extent", m.Policy(), err)
	}
}

// noCutter is a Space that hides its model's Cut method.
type noCutter struct{ iommu.Space }

// TestExtentEntries checks that Extent maps one entry per populate, never
// merges two notifications, and maps only the gaps of a partly mapped
// section.
func TestExtentEntries(t *testing.T) {
	f := newFixture(t, iommu.Caps{Rules: iommu.Type1v2}, dma.Options{})
	f.populate(sec(0, 16))
	f.entries(ent(0, 16))
	f.populate(sec(16, 4)) // adjacent: a second entry, not a grown first one
	f.entries(ent(0, 16), ent(16, 4))
	f.populate(sec(30, 2))
	// Populating over mapped parts maps only the two gaps [20,30) and [32,40).
	f.populate(sec(8, 32))
	f.entries(ent(0, 16), ent(16, 4), ent(20, 10), ent(30, 2), ent(32, 8))
	f.populate(sec(0, 40)) // all mapped: no call at all
	st := f.mapper.Stats()
	want := dma.Stats{Entries: 5, PeakEntries: 5, MappedBytes: 40 * pg, MapCalls: 5, PinnedBytes: 40 * pg}
	if diff := cmp.Diff(want, st); diff != "" {
		t.Fatalf("stats (-want +got):\n%s", diff)
	}
	f.reach(rangeOf(0, 40)...)
	if f.mapper.Populate(discard.Section{Offset: pg, GPA: gpa}) != nil || f.mapper.Stats().MapCalls != 5 {
		t.Fatal("an empty section must map nothing")
	}
}

func rangeOf(first, n uint64) []uint64 {
	var out []uint64
	for p := first; p < first+n; p++ {
		out = append(out, p)
	}
	return out
}

// TestGranuleEntries checks that Granule maps one entry per granule, aligned
// to the granule in region offsets, and that discarding never splits.
func TestGranuleEntries(t *testing.T) {
	t.Run("4K", func(t *testing.T) {
		f := newFixture(t, iommu.Caps{Rules: iommu.Type1v2}, dma.Options{Policy: dma.Granule})
		f.populate(sec(2, 5))
		f.entries(ent(2, 1), ent(3, 1), ent(4, 1), ent(5, 1), ent(6, 1))
		f.discard(sec(3, 2))
		f.entries(ent(2, 1), ent(5, 1), ent(6, 1))
		st := f.mapper.Stats()
		if st.MapCalls != 5 || st.UnmapCalls != 1 || st.Splits != 0 || st.Entries != 3 || st.PeakEntries != 5 {
			t.Fatalf("stats %+v", st)
		}
		f.reach(2, 5, 6)
	})
	t.Run("16K", func(t *testing.T) {
		f := newFixture(t, iommu.Caps{Rules: iommu.IOMMUFD}, dma.Options{Policy: dma.Granule, Granularity: 4 * pg})
		// Pages [2, 11): granules [0,4) [4,8) [8,12) of region offsets,
		// clipped to the section.
		f.populate(sec(2, 9))
		f.entries(ent(2, 2), ent(4, 4), ent(8, 3))
		// A discard below the granule cuts a granule entry: counted.
		f.discard(sec(5, 1))
		f.entries(ent(2, 2), ent(4, 1), ent(6, 2), ent(8, 3))
		if st := f.mapper.Stats(); st.Splits != 1 {
			t.Fatalf("Splits = %d, want 1", st.Splits)
		}
		f.reach(2, 3, 4, 6, 7, 8, 9, 10)
	})
}

// TestDiscardSplit checks a discard in the middle of an extent: one split,
// the remainder still reachable, the cut pages not.
func TestDiscardSplit(t *testing.T) {
	for _, rules := range []iommu.Rules{iommu.Type1v2, iommu.IOMMUFD} {
		t.Run(rules.String(), func(t *testing.T) {
			f := newFixture(t, iommu.Caps{Rules: rules}, dma.Options{})
			f.populate(sec(0, 16))
			f.discard(sec(4, 4))
			f.entries(ent(0, 4), ent(8, 8))
			f.reach(append(rangeOf(0, 4), rangeOf(8, 8)...)...)
			want := dma.Stats{Entries: 2, PeakEntries: 2, MappedBytes: 12 * pg, MapCalls: 3, UnmapCalls: 1, Splits: 1,
				PinnedBytes: 28 * pg, UnpinnedBytes: 16 * pg, RepinnedBytes: 12 * pg, WindowBytes: 12 * pg, MaxWindow: 12 * pg}
			if diff := cmp.Diff(want, f.mapper.Stats()); diff != "" {
				t.Fatalf("stats (-want +got):\n%s", diff)
			}
			// A discard over a whole entry and part of the next: one split
			// (the straddler), one unmap for the whole entry.
			f.discard(sec(0, 10))
			f.entries(ent(10, 6))
			f.reach(rangeOf(10, 6)...)
			st := f.mapper.Stats()
			if st.Splits != 2 || st.Entries != 1 || st.MappedBytes != 6*pg {
				t.Fatalf("stats after the second discard: %+v", st)
			}
			// A discard of nothing mapped, or of an empty section inside
			// an entry, makes no call.
			f.discard(sec(40, 4))
			f.discard(sec(12, 0))
			f.entries(ent(10, 6))
			if got := f.mapper.Stats(); got.UnmapCalls != st.UnmapCalls || got.MapCalls != st.MapCalls {
				t.Fatalf("a discard of unmapped pages made calls: %+v", got)
			}
			// Exactly an entry: no split.
			f.discard(sec(10, 6))
			f.entries()
			if got := f.mapper.Stats(); got.Splits != 2 || got.Entries != 0 || got.MappedBytes != 0 {
				t.Fatalf("stats at the end: %+v", got)
			}
		})
	}
}

// TestPopulateBudget checks that a populate needing more entries than are
// left fails with ENOSPC before any map call.
func TestPopulateBudget(t *testing.T) {
	f := newFixture(t, iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 4}, dma.Options{Policy: dma.Granule, SplitReserve: dma.NoReserve})
	f.populate(sec(0, 1))
	maps, unmaps := f.model.Calls()
	err := f.mapper.Populate(sec(8, 4)) // needs 4, 3 left
	if !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("Populate over budget = %v, want ENOSPC", err)
	}
	if m2, u2 := f.model.Calls(); m2 != maps || u2 != unmaps {
		t.Fatalf("a populate over budget reached the IOMMU: %d/%d map/unmap calls, had %d/%d", m2, u2, maps, unmaps)
	}
	f.entries(ent(0, 1))
	st := f.mapper.Stats()
	if st.MapCalls != 1 || st.Failures != 1 {
		t.Fatalf("stats %+v, want 1 map call and 1 failure", st)
	}
	f.populate(sec(8, 3)) // exactly what is left
	f.entries(ent(0, 1), ent(8, 1), ent(9, 1), ent(10, 1))
}

// TestDiscardBudget checks that a discard needing a split with no entry left
// fails with ENOSPC and changes nothing, while a discard whose splits give
// back as many entries as they take succeeds at the limit.
func TestDiscardBudget(t *testing.T) {
	f := newFixture(t, iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 2}, dma.Options{SplitReserve: dma.NoReserve})
	f.populate(sec(0, 4))
	f.populate(sec(8, 4))
	maps, unmaps := f.model.Calls()
	err := f.mapper.Discard(sec(1, 1)) // one entry becomes two: needs one more
	if !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("Discard needing a split at the limit = %v, want ENOSPC", err)
	}
	if m2, u2 := f.model.Calls(); m2 != maps || u2 != unmaps {
		t.Fatal("the refused discard reached the IOMMU")
	}
	f.entries(ent(0, 4), ent(8, 4))
	if st := f.mapper.Stats(); st.Splits != 0 || st.Failures != 1 {
		t.Fatalf("stats %+v", st)
	}
	// Two straddlers, each leaving one piece: net zero entries.
	f.discard(sec(3, 6))
	f.entries(ent(0, 3), ent(9, 3))
	f.reach(0, 1, 2, 9, 10, 11)
	if st := f.mapper.Stats(); st.Splits != 2 || st.Entries != 2 || st.PeakEntries != 2 {
		t.Fatalf("stats %+v", st)
	}
}

// TestRevert checks that Revert restores the exact entries a notification
// replaced, and the split count, and that it needs a pending notification.
func TestRevert(t *testing.T) {
	f := newFixture(t, iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 3}, dma.Options{SplitReserve: dma.NoReserve})
	f.populate(sec(0, 16))
	f.mapper.Settle(sec(0, 16))
	if err := f.mapper.Revert(sec(0, 16)); err == nil {
		t.Fatal("Revert after Settle succeeded")
	}
	f.discard(sec(4, 4))
	f.entries(ent(0, 4), ent(8, 8))
	if err := f.mapper.Revert(sec(4, 4)); err != nil {
		t.Fatal(err)
	}
	// One entry again, not two pieces plus a remapped middle.
	f.entries(ent(0, 16))
	if st := f.mapper.Stats(); st.Splits != 0 || st.Entries != 1 {
		t.Fatalf("stats after revert: %+v", st)
	}
	if err := f.mapper.Revert(sec(4, 4)); err == nil {
		t.Fatal("a second Revert of the same notification succeeded")
	}
	// Revert of a populate removes only what it added.
	f.populate(sec(14, 6))
	f.entries(ent(0, 16), ent(16, 4))
	if err := f.mapper.Revert(sec(14, 6)); err != nil {
		t.Fatal(err)
	}
	f.entries(ent(0, 16))
	// Revert of a discard that removed whole entries at the limit.
	f.populate(sec(20, 1))
	f.populate(sec(22, 1))
	f.discard(sec(16, 8))
	f.entries(ent(0, 16))
	if err := f.mapper.Revert(sec(16, 8)); err != nil {
		t.Fatal(err)
	}
	f.entries(ent(0, 16), ent(20, 1), ent(22, 1))
	f.reach(append(rangeOf(0, 16), 20, 22)...)
	// A populate or discard that found nothing to do is revertible too, and
	// its revert changes nothing.
	f.populate(sec(0, 4))
	f.discard(sec(40, 4))
	if err := f.mapper.Revert(sec(0, 4)); err != nil {
		t.Fatalf("Revert of a populate that mapped nothing: %v", err)
	}
	if err := f.mapper.Revert(sec(40, 4)); err != nil {
		t.Fatalf("Revert of a discard that unmapped nothing: %v", err)
	}
	f.entries(ent(0, 16), ent(20, 1), ent(22, 1))
}

// TestFailureRestores injects an IOMMU failure at each call of a populate
// and of a split and checks that the mapper's entries and stats come back
// as before (except Failures).
func TestFailureRestores(t *testing.T) {
	boom := errors.New("boom")
	type tc struct {
		name  string
		cut   bool // on a space that cuts (Auto: the Cut policy)
		opts  dma.Options
		setup []discard.Section
		op    func(m *dma.Mapper) error
	}
	cases := []tc{
		{name: "granule populate", opts: dma.Options{Policy: dma.Granule}, op: func(m *dma.Mapper) error { return m.Populate(sec(0, 4)) }},
		{name: "populate around entries", setup: []discard.Section{sec(2, 1), sec(5, 1)}, op: func(m *dma.Mapper) error { return m.Populate(sec(0, 8)) }},
		{name: "split in the middle", setup: []discard.Section{sec(0, 16)}, op: func(m *dma.Mapper) error { return m.Discard(sec(4, 4)) }},
		{name: "two straddlers and inside entries", setup: []discard.Section{sec(0, 4), sec(4, 2), sec(6, 2), sec(8, 4)}, op: func(m *dma.Mapper) error { return m.Discard(sec(2, 8)) }},
		{name: "cut in the middle", cut: true, setup: []discard.Section{sec(0, 16)}, op: func(m *dma.Mapper) error { return m.Discard(sec(4, 4)) }},
		{name: "cut of straddlers and inside entries", cut: true, setup: []discard.Section{sec(0, 4), sec(4, 2), sec(6, 2), sec(8, 4)}, op: func(m *dma.Mapper) error { return m.Discard(sec(2, 8)) }},
		{name: "populate on a space that cuts", cut: true, setup: []discard.Section{sec(2, 1), sec(5, 1)}, op: func(m *dma.Mapper) error { return m.Populate(sec(0, 8)) }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for n := 1; ; n++ {
				f := newFixture(t, iommu.Caps{Rules: iommu.IOMMUFD, Cut: c.cut}, c.opts)
				for _, s := range c.setup {
					f.populate(s)
				}
				before, beforeStats := f.model.Mappings(), f.mapper.Stats()
				calls := 0
				f.model.SetFault(func(iommu.Call) error {
					calls++
					if calls == n {
						return boom
					}
					return nil
				})
				err := c.op(f.mapper)
				f.model.SetFault(nil)
				if calls < n {
					if err != nil {
						t.Fatalf("no fault injected, yet: %v", err)
					}
					if n == 1 {
						t.Fatal("the operation made no IOMMU call")
					}
					return
				}
				if !errors.Is(err, boom) {
					t.Fatalf("fault at call %d: err = %v, want boom", n, err)
				}
				f.entries(before...)
				after := f.mapper.Stats()
				beforeStats.Failures++
				beforeStats.MapCalls, beforeStats.UnmapCalls, beforeStats.CutCalls = after.MapCalls, after.UnmapCalls, after.CutCalls
				beforeStats.PeakEntries = after.PeakEntries
				// Pins follow the calls made and undone; what was mapped
				// stays pinned, and only what the undo restored was
				// hidden from the device.
				if after.PinnedBytes-after.UnpinnedBytes != after.MappedBytes {
					t.Fatalf("fault at call %d: pinned %d - unpinned %d != mapped %d", n, after.PinnedBytes, after.UnpinnedBytes, after.MappedBytes)
				}
				if after.WindowBytes-beforeStats.WindowBytes > after.RepinnedBytes-beforeStats.RepinnedBytes {
					t.Fatalf("fault at call %d: window %d, re-pinned %d: a window is memory mapped again", n, after.WindowBytes, after.RepinnedBytes)
				}
				beforeStats.PinnedBytes, beforeStats.UnpinnedBytes = after.PinnedBytes, after.UnpinnedBytes
				beforeStats.RepinnedBytes, beforeStats.WindowBytes, beforeStats.MaxWindow = after.RepinnedBytes, after.WindowBytes, after.MaxWindow
				if diff := cmp.Diff(beforeStats, after); diff != "" {
					t.Fatalf("fault at call %d: stats (-want +got):\n%s", n, diff)
				}
			}
		})
	}
}

// TestStats follows the counters through a sequence of notifications.
func TestStats(t *testing.T) {
	f := newFixture(t, iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 8}, dma.Options{})
	steps := []struct {
		populate bool
		s        discard.Section
		want     dma.Stats
	}{
		{true, sec(0, 8), dma.Stats{Entries: 1, PeakEntries: 1, MappedBytes: 8 * pg, MapCalls: 1, PinnedBytes: 8 * pg}},
		{true, sec(8, 8), dma.Stats{Entries: 2, PeakEntries: 2, MappedBytes: 16 * pg, MapCalls: 2, PinnedBytes: 16 * pg}},
		// [0,8) unmapped, [0,2) and [4,8) mapped again: 6 pages re-pinned
		// and unreachable for a moment.
		{false, sec(2, 2), dma.Stats{Entries: 3, PeakEntries: 3, MappedBytes: 14 * pg, MapCalls: 4, UnmapCalls: 1, Splits: 1,
			PinnedBytes: 22 * pg, UnpinnedBytes: 8 * pg, RepinnedBytes: 6 * pg, WindowBytes: 6 * pg, MaxWindow: 6 * pg}},
		// [4,8) and [8,16) cut: [4,6) and [10,16) re-pinned.
		{false, sec(6, 4), dma.Stats{Entries: 3, PeakEntries: 3, MappedBytes: 10 * pg, MapCalls: 6, UnmapCalls: 3, Splits: 3,
			PinnedBytes: 30 * pg, UnpinnedBytes: 20 * pg, RepinnedBytes: 14 * pg, WindowBytes: 14 * pg, MaxWindow: 8 * pg}},
		{false, sec(0, 16), dma.Stats{Entries: 0, PeakEntries: 3, MappedBytes: 0, MapCalls: 6, UnmapCalls: 4, Splits: 3,
			PinnedBytes: 30 * pg, UnpinnedBytes: 30 * pg, RepinnedBytes: 14 * pg, WindowBytes: 14 * pg, MaxWindow: 8 * pg}},
	}
	for i, st := range steps {
		var err error
		if st.populate {
			err = f.mapper.Populate(st.s)
		} else {
			err = f.mapper.Discard(st.s)
		}
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if diff := cmp.Diff(st.want, f.mapper.Stats()); diff != "" {
			t.Fatalf("step %d: stats (-want +got):\n%s", i, diff)
		}
		if got := uint64(f.model.Len()); got != st.want.Entries {
			t.Fatalf("step %d: IOMMU holds %d entries, stats say %d", i, got, st.want.Entries)
		}
	}
}

// TestHostBounds checks that a section beyond the host memory is refused
// before anything is mapped.
func TestHostBounds(t *testing.T) {
	f := newFixture(t, iommu.Caps{Rules: iommu.IOMMUFD}, dma.Options{})
	if err := f.mapper.Populate(sec(60, 8)); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Populate beyond host memory = %v, want EINVAL", err)
	}
	f.entries()
}

// probingSpace is a Model whose device, while probing is set, DMAs to one
// IOVA after every map and unmap call: what a device with a transfer in
// flight sees between the calls of an operation.
type probingSpace struct {
	*iommu.Model
	probing      bool
	iova         uint64
	hits, faults int
}

func (p *probingSpace) probe() {
	if !p.probing {
		return
	}
	if err := p.DMAWrite(p.iova, []byte{1}); err == nil {
		p.hits++
	} else {
		p.faults++
	}
}

func (p *probingSpace) Map(iova, size uint64, host []byte) error {
	err := p.Model.Map(iova, size, host)
	p.probe()
	return err
}

func (p *probingSpace) Unmap(iova, size uint64) (uint64, error) {
	n, err := p.Model.Unmap(iova, size)
	p.probe()
	return n, err
}

func (p *probingSpace) Cut(iova, size uint64) (uint64, error) {
	n, err := p.Model.Cut(iova, size)
	p.probe()
	return n, err
}

// TestMaxExtent checks that Extent entries stop at multiples of MaxExtent,
// and that a cut then unmaps only the chunk it falls in: a device DMAing to
// another chunk while the split runs (between its unmap and its map) reaches
// memory, while without the bound it faults. The model measures the same
// window and re-pinned bytes as the mapper. The Cut policy hides nothing,
// bounded or not.
func TestMaxExtent(t *testing.T) {
	for _, c := range []struct {
		name      string
		caps      iommu.Caps
		max       uint64
		entries   []iommu.Mapping
		window    uint64 // bytes hidden from the device by the cut
		probeHits bool   // a DMA to page 40 during the split lands
	}{
		{"bounded", iommu.Caps{Rules: iommu.Type1v2}, 16 * pg, []iommu.Mapping{ent(0, 16), ent(16, 4), ent(21, 11), ent(32, 16), ent(48, 16)}, 15 * pg, true},
		{"unbounded", iommu.Caps{Rules: iommu.Type1v2}, dma.Unbounded, []iommu.Mapping{ent(0, 20), ent(21, 43)}, 63 * pg, false},
		{"cut bounded", iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}, 16 * pg, []iommu.Mapping{ent(0, 16), ent(16, 4), ent(21, 11), ent(32, 16), ent(48, 16)}, 0, true},
		{"cut unbounded", iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}, dma.Unbounded, []iommu.Mapping{ent(0, 20), ent(21, 43)}, 0, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			space := &probingSpace{Model: iommu.NewModel(c.caps), iova: gpa + 40*pg}
			host := make([]byte, 64*pg)
			m, err := dma.New(space, host, dma.Options{MaxExtent: c.max})
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Populate(sec(0, 64)); err != nil {
				t.Fatal(err)
			}
			if st := m.Stats(); st.WindowBytes != 0 || st.RepinnedBytes != 0 {
				t.Fatalf("a populate of nothing mapped had a window: %+v", st)
			}
			space.BeginOp()
			space.probing = true
			if err := m.Discard(sec(20, 1)); err != nil {
				t.Fatal(err)
			}
			space.probing = false
			hidden, repinned := space.EndOp()
			var window uint64
			for _, r := range hidden {
				window += r.Len()
			}
			if diff := cmp.Diff(c.entries, space.Mappings()); diff != "" {
				t.Fatalf("entries after the cut (-want +got):\n%s", diff)
			}
			st := m.Stats()
			if window != c.window || st.WindowBytes != c.window || st.MaxWindow != c.window || repinned != c.window || st.RepinnedBytes != c.window {
				t.Fatalf("window: model %d (re-pinned %d), mapper %d (max %d, re-pinned %d), want %d", window, repinned, st.WindowBytes, st.MaxWindow, st.RepinnedBytes, c.window)
			}
			if pins := space.Pins(); pins.Pinned*pg != st.PinnedBytes || pins.Unpinned*pg != st.UnpinnedBytes {
				t.Fatalf("model pinned %d / unpinned %d pages, mapper counted %d / %d bytes", pins.Pinned, pins.Unpinned, st.PinnedBytes, st.UnpinnedBytes)
			}
			if space.hits+space.faults == 0 {
				t.Fatal("the split made no IOMMU call")
			}
			if c.probeHits != (space.faults == 0) {
				t.Fatalf("DMA to page 40 during the split: %d landed, %d faulted", space.hits, space.faults)
			}
		})
	}
	if _, err := dma.New(iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD}), nil, dma.Options{MaxExtent: 3 << 20}); err == nil {
		t.Error("New accepted a maximum extent that is not a power of two")
	}
}

// TestSplitReserve checks that populates leave the reserve free and a
// splitting discard may use it.
func TestSplitReserve(t *testing.T) {
	f := newFixture(t, iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 4}, dma.Options{SplitReserve: 1})
	f.populate(sec(0, 8))
	f.populate(sec(10, 8))
	f.populate(sec(20, 8))
	if err := f.mapper.Populate(sec(30, 1)); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("a populate into the reserve = %v, want ENOSPC", err)
	}
	f.discard(sec(2, 1)) // takes the reserved entry
	f.entries(ent(0, 2), ent(3, 5), ent(10, 8), ent(20, 8))
	var want []uint64
	for _, r := range [][2]uint64{{0, 2}, {3, 5}, {10, 8}, {20, 8}} {
		want = append(want, rangeOf(r[0], r[1])...)
	}
	f.reach(want...)
	if got := dma.DefaultSplitReserve(65535); got != 4096 {
		t.Errorf("DefaultSplitReserve(65535) = %d", got)
	}
	for _, limit := range []uint64{0, 1, 2, 16, 200} {
		if r := dma.DefaultSplitReserve(limit); limit > 0 && r >= limit || limit > 1 && r == 0 {
			t.Errorf("DefaultSplitReserve(%d) = %d", limit, r)
		}
	}
}

// TestStatsAdd: every counter is summed, the largest window kept.
func TestStatsAdd(t *testing.T) {
	a := dma.Stats{Entries: 1, PeakEntries: 2, MappedBytes: 3, MapCalls: 4, UnmapCalls: 5, CutCalls: 13, Splits: 6, Failures: 7,
		PinnedBytes: 8, UnpinnedBytes: 9, RepinnedBytes: 10, WindowBytes: 11, MaxWindow: 12}
	b := dma.Stats{Entries: 10, PeakEntries: 20, MappedBytes: 30, MapCalls: 40, UnmapCalls: 50, CutCalls: 130, Splits: 60, Failures: 70,
		PinnedBytes: 80, UnpinnedBytes: 90, RepinnedBytes: 100, WindowBytes: 110, MaxWindow: 5}
	a.Add(b)
	want := dma.Stats{Entries: 11, PeakEntries: 22, MappedBytes: 33, MapCalls: 44, UnmapCalls: 55, CutCalls: 143, Splits: 66, Failures: 77,
		PinnedBytes: 88, UnpinnedBytes: 99, RepinnedBytes: 110, WindowBytes: 121, MaxWindow: 12}
	if a != want {
		t.Errorf("Add = %+v, want %+v", a, want)
	}
}
