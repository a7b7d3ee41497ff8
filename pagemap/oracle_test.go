package pagemap

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"

	"github.com/gmemproject/gmem/span"
)

// oracle is the naive model of a Map: one byte per page.
type oracle struct {
	bits uint
	v    []uint8
}

func newOracle(pages uint64, bits uint) *oracle {
	return &oracle{bits: bits, v: make([]uint8, pages)}
}

func (o *oracle) pages() uint64 { return uint64(len(o.v)) }

func (o *oracle) set(r span.Range, v uint8) error {
	switch {
	case r.End <= r.Start:
		return span.ErrEmpty
	case r.End > o.pages():
		return span.ErrBounds
	case v >= 1<<o.bits:
		return ErrValue
	}
	for p := r.Start; p < r.End; p++ {
		o.v[p] = v
	}
	return nil
}

// clip returns r ∩ [0, pages).
func (o *oracle) clip(r span.Range) (uint64, uint64) {
	s, e := r.Start, min(r.End, o.pages())
	if s >= e {
		return 0, 0
	}
	return s, e
}

// runs returns the maximal runs of r, page by page.
func (o *oracle) runs(r span.Range) []Run {
	s, e := o.clip(r)
	var out []Run
	for p := s; p < e; p++ {
		if n := len(out); n > 0 && out[n-1].Value == o.v[p] {
			out[n-1].End = p + 1
			continue
		}
		out = append(out, Run{span.Range{Start: p, End: p + 1}, o.v[p]})
	}
	return out
}

func (o *oracle) count(r span.Range, v uint8) uint64 {
	s, e := o.clip(r)
	return uint64(bytes.Count(o.v[s:e], []byte{v}))
}

func (o *oracle) next(from uint64, v uint8) (uint64, bool) {
	if from >= o.pages() {
		return 0, false
	}
	i := bytes.IndexByte(o.v[from:], v)
	if i < 0 {
		return 0, false
	}
	return from + uint64(i), true
}

func (o *oracle) nextNot(from uint64, v uint8) (uint64, bool) {
	if from >= o.pages() {
		return 0, false
	}
	best, found := uint64(0), false
	for u := range uint8(1 << o.bits) {
		if u == v {
			continue
		}
		if p, ok := o.next(from, u); ok && (!found || p < best) {
			best, found = p, true
		}
	}
	return best, found
}

// verifyAllRuns checks that m.Runs over the whole map, and over [0, huge),
// yields exactly the maximal runs of the oracle. It costs O(pages) with
// fast byte scans, so that it can run after every operation.
func verifyAllRuns(m Map, o *oracle) error {
	for _, r := range []span.Range{{End: o.pages()}, {End: ^uint64(0)}} {
		pos := uint64(0)
		first := true
		var prev uint8
		for run := range m.Runs(r) {
			if run.Start != pos || run.End <= run.Start || run.End > o.pages() {
				return fmt.Errorf("Runs(%v): run %v after position %#x", r, run, pos)
			}
			if !first && run.Value == prev {
				return fmt.Errorf("Runs(%v): run %v has the value of the run before it (not maximal)", r, run)
			}
			if n := uint64(bytes.Count(o.v[run.Start:run.End], []byte{run.Value})); n != run.Len() {
				return fmt.Errorf("Runs(%v): run %v, but only %d of its pages hold %d", r, run, n, run.Value)
			}
			pos, prev, first = run.End, run.Value, false
		}
		if pos != o.pages() {
			return fmt.Errorf("Runs(%v) ended at %#x, want %#x", r, pos, o.pages())
		}
	}
	return nil
}

// verifyQueries compares Get, Runs of a sub-range, Count, Next and NextNot
// at the given points and at random ones with the oracle.
func verifyQueries(m Map, o *oracle, rng *rand.Rand, points []uint64) error {
	n := o.pages()
	pts := append([]uint64(nil), points...)
	for range 8 {
		pts = append(pts, rng.Uint64N(n+2))
	}
	for _, p := range pts {
		if p < n {
			if got, want := m.Get(p), o.v[p]; got != want {
				return fmt.Errorf("Get(%#x) = %d, want %d", p, got, want)
			}
		}
		for v := range uint8(1<<o.bits + 1) { // one value past the range too
			gp, gok := m.Next(p, v)
			wp, wok := o.next(p, v)
			if gp != wp || gok != wok {
				return fmt.Errorf("Next(%#x, %d) = %#x, %v; want %#x, %v", p, v, gp, gok, wp, wok)
			}
			gp, gok = m.NextNot(p, v)
			wp, wok = o.nextNot(p, v)
			if gp != wp || gok != wok {
				return fmt.Errorf("NextNot(%#x, %d) = %#x, %v; want %#x, %v", p, v, gp, gok, wp, wok)
			}
		}
	}
	for range 3 {
		a := rng.Uint64N(n + 2)
		r := span.Range{Start: a, End: a + rng.Uint64N(3*chunkPages)}
		if rng.IntN(4) == 0 {
			r.End = a + rng.Uint64N(64) // short ranges, sometimes empty
		}
		var got []Run
		for run := range m.Runs(r) {
			got = append(got, run)
		}
		if want := o.runs(r); !runsEqual(got, want) {
			return fmt.Errorf("Runs(%v) = %v, want %v", r, shorten(got), shorten(want))
		}
		for v := range uint8(1<<o.bits + 1) {
			if got, want := m.Count(r, v), o.count(r, v); got != want {
				return fmt.Errorf("Count(%v, %d) = %d, want %d", r, v, got, want)
			}
		}
	}
	return nil
}

func runsEqual(a, b []Run) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// shorten keeps error messages readable.
func shorten(rs []Run) string {
	if len(rs) <= 8 {
		return fmt.Sprint(rs)
	}
	return fmt.Sprintf("%v ... %v (%d runs)", rs[:4], rs[len(rs)-4:], len(rs))
}

// sameError reports whether two Set errors are both nil or wrap the same
// sentinel.
func sameError(got, want error) bool {
	if want == nil || got == nil {
		return got == want
	}
	return errors.Is(got, want)
}
