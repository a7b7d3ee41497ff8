package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"time"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/replay"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/trace"
)

var (
	// FullSizes are the sizes of the numbers to quote.
	FullSizes = Sizes{
		StateRegion: 1 << 40, Scattered: 50_000, AdvRegion: 1 << 40, HugeRegion: 64 << 40,
		ReplayRegion: 1 << 40, ReplayRuns: 100_000,
		ChurnRegion: 16 << 30, ChurnOps: 100_000,
		WideRegion: 1 << 40, WideShared: 500_000,
		RoundTrip: 1 << 30, ParRegion: 16 << 30, ParOps: 200_000,
		BootEvents: trace.DefaultEvents, Rounds: 9, Warmup: true,
	}
	// QuickSizes are FullSizes made small, with few rounds, for tests;
	// the state and scale rows keep their sizes (they take little time).
	QuickSizes = func() Sizes {
		s := FullSizes
		s.AdvRegion, s.ReplayRegion, s.ReplayRuns = 1<<30, 16<<30, 10_000
		s.ChurnRegion, s.ChurnOps, s.WideRegion, s.WideShared = 1<<30, 5_000, 16<<30, 5_000
		s.RoundTrip, s.ParRegion, s.ParOps = 64<<20, 1<<30, 10_000
		s.BootEvents, s.Rounds, s.Warmup = 200, 3, false
		return s
	}()
)

// Scenario measures one or more rows. Counted values go into Baseline and
// Gmem directly; timed ones come from Timed, which alternates the sides.
type Scenario struct {
	Name string // what "gmem bench --only" selects it by
	Run  func(sz Sizes) ([]Row, error)
}

// Scenarios lists the scenarios in the order of the table. A new row is a
// scenario added here, at the end, so that the rows before it keep their
// numbers.
func Scenarios() []Scenario {
	return []Scenario{
		{"state", State}, {"replay", ListenerReplay}, {"churn", ScatteredChurnRows}, {"churn-runs", ChurnAmongRunsRows},
		{"roundtrip", RoundTripRows}, {"parallel", Parallel}, {"boot", Boot}, {"split", Split}, {"scale", Huge}, {"floor", FloorModel},
	}
}

// Run runs the scenarios in order and fills in ratios and noise: a timed
// row whose spread passes maxSpread is noisy.
func Run(ctx context.Context, scenarios []Scenario, sz Sizes, maxSpread float64) ([]Row, error) {
	var rows []Row
	for _, s := range scenarios {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("interrupted: %w", err)
		}
		rs, err := s.Run(sz)
		if err != nil {
			return nil, err
		}
		rows = append(rows, rs...)
	}
	for i := range rows {
		rows[i].Ratio = Improvement(rows[i])
		rows[i].Noisy = rows[i].Spread > maxSpread
	}
	return rows, nil
}

// State measures the memory of the page state of a large region.
func State(sz Sizes) ([]Row, error) {
	measure := func(region uint64, fill func(pagemap.Map) error) (b, g float64, err error) {
		bm, err := pagemap.NewBitmap(region/page, 1)
		if err != nil {
			return 0, 0, err
		}
		rm, err := pagemap.NewRuns(region/page, 1)
		if err != nil {
			return 0, 0, err
		}
		if err := fill(bm); err != nil {
			return 0, 0, err
		}
		if err := fill(rm); err != nil {
			return 0, 0, err
		}
		if bc, rc := bm.Count(span.Range{End: bm.Pages()}, 1), rm.Count(span.Range{End: rm.Pages()}, 1); bc != rc {
			return 0, 0, fmt.Errorf("state memory: bitmap holds %d shared pages, runs %d", bc, rc)
		}
		return float64(bm.Bytes()), float64(rm.Bytes()), nil
	}
	rb, rg, err := measure(sz.StateRegion, func(m pagemap.Map) error { return fillRealistic(m, sz.Scattered, 1) })
	if err != nil {
		return nil, err
	}
	ab, ag, err := measure(sz.AdvRegion, fillAlternating)
	if err != nil {
		return nil, err
	}
	return []Row{
		{Name: "state memory, realistic", Unit: "bytes", Baseline: rb, Gmem: rg, Better: "lower", Scale: trace.FormatSize(sz.StateRegion),
			Note: fmt.Sprintf("1 GiB contiguous shared + %s scattered 4 KiB pages: a bitmap costs 1 bit per page whatever the state, runs cost per run", Commas(uint64(sz.Scattered)))},
		{Name: "state memory, adversarial", Unit: "bytes", Baseline: ab, Gmem: ag, Better: "lower", Scale: trace.FormatSize(sz.AdvRegion),
			Note: "every other page shared, the worst case for runs: they fall back to dense chunks and stay within a few percent of the bitmap"},
	}, nil
}

