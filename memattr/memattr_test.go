package memattr_test

import (
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

const pg = 4096

// gpa is where region offset 0 is seen, so IOVAs differ from offsets.
const gpa = 0x8000_0000

func pr(first, n uint64) span.Range { return span.Range{Start: first * pg, End: (first + n) * pg} }

var errBoom = errors.New("boom")

// events is the ordered record of what a conversion did, shared by the
// backend and the listener so their relative order shows.
type events struct{ list []string }

func (e *events) add(format string, args ...any) {
	e.list = append(e.list, fmt.Sprintf(format, args...))
}

func (e *events) take() []string {
	l := e.list
	e.list = nil
	return l
}

// backend records SetAttributes and Release calls, keeps the kernel's view
// of each page, and fails the calls its hooks pick.
type backend struct {
	ev          *events
	kernel      []bool // shared, per page
	failSet     func(runs []span.Range, to memattr.State) bool
	failRelease func(runs []span.Range, to memattr.State) bool
	// during, if set, runs at each call, to look at the rest of the system
	// at that moment.
	during func(what string, runs []span.Range, to memattr.State)
}

func (b *backend) SetAttributes(runs []span.Range, to memattr.State) error {
	b.ev.add("kernel %v %v", to, runs)
	if b.during != nil {
		b.during("kernel", runs, to)
	}
	if b.failSet != nil && b.failSet(runs, to) {
		return errBoom
	}
	for _, r := range runs {
		for p := r.Start / pg; p < r.End/pg; p++ {
			b.kernel[p] = to == memattr.Shared
		}
	}
	return nil
}

func (b *backend) Release(runs []span.Range, to memattr.State) error {
	b.ev.add("release %v %v", to, runs)
	if b.during != nil {
		b.during("release", runs, to)
	}
	if b.failRelease != nil && b.failRelease(runs, to) {
		return errBoom
	}
	return nil
}

// listener records notifications and refuses the populates (or discards)
// its hooks pick.
type listener struct {
	ev          *events
	failPop     func(discard.Section) bool
	failDiscard func(discard.Section) bool
}

func (l *listener) Populate(s discard.Section) error {
	l.ev.add("populate %v", s.Range())
	if l.failPop != nil && l.failPop(s) {
		return errBoom
	}
	return nil
}

func (l *listener) Discard(s discard.Section) error {
	l.ev.add("discard %v", s.Range())
	if l.failDiscard != nil && l.failDiscard(s) {
		return errBoom
	}
	return nil
}

type fixture struct {
	t      *testing.T
	m      *discard.Manager
	a      *memattr.Attributes
	ev     *events
	be     *backend
	l      *listener
	model  *iommu.Model
	mapper *dma.Mapper
	host   []byte
}

// newFixture builds a 32-page region with a recording backend, a recording
// listener and a DMA mapper over the whole region.
func newFixture(t *testing.T, inPlace, bitmap bool) *fixture {
	t.Helper()
	const pages = 32
	f := &fixture{t: t, ev: &events{}, host: make([]byte, pages*pg)}
	f.m = discard.New(pages*pg, nil)
	f.be = &backend{ev: f.ev, kernel: make([]bool, pages)}
	var err error
	f.a, err = memattr.New(f.m, memattr.Config{Backend: f.be, InPlace: inPlace, Bitmap: bitmap})
	if err != nil {
		t.Fatal(err)
	}
	f.l = &listener{ev: f.ev}
	if err := f.m.Register(f.l, discard.Section{Size: pages * pg, GPA: gpa}); err != nil {
		t.Fatal(err)
	}
	f.model = iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
	f.mapper, err = dma.New(f.model, f.host, dma.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.m.Register(f.mapper, discard.Section{Size: pages * pg, GPA: gpa}); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) convert(first, n uint64, to memattr.State) {
	f.t.Helper()
	if err := f.a.Convert(first*pg, n*pg, to); err != nil {
		f.t.Fatalf("Convert(%d+%d, %v): %v", first, n, to, err)
	}
}

// state is everything a failed conversion must leave as it was: the
// attributes, the kernel's view, and the device's mappings.
type state struct {
	Shared, Kernel []bool
	Mapped         []iommu.Mapping
}

func (f *fixture) state() state {
	s := state{Kernel: append([]bool(nil), f.be.kernel...), Mapped: f.model.Mappings()}
	for p := range uint64(len(f.be.kernel)) {
		s.Shared = append(s.Shared, f.a.Get(p*pg) == memattr.Shared)
	}
	return s
}

// consistent checks that attributes, kernel and device agree: every shared
// page mapped, no private page mapped.
func (f *fixture) consistent() {
	f.t.Helper()
	s := f.state()
	if diff := cmp.Diff(s.Shared, s.Kernel); diff != "" {
		f.t.Fatalf("attributes and kernel disagree (-attrs +kernel):\n%s", diff)
	}
	for p, sh := range s.Shared {
		if f.model.Reaches(gpa+uint64(p)*pg) != sh {
			f.t.Fatalf("page %d: shared=%v but device reaches it=%v", p, sh, !sh)
		}
	}
}

func TestNew(t *testing.T) {
	m := discard.New(64*pg, nil)
	a, err := memattr.New(m, memattr.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if a.PageSize() != pg {
		t.Fatalf("default page size %#x", a.PageSize())
	}
	if !a.IsPrivate(pr(0, 64)) || a.IsShared(pr(0, 1)) || a.SharedBytes() != 0 {
		t.Fatal("pages are not all private at creation")
	}
	for p := range uint64(64) {
		if a.Get(p*pg+7) != memattr.Private {
			t.Fatalf("page %d not private", p)
		}
	}
	if srcs := m.Sources(); len(srcs) != 1 || srcs[0] != a.Source() {
		t.Fatal("the attributes did not add themselves as the manager's source")
	}
	if m.IsPopulated(pr(0, 1)) {
		t.Fatal("a private page counts as populated")
	}
	if _, err := memattr.New(m, memattr.Config{PageSize: 3000}); err == nil {
		t.Fatal("page size not a power of two accepted")
	}
	if _, err := memattr.New(discard.New(3*pg, nil), memattr.Config{PageSize: 2 * pg}); err == nil {
		t.Fatal("region not a multiple of the page size accepted")
	}
	if memattr.Shared.String() != "shared" || memattr.Private.String() != "private" {
		t.Fatal("State names")
	}
	if a.StateBytes() == 0 {
		t.Fatal("StateBytes = 0")
	}
}

// TestConvertValidation checks that invalid requests fail with the typed
// error before anything is touched: no backend call, no notification, no
// change.
func TestConvertValidation(t *testing.T) {
	f := newFixture(t, false, false)
	f.convert(4, 4, memattr.Shared)
	f.ev.take()
	before := f.state()
	cases := []struct {
		name       string
		off, size  uint64
		want       error
		wantPrefix string
	}{
		{name: "size 0", off: 0, size: 0, want: span.ErrEmpty},
		{name: "overflow", off: 4 * pg, size: math.MaxUint64 - 2*pg + 1, want: span.ErrOverflow},
		{name: "unaligned offset", off: pg + 512, size: pg, want: span.ErrAlign},
		{name: "unaligned size", off: pg, size: pg + 1, want: span.ErrAlign},
		{name: "sub-page", off: 0, size: 100, want: span.ErrAlign},
		{name: "past the end", off: 30 * pg, size: 4 * pg, want: span.ErrBounds},
		{name: "beyond the region", off: 64 * pg, size: pg, want: span.ErrBounds},
	}
	for _, c := range cases {
		for _, to := range []memattr.State{memattr.Shared, memattr.Private} {
			err := f.a.Convert(c.off, c.size, to)
			if !errors.Is(err, c.want) {
				t.Errorf("%s to %v: err = %v, want %v", c.name, to, err, c.want)
			}
			if ev := f.ev.take(); len(ev) != 0 {
				t.Errorf("%s to %v: an invalid request made calls %v", c.name, to, ev)
			}
		}
	}
	if diff := cmp.Diff(before, f.state()); diff != "" {
		t.Fatalf("invalid requests changed state (-before +after):\n%s", diff)
	}
	if st := f.a.Stats(); st.Failures != uint64(2*len(cases)) || st.Conversions != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// TestSameStateNoOp checks that converting pages to the state they are in
// calls nothing.
func TestSameStateNoOp(t *testing.T) {
	f := newFixture(t, false, false)
	if runs, err := f.a.ConvertRuns(0, 32*pg, memattr.Private); err != nil || runs != nil {
		t.Fatalf("private to private = %v, %v", runs, err)
	}
	f.convert(8, 8, memattr.Shared)
	f.ev.take()
	f.convert(10, 2, memattr.Shared)
	if ev := f.ev.take(); len(ev) != 0 {
		t.Fatalf("same-state conversion made calls %v", ev)
	}
	if st := f.a.Stats(); st.NoOps != 2 || st.Conversions != 1 || st.ChangedRuns != 1 || st.ChangedBytes != 8*pg {
		t.Fatalf("stats %+v", st)
	}
	f.consistent()
}

// TestMixedRange checks that a mixed range changes only the pages that
// differ, with one notification per changed run and one backend call for
// all of them.
func TestMixedRange(t *testing.T) {
	f := newFixture(t, false, false)
	f.convert(2, 2, memattr.Shared)
	f.convert(6, 1, memattr.Shared)
	f.ev.take()
	runs, err := f.a.ConvertRuns(0, 10*pg, memattr.Shared)
	if err != nil {
		t.Fatal(err)
	}
	want := []span.Range{pr(0, 2), pr(4, 2), pr(7, 3)}
	if diff := cmp.Diff(want, runs); diff != "" {
		t.Fatalf("changed runs (-want +got):\n%s", diff)
	}
	wantEv := []string{
		fmt.Sprintf("kernel shared %v", want),
		fmt.Sprintf("populate %v", pr(0, 2)),
		fmt.Sprintf("populate %v", pr(4, 2)),
		fmt.Sprintf("populate %v", pr(7, 3)),
		fmt.Sprintf("release shared %v", want),
	}
	if diff := cmp.Diff(wantEv, f.ev.take()); diff != "" {
		t.Fatalf("calls (-want +got):\n%s", diff)
	}
	if st := f.a.Stats(); st.ChangedRuns != 5 || st.ChangedBytes != 10*pg || st.Conversions != 3 {
		t.Fatalf("stats %+v", st)
	}
	// The mapper made one entry per changed run, none for the pages that
	// were already shared.
	if got := f.mapper.Stats(); got.MapCalls != 5 || got.Entries != 5 {
		t.Fatalf("mapper stats %+v", got)
	}
	f.consistent()
	// Back to private over a wider range: one run, one discard.
	f.convert(0, 16, memattr.Private)
	wantEv = []string{
		fmt.Sprintf("kernel private %v", []span.Range{pr(0, 10)}),
		fmt.Sprintf("discard %v", pr(0, 10)),
		fmt.Sprintf("release private %v", []span.Range{pr(0, 10)}),
	}
	if diff := cmp.Diff(wantEv, f.ev.take()); diff != "" {
		t.Fatalf("calls (-want +got):\n%s", diff)
	}
	f.consistent()
	var got []string
	f.a.Runs(pr(0, 32), func(r span.Range, s memattr.State) { got = append(got, fmt.Sprint(r, s)) })
	if diff := cmp.Diff([]string{fmt.Sprint(pr(0, 32), memattr.Private)}, got); diff != "" {
		t.Fatalf("Runs (-want +got):\n%s", diff)
	}
}

// TestOrdering checks the order of the steps for each backing mode and
// direction, and what the device can reach at each step.
func TestOrdering(t *testing.T) {
	type tc struct {
		name    string
		inPlace bool
		to      memattr.State
		want    []string
	}
	r := []span.Range{pr(4, 4)}
	cases := []tc{
		{"split to shared", false, memattr.Shared, []string{"kernel shared " + fmt.Sprint(r), "populate " + fmt.Sprint(r[0]), "release shared " + fmt.Sprint(r)}},
		{"split to private", false, memattr.Private, []string{"kernel private " + fmt.Sprint(r), "discard " + fmt.Sprint(r[0]), "release private " + fmt.Sprint(r)}},
		{"in place to shared", true, memattr.Shared, []string{"kernel shared " + fmt.Sprint(r), "populate " + fmt.Sprint(r[0]), "release shared " + fmt.Sprint(r)}},
		{"in place to private", true, memattr.Private, []string{"discard " + fmt.Sprint(r[0]), "kernel private " + fmt.Sprint(r), "release private " + fmt.Sprint(r)}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, c.inPlace, false)
			if c.to == memattr.Private {
				f.convert(4, 4, memattr.Shared)
			}
			f.ev.take()
			f.be.during = func(what string, runs []span.Range, to memattr.State) {
				reach := f.model.Reaches(gpa + 4*pg)
				switch {
				case to == memattr.Shared && what == "kernel" && reach:
					// Mapping comes after the kernel change.
					t.Errorf("kernel change to shared while the device already reaches the page")
				case to == memattr.Shared && what == "release" && !reach:
					t.Errorf("release to shared before the device reaches the page")
				case to == memattr.Private && what == "release" && reach:
					t.Errorf("release to private while the device reaches the page")
				case to == memattr.Private && c.inPlace && what == "kernel" && reach:
					t.Errorf("in-place conversion to private while the device still maps the page")
				}
			}
			f.convert(4, 4, c.to)
			if diff := cmp.Diff(c.want, f.ev.take()); diff != "" {
				t.Fatalf("order (-want +got):\n%s", diff)
			}
			f.consistent()
		})
	}
}

// TestFailures makes each step of a conversion fail in turn, for each mode
// and direction, and checks the undo order and that attributes, kernel and
// device mappings are as before.
func TestFailures(t *testing.T) {
	r := []span.Range{pr(4, 4)}
	sr := fmt.Sprint(r)
	s0 := fmt.Sprint(r[0])
	type tc struct {
		name    string
		inPlace bool
		to      memattr.State
		fail    string // "kernel", "listener", "release"
		want    []string
	}
	cases := []tc{
		{"split shared kernel", false, memattr.Shared, "kernel", []string{"kernel shared " + sr}},
		{"split shared listener", false, memattr.Shared, "listener", []string{"kernel shared " + sr, "populate " + s0, "discard " + s0, "kernel private " + sr}},
		{"split shared release", false, memattr.Shared, "release", []string{"kernel shared " + sr, "populate " + s0, "release shared " + sr, "discard " + s0, "kernel private " + sr}},
		{"split private kernel", false, memattr.Private, "kernel", []string{"kernel private " + sr}},
		{"split private listener", false, memattr.Private, "listener", []string{"kernel private " + sr, "discard " + s0, "populate " + s0, "kernel shared " + sr}},
		{"split private release", false, memattr.Private, "release", []string{"kernel private " + sr, "discard " + s0, "release private " + sr, "populate " + s0, "kernel shared " + sr}},
		{"in place shared kernel", true, memattr.Shared, "kernel", []string{"kernel shared " + sr}},
		{"in place shared listener", true, memattr.Shared, "listener", []string{"kernel shared " + sr, "populate " + s0, "discard " + s0, "kernel private " + sr}},
		{"in place shared release", true, memattr.Shared, "release", []string{"kernel shared " + sr, "populate " + s0, "release shared " + sr, "discard " + s0, "kernel private " + sr}},
		{"in place private listener", true, memattr.Private, "listener", []string{"discard " + s0, "populate " + s0}},
		{"in place private kernel", true, memattr.Private, "kernel", []string{"discard " + s0, "kernel private " + sr, "populate " + s0}},
		{"in place private release", true, memattr.Private, "release", []string{"discard " + s0, "kernel private " + sr, "release private " + sr, "kernel shared " + sr, "populate " + s0}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t, c.inPlace, false)
			f.convert(0, 2, memattr.Shared) // unrelated shared pages stay so
			if c.to == memattr.Private {
				f.convert(4, 4, memattr.Shared)
			}
			f.ev.take()
			before := f.state()
			// Fail only the step under test in the direction under test:
			// the undo calls go the other way.
			switch c.fail {
			case "kernel":
				f.be.failSet = func(_ []span.Range, to memattr.State) bool { return to == c.to }
			case "release":
				f.be.failRelease = func(_ []span.Range, to memattr.State) bool { return to == c.to }
			case "listener":
				if c.to == memattr.Shared {
					f.l.failPop = func(discard.Section) bool { return true }
				} else {
					f.l.failDiscard = func(discard.Section) bool { return true }
				}
			}
			stats := f.a.Stats()
			err := f.a.Convert(4*pg, 4*pg, c.to)
			if !errors.Is(err, errBoom) {
				t.Fatalf("Convert = %v, want the injected failure", err)
			}
			if diff := cmp.Diff(c.want, f.ev.take()); diff != "" {
				t.Fatalf("calls (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(before, f.state()); diff != "" {
				t.Fatalf("a failed conversion changed state (-before +after):\n%s", diff)
			}
			if st := f.a.Stats(); st.Failures != stats.Failures+1 || st.Conversions != stats.Conversions {
				t.Fatalf("stats %+v after %+v", st, stats)
			}
			f.consistent()
			// With the failure gone the same conversion goes through.
			f.be.failSet, f.be.failRelease, f.l.failPop, f.l.failDiscard = nil, nil, nil, nil
			f.convert(4, 4, c.to)
			f.consistent()
		})
	}
}

// TestBitmapSameAnswers checks that the bitmap baseline gives the same
// answers and notifications as runs.
func TestBitmapSameAnswers(t *testing.T) {
	var logs [2][]string
	for i, bitmap := range []bool{false, true} {
		f := newFixture(t, false, bitmap)
		for k := range uint64(12) {
			f.convert((k*7)%29, 1+k%3, memattr.State(k%2))
		}
		f.convert(0, 32, memattr.Shared)
		f.convert(3, 20, memattr.Private)
		logs[i] = f.ev.take()
		f.consistent()
		logs[i] = append(logs[i], fmt.Sprint(f.a.SharedBytes()))
	}
	if diff := cmp.Diff(logs[0], logs[1]); diff != "" {
		t.Fatalf("runs and bitmap differ (-runs +bitmap):\n%s", diff)
	}
}
