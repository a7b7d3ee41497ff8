package discard_test

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/span"
)

// fuzzPages is the size of the fuzzed region in pages: small, so every
// input runs in microseconds and the per-page oracle is cheap.
const fuzzPages = 32

// pageListener is a listener that keeps its own per-page view of what is
// populated, checks that it is only asked to populate pages it does not
// have, and refuses populates (and, with a journal, discards) that touch a
// chosen page. Refusing changes nothing.
type pageListener struct {
	t       *testing.T
	name    string
	view    [fuzzPages]bool
	journal map[discard.Section][fuzzPages]bool // nil: no journal
	failAt  int                                 // page whose populate is refused; -1: none
	failDis int                                 // page whose discard fails (journal only); -1: none
	calls   int
	delta   uint64 // GPA - offset of the current registration
	// refusals counts the refusals of every listener of the run, so an
	// operation can tell whether more than one call failed.
	refusals *int
}

func (l *pageListener) pages(s discard.Section) (int, int) {
	return int(s.Offset / pg), int((s.Offset + s.Size) / pg)
}

func (l *pageListener) check(s discard.Section) {
	if s.Size == 0 || s.Offset%pg != 0 || s.Size%pg != 0 || s.Offset+s.Size > fuzzPages*pg {
		l.t.Fatalf("%s: malformed section %v", l.name, s)
	}
	if s.GPA-s.Offset != l.delta {
		l.t.Fatalf("%s: section %v carries a GPA not shifted like its offset", l.name, s)
	}
}

func (l *pageListener) Populate(s discard.Section) error {
	l.calls++
	l.check(s)
	a, b := l.pages(s)
	if l.failAt >= a && l.failAt < b {
		*l.refusals++
		return errRefused
	}
	before := l.view
	for p := a; p < b; p++ {
		if l.view[p] {
			l.t.Fatalf("%s: populate %v of page %d, already populated", l.name, s, p)
		}
		l.view[p] = true
	}
	if l.journal != nil {
		l.journal[s] = before
	}
	return nil
}

func (l *pageListener) Discard(s discard.Section) error {
	l.calls++
	l.check(s)
	a, b := l.pages(s)
	if l.journal != nil && l.failDis >= a && l.failDis < b {
		*l.refusals++
		return errRefused
	}
	before := l.view
	for p := a; p < b; p++ {
		l.view[p] = false // discarding what is not populated is allowed
	}
	if l.journal != nil {
		l.journal[s] = before
	}
	return nil
}

// journalListener adds discard.Journal to a pageListener.
type journalListener struct{ *pageListener }

func (j journalListener) Revert(s discard.Section) error {
	before, ok := j.journal[s]
	if !ok {
		j.t.Fatalf("%s: Revert(%v) of nothing pending", j.name, s)
	}
	a, b := j.pages(s)
	for p := a; p < b; p++ {
		j.view[p] = before[p]
	}
	delete(j.journal, s)
	return nil
}

func (j journalListener) Settle(s discard.Section) { delete(j.journal, s) }

type fuzzSource struct {
	src   *discard.StateSource
	unit  uint64 // pages
	state [fuzzPages]bool
	added bool
}

type fuzzListener struct {
	l          *pageListener
	as         discard.Listener
	registered bool
	sec        discard.Section
}

type fuzzState struct {
	t         *testing.T
	m         *discard.Manager
	sources   []*fuzzSource
	listeners []*fuzzListener
	refusals  int // listener refusals in the running operation
}

// populated is the oracle: a page is populated when every added source has
// it populated.
func (f *fuzzState) populated(p int) bool {
	for _, s := range f.sources {
		if s.added && !s.state[p] {
			return false
		}
	}
	return true
}

