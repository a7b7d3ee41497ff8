package discard_test

import (
	"errors"
	"math"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/span"
)

// TestIsPopulatedUnaligned checks that IsPopulated answers for every page an
// unaligned or sub-page range touches. QEMU's bitmap source truncates the
// size, so a sub-4K range there is always "populated".
func TestIsPopulatedUnaligned(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	change(t, src, pr(1, 3), true) // pages 1, 2, 3 populated
	cases := []struct {
		name string
		r    span.Range
		want bool
	}{
		{"sub-page in a populated page", span.Range{Start: pg + 1, End: pg + 2}, true},
		{"sub-page in a discarded page", span.Range{Start: 1, End: 2}, false},
		{"sub-page at the end of a discarded page", span.Range{Start: pg - 1, End: pg}, false},
		{"sub-page at the start of a discarded page", span.Range{Start: 4 * pg, End: 4*pg + 1}, false},
		{"straddles discarded and populated", span.Range{Start: 100, End: pg + 100}, false},
		{"aligned populated", pr(1, 3), true},
		{"one byte past the populated pages", span.Range{Start: pg, End: 4*pg + 1}, false},
		{"last byte of the populated pages", span.Range{Start: 4*pg - 1, End: 4 * pg}, true},
		{"unaligned inside populated", span.Range{Start: pg + 17, End: 4*pg - 17}, true},
		{"empty", span.Range{Start: 5, End: 5}, true},
		{"past the region", span.Range{Start: 15 * pg, End: 17 * pg}, false},
		{"whole region", pr(0, 16), false},
	}
	for _, c := range cases {
		if got := m.IsPopulated(c.r); got != c.want {
			t.Errorf("%s: IsPopulated(%v) = %v, want %v", c.name, c.r, got, c.want)
		}
	}
	// A non-maximal source (touching runs) must still answer true for a
	// range its runs cover together.
	m2 := discard.New(16*pg, nil)
	if err := m2.AddSource(&fixedSource{gran: pg, runs: []span.Range{pr(0, 2), pr(2, 2)}}); err != nil {
		t.Fatal(err)
	}
	if !m2.IsPopulated(span.Range{Start: 1000, End: 3*pg + 5}) {
		t.Error("IsPopulated false over two touching runs of one source")
	}
}

// TestAggregation checks the AND of two sources with different
// granularities (4K and 2M): the manager's granularity is the smaller, and
// populated means populated in both.
func TestAggregation(t *testing.T) {
	const mib = 1 << 20
	m := discard.New(8*mib, nil)
	if g := m.Granularity(); g != discard.DefaultGranularity {
		t.Fatalf("granularity without sources = %#x", g)
	}
	if !m.IsPopulated(span.Range{End: 8 * mib}) {
		t.Fatal("without sources everything must be populated")
	}
	big := newSource(t, m, 2*mib)
	if g := m.Granularity(); g != 2*mib {
		t.Fatalf("granularity with a 2M source = %#x", g)
	}
	small := newSource(t, m, pg)
	if g := m.Granularity(); g != pg {
		t.Fatalf("granularity with 4K and 2M sources = %#x, want 4K", g)
	}
	change(t, small, span.Range{Start: 0, End: 3 * mib}, true)
	change(t, big, span.Range{Start: 2 * mib, End: 6 * mib}, true)
	runs, err := m.PopulatedRuns(span.Range{End: 8 * mib})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]span.Range{{Start: 2 * mib, End: 3 * mib}}, runs); diff != "" {
		t.Fatalf("populated runs (-want +got):\n%s", diff)
	}
	for _, c := range []struct {
		r    span.Range
		want bool
	}{
		{span.Range{Start: 2 * mib, End: 3 * mib}, true},
		{span.Range{Start: 2*mib + 5, End: 2*mib + 6}, true}, // sub-page of both
		{span.Range{Start: mib, End: mib + pg}, false},       // shared, unplugged
		{span.Range{Start: 4 * mib, End: 4*mib + pg}, false}, // plugged, private
		{span.Range{Start: 3*mib - pg, End: 3*mib + 1}, false},
	} {
		if got := m.IsPopulated(c.r); got != c.want {
			t.Errorf("IsPopulated(%v) = %v, want %v", c.r, got, c.want)
		}
	}
	if err := m.RemoveSource(small); err != nil {
		t.Fatal(err)
	}
	if g := m.Granularity(); g != 2*mib {
		t.Fatalf("granularity after removing the 4K source = %#x", g)
	}
}

