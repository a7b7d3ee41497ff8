package pagemap

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gmemproject/gmem/span"
)

// impl names a Map constructor; the conformance tests run against each.
type impl struct {
	name string
	new  func(pages uint64, bits uint) (Map, error)
}

func implementations() []impl {
	return []impl{
		{"bitmap", func(p uint64, b uint) (Map, error) { return NewBitmap(p, b) }},
		{"runs", func(p uint64, b uint) (Map, error) { return NewRuns(p, b) }},
	}
}

func mustNew(t testing.TB, im impl, pages uint64, bits uint) Map {
	t.Helper()
	m, err := im.new(pages, bits)
	if err != nil {
		t.Fatalf("new(%d, %d): %v", pages, bits, err)
	}
	return m
}

func collect(m Map, r span.Range) []Run {
	var out []Run
	for run := range m.Runs(r) {
		out = append(out, run)
	}
	return out
}

// check verifies m against the oracle; for a Runs it also checks the
// structure.
func check(m Map, o *oracle, rng *rand.Rand, points []uint64) error {
	if err := verifyAllRuns(m, o); err != nil {
		return err
	}
	if err := verifyQueries(m, o, rng, points); err != nil {
		return err
	}
	if r, ok := m.(*Runs); ok {
		return checkInvariants(r)
	}
	return nil
}

// op is one randomized step of the differential test.
type op struct {
	kind   string
	r      span.Range
	v      uint8
	stride uint64 // stripe: set every stride-th page of r to v
	fill   uint8  // stripe: value r gets first
}

func (x op) String() string {
	if x.kind == "stripe" {
		return fmt.Sprintf("stripe %v fill %d then every %d-th page %d", x.r, x.fill, x.stride, x.v)
	}
	return fmt.Sprintf("%s Set(%v, %d)", x.kind, x.r, x.v)
}

// randomOp draws an operation, biased towards the cases that break
// run-length maps: single pages, ranges straddling chunk boundaries, the
// tail of a map whose size is not a multiple of the chunk, whole chunks,
// stripes that push a chunk past the dense threshold, and invalid requests.
func randomOp(rng *rand.Rand, pages uint64, bits uint) op {
	val := uint8(rng.IntN(1 << bits))
	at := func(p uint64) uint64 { return min(p, pages-1) }
	length := func() uint64 { return 1 + rng.Uint64N(1<<rng.IntN(19)) } // log-uniform up to 2^18
	switch k := rng.IntN(100); {
	case k < 4:
		return op{kind: "whole", r: span.Range{End: pages}, v: val}
	case k < 24:
		p := rng.Uint64N(pages)
		return op{kind: "single", r: span.Range{Start: p, End: p + 1}, v: val}
	case k < 38:
		b := (1 + rng.Uint64N(pages/chunkPages+1)) * chunkPages
		s := at(b - min(b, 1+rng.Uint64N(300)))
		e := min(pages, b+1+rng.Uint64N(300))
		return op{kind: "straddle", r: span.Range{Start: s, End: e}, v: val}
	case k < 48:
		s := pages - min(pages, 1+rng.Uint64N(2*chunkPages))
		e := pages - min(pages-s-1, rng.Uint64N(3))
		return op{kind: "tail", r: span.Range{Start: s, End: e}, v: val}
	case k < 56:
		c := rng.Uint64N(pages/chunkPages + 1)
		s, e := at(c*chunkPages), min(pages, (c+1+rng.Uint64N(2))*chunkPages)
		return op{kind: "chunks", r: span.Range{Start: s, End: e}, v: val}
	case k < 62:
		s := rng.Uint64N(pages)
		e := min(pages, s+3000+rng.Uint64N(9000))
		stride := uint64(2)
		if rng.IntN(3) == 0 {
			stride = 2 + rng.Uint64N(5)
		}
		fill := uint8(rng.IntN(1 << bits))
		if fill == val {
			val = fill ^ 1
		}
		return op{kind: "stripe", r: span.Range{Start: s, End: e}, v: val, stride: stride, fill: fill}
	case k < 66:
		s := rng.Uint64N(pages + 1)
		switch rng.IntN(4) {
		case 0:
			return op{kind: "empty", r: span.Range{Start: s, End: s}, v: val}
		case 1:
			return op{kind: "wrapped", r: span.Range{Start: s + 1, End: s}, v: val}
		case 2:
			return op{kind: "past-end", r: span.Range{Start: min(s, pages-1), End: pages + 1 + rng.Uint64N(10)}, v: val}
		default:
			p := rng.Uint64N(pages)
			return op{kind: "big-value", r: span.Range{Start: p, End: p + 1}, v: uint8(1<<bits + rng.IntN(3))}
		}
	default:
		s := rng.Uint64N(pages)
		return op{kind: "range", r: span.Range{Start: s, End: min(pages, s+length())}, v: val}
	}
}