// verify checks the manager, the sources and every listener's view against
// the oracle.
func (f *fuzzState) verify(op int) {
	t := f.t
	for i, s := range f.sources {
		for p := range fuzzPages {
			if got := s.src.Populated(pr(uint64(p), 1)); got != s.state[p] {
				t.Fatalf("op %d: source %d page %d populated=%v, oracle %v", op, i, p, got, s.state[p])
			}
		}
	}
	var want []span.Range
	for p := range fuzzPages {
		if f.populated(p) {
			want = appendPage(want, uint64(p))
		}
	}
	got, err := f.m.PopulatedRuns(pr(0, fuzzPages))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("op %d: populated runs %v, oracle %v", op, got, want)
	}
	for i, fl := range f.listeners {
		for p := range fuzzPages {
			w := fl.registered && fl.sec.Range().Contains(uint64(p)*pg) && f.populated(p)
			if fl.l.view[p] != w {
				t.Fatalf("op %d: listener %d (registered=%v, %v) page %d: view %v, oracle %v", op, i, fl.registered, fl.sec, p, fl.l.view[p], w)
			}
		}
		if len(fl.l.journal) != 0 {
			t.Fatalf("op %d: listener %d has unsettled notifications %v", op, i, fl.l.journal)
		}
	}
}

func appendPage(runs []span.Range, p uint64) []span.Range {
	if n := len(runs); n > 0 && runs[n-1].End == p*pg {
		runs[n-1].End += pg
		return runs
	}
	return append(runs, pr(p, 1))
}

