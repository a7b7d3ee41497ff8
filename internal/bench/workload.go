package bench

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/span"
)

// fillRealistic makes m's pages a guest's realistic shared state: 1 GiB of
// contiguous shared memory (a swiotlb pool) at 3 GiB, and scattered
// shared pages (coherent buffers) anywhere.
func fillRealistic(m pagemap.Map, scattered int, seed uint64) error {
	if err := m.Set(span.Range{Start: 3 << 30 / page, End: 4 << 30 / page}, 1); err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(seed, seed+1))
	for range scattered {
		p := rng.Uint64N(m.Pages())
		if err := m.Set(span.Range{Start: p, End: p + 1}, 1); err != nil {
			return err
		}
	}
	return nil
}

// fillAlternating makes every other page of m shared: the worst case for
// runs.
func fillAlternating(m pagemap.Map) error {
	for p := uint64(0); p < m.Pages(); p += 2 {
		if err := m.Set(span.Range{Start: p, End: p + 1}, 1); err != nil {
			return err
		}
	}
	return nil
}

// ScatteredRuns returns shared runs (byte ranges of a region of the given
// size) that with the private memory between them make runs runs: one
// shared run of 1 to 64 pages at a random place in each of runs/2 equal
// slots.
func ScatteredRuns(region uint64, runs int, rng *rand.Rand) []span.Range {
	shared := runs / 2
	slot := region / uint64(shared) / page * page
	out := make([]span.Range, shared)
	for i := range uint64(shared) {
		n := 1 + rng.Uint64N(min(64, slot/page-1))
		off := i*slot + rng.Uint64N(slot/page-n)*page
		out[i] = span.Range{Start: off, End: off + n*page}
	}
	return out
}

// share converts the byte ranges rs of a to shared.
func share(a *memattr.Attributes, rs []span.Range) error {
	for _, r := range rs {
		if err := a.Convert(r.Start, r.Len(), memattr.Shared); err != nil {
			return err
		}
	}
	return nil
}

// CountListener counts populate notifications and the bytes they carry,
// so that a replay is measured and not what a listener does with it.
type CountListener struct{ Calls, Bytes uint64 }

// Populate counts s.
func (c *CountListener) Populate(s discard.Section) error { c.Calls++; c.Bytes += s.Size; return nil }

// Discard does nothing.
func (c *CountListener) Discard(discard.Section) error { return nil }

// GranuleSource is the source interface of QEMU's 2026 aggregating
// manager: one question per granule, through an indirect call.
type GranuleSource interface {
	IsPopulated(offset, size uint64) bool
}

// BitmapSource answers from a dense bitmap of 4 KiB pages, as
// RamBlockAttributes does. A one-granule question reads one bit, the
// cheapest form of QEMU's find_next_zero_bit over [first, last]: generous
// to the baseline.
type BitmapSource struct{ Bitmap *pagemap.Bitmap }

// IsPopulated reports whether the page at offset is populated.
func (b BitmapSource) IsPopulated(offset, _ uint64) bool { return b.Bitmap.Get(offset/page) == 1 }

// GranuleReplay is QEMU's 2026 replay_by_populated_state: it walks the
// section one granule at a time, asks every source, and hands each maximal
// populated run to fn.
func GranuleReplay(srcs []GranuleSource, s discard.Section, gran uint64, fn func(discard.Section) error) error {
	var runStart uint64
	in := false
	flush := func(end uint64) error {
		in = false
		return fn(discard.Section{Offset: runStart, Size: end - runStart, GPA: s.GPA + (runStart - s.Offset)})
	}
	end := s.Offset + s.Size
	for off := s.Offset; off < end; off += gran {
		all := true
		for _, src := range srcs {
			if !src.IsPopulated(off, gran) {
				all = false
				break
			}
		}
		switch {
		case all && !in:
			runStart, in = off, true
		case !all && in:
			if err := flush(off); err != nil {
				return err
			}
		}
	}
	if in {
		return flush(end)
	}
	return nil
}

// ChurnOp is one conversion of a churn: a page and its new state.
type ChurnOp struct {
	Off uint64
	To  memattr.State
}

// ChurnWorkload is random single-page conversions of a region that holds
// background shared pages.
type ChurnWorkload struct {
	Region     uint64
	Background []uint64 // offsets of single shared pages before the churn
	Ops        []ChurnOp
}

// churnOps returns n conversions of random pages of region, each to a
// random state (half of them to the state the page is in).
func churnOps(region uint64, n int, seed uint64) []ChurnOp {
	rng := rand.New(rand.NewPCG(seed, 6))
	ops := make([]ChurnOp, n)
	for i := range ops {
		ops[i] = ChurnOp{rng.Uint64N(region/page) * page, memattr.State(rng.IntN(2))}
	}
	return ops
}

// ScatteredChurn is the 4 KiB churn row's workload: sz.ChurnOps
// conversions of a region of sz.ChurnRegion that starts private, which
// leave about half the pages they touch shared, scattered.
func ScatteredChurn(sz Sizes) ChurnWorkload {
	return ChurnWorkload{Region: sz.ChurnRegion, Ops: churnOps(sz.ChurnRegion, sz.ChurnOps, 5)}
}