// apply performs x on m and o and compares their errors.
func apply(m Map, o *oracle, x op) error {
	if x.kind != "stripe" {
		got, want := m.Set(x.r, x.v), o.set(x.r, x.v)
		if !sameError(got, want) {
			return fmt.Errorf("%v: error %v, want %v", x, got, want)
		}
		return nil
	}
	if err := m.Set(x.r, x.fill); err != nil {
		return fmt.Errorf("%v: %v", x, err)
	}
	_ = o.set(x.r, x.fill)
	for p := x.r.Start; p < x.r.End; p += x.stride {
		r := span.Range{Start: p, End: p + 1}
		if err := m.Set(r, x.v); err != nil {
			return fmt.Errorf("%v: page %#x: %v", x, p, err)
		}
		_ = o.set(r, x.v)
	}
	return nil
}

// TestDifferential runs seeded random operations against every
// implementation and the oracle, comparing after every operation.
func TestDifferential(t *testing.T) {
	sizes := []uint64{1, 2, 63, 65, 1000, chunkPages - 1, chunkPages, chunkPages + 1, 3*chunkPages - 5, 5*chunkPages + 123}
	for _, im := range implementations() {
		for _, bits := range []uint{1, 2} {
			for _, pages := range sizes {
				t.Run(fmt.Sprintf("%s/bits=%d/pages=%d", im.name, bits, pages), func(t *testing.T) {
					ops := 2000
					if pages > chunkPages {
						ops = 1000
					}
					if testing.Short() {
						ops /= 10
					}
					differential(t, im, pages, bits, ops, uint64(pages)*10+uint64(bits))
				})
			}
		}
	}
}

func differential(t *testing.T, im impl, pages uint64, bits uint, ops int, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 0x9a9e))
	m := mustNew(t, im, pages, bits)
	o := newOracle(pages, bits)
	if err := check(m, o, rng, nil); err != nil {
		t.Fatalf("fresh map: %v", err)
	}
	kinds := map[string]int{}
	var prev map[uint64]bool
	sawDense, sawDenseToRuns := false, false
	for i := range ops {
		x := randomOp(rng, pages, bits)
		kinds[x.kind]++
		if err := apply(m, o, x); err != nil {
			t.Fatalf("op %d: %v", i, err)
		}
		points := []uint64{x.r.Start, x.r.End, x.r.Start - 1, x.r.End - 1, pages - 1, chunkPages - 1, chunkPages}
		if err := check(m, o, rng, points); err != nil {
			t.Fatalf("op %d (%v): %v", i, x, err)
		}
		if rm, ok := m.(*Runs); ok {
			cur := forms(rm)
			for c, dense := range cur {
				sawDense = sawDense || dense
				if !dense && prev[c] {
					sawDenseToRuns = true
				}
			}
			prev = cur
		}
	}
	t.Logf("operations by kind: %v", kinds)
	if _, ok := m.(*Runs); ok && pages >= chunkPages && !testing.Short() {
		// The stripes are long enough to push a chunk past the dense
		// threshold, and later sets thin such chunks out again.
		if !sawDense || !sawDenseToRuns {
			t.Errorf("dense form reached: %v, dense chunk turned back into runs: %v; the test no longer exercises the switch", sawDense, sawDenseToRuns)
		}
	}
}