// TestReplayCoalesces checks that registering replays maximal runs: two runs
// give two callbacks, however the state was built.
func TestReplayCoalesces(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	change(t, src, pr(1, 1), true)
	change(t, src, pr(2, 1), true)
	change(t, src, pr(5, 2), true)
	change(t, src, pr(7, 1), true)
	var log callLog
	l := &recorder{name: "l", log: &log}
	s := discard.Section{Offset: 0, Size: 16 * pg, GPA: 0x100000}
	if err := m.Register(l, s); err != nil {
		t.Fatal(err)
	}
	want := []call{
		{"l", "populate", discard.Section{Offset: pg, Size: 2 * pg, GPA: 0x100000 + pg}},
		{"l", "populate", discard.Section{Offset: 5 * pg, Size: 3 * pg, GPA: 0x100000 + 5*pg}},
	}
	if diff := cmp.Diff(want, log.take()); diff != "" {
		t.Fatalf("replay at register (-want +got):\n%s", diff)
	}
	got := sections(t, m.ReplayPopulated, s)
	if diff := cmp.Diff([]discard.Section{want[0].Sec, want[1].Sec}, got); diff != "" {
		t.Fatalf("ReplayPopulated (-want +got):\n%s", diff)
	}
	// Two sources whose pieces touch still replay one run.
	m2 := discard.New(16*pg, nil)
	if err := m2.AddSource(&fixedSource{gran: pg, runs: []span.Range{pr(0, 2), pr(2, 2), pr(8, 1)}}); err != nil {
		t.Fatal(err)
	}
	got = sections(t, m2.ReplayPopulated, discard.Section{Size: 16 * pg})
	if diff := cmp.Diff([]discard.Section{id(0, 4), id(8, 1)}, got); diff != "" {
		t.Fatalf("single non-maximal source (-want +got):\n%s", diff)
	}
	other := newSource(t, m2, pg)
	change(t, other, pr(0, 16), true)
	got = sections(t, m2.ReplayPopulated, discard.Section{Size: 16 * pg})
	if diff := cmp.Diff([]discard.Section{id(0, 4), id(8, 1)}, got); diff != "" {
		t.Fatalf("two sources (-want +got):\n%s", diff)
	}
}

// TestNotifyClipped checks that each listener hears only the part of a
// change inside its section, with its own GPA.
func TestNotifyClipped(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	var log callLog
	lo := &recorder{name: "lo", log: &log}
	hi := &recorder{name: "hi", log: &log}
	if err := m.Register(lo, discard.Section{Offset: 0, Size: 8 * pg, GPA: 0x10000}); err != nil {
		t.Fatal(err)
	}
	if err := m.Register(hi, discard.Section{Offset: 8 * pg, Size: 8 * pg, GPA: 0x800000}); err != nil {
		t.Fatal(err)
	}
	change(t, src, pr(0, 16), true)
	change(t, src, pr(6, 4), false) // spans the boundary at page 8
	change(t, src, pr(12, 2), false)
	want := []call{
		{"lo", "populate", discard.Section{Offset: 0, Size: 8 * pg, GPA: 0x10000}},
		{"hi", "populate", discard.Section{Offset: 8 * pg, Size: 8 * pg, GPA: 0x800000}},
		{"lo", "discard", discard.Section{Offset: 6 * pg, Size: 2 * pg, GPA: 0x10000 + 6*pg}},
		{"hi", "discard", discard.Section{Offset: 8 * pg, Size: 2 * pg, GPA: 0x800000}},
		{"hi", "discard", discard.Section{Offset: 12 * pg, Size: 2 * pg, GPA: 0x800000 + 4*pg}},
	}
	if diff := cmp.Diff(want, log.take()); diff != "" {
		t.Fatalf("notifications (-want +got):\n%s", diff)
	}
}