// ReplayState is the state of the listener replay row: a region's shared
// runs in gmem's manager and in the baseline's bitmap.
type ReplayState struct {
	Manager *discard.Manager
	Bitmap  *pagemap.Bitmap
	Shared  int // populated runs
}

// NewReplayState returns a region of the given size holding runs runs,
// alternating shared and private, each shared one 1 to 64 pages at a random
// place (ScatteredRuns).
func NewReplayState(region uint64, runs int) (*ReplayState, error) {
	s, err := NewStackConfig(StackConfig{Region: region, Shape: Gmem, NoDevice: true})
	if err != nil {
		return nil, err
	}
	bm, err := pagemap.NewBitmap(region/page, 1)
	if err != nil {
		return nil, err
	}
	shared := ScatteredRuns(region, runs, rand.New(rand.NewPCG(3, 4)))
	if err := share(s.Attrs, shared); err != nil {
		return nil, err
	}
	for _, r := range shared {
		if err := bm.Set(span.Range{Start: r.Start / page, End: r.End / page}, 1); err != nil {
			return nil, err
		}
	}
	return &ReplayState{Manager: s.Manager, Bitmap: bm, Shared: len(shared)}, nil
}

// ListenerReplay measures registering a listener over a large region with
// many runs: what attaching a device (or a memory listener) costs.
func ListenerReplay(sz Sizes) ([]Row, error) {
	st, err := NewReplayState(sz.ReplayRegion, sz.ReplayRuns)
	if err != nil {
		return nil, err
	}
	whole := discard.Section{Size: sz.ReplayRegion}
	srcs := []GranuleSource{BitmapSource{st.Bitmap}}
	var gl, bl CountListener
	row := Row{
		Name: "listener replay", Unit: "ns", Better: "lower",
		Scale: fmt.Sprintf("%s, %s runs", trace.FormatSize(sz.ReplayRegion), Commas(uint64(sz.ReplayRuns))),
		Note:  "registering a listener replays the shared runs: QEMU (2026) asks is_populated once per 4 KiB granule, gmem walks the runs; a round is the mean of replays over at least 50 ms",
	}
	row, err = Timed(sz, row, func() (float64, error) {
		return Repeated(MinRound, func() (time.Duration, error) {
			bl = CountListener{}
			t0 := time.Now()
			err := GranuleReplay(srcs, whole, page, bl.Populate)
			return time.Since(t0), err
		})
	}, registerRound(st.Manager, &gl, whole))
	if err != nil {
		return nil, err
	}
	if bl != gl || gl.Calls != uint64(st.Shared) {
		return nil, fmt.Errorf("listener replay: baseline notified %d runs (%d bytes), gmem %d (%d bytes), want %d runs",
			bl.Calls, bl.Bytes, gl.Calls, gl.Bytes, st.Shared)
	}
	return []Row{row}, nil
}

// registerRound returns one round of registering l on m over s, timed,
// and unregistering it, untimed, repeated for MinRound after one untimed
// registration: the round measures a warm replay, whatever the side before
// it left in the caches. l is reset before each registration.
func registerRound(m *discard.Manager, l *CountListener, s discard.Section) func() (float64, error) {
	return func() (float64, error) {
		if err := m.Register(l, s); err != nil {
			return 0, err
		}
		if err := m.Unregister(l); err != nil {
			return 0, err
		}
		return Repeated(MinRound, func() (time.Duration, error) {
			*l = CountListener{}
			t0 := time.Now()
			err := m.Register(l, s)
			d := time.Since(t0)
			if err != nil {
				return 0, err
			}
			return d, m.Unregister(l)
		})
	}
}