func TestNewBits(t *testing.T) {
	for _, im := range implementations() {
		for _, bits := range []uint{0, 3, 8} {
			if _, err := im.new(10, bits); err == nil {
				t.Errorf("%s: new(10, %d) succeeded", im.name, bits)
			}
		}
		for _, bits := range []uint{1, 2} {
			m := mustNew(t, im, 10, bits)
			if m.Pages() != 10 || m.Bits() != bits {
				t.Errorf("%s: Pages, Bits = %d, %d; want 10, %d", im.name, m.Pages(), m.Bits(), bits)
			}
		}
	}
}

// TestSetErrors checks that invalid requests fail with the right error and
// change nothing.
func TestSetErrors(t *testing.T) {
	const pages = 2*chunkPages + 7
	cases := []struct {
		name string
		r    span.Range
		v    uint8
		want error
	}{
		{"empty", span.Range{Start: 5, End: 5}, 1, span.ErrEmpty},
		{"empty at end", span.Range{Start: pages, End: pages}, 1, span.ErrEmpty},
		{"wrapped", span.Range{Start: 9, End: 3}, 1, span.ErrEmpty},
		{"past end", span.Range{Start: pages - 1, End: pages + 1}, 1, span.ErrBounds},
		{"beyond end", span.Range{Start: pages + 10, End: pages + 20}, 1, span.ErrBounds},
		{"whole plus one", span.Range{End: pages + 1}, 0, span.ErrBounds},
		{"value 2 on 1 bit", span.Range{Start: 0, End: 1}, 2, ErrValue},
		{"value 255", span.Range{Start: 0, End: 1}, 255, ErrValue},
	}
	for _, im := range implementations() {
		for _, bits := range []uint{1, 2} {
			m := mustNew(t, im, pages, bits)
			// Some state to preserve, across a chunk boundary.
			if err := m.Set(span.Range{Start: chunkPages - 3, End: chunkPages + 3}, 1); err != nil {
				t.Fatal(err)
			}
			before := collect(m, span.Range{End: pages})
			for _, c := range cases {
				if c.want == ErrValue && c.v < 1<<bits {
					continue
				}
				err := m.Set(c.r, c.v)
				if !errors.Is(err, c.want) {
					t.Errorf("%s/bits=%d: %s: Set(%v, %d) = %v, want %v", im.name, bits, c.name, c.r, c.v, err, c.want)
				}
				if diff := cmp.Diff(before, collect(m, span.Range{End: pages})); diff != "" {
					t.Errorf("%s/bits=%d: %s changed the map (-before +after):\n%s", im.name, bits, c.name, diff)
				}
			}
			if bits == 2 {
				if err := m.Set(span.Range{Start: 0, End: 1}, 3); err != nil {
					t.Errorf("%s: Set value 3 on a 2-bit map: %v", im.name, err)
				}
			}
		}
	}
}

// TestRunsClipping checks Runs and Count with ranges partly or wholly
// outside the map, and early exit from the iteration.
func TestRunsClipping(t *testing.T) {
	const pages = chunkPages + 100
	for _, im := range implementations() {
		m := mustNew(t, im, pages, 1)
		for _, r := range []span.Range{{Start: 10, End: 20}, {Start: chunkPages - 5, End: chunkPages + 5}, {Start: pages - 2, End: pages}} {
			if err := m.Set(r, 1); err != nil {
				t.Fatal(err)
			}
		}
		run := func(s, e, v uint64) Run { return Run{span.Range{Start: s, End: e}, uint8(v)} }
		cases := []struct {
			r    span.Range
			want []Run
		}{
			{span.Range{Start: 15, End: 25}, []Run{run(15, 20, 1), run(20, 25, 0)}},
			{span.Range{Start: pages - 10, End: pages + 1000}, []Run{run(pages-10, pages-2, 0), run(pages-2, pages, 1)}},
			{span.Range{Start: pages - 1, End: ^uint64(0)}, []Run{run(pages-1, pages, 1)}},
			{span.Range{Start: pages, End: pages + 5}, nil},
			{span.Range{Start: pages + 5, End: pages + 50}, nil},
			{span.Range{Start: 30, End: 30}, nil},
			{span.Range{Start: 40, End: 30}, nil},
			{span.Range{Start: chunkPages - 6, End: chunkPages + 6}, []Run{run(chunkPages-6, chunkPages-5, 0), run(chunkPages-5, chunkPages+5, 1), run(chunkPages+5, chunkPages+6, 0)}},
		}
		for _, c := range cases {
			if diff := cmp.Diff(c.want, collect(m, c.r)); diff != "" {
				t.Errorf("%s: Runs(%v) (-want +got):\n%s", im.name, c.r, diff)
			}
			var n uint64
			for _, w := range c.want {
				if w.Value == 1 {
					n += w.Len()
				}
			}
			if got := m.Count(c.r, 1); got != n {
				t.Errorf("%s: Count(%v, 1) = %d, want %d", im.name, c.r, got, n)
			}
		}
		// Stopping early yields nothing more (a second yield after false
		// would panic in the range statement).
		seen := 0
		for range m.Runs(span.Range{End: pages}) {
			seen++
			if seen == 2 {
				break
			}
		}
		if seen != 2 {
			t.Errorf("%s: stopped iteration after %d runs, want 2", im.name, seen)
		}
	}
}