// TestMixedChangeNotifiesChangedRuns checks that a change over a mixed range
// notifies only the runs that change, one notification per run, and that a
// same-state change notifies nothing.
func TestMixedChangeNotifiesChangedRuns(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	var log callLog
	if err := m.Register(&recorder{name: "l", log: &log}, discard.Section{Size: 16 * pg}); err != nil {
		t.Fatal(err)
	}
	change(t, src, pr(2, 2), true)
	change(t, src, pr(6, 1), true)
	log.take()
	got := change(t, src, pr(0, 10), true)
	if diff := cmp.Diff([]span.Range{pr(0, 2), pr(4, 2), pr(7, 3)}, got); diff != "" {
		t.Fatalf("changed runs (-want +got):\n%s", diff)
	}
	want := []call{
		{"l", "populate", id(0, 2)},
		{"l", "populate", id(4, 2)},
		{"l", "populate", id(7, 3)},
	}
	if diff := cmp.Diff(want, log.take()); diff != "" {
		t.Fatalf("notifications (-want +got):\n%s", diff)
	}
	if got := change(t, src, pr(1, 8), true); len(got) != 0 {
		t.Fatalf("same-state change reported %v", got)
	}
	if calls := log.take(); len(calls) != 0 {
		t.Fatalf("same-state change notified %v", calls)
	}
}

// TestRedundantDiscard checks that a second source discarding what another
// source already discarded notifies nothing.
func TestRedundantDiscard(t *testing.T) {
	m := discard.New(16*pg, nil)
	a, b := newSource(t, m, pg), newSource(t, m, pg)
	change(t, a, pr(0, 16), true)
	change(t, b, pr(0, 16), true)
	var log callLog
	if err := m.Register(&recorder{name: "l", log: &log}, discard.Section{Size: 16 * pg}); err != nil {
		t.Fatal(err)
	}
	log.take()
	change(t, a, pr(0, 4), false)
	change(t, b, pr(2, 4), false)
	want := []call{
		{"l", "discard", id(0, 4)},
		{"l", "discard", id(4, 2)},
	}
	if diff := cmp.Diff(want, log.take()); diff != "" {
		t.Fatalf("notifications (-want +got):\n%s", diff)
	}
	// Populating in one source where the other still discards: nothing.
	change(t, a, pr(0, 4), true)
	want = []call{{"l", "populate", id(0, 2)}}
	if diff := cmp.Diff(want, log.take()); diff != "" {
		t.Fatalf("populate where the other source discards (-want +got):\n%s", diff)
	}
}

// TestZeroSizeSection checks that a listener of an empty section is
// registered but never called.
func TestZeroSizeSection(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	change(t, src, pr(0, 16), true)
	var log callLog
	l := &recorder{name: "l", log: &log}
	s := discard.Section{Offset: 4 * pg, GPA: 0x1000}
	if err := m.Register(l, s); err != nil {
		t.Fatalf("register of an empty section: %v", err)
	}
	ls, ss := m.Listeners()
	if len(ls) != 1 || ls[0] != discard.Listener(l) || ss[0] != s {
		t.Fatalf("Listeners = %v %v", ls, ss)
	}
	change(t, src, pr(0, 16), false)
	change(t, src, pr(4, 1), true)
	if err := m.RemoveSource(src); err != nil {
		t.Fatal(err)
	}
	if err := m.Unregister(l); err != nil {
		t.Fatal(err)
	}
	if calls := log.take(); len(calls) != 0 {
		t.Fatalf("a listener of an empty section was called: %v", calls)
	}
}

// TestRegisterValidation checks the section checks of Register.
func TestRegisterValidation(t *testing.T) {
	m := discard.New(16*pg, nil)
	var log callLog
	l := &recorder{name: "l", log: &log}
	for _, c := range []struct {
		s    discard.Section
		want error
	}{
		{discard.Section{Offset: 1, Size: pg}, span.ErrAlign},
		{discard.Section{Offset: 0, Size: pg + 1}, span.ErrAlign},
		{discard.Section{Offset: 8 * pg, Size: 9 * pg}, span.ErrBounds},
		{discard.Section{Offset: 0, Size: pg, GPA: math.MaxUint64 - 10}, span.ErrOverflow},
		{discard.Section{Offset: math.MaxUint64 - 10, Size: pg}, span.ErrOverflow},
	} {
		if err := m.Register(l, c.s); !errors.Is(err, c.want) {
			t.Errorf("Register(%v) = %v, want %v", c.s, err, c.want)
		}
	}
	if ls, _ := m.Listeners(); len(ls) != 0 || len(log.take()) != 0 {
		t.Fatal("a refused registration left a listener or made calls")
	}
}