// ChurnAmongRuns is the workload of the churn row among runs: the same
// conversions in a region of sz.WideRegion that already holds
// sz.WideShared scattered single shared pages, no two adjacent.
func ChurnAmongRuns(sz Sizes) ChurnWorkload {
	rng := rand.New(rand.NewPCG(8, 9))
	slot := sz.WideRegion / page / uint64(sz.WideShared)
	background := make([]uint64, sz.WideShared)
	for i := range background {
		background[i] = (uint64(i)*slot + rng.Uint64N(slot-1)) * page
	}
	return ChurnWorkload{Region: sz.WideRegion, Background: background, Ops: churnOps(sz.WideRegion, sz.ChurnOps, 10)}
}

// Churn is one side of a churn: a stack whose workload's ops are applied
// one at a time and then undone, so that every pass starts from the same
// state.
type Churn struct {
	Stack *Stack
	Ops   []ChurnOp
	prev  []memattr.State // each op's page before it
}

// NewChurn returns the churn of w on a new stack of shape, its background
// shared.
func NewChurn(shape Shape, w ChurnWorkload) (*Churn, error) {
	s, err := NewStack(w.Region, shape)
	if err != nil {
		return nil, err
	}
	return newChurnOn(s, w)
}

// newChurnOn returns the churn of w on s, its background made shared.
func newChurnOn(s *Stack, w ChurnWorkload) (*Churn, error) {
	for _, off := range w.Background {
		if err := s.Attrs.Convert(off, page, memattr.Shared); err != nil {
			return nil, err
		}
	}
	// A page's state before op i is that of the last earlier op on it, or
	// the state the pass starts from.
	c := &Churn{Stack: s, Ops: w.Ops, prev: make([]memattr.State, len(w.Ops))}
	last := make(map[uint64]memattr.State, len(w.Ops))
	for i, o := range w.Ops {
		st, ok := last[o.Off]
		if !ok {
			st = s.Attrs.Get(o.Off)
		}
		c.prev[i], last[o.Off] = st, o.To
	}
	return c, nil
}

// Step applies op i.
func (c *Churn) Step(i int) error {
	o := c.Ops[i]
	return c.Stack.Attrs.Convert(o.Off, page, o.To)
}

// Undo takes the ops back, newest first.
func (c *Churn) Undo() error {
	for i := len(c.Ops) - 1; i >= 0; i-- {
		if err := c.Stack.Attrs.Convert(c.Ops[i].Off, page, c.prev[i]); err != nil {
			return err
		}
	}
	return nil
}

// Pass times the ops and returns nanoseconds per op and the map calls they
// made; undoing them is not timed.
func (c *Churn) Pass() (nsPerOp float64, mapCalls uint64, err error) {
	before := c.mapCalls()
	t0 := time.Now()
	for i := range c.Ops {
		if err := c.Step(i); err != nil {
			return 0, 0, err
		}
	}
	d := time.Since(t0)
	mapCalls = c.mapCalls() - before
	return perOp(d, len(c.Ops)), mapCalls, c.Undo()
}

func (c *Churn) mapCalls() uint64 {
	if c.Stack.Mapper == nil {
		return 0
	}
	return c.Stack.Mapper.Stats().MapCalls
}

// RoundTrip converts [0, size) of s to shared and back and returns how
// long that took; the mapper must be left without entries.
func RoundTrip(s *Stack, size uint64) (time.Duration, error) {
	t0 := time.Now()
	if err := s.Attrs.Convert(0, size, memattr.Shared); err != nil {
		return 0, err
	}
	if err := s.Attrs.Convert(0, size, memattr.Private); err != nil {
		return 0, err
	}
	d := time.Since(t0)
	if s.Mapper != nil {
		if n := s.Mapper.Stats().Entries; n != 0 {
			return 0, fmt.Errorf("round trip left %d entries", n)
		}
	}
	return d, nil
}

// Lanes converts random pages of disjoint lanes of one stack's region, one
// random sequence a lane.
type Lanes struct {
	s    *Stack
	lane uint64
	rngs []*rand.Rand
}

// NewLanes cuts s's region into n lanes (whole pages), seeding lane i's
// sequence with (i, seed).
func NewLanes(s *Stack, region uint64, n int, seed uint64) *Lanes {
	l := &Lanes{s: s, lane: region / uint64(n) / page * page, rngs: make([]*rand.Rand, n)}
	for i := range l.rngs {
		l.rngs[i] = rand.New(rand.NewPCG(uint64(i), seed))
	}
	return l
}

// Run converts pairs random pages of every lane to shared and back (2 ×
// pairs × lanes conversions), with workers goroutines: worker w takes lanes
// w, w+workers, ... in turn. The work is the same for any number of
// workers.
func (l *Lanes) Run(workers, pairs int) error {
	n := len(l.rngs)
	work := func(i int) error {
		rng, base := l.rngs[i], uint64(i)*l.lane
		for range pairs {
			off := base + rng.Uint64N(l.lane/page)*page
			if err := l.s.Attrs.Convert(off, page, memattr.Shared); err != nil {
				return err
			}
			if err := l.s.Attrs.Convert(off, page, memattr.Private); err != nil {
				return err
			}
		}
		return nil
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < n; i += workers {
				if err := work(i); err != nil {
					errs[i] = err
					return
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}