// TestRunsMaximalAcrossChunks checks that runs continue across chunk
// boundaries whatever the representation on either side.
func TestRunsMaximalAcrossChunks(t *testing.T) {
	const pages = 4*chunkPages + 10
	run := func(s, e uint64, v uint8) Run { return Run{span.Range{Start: s, End: e}, v} }
	steps := []struct {
		r    span.Range
		v    uint8
		want []Run
	}{
		// A run that covers the end of chunk 0 and the start of chunk 1.
		{span.Range{Start: chunkPages - 10, End: chunkPages + 10}, 1,
			[]Run{run(0, chunkPages-10, 0), run(chunkPages-10, chunkPages+10, 1), run(chunkPages+10, pages, 0)}},
		// Chunk 2 whole: uniform, next to chunk 1's partial runs.
		{span.Range{Start: chunkPages + 10, End: 3 * chunkPages}, 1,
			[]Run{run(0, chunkPages-10, 0), run(chunkPages-10, 3*chunkPages, 1), run(3*chunkPages, pages, 0)}},
		// A hole in chunk 2 and its removal: chunk 2 becomes uniform again.
		{span.Range{Start: 2*chunkPages + 5, End: 2*chunkPages + 6}, 0,
			[]Run{run(0, chunkPages-10, 0), run(chunkPages-10, 2*chunkPages+5, 1), run(2*chunkPages+5, 2*chunkPages+6, 0), run(2*chunkPages+6, 3*chunkPages, 1), run(3*chunkPages, pages, 0)}},
		{span.Range{Start: 2*chunkPages + 5, End: 2*chunkPages + 6}, 1,
			[]Run{run(0, chunkPages-10, 0), run(chunkPages-10, 3*chunkPages, 1), run(3*chunkPages, pages, 0)}},
		// The partial last chunk joins the run.
		{span.Range{Start: 3 * chunkPages, End: pages}, 1,
			[]Run{run(0, chunkPages-10, 0), run(chunkPages-10, pages, 1)}},
		// Everything one value: one run.
		{span.Range{Start: 0, End: chunkPages - 10}, 1,
			[]Run{run(0, pages, 1)}},
	}
	for _, im := range implementations() {
		for _, bits := range []uint{1, 2} {
			m := mustNew(t, im, pages, bits)
			for i, s := range steps {
				if err := m.Set(s.r, s.v); err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(s.want, collect(m, span.Range{End: pages})); diff != "" {
					t.Errorf("%s/bits=%d: step %d: Runs (-want +got):\n%s", im.name, bits, i, diff)
				}
				if rm, ok := m.(*Runs); ok {
					if err := checkInvariants(rm); err != nil {
						t.Errorf("runs/bits=%d: step %d: %v", bits, i, err)
					}
				}
			}
			// One segment, or, while a chunk lingers, that chunk and the
			// uniform segments either side of it.
			if rm, ok := m.(*Runs); ok && rm.segs != 1 && (rm.linger == nil || rm.segs > 3) {
				t.Errorf("runs/bits=%d: a uniform map has %d segments (a chunk lingers: %v), want 1", bits, rm.segs, rm.linger != nil)
			}
		}
	}
}