// TestReplayEdges checks replays of an empty section, replays stopping at
// the first error, and ReplayDiscarded.
func TestReplayEdges(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	change(t, src, pr(2, 2), true)
	change(t, src, pr(8, 4), true)
	empty := discard.Section{Offset: 2 * pg, GPA: 0x1000}
	for _, replay := range []func(discard.Section, func(discard.Section) error) error{m.ReplayPopulated, m.ReplayDiscarded} {
		n := 0
		if err := replay(empty, func(discard.Section) error { n++; return nil }); err != nil || n != 0 {
			t.Fatalf("replay of an empty section: %d calls, %v", n, err)
		}
	}
	s := discard.Section{Offset: pg, Size: 12 * pg, GPA: 0x200000}
	got := sections(t, m.ReplayDiscarded, s)
	want := []discard.Section{
		{Offset: pg, Size: pg, GPA: 0x200000},
		{Offset: 4 * pg, Size: 4 * pg, GPA: 0x200000 + 3*pg},
		{Offset: 12 * pg, Size: pg, GPA: 0x200000 + 11*pg},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("ReplayDiscarded (-want +got):\n%s", diff)
	}
	got = sections(t, m.ReplayPopulated, s)
	want = []discard.Section{
		{Offset: 2 * pg, Size: 2 * pg, GPA: 0x200000 + pg},
		{Offset: 8 * pg, Size: 4 * pg, GPA: 0x200000 + 7*pg},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("ReplayPopulated (-want +got):\n%s", diff)
	}
	n := 0
	err := m.ReplayPopulated(s, func(discard.Section) error { n++; return errRefused })
	if !errors.Is(err, errRefused) || n != 1 {
		t.Fatalf("replay with a failing callback: %d calls, %v", n, err)
	}
	if err := m.ReplayPopulated(discard.Section{Offset: 15 * pg, Size: 2 * pg}, func(discard.Section) error { return nil }); !errors.Is(err, span.ErrBounds) {
		t.Fatalf("replay past the region = %v", err)
	}
	if _, err := m.PopulatedRuns(pr(10, 10)); !errors.Is(err, span.ErrBounds) {
		t.Fatalf("PopulatedRuns past the region = %v", err)
	}
}

// TestUnregister checks that unregistering sends one discard of the whole
// section, even where nothing was ever populated, and that a failed discard
// keeps the listener.
func TestUnregister(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	var log callLog
	l := &recorder{name: "l", log: &log}
	s := discard.Section{Offset: 4 * pg, Size: 4 * pg, GPA: 0x9000}
	if err := m.Register(l, s); err != nil {
		t.Fatal(err)
	}
	if calls := log.take(); len(calls) != 0 {
		t.Fatalf("register over discarded memory notified %v", calls)
	}
	if err := m.Unregister(l); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]call{{"l", "discard", s}}, log.take()); diff != "" {
		t.Fatalf("unregister (-want +got):\n%s", diff)
	}
	if err := m.Unregister(l); !errors.Is(err, discard.ErrNoListener) {
		t.Fatalf("second Unregister = %v, want ErrNoListener", err)
	}

	// Partly populated: still one whole-section discard.
	change(t, src, pr(5, 1), true)
	if err := m.Register(l, s); err != nil {
		t.Fatal(err)
	}
	log.take()
	l.failDiscard = func(discard.Section) bool { return true }
	if err := m.Unregister(l); !errors.Is(err, errRefused) {
		t.Fatalf("Unregister with a failing discard = %v", err)
	}
	if ls, _ := m.Listeners(); len(ls) != 1 {
		t.Fatal("a listener whose discard failed was removed")
	}
	l.failDiscard = nil
	log.take()
	if err := m.Unregister(l); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]call{{"l", "discard", s}}, log.take()); diff != "" {
		t.Fatalf("unregister (-want +got):\n%s", diff)
	}
}

