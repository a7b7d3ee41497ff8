package discard_test

import (
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/span"
)

const pg = 4096

// pr is the byte range of pages [first, first+n).
func pr(first, n uint64) span.Range { return span.Range{Start: first * pg, End: (first + n) * pg} }

// call is one notification a recorder received.
type call struct {
	Who string
	Op  string // "populate", "discard", "revert"
	Sec discard.Section
}

func (c call) String() string { return fmt.Sprintf("%s %s %v", c.Who, c.Op, c.Sec) }

// callLog collects the calls of several recorders in the order they came.
type callLog struct {
	mu    sync.Mutex
	calls []call
}

func (l *callLog) add(c call) {
	l.mu.Lock()
	l.calls = append(l.calls, c)
	l.mu.Unlock()
}

// take returns the calls so far and forgets them.
func (l *callLog) take() []call {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.calls
	l.calls = nil
	return c
}

var errRefused = errors.New("refused")

// recorder is a Listener without a journal that logs every call and refuses
// the populates (or discards) its hooks pick.
type recorder struct {
	name         string
	log          *callLog
	failPopulate func(discard.Section) bool
	failDiscard  func(discard.Section) bool
}

func (r *recorder) Populate(s discard.Section) error {
	r.log.add(call{r.name, "populate", s})
	if r.failPopulate != nil && r.failPopulate(s) {
		return errRefused
	}
	return nil
}

func (r *recorder) Discard(s discard.Section) error {
	r.log.add(call{r.name, "discard", s})
	if r.failDiscard != nil && r.failDiscard(s) {
		return errRefused
	}
	return nil
}

// journaled is a recorder that also implements discard.Journal.
type journaled struct {
	recorder
	logSettle bool // log Settle calls too
}

func (j *journaled) Revert(s discard.Section) error {
	j.log.add(call{j.name, "revert", s})
	return nil
}

func (j *journaled) Settle(s discard.Section) {
	if j.logSettle {
		j.log.add(call{j.name, "settle", s})
	}
}

// fixedSource is a Source with a fixed list of populated runs, returned as
// given (they may touch: a Source need not return maximal runs).
type fixedSource struct {
	gran uint64
	runs []span.Range
}

func (f *fixedSource) Granularity() uint64 { return f.gran }

func (f *fixedSource) AppendPopulated(dst []span.Range, r span.Range) []span.Range {
	for _, x := range f.runs {
		if c := x.Intersect(r); !c.Empty() {
			dst = append(dst, c)
		}
	}
	return dst
}

// newSource returns a StateSource of unit bytes over m (all discarded),
// added to m.
func newSource(t testing.TB, m *discard.Manager, unit uint64) *discard.StateSource {
	t.Helper()
	src := newLoose(t, m, unit)
	if err := m.AddSource(src); err != nil {
		t.Fatal(err)
	}
	return src
}

// newLoose returns a StateSource of unit bytes over m that is not added.
func newLoose(t testing.TB, m *discard.Manager, unit uint64) *discard.StateSource {
	t.Helper()
	pm, err := pagemap.NewRuns(m.Size()/unit, 1)
	if err != nil {
		t.Fatal(err)
	}
	src, err := discard.NewStateSource(m, unit, pm)
	if err != nil {
		t.Fatal(err)
	}
	return src
}

// change makes r of src populated or discarded, failing the test on error.
func change(t testing.TB, src *discard.StateSource, r span.Range, populate bool) []span.Range {
	t.Helper()
	got, err := src.Change(r, populate, discard.Steps{})
	if err != nil {
		t.Fatalf("Change(%v, %v): %v", r, populate, err)
	}
	return got
}

// sections collects what a replay hands out.
func sections(t testing.TB, replay func(discard.Section, func(discard.Section) error) error, s discard.Section) []discard.Section {
	t.Helper()
	var out []discard.Section
	if err := replay(s, func(x discard.Section) error { out = append(out, x); return nil }); err != nil {
		t.Fatal(err)
	}
	return out
}