// churnRows measures workload w through the whole stack, as a time row and
// a map calls row.
func churnRows(sz Sizes, name, scale, note string, w ChurnWorkload) ([]Row, error) {
	bside, err := NewChurn(Baseline, w)
	if err != nil {
		return nil, err
	}
	gside, err := NewChurn(Gmem, w)
	if err != nil {
		return nil, err
	}
	var bmaps, gmaps uint64
	pass := func(c *Churn, maps *uint64) func() (float64, error) {
		return func() (float64, error) {
			ns, m, err := c.Pass()
			*maps = m
			return ns, err
		}
	}
	row, err := Timed(sz, Row{Name: name + " time", Unit: "ns/op", Better: "lower", Scale: scale, Note: note}, pass(bside, &bmaps), pass(gside, &gmaps))
	if err != nil {
		return nil, err
	}
	n := float64(len(w.Ops))
	return []Row{row, {
		Name: name + " map calls", Unit: "calls/op", Baseline: float64(bmaps) / n, Gmem: float64(gmaps) / n, Better: "lower", Scale: scale,
		Note: "a 4 KiB conversion is one granule: both map once per page made shared, so no gain is expected here",
	}}, nil
}

// ScatteredChurnRows measures ScatteredChurn.
func ScatteredChurnRows(sz Sizes) ([]Row, error) {
	return churnRows(sz, "4 KiB churn",
		fmt.Sprintf("%s, %s conversions", trace.FormatSize(sz.ChurnRegion), Commas(uint64(sz.ChurnOps))),
		"random single-page conversions (half of them to the state the page is in) through manager, mapper and model IOMMU",
		ScatteredChurn(sz))
}

// ChurnAmongRunsRows measures ChurnAmongRuns.
func ChurnAmongRunsRows(sz Sizes) ([]Row, error) {
	return churnRows(sz, "4 KiB churn among runs",
		fmt.Sprintf("%s, %s runs, %s conversions", trace.FormatSize(sz.WideRegion), Commas(2*uint64(sz.WideShared)), Commas(uint64(sz.ChurnOps))),
		fmt.Sprintf("the same conversions in a region holding %s scattered shared pages, each a run", Commas(uint64(sz.WideShared))),
		ChurnAmongRuns(sz))
}

// RoundTripRows measures converting a large range to shared and back.
func RoundTripRows(sz Sizes) ([]Row, error) {
	maps := map[Shape]uint64{}
	run := func(shape Shape) func() (float64, error) {
		return func() (float64, error) {
			s, err := NewStack(2*sz.RoundTrip, shape)
			if err != nil {
				return 0, err
			}
			trips := 0
			ns, err := Repeated(MinRound, func() (time.Duration, error) {
				trips++
				return RoundTrip(s, sz.RoundTrip)
			})
			maps[shape] = s.Mapper.Stats().MapCalls / uint64(trips)
			return ns, err
		}
	}
	scale := trace.FormatSize(sz.RoundTrip)
	row, err := Timed(sz, Row{Name: "round trip time", Unit: "ns", Better: "lower", Scale: scale,
		Note: "the same round trip, timed: bookkeeping plus the model IOMMU's map and unmap; a round is the mean of round trips over at least 50 ms"}, run(Baseline), run(Gmem))
	if err != nil {
		return nil, err
	}
	return []Row{
		{Name: "round trip map calls", Unit: "calls", Baseline: float64(maps[Baseline]), Gmem: float64(maps[Gmem]), Better: "lower", Scale: scale,
			Note: "converting the range to shared and back: one map call per 4 KiB granule against one per extent"},
		row,
	}, nil
}

// Parallel measures conversion throughput with one goroutine and with
// GOMAXPROCS goroutines, each on its own part of one region.
func Parallel(sz Sizes) ([]Row, error) {
	procs := runtime.GOMAXPROCS(0)
	pairs := sz.ParOps / procs / 2
	run := func(workers int) func() (float64, error) {
		return func() (float64, error) {
			s, err := NewStack(sz.ParRegion, Gmem)
			if err != nil {
				return 0, err
			}
			// Collect what building the stack left, off the clock: a
			// collection during the timed part runs on the core one
			// goroutine leaves idle but takes time from two.
			runtime.GC()
			// The same work either way: procs lanes, each with its own
			// sequence of conversions; one goroutine does them all in turn.
			lanes := NewLanes(s, sz.ParRegion, procs, 7)
			t0 := time.Now()
			if err := lanes.Run(workers, pairs); err != nil {
				return 0, err
			}
			return float64(2*pairs*procs) / time.Since(t0).Seconds(), nil
		}
	}
	row, err := Timed(sz, Row{
		Name: "parallel conversions", Unit: "ops/s", Better: "higher",
		Scale: fmt.Sprintf("%s, %s conversions, %d goroutines", trace.FormatSize(sz.ParRegion), Commas(uint64(sz.ParOps)), procs),
		Note:  fmt.Sprintf("gmem with 1 goroutine (baseline column; QEMU converts under one lock) against %d on disjoint ranges (GOMAXPROCS)", procs),
	}, run(1), run(procs))
	if err != nil {
		return nil, err
	}
	return []Row{row}, nil
}