// TestRemoveAndReaddSource checks that removing the last source makes
// everything populated (listeners told, clipped to their sections) and that
// adding it back discards again.
func TestRemoveAndReaddSource(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	change(t, src, pr(0, 4), true)
	var log callLog
	l := &recorder{name: "l", log: &log}
	s := discard.Section{Offset: 2 * pg, Size: 12 * pg, GPA: 0x100000}
	if err := m.Register(l, s); err != nil {
		t.Fatal(err)
	}
	log.take()
	if err := m.RemoveSource(src); err != nil {
		t.Fatal(err)
	}
	want := []call{{"l", "populate", discard.Section{Offset: 4 * pg, Size: 10 * pg, GPA: 0x100000 + 2*pg}}}
	if diff := cmp.Diff(want, log.take()); diff != "" {
		t.Fatalf("remove source (-want +got):\n%s", diff)
	}
	if !m.IsPopulated(pr(0, 16)) {
		t.Fatal("with no source left everything must be populated")
	}
	if got := m.Sources(); len(got) != 0 {
		t.Fatalf("Sources = %v", got)
	}
	if err := m.RemoveSource(src); !errors.Is(err, discard.ErrNoSource) {
		t.Fatalf("removing it again = %v, want ErrNoSource", err)
	}
	if err := m.AddSource(src); err != nil {
		t.Fatal(err)
	}
	want = []call{{"l", "discard", discard.Section{Offset: 4 * pg, Size: 10 * pg, GPA: 0x100000 + 2*pg}}}
	if diff := cmp.Diff(want, log.take()); diff != "" {
		t.Fatalf("re-add source (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]span.Range{pr(0, 4)}, must(m.PopulatedRuns(pr(0, 16)))); diff != "" {
		t.Fatalf("populated after re-add (-want +got):\n%s", diff)
	}
}

// id is the section of pages [first, first+n) of a listener registered for
// the whole region at GPA 0 (GPA = offset).
func id(first, n uint64) discard.Section {
	return discard.Section{Offset: first * pg, Size: n * pg, GPA: first * pg}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestSourceChangeRefused checks that adding or removing a source is undone
// when a listener refuses, and that the source list stays as it was.
func TestSourceChangeRefused(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	change(t, src, pr(0, 4), true)
	var log callLog
	a := &recorder{name: "a", log: &log}
	b := &recorder{name: "b", log: &log}
	if err := m.Register(a, discard.Section{Size: 16 * pg}); err != nil {
		t.Fatal(err)
	}
	if err := m.Register(b, discard.Section{Offset: 8 * pg, Size: 8 * pg}); err != nil {
		t.Fatal(err)
	}
	log.take()
	b.failPopulate = func(discard.Section) bool { return true }
	if err := m.RemoveSource(src); !errors.Is(err, errRefused) {
		t.Fatalf("RemoveSource with a refusing listener = %v", err)
	}
	want := []call{
		{"a", "populate", id(4, 12)},
		{"b", "populate", discard.Section{Offset: 8 * pg, Size: 8 * pg}},
		// b keeps no journal: it is told the opposite of what it refused.
		{"b", "discard", discard.Section{Offset: 8 * pg, Size: 8 * pg}},
		{"a", "discard", id(4, 12)},
	}
	if diff := cmp.Diff(want, log.take()); diff != "" {
		t.Fatalf("refused RemoveSource (-want +got):\n%s", diff)
	}
	if got := m.Sources(); len(got) != 1 || got[0] != discard.Source(src) {
		t.Fatalf("Sources after a refused removal = %v", got)
	}
	if m.IsPopulated(pr(4, 1)) {
		t.Fatal("a refused removal changed the populated set")
	}

	b.failPopulate = nil
	a.failDiscard = func(discard.Section) bool { return true }
	other := newLoose(t, m, pg)
	if err := m.AddSource(other); !errors.Is(err, errRefused) {
		t.Fatalf("AddSource with a failing discard = %v", err)
	}
	want = []call{
		{"a", "discard", discard.Section{Offset: 0, Size: 4 * pg}},
		{"a", "populate", discard.Section{Offset: 0, Size: 4 * pg}},
	}
	if diff := cmp.Diff(want, log.take()); diff != "" {
		t.Fatalf("refused AddSource (-want +got):\n%s", diff)
	}
	if got := m.Sources(); len(got) != 1 {
		t.Fatalf("a refused source was added: %v", got)
	}
	if !m.IsPopulated(pr(0, 4)) {
		t.Fatal("a refused AddSource changed the populated set")
	}
}

// TestRollback checks that when the second listener refuses a populate, the
// first, already told, is told to discard again (or reverted, if it keeps a
// journal), newest first, and the source's change is undone.
func TestRollback(t *testing.T) {
	for _, withJournal := range []bool{false, true} {
		name := "plain"
		if withJournal {
			name = "journal"
		}
		t.Run(name, func(t *testing.T) {
			m := discard.New(16*pg, nil)
			src := newSource(t, m, pg)
			change(t, src, pr(1, 1), true) // so [0, 3) changes as two runs
			var log callLog
			var first discard.Listener = &recorder{name: "first", log: &log}
			if withJournal {
				first = &journaled{recorder: recorder{name: "first", log: &log}}
			}
			refuseSecondRun := func(s discard.Section) bool { return s.Offset == 2*pg }
			second := &recorder{name: "second", log: &log, failPopulate: refuseSecondRun}
			for _, l := range []discard.Listener{first, second} {
				if err := m.Register(l, discard.Section{Size: 16 * pg, GPA: 0x1000_0000}); err != nil {
					t.Fatal(err)
				}
			}
			log.take()
			_, err := src.Change(pr(0, 3), true, discard.Steps{})
			if !errors.Is(err, errRefused) {
				t.Fatalf("Change = %v, want the refusal", err)
			}
			s0 := discard.Section{Offset: 0, Size: pg, GPA: 0x1000_0000}
			s2 := discard.Section{Offset: 2 * pg, Size: pg, GPA: 0x1000_0000 + 2*pg}
			undo := "discard"
			if withJournal {
				undo = "revert"
			}
			want := []call{
				{"first", "populate", s0},
				{"first", "populate", s2},
				{"second", "populate", s0},
				{"second", "populate", s2}, // refused
				{"second", "discard", s2},
				{"second", "discard", s0},
				{"first", undo, s2},
				{"first", undo, s0},
			}
			if diff := cmp.Diff(want, log.take()); diff != "" {
				t.Fatalf("calls (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff([]span.Range{pr(1, 1)}, must(m.PopulatedRuns(pr(0, 16)))); diff != "" {
				t.Fatalf("populated after the refused change (-want +got):\n%s", diff)
			}
			if !src.Discarded(pr(0, 1)) || !src.Discarded(pr(2, 1)) {
				t.Fatal("the source kept a refused change")
			}
		})
	}
}

// TestErrors checks the manager's sentinel errors.
func TestErrors(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	if err := m.AddSource(src); !errors.Is(err, discard.ErrSourceExists) {
		t.Errorf("duplicate AddSource = %v", err)
	}
	if err := m.RemoveSource(&fixedSource{gran: pg}); !errors.Is(err, discard.ErrNoSource) {
		t.Errorf("RemoveSource of an unknown source = %v", err)
	}
	if err := m.AddSource(&fixedSource{gran: 3 * pg}); err == nil {
		t.Error("AddSource accepted a granularity that is not a power of two")
	}
	var log callLog
	l := &recorder{name: "l", log: &log}
	if err := m.Register(l, discard.Section{Size: pg}); err != nil {
		t.Fatal(err)
	}
	if err := m.Register(l, discard.Section{Offset: pg, Size: pg}); !errors.Is(err, discard.ErrListenerExists) {
		t.Errorf("duplicate Register = %v", err)
	}
	if err := m.Unregister(&recorder{name: "x", log: &log}); !errors.Is(err, discard.ErrNoListener) {
		t.Errorf("Unregister of an unknown listener = %v", err)
	}
	for i := len(m.Sources()); i < 64; i++ {
		if err := m.AddSource(&fixedSource{gran: pg, runs: []span.Range{pr(0, 16)}}); err != nil {
			t.Fatalf("source %d: %v", i, err)
		}
	}
	if err := m.AddSource(&fixedSource{gran: pg}); !errors.Is(err, discard.ErrTooManySources) {
		t.Errorf("65th source = %v", err)
	}
	if len(m.Sources()) != 64 {
		t.Errorf("%d sources", len(m.Sources()))
	}
}

// TestWalk checks the extents Walk yields with the sources that discard
// them: private (memattr-like source 0), unplugged (virtio-mem-like source
// 1), both, or none.
func TestWalk(t *testing.T) {
	m := discard.New(16*pg, nil)
	attrs := newSource(t, m, pg)      // bit 0: shared/private
	plug := newSource(t, m, 4*pg)     // bit 1: plugged/unplugged
	change(t, attrs, pr(2, 8), true)  // shared [2,10)
	change(t, plug, pr(4, 8), true)   // plugged [4,12)
	change(t, attrs, pr(13, 1), true) // shared but unplugged
	var srcs []discard.Source
	got := slices.Collect(m.Walk(pr(0, 16), &srcs))
	ext := func(first, n, set uint64) discard.Extent {
		return discard.Extent{Range: pr(first, n), DiscardedBy: set}
	}
	want := []discard.Extent{
		ext(0, 2, 0b11),  // private, unplugged
		ext(2, 2, 0b10),  // shared, unplugged
		ext(4, 6, 0),     // shared, plugged
		ext(10, 2, 0b01), // private, plugged
		ext(12, 1, 0b11),
		ext(13, 1, 0b10),
		ext(14, 2, 0b11),
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("Walk (-want +got):\n%s", diff)
	}
	if len(srcs) != 2 || srcs[0] != discard.Source(attrs) || srcs[1] != discard.Source(plug) {
		t.Fatalf("Walk sources = %v", srcs)
	}
	for _, e := range got {
		if e.Populated() != (e.DiscardedBy == 0) {
			t.Fatalf("Populated() wrong for %+v", e)
		}
	}
	// A sub-range is clipped; stopping early is honoured.
	got = slices.Collect(m.Walk(span.Range{Start: 3 * pg, End: 5 * pg}, nil))
	if diff := cmp.Diff([]discard.Extent{ext(3, 1, 0b10), ext(4, 1, 0)}, got); diff != "" {
		t.Fatalf("Walk of a sub-range (-want +got):\n%s", diff)
	}
	n := 0
	for range m.Walk(pr(0, 16), nil) {
		n++
		break
	}
	if n != 1 {
		t.Fatal("Walk ignored a break")
	}
	if got := slices.Collect(m.Walk(pr(8, 10), nil)); len(got) != 0 {
		t.Fatalf("Walk past the region yielded %v", got)
	}
	if got := slices.Collect(m.Walk(span.Range{Start: pg, End: pg}, nil)); len(got) != 0 {
		t.Fatalf("Walk of an empty range yielded %v", got)
	}
	// With no source everything is one populated extent.
	m2 := discard.New(16*pg, nil)
	if diff := cmp.Diff([]discard.Extent{ext(0, 16, 0)}, slices.Collect(m2.Walk(pr(0, 16), nil))); diff != "" {
		t.Fatalf("Walk without sources (-want +got):\n%s", diff)
	}
}

// TestTx checks the transaction API's range checks and that a source not
// added to the manager notifies nothing.
func TestTx(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	var log callLog
	if err := m.Register(&recorder{name: "l", log: &log}, discard.Section{Size: 16 * pg}); err != nil {
		t.Fatal(err)
	}
	if err := m.Transact(pr(10, 10), func(*discard.Tx) error { return nil }); !errors.Is(err, span.ErrBounds) {
		t.Fatalf("Transact past the region = %v", err)
	}
	err := m.Transact(pr(0, 4), func(tx *discard.Tx) error {
		if tx.Range() != pr(0, 4) {
			t.Errorf("Range = %v", tx.Range())
		}
		return tx.NotifyPopulate(src, []span.Range{pr(2, 4)})
	})
	if !errors.Is(err, span.ErrBounds) {
		t.Fatalf("notifying outside the transaction's range = %v", err)
	}
	// A source outside the manager changes its own state silently.
	loose := newLoose(t, m, pg)
	got := change(t, loose, pr(0, 4), true)
	if diff := cmp.Diff([]span.Range{pr(0, 4)}, got); diff != "" {
		t.Fatalf("changed (-want +got):\n%s", diff)
	}
	if !loose.Populated(pr(0, 4)) {
		t.Fatal("loose source did not change")
	}
	if calls := log.take(); len(calls) != 0 {
		t.Fatalf("a source outside the manager notified %v", calls)
	}
	// Rollback through the Tx API.
	err = m.Transact(pr(0, 4), func(tx *discard.Tx) error {
		mark := tx.Mark()
		if err := tx.NotifyPopulate(src, []span.Range{pr(0, 2)}); err != nil {
			return err
		}
		return tx.Rollback(mark)
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []call{
		{"l", "populate", discard.Section{Size: 2 * pg}},
		{"l", "discard", discard.Section{Size: 2 * pg}},
	}
	if diff := cmp.Diff(want, log.take()); diff != "" {
		t.Fatalf("Tx rollback (-want +got):\n%s", diff)
	}
}

// TestStateSource checks the StateSource constructor, request checks and
// queries.
func TestStateSource(t *testing.T) {
	m := discard.New(16*pg, nil)
	pm, _ := pagemap.NewRuns(16, 1)
	if _, err := discard.NewStateSource(m, 3*pg, pm); err == nil {
		t.Error("unit not a power of two accepted")
	}
	if _, err := discard.NewStateSource(m, 32*pg, pm); err == nil {
		t.Error("region not a multiple of the unit accepted")
	}
	pm8, _ := pagemap.NewRuns(8, 1)
	if _, err := discard.NewStateSource(m, pg, pm8); err == nil {
		t.Error("page map of the wrong size accepted")
	}
	src := newSource(t, m, 2*pg)
	if src.Unit() != 2*pg || src.Granularity() != 2*pg || src.Size() != 16*pg {
		t.Fatalf("Unit %#x Granularity %#x Size %#x", src.Unit(), src.Granularity(), src.Size())
	}
	for _, c := range []struct {
		off, size uint64
		want      error
	}{
		{0, 0, span.ErrEmpty},
		{pg, 2 * pg, span.ErrAlign},
		{0, 3 * pg, span.ErrAlign},
		{14 * pg, 4 * pg, span.ErrBounds},
		{2 * pg, math.MaxUint64 - pg, span.ErrOverflow},
	} {
		if _, err := src.Check(c.off, c.size); !errors.Is(err, c.want) {
			t.Errorf("Check(%#x, %#x) = %v, want %v", c.off, c.size, err, c.want)
		}
		if _, err := src.Change(span.Range{Start: c.off, End: c.off + c.size}, true, discard.Steps{}); err == nil {
			t.Errorf("Change(%#x+%#x) accepted", c.off, c.size)
		}
	}
	if src.Count(pr(0, 16)) != 0 {
		t.Fatal("Change of an invalid request changed something")
	}
	change(t, src, pr(2, 4), true)
	if got := src.Count(pr(0, 16)); got != 4*pg {
		t.Fatalf("Count = %#x", got)
	}
	// Queries round out to the unit.
	if got := src.Count(pr(3, 1)); got != 2*pg {
		t.Fatalf("Count of a half unit = %#x, want the whole unit", got)
	}
	if !src.Populated(span.Range{Start: 2 * pg, End: 2*pg + 1}) || src.Populated(pr(1, 2)) || !src.Discarded(pr(0, 2)) || src.Discarded(pr(1, 2)) {
		t.Fatal("Populated/Discarded wrong")
	}
	type run struct {
		R span.Range
		P bool
	}
	var runs []run
	src.Runs(pr(1, 6), func(r span.Range, p bool) { runs = append(runs, run{r, p}) })
	if diff := cmp.Diff([]run{{pr(0, 2), false}, {pr(2, 4), true}, {pr(6, 2), false}}, runs); diff != "" {
		t.Fatalf("Runs (-want +got):\n%s", diff)
	}
	var app []span.Range
	app = src.AppendPopulated(app, span.Range{Start: 3*pg + 5, End: 20 * pg})
	if diff := cmp.Diff([]span.Range{{Start: 3*pg + 5, End: 6 * pg}}, app, cmpopts.EquateEmpty()); diff != "" {
		t.Fatalf("AppendPopulated clips to the request (-want +got):\n%s", diff)
	}
	if src.Bytes() == 0 {
		t.Fatal("Bytes = 0")
	}
}

// TestJournalSettled checks that every operation that ends tells a Journal
// listener that its notifications stand: registering, changing, adding and
// removing a source, unregistering.
func TestJournalSettled(t *testing.T) {
	m := discard.New(16*pg, nil)
	src := newSource(t, m, pg)
	change(t, src, pr(2, 2), true)
	var log callLog
	j := &journaled{recorder: recorder{name: "j", log: &log}, logSettle: true}
	if err := m.Register(j, discard.Section{Size: 16 * pg}); err != nil {
		t.Fatal(err)
	}
	change(t, src, pr(8, 1), true)
	if err := m.RemoveSource(src); err != nil {
		t.Fatal(err)
	}
	if err := m.AddSource(src); err != nil {
		t.Fatal(err)
	}
	if err := m.Unregister(j); err != nil {
		t.Fatal(err)
	}
	want := []call{
		{"j", "populate", id(2, 2)}, {"j", "settle", id(2, 2)},
		{"j", "populate", id(8, 1)}, {"j", "settle", id(8, 1)},
		{"j", "populate", id(0, 2)}, {"j", "populate", id(4, 4)}, {"j", "populate", id(9, 7)},
		{"j", "settle", id(0, 2)}, {"j", "settle", id(4, 4)}, {"j", "settle", id(9, 7)},
		{"j", "discard", id(0, 2)}, {"j", "discard", id(4, 4)}, {"j", "discard", id(9, 7)},
		{"j", "settle", id(0, 2)}, {"j", "settle", id(4, 4)}, {"j", "settle", id(9, 7)},
		{"j", "discard", id(0, 16)}, {"j", "settle", id(0, 16)},
	}
	if diff := cmp.Diff(want, log.take()); diff != "" {
		t.Fatalf("calls (-want +got):\n%s", diff)
	}
}