// query checks IsPopulated on an arbitrary (unaligned) byte range, Walk and
// ReplayDiscarded against the oracle.
func (f *fuzzState) query(op int, a, b, c byte) {
	t := f.t
	start := (uint64(a) * 521) % (fuzzPages * pg)
	end := min(start+uint64(b)*97+uint64(c%3)*pg, fuzzPages*pg)
	r := span.Range{Start: start, End: end}
	want := true
	for p := start / pg; start < end && p*pg < end; p++ {
		want = want && f.populated(int(p))
	}
	if got := f.m.IsPopulated(r); got != want {
		t.Fatalf("op %d: IsPopulated(%v) = %v, oracle %v", op, r, got, want)
	}
	// Walk: extents tile the range, are maximal, and name exactly the
	// sources that discard each page.
	var srcs []discard.Source
	at := start
	var prev *discard.Extent
	for e := range f.m.Walk(r, &srcs) {
		if e.Start != at || e.Empty() {
			t.Fatalf("op %d: Walk(%v) extent %v does not follow %#x", op, r, e.Range, at)
		}
		if prev != nil && prev.DiscardedBy == e.DiscardedBy {
			t.Fatalf("op %d: Walk extents %v and %v not merged", op, prev.Range, e.Range)
		}
		for p := e.Start / pg; p*pg < e.End; p++ {
			var set uint64
			for i, s := range srcs {
				fs := f.sourceOf(s)
				if !fs.state[p] {
					set |= 1 << i
				}
			}
			if set != e.DiscardedBy {
				t.Fatalf("op %d: Walk extent %v says %b for page %d, oracle %b", op, e.Range, e.DiscardedBy, p, set)
			}
		}
		at = e.End
		prev = &e
	}
	if at != end && start < end {
		t.Fatalf("op %d: Walk(%v) stopped at %#x", op, r, at)
	}
	// ReplayDiscarded of a page-aligned section.
	s := discard.Section{Offset: start &^ (pg - 1), GPA: 0x7000_0000}
	s.Size = (end - s.Offset) &^ (pg - 1)
	var got []span.Range
	err := f.m.ReplayDiscarded(s, func(x discard.Section) error {
		if x.GPA-x.Offset != s.GPA-s.Offset {
			t.Fatalf("op %d: replayed section %v has a shifted GPA", op, x)
		}
		got = append(got, x.Range())
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var wantD []span.Range
	for p := s.Offset / pg; p < (s.Offset+s.Size)/pg; p++ {
		if !f.populated(int(p)) {
			wantD = appendPage(wantD, p)
		}
	}
	if !slices.Equal(got, wantD) {
		t.Fatalf("op %d: ReplayDiscarded(%v) = %v, oracle %v", op, s, got, wantD)
	}
}

func (f *fuzzState) sourceOf(s discard.Source) *fuzzSource {
	for _, fs := range f.sources {
		if discard.Source(fs.src) == s {
			return fs
		}
	}
	f.t.Fatalf("Walk named an unknown source %v", s)
	return nil
}

// snapshot is the listener-visible and source state an operation that fails
// must leave unchanged.
type snapshot struct {
	states [3][fuzzPages]bool
	added  [3]bool
	views  [3][fuzzPages]bool
	regs   [3]bool
}

func (f *fuzzState) snapshot() snapshot {
	var s snapshot
	for i, x := range f.sources {
		s.states[i], s.added[i] = x.state, x.added
	}
	for i, l := range f.listeners {
		s.views[i], s.regs[i] = l.l.view, l.registered
	}
	return s
}

// countRefusals counts the errRefused leaves of an error tree.
func countRefusals(err error) int {
	switch e := err.(type) {
	case nil:
		return 0
	case interface{ Unwrap() []error }:
		n := 0
		for _, x := range e.Unwrap() {
			n += countRefusals(x)
		}
		return n
	case interface{ Unwrap() error }:
		return countRefusals(e.Unwrap())
	}
	if err == errRefused {
		return 1
	}
	return 0
}

// FuzzManager runs sequences of source changes, source additions and
// removals, listener registrations (some refusing populates, some keeping a
// journal and failing discards) and queries against a per-page oracle.
func FuzzManager(f *testing.F) {
	f.Add([]byte{0x00, 0x10, 0x21, 0, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0})
	// A journal listener registered with no source: its replay must be
	// settled (the manager once deferred settling an empty log).
	f.Add([]byte("000C000"))
	f.Add([]byte{0x31, 0x02, 0x13,
		1, 0, 0, 0, 1, 1, 0, 0, 3, 0, 0, 32, 3, 1, 8, 8,
		0, 0, 4, 20, 0, 1, 2, 10, 6, 0, 77, 40, 2, 1, 0, 0,
		5, 1, 12, 0, 0, 0, 10, 9, 4, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0})
	f.Add([]byte{0x22, 0x21, 0x00,
		1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 31, 0, 1, 0, 31, 3, 0, 0, 32, 3, 1, 4, 12, 3, 2, 16, 16,
		5, 2, 20, 0, 0, 0, 16, 8, 5, 2, 255, 0, 0, 0, 16, 8, 7, 0, 0, 0, 2, 1, 0, 0, 6, 3, 200, 9})
	f.Add([]byte{0x01, 0x33, 0x20,
		1, 0, 0, 0, 3, 0, 0, 32, 3, 1, 0, 32, 5, 1, 0, 1, 0, 0, 0, 32, 5, 1, 0, 0,
		5, 1, 3, 1, 0, 0, 0, 16, 2, 0, 0, 0, 4, 1, 0, 0, 4, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 3 || len(data) > 3+4*96 {
			return
		}
		m := discard.New(fuzzPages*pg, nil)
		fs := &fuzzState{t: t, m: m}
		// Header: three sources (unit 1, 2, 4 or 8 pages; runs or bitmap
		// map) and three listeners (journal or not).
		for i := range 3 {
			h := data[i]
			unit := uint64(1) << (h & 3)
			var pm pagemap.Map
			var err error
			if h&4 != 0 {
				pm, err = pagemap.NewBitmap(fuzzPages/unit, 1)
			} else {
				pm, err = pagemap.NewRuns(fuzzPages/unit, 1)
			}
			if err != nil {
				t.Fatal(err)
			}
			src, err := discard.NewStateSource(m, unit*pg, pm)
			if err != nil {
				t.Fatal(err)
			}
			fs.sources = append(fs.sources, &fuzzSource{src: src, unit: unit})
			pl := &pageListener{t: t, name: fmt.Sprintf("listener%d", i), failAt: -1, failDis: -1, refusals: &fs.refusals}
			fl := &fuzzListener{l: pl, as: pl}
			if h&0x10 != 0 {
				pl.journal = map[discard.Section][fuzzPages]bool{}
				fl.as = journalListener{pl}
			}
			fs.listeners = append(fs.listeners, fl)
		}
		ops := data[3:]
		for op := 0; len(ops) >= 4; op++ {
			code, a, b, c := ops[0], ops[1], ops[2], ops[3]
			ops = ops[4:]
			before := fs.snapshot()
			fs.refusals = 0
			var err error
			mayFail := false
			switch code % 8 {
			case 0, 7: // change a source
				s := fs.sources[int(a)%3]
				unit := s.unit
				first := (uint64(b) % fuzzPages) / unit * unit
				n := (uint64(c&0x3f)%(fuzzPages-first) + unit) / unit * unit
				n = min(n, fuzzPages-first)
				populate := c&0x80 != 0
				bad := c&0x40 != 0 && unit > 1
				if bad {
					first++ // not unit aligned: refused, nothing changes
				}
				var changed []span.Range
				changed, err = s.src.Change(pr(first, n), populate, discard.Steps{})
				mayFail = true
				if bad && !errors.Is(err, span.ErrAlign) {
					t.Fatalf("op %d: unaligned change = %v, want ErrAlign", op, err)
				}
				if err == nil {
					var want []span.Range
					for p := first; p < first+n; p++ {
						if s.state[p] != populate {
							want = appendPage(want, p)
						}
						s.state[p] = populate
					}
					if !slices.Equal(changed, want) {
						t.Fatalf("op %d: Change returned %v, oracle %v", op, changed, want)
					}
				}
			case 1: // add a source
				s := fs.sources[int(a)%3]
				err = m.AddSource(s.src)
				mayFail = true
				if s.added {
					if !errors.Is(err, discard.ErrSourceExists) {
						t.Fatalf("op %d: adding a source twice = %v", op, err)
					}
				} else if err == nil {
					s.added = true
				}
			case 2: // remove a source
				s := fs.sources[int(a)%3]
				err = m.RemoveSource(s.src)
				mayFail = true
				if !s.added {
					if !errors.Is(err, discard.ErrNoSource) {
						t.Fatalf("op %d: removing an absent source = %v", op, err)
					}
				} else if err == nil {
					s.added = false
				}
			case 3: // register
				fl := fs.listeners[int(a)%3]
				first := uint64(b) % fuzzPages
				n := uint64(c) % (fuzzPages - first + 1) // may be 0
				sec := discard.Section{Offset: first * pg, Size: n * pg, GPA: 0x1_0000_0000 + uint64(a>>2)*0x10_0000 + first*pg}
				old := fl.sec
				if !fl.registered {
					fl.sec = sec
					fl.l.delta = sec.GPA - sec.Offset
				}
				err = m.Register(fl.as, sec)
				mayFail = true
				switch {
				case fl.registered:
					if !errors.Is(err, discard.ErrListenerExists) {
						t.Fatalf("op %d: registering twice = %v", op, err)
					}
				case err == nil:
					fl.registered = true
				default:
					fl.sec = old
					fl.l.delta = old.GPA - old.Offset
				}
			case 4: // unregister
				fl := fs.listeners[int(a)%3]
				calls := fl.l.calls
				err = m.Unregister(fl.as)
				mayFail = true
				switch {
				case !fl.registered:
					if !errors.Is(err, discard.ErrNoListener) {
						t.Fatalf("op %d: unregistering an absent listener = %v", op, err)
					}
				case err == nil:
					fl.registered = false
					if want := calls + min(1, int(fl.sec.Size)); fl.l.calls != want {
						t.Fatalf("op %d: unregister made %d calls, want %d", op, fl.l.calls-calls, want-calls)
					}
				}
			case 5: // arm or clear a listener's refusals
				fl := fs.listeners[int(a)%3]
				fl.l.failAt, fl.l.failDis = -1, -1
				if b < fuzzPages {
					fl.l.failAt = int(b)
				}
				if c < fuzzPages && fl.l.journal != nil {
					fl.l.failDis = int(c)
				}
			case 6:
				fs.query(op, a, b, c)
			}
			if err != nil {
				expected := errors.Is(err, errRefused) || errors.Is(err, span.ErrAlign) ||
					errors.Is(err, discard.ErrSourceExists) || errors.Is(err, discard.ErrNoSource) ||
					errors.Is(err, discard.ErrListenerExists) || errors.Is(err, discard.ErrNoListener)
				if !mayFail || !expected {
					t.Fatalf("op %d: unexpected error %v", op, err)
				}
				if fs.refusals > 1 {
					// A listener refused the undo of another's refusal: two
					// failing calls, past what a failed operation promises
					// (I3 is for a single failing call). The manager must
					// report both; the state is then the listeners' to
					// repair, and the oracle cannot follow.
					if n := countRefusals(err); n != fs.refusals {
						t.Fatalf("op %d: %d refusals, the error reports %d: %v", op, fs.refusals, n, err)
					}
					return
				}
				if after := fs.snapshot(); after != before {
					t.Fatalf("op %d: failed operation (%v) changed state:\nbefore %v\nafter  %v", op, err, before, after)
				}
			}
			fs.verify(op)
		}
	})
}