// Boot replays the boot trace of a 16 GiB and a 1 TiB guest.
func Boot(sz Sizes) ([]Row, error) {
	var rows []Row
	for _, ram := range []uint64{16 << 30, 1 << 40} {
		seq, err := trace.Boot(trace.BootOptions{Common: trace.Common{RAM: ram, Events: sz.BootEvents, IOMMU: trace.IOMMUFD, Seed: 1}})
		if err != nil {
			return nil, err
		}
		res := replay.Events(seq, replay.Options{})
		if res.Violations > 0 || res.Rejected > 0 {
			return nil, fmt.Errorf("boot trace of %s: %d violations, %d rejected events: %+v",
				trace.FormatSize(ram), res.Violations, res.Rejected, res.ViolationDetails)
		}
		rows = append(rows, Row{
			Name: "boot DMA entries peak, " + trace.FormatSize(ram) + " guest", Unit: "entries",
			Baseline: float64(res.Baseline.EntriesPeak), Gmem: float64(res.Gmem.EntriesPeak), Better: "lower",
			Scale: fmt.Sprintf("%s events, iommufd", Commas(res.Events)),
			Note:  "TDX guest: swiotlb pool (6% of RAM, 64 MiB to 1 GiB) shared at boot, then coherent-buffer churn; type1 allows 65,535",
		})
	}
	return rows, nil
}

// Huge runs gmem alone on a region past 2^32 pages, where the baseline's
// bitmap is computed, not allocated, and its per-granule replay and churn
// are not run: state memory, listener replay and 4 KiB churn.
func Huge(sz Sizes) ([]Row, error) {
	region := sz.HugeRegion
	pages := region / page
	size := trace.FormatSize(region)
	bitmap := float64((pages + 63) / 64 * 8)
	why := fmt.Sprintf("%s pages, past 2^32: the baseline would need a %s bitmap", Commas(pages), Human(uint64(bitmap)))

	// State memory: as the realistic row, at this size.
	rm, err := pagemap.NewRuns(pages, 1)
	if err != nil {
		return nil, err
	}
	if err := fillRealistic(rm, sz.Scattered, 11); err != nil {
		return nil, err
	}
	rows := []Row{{
		Name: "scale: state memory, realistic", Unit: "bytes", Baseline: bitmap, Gmem: float64(rm.Bytes()), Better: "lower", Scale: size,
		BaselineHow: Computed, Note: why + " (1 bit a page, computed); gmem's state as in the 1 TiB realistic row",
	}}

	// Listener replay and churn through the whole stack.
	s, err := NewStack(region, Gmem)
	if err != nil {
		return nil, err
	}
	shared := ScatteredRuns(region, sz.ReplayRuns, rand.New(rand.NewPCG(13, 14)))
	if err := share(s.Attrs, shared); err != nil {
		return nil, err
	}
	var l CountListener
	reg := Row{Name: "scale: listener replay", Unit: "ns", Better: "lower", BaselineHow: NotRun,
		Scale: fmt.Sprintf("%s, %s runs", size, Commas(uint64(sz.ReplayRuns))),
		Note:  why + " and would ask is_populated 2^34 times per replay; gmem walks the runs"}
	reg, err = Timed(sz, reg, nil, registerRound(s.Manager, &l, discard.Section{Size: region}))
	if err != nil {
		return nil, err
	}
	if l.Calls != uint64(len(shared)) {
		return nil, fmt.Errorf("listener replay of %s: %d runs notified, want %d", size, l.Calls, len(shared))
	}
	churn, err := newChurnOn(s, ChurnWorkload{Region: region, Ops: churnOps(region, sz.ChurnOps, 15)})
	if err != nil {
		return nil, err
	}
	crow := Row{Name: "scale: 4 KiB churn time", Unit: "ns/op", Better: "lower", BaselineHow: NotRun,
		Scale: fmt.Sprintf("%s, %s runs, %s conversions", size, Commas(uint64(sz.ReplayRuns)), Commas(uint64(sz.ChurnOps))),
		Note:  why + "; gmem: random single-page conversions among the replay row's runs"}
	crow, err = Timed(sz, crow, nil, func() (float64, error) {
		ns, _, err := churn.Pass()
		return ns, err
	})
	if err != nil {
		return nil, err
	}
	return append(rows, reg, crow), nil
}