// TestZeroPages checks a map of no pages.
func TestZeroPages(t *testing.T) {
	for _, im := range implementations() {
		for _, bits := range []uint{1, 2} {
			m := mustNew(t, im, 0, bits)
			if m.Pages() != 0 {
				t.Errorf("%s: Pages() = %d", im.name, m.Pages())
			}
			if err := m.Set(span.Range{Start: 0, End: 1}, 1); !errors.Is(err, span.ErrBounds) {
				t.Errorf("%s: Set([0, 1)) = %v, want ErrBounds", im.name, err)
			}
			if err := m.Set(span.Range{}, 1); !errors.Is(err, span.ErrEmpty) {
				t.Errorf("%s: Set(empty) = %v, want ErrEmpty", im.name, err)
			}
			if runs := collect(m, span.Range{End: 100}); len(runs) != 0 {
				t.Errorf("%s: Runs = %v, want none", im.name, runs)
			}
			if n := m.Count(span.Range{End: 100}, 0); n != 0 {
				t.Errorf("%s: Count = %d, want 0", im.name, n)
			}
			for v := range uint8(3) {
				if p, ok := m.Next(0, v); ok {
					t.Errorf("%s: Next(0, %d) = %d, true", im.name, v, p)
				}
				if p, ok := m.NextNot(0, v); ok {
					t.Errorf("%s: NextNot(0, %d) = %d, true", im.name, v, p)
				}
			}
			func() {
				defer func() {
					if recover() == nil {
						t.Errorf("%s: Get(0) on an empty map did not panic", im.name)
					}
				}()
				m.Get(0)
			}()
		}
	}
}

// TestGetOutOfRange checks that Get panics past the end.
func TestGetOutOfRange(t *testing.T) {
	for _, im := range implementations() {
		m := mustNew(t, im, chunkPages+1, 1)
		for _, p := range []uint64{chunkPages + 1, chunkPages + 64, ^uint64(0)} {
			func() {
				defer func() {
					if recover() == nil {
						t.Errorf("%s: Get(%#x) did not panic", im.name, p)
					}
				}()
				m.Get(p)
			}()
		}
	}
}

// TestNextValues checks Next and NextNot at the edges: from past the end,
// values that do not fit, the last page.
func TestNextValues(t *testing.T) {
	const pages = 2*chunkPages + 3
	type res struct {
		P  uint64
		OK bool
	}
	for _, im := range implementations() {
		m := mustNew(t, im, pages, 1)
		if err := m.Set(span.Range{Start: pages - 1, End: pages}, 1); err != nil {
			t.Fatal(err)
		}
		cases := []struct {
			name string
			got  res
			want res
		}{
			{"Next 1 from 0", res{}, res{pages - 1, true}},
			{"Next 1 from last", res{}, res{pages - 1, true}},
			{"Next 1 from end", res{}, res{0, false}},
			{"NextNot 0 from 0", res{}, res{pages - 1, true}},
			{"NextNot 1 from last", res{}, res{0, false}},
			{"Next 2 (does not fit)", res{}, res{0, false}},
			{"NextNot 2 (does not fit)", res{}, res{5, true}},
			{"Next 0 from last", res{}, res{0, false}},
		}
		cases[0].got.P, cases[0].got.OK = m.Next(0, 1)
		cases[1].got.P, cases[1].got.OK = m.Next(pages-1, 1)
		cases[2].got.P, cases[2].got.OK = m.Next(pages, 1)
		cases[3].got.P, cases[3].got.OK = m.NextNot(0, 0)
		cases[4].got.P, cases[4].got.OK = m.NextNot(pages-1, 1)
		cases[5].got.P, cases[5].got.OK = m.Next(0, 2)
		cases[6].got.P, cases[6].got.OK = m.NextNot(5, 2)
		cases[7].got.P, cases[7].got.OK = m.Next(pages-1, 0)
		for _, c := range cases {
			if c.got != c.want {
				t.Errorf("%s: %s = %+v, want %+v", im.name, c.name, c.got, c.want)
			}
		}
	}
}
