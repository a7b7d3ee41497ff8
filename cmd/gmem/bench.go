package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"runtime"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/replay"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/trace"
)

const page = 4096

// benchRow is one line of gmem bench. Ratio is how many times better gmem
// is: baseline/gmem when lower is better, gmem/baseline when higher is.
type benchRow struct {
	Name     string  `json:"name"`
	Unit     string  `json:"unit"`
	Baseline float64 `json:"baseline"`
	Gmem     float64 `json:"gmem"`
	Ratio    float64 `json:"ratio"`
	Better   string  `json:"better"` // "lower" or "higher"
	Scale    string  `json:"scale"`  // the size the row was measured at
	Note     string  `json:"note"`   // what the row measures
}

// benchReport is the output of gmem bench --json.
type benchReport struct {
	Rows       []benchRow `json:"rows"`
	Quick      bool       `json:"quick"`
	GOMAXPROCS int        `json:"gomaxprocs"`
}

// benchSizes scales the scenarios: full for the numbers to quote, quick for
// tests.
type benchSizes struct {
	stateRegion  uint64        // region of the state-memory rows
	scattered    int           // scattered shared pages of the realistic state
	advRegion    uint64        // region of the adversarial state row
	replayRegion uint64        // region of the listener replay row
	replayRuns   int           // runs (shared and private) in it
	churnRegion  uint64        // region of the 4 KiB churn rows
	churnOps     int           // conversions of the churn rows
	roundTrip    uint64        // size converted to shared and back
	parRegion    uint64        // region of the parallel row
	parOps       int           // conversions in total in the parallel row
	bootEvents   int           // workload events of the boot traces
	minTime      time.Duration // repeat a timed scenario at least this long
	maxReps      int           // and at most this many times
}

var (
	fullSizes = benchSizes{
		stateRegion: 1 << 40, scattered: 50_000, advRegion: 1 << 40,
		replayRegion: 1 << 40, replayRuns: 100_000,
		churnRegion: 16 << 30, churnOps: 100_000,
		roundTrip: 1 << 30, parRegion: 16 << 30, parOps: 200_000,
		bootEvents: trace.DefaultEvents, minTime: time.Second, maxReps: 5,
	}
	quickSizes = benchSizes{
		stateRegion: 1 << 40, scattered: 50_000, advRegion: 1 << 30,
		replayRegion: 16 << 30, replayRuns: 10_000,
		churnRegion: 1 << 30, churnOps: 5_000,
		roundTrip: 64 << 20, parRegion: 1 << 30, parOps: 10_000,
		bootEvents: 200, minTime: 0, maxReps: 1,
	}
)

// runBench implements "gmem bench".
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("gmem bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {}
	asJSON := fs.Bool("json", false, `print {"rows":[...]} as JSON`)
	quick := fs.Bool("quick", false, "smaller sizes and single runs: fast, for tests; the numbers are rougher")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			benchHelp(stdout, fs)
			return exitOK
		}
		fmt.Fprintln(stderr, "Run 'gmem bench -h' for its flags.")
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "gmem bench: unexpected argument %q\n", fs.Arg(0))
		return exitUsage
	}
	sz := fullSizes
	if *quick {
		sz = quickSizes
	}
	rows, err := benchRows(ctx, sz)
	if err != nil {
		fmt.Fprintf(stderr, "gmem bench: %v\n", err)
		return exitFail
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(benchReport{Rows: rows, Quick: *quick, GOMAXPROCS: runtime.GOMAXPROCS(0)}); err != nil {
			fmt.Fprintf(stderr, "gmem bench: %v\n", err)
			return exitFail
		}
		return exitOK
	}
	printBench(stdout, rows, *quick)
	return exitOK
}

// scenario measures one or more rows.
type scenario func(sz benchSizes) ([]benchRow, error)

// benchRows runs every scenario in order.
func benchRows(ctx context.Context, sz benchSizes) ([]benchRow, error) {
	var rows []benchRow
	for _, s := range []scenario{benchState, benchListenerReplay, benchChurn, benchRoundTrip, benchParallel, benchBoot, benchSplit} {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("interrupted: %w", err)
		}
		rs, err := s(sz)
		if err != nil {
			return nil, err
		}
		rows = append(rows, rs...)
	}
	for i := range rows {
		rows[i].Ratio = improvement(rows[i])
	}
	return rows, nil
}

// improvement returns how many times better gmem is than the baseline.
func improvement(r benchRow) float64 {
	b, g := r.Baseline, r.Gmem
	if r.Better == "higher" {
		b, g = g, b
	}
	switch {
	case b == g:
		return 1
	case g == 0:
		return math.Inf(1)
	}
	return b / g
}

// MarshalJSON writes an infinite ratio (gmem needs nothing where the
// baseline needs something) as null, which JSON can carry.
func (r benchRow) MarshalJSON() ([]byte, error) {
	type plain benchRow
	if math.IsInf(r.Ratio, 0) || math.IsNaN(r.Ratio) {
		return json.Marshal(struct {
			plain
			Ratio *float64 `json:"ratio"`
		}{plain: plain(r)})
	}
	return json.Marshal(plain(r))
}

// repeat runs fn, which times its own work, until minTime has been spent or
// maxReps runs are done (at least once), and returns the fastest run.
func repeat(sz benchSizes, fn func() (time.Duration, error)) (time.Duration, error) {
	best := time.Duration(math.MaxInt64)
	var spent time.Duration
	for i := 0; i == 0 || (i < sz.maxReps && spent < sz.minTime); i++ {
		d, err := fn()
		if err != nil {
			return 0, err
		}
		best = min(best, d)
		spent += d
	}
	return best, nil
}

// benchState measures the memory of the page state of a large region.
func benchState(sz benchSizes) ([]benchRow, error) {
	realistic := func(m pagemap.Map) error {
		// 1 GiB of contiguous shared memory (a swiotlb pool) at 3 GiB, and
		// scattered shared pages (coherent buffers) anywhere.
		if err := m.Set(span.Range{Start: 3 << 30 / page, End: 4 << 30 / page}, 1); err != nil {
			return err
		}
		rng := rand.New(rand.NewPCG(1, 2))
		for range sz.scattered {
			p := rng.Uint64N(m.Pages())
			if err := m.Set(span.Range{Start: p, End: p + 1}, 1); err != nil {
				return err
			}
		}
		return nil
	}
	alternating := func(m pagemap.Map) error {
		for p := uint64(0); p < m.Pages(); p += 2 {
			if err := m.Set(span.Range{Start: p, End: p + 1}, 1); err != nil {
				return err
			}
		}
		return nil
	}
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
	rb, rg, err := measure(sz.stateRegion, realistic)
	if err != nil {
		return nil, err
	}
	ab, ag, err := measure(sz.advRegion, alternating)
	if err != nil {
		return nil, err
	}
	return []benchRow{
		{Name: "state memory, realistic", Unit: "bytes", Baseline: rb, Gmem: rg, Better: "lower", Scale: trace.FormatSize(sz.stateRegion),
			Note: fmt.Sprintf("1 GiB contiguous shared + %s scattered 4 KiB pages: a bitmap costs 1 bit per page whatever the state, runs cost per run", commas(uint64(sz.scattered)))},
		{Name: "state memory, adversarial", Unit: "bytes", Baseline: ab, Gmem: ag, Better: "lower", Scale: trace.FormatSize(sz.advRegion),
			Note: "every other page shared, the worst case for runs: they fall back to dense chunks and stay within a few percent of the bitmap"},
	}, nil
}

// countListener counts populate notifications and the bytes they carry.
type countListener struct{ calls, bytes uint64 }

func (c *countListener) Populate(s discard.Section) error { c.calls++; c.bytes += s.Size; return nil }
func (c *countListener) Discard(discard.Section) error    { return nil }

// benchListenerReplay measures registering a listener over a large region
// with many runs: what attaching a device (or a memory listener) costs.
func benchListenerReplay(sz benchSizes) ([]benchRow, error) {
	m := discard.New(sz.replayRegion, nil)
	attrs, err := memattr.New(m, memattr.Config{})
	if err != nil {
		return nil, err
	}
	bm, err := pagemap.NewBitmap(sz.replayRegion/page, 1)
	if err != nil {
		return nil, err
	}
	// replayRuns runs alternate shared and private, each 1 to 64 pages, at
	// random places: the shared runs start at distinct random slots.
	shared := sz.replayRuns / 2
	slot := sz.replayRegion / uint64(shared) / page * page
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range uint64(shared) {
		n := 1 + rng.Uint64N(min(64, slot/page-1))
		off := i*slot + rng.Uint64N(slot/page-n)*page
		if err := attrs.Convert(off, n*page, memattr.Shared); err != nil {
			return nil, err
		}
		if err := bm.Set(span.Range{Start: off / page, End: off/page + n}, 1); err != nil {
			return nil, err
		}
	}
	whole := discard.Section{Size: sz.replayRegion}

	var gl countListener
	g, err := repeat(sz, func() (time.Duration, error) {
		gl = countListener{}
		t0 := time.Now()
		err := m.Register(&gl, whole)
		d := time.Since(t0)
		if err != nil {
			return 0, err
		}
		return d, m.Unregister(&gl)
	})
	if err != nil {
		return nil, err
	}
	var bl countListener
	b, err := repeat(sz, func() (time.Duration, error) {
		bl = countListener{}
		t0 := time.Now()
		err := granuleReplay(bm, whole, &bl)
		return time.Since(t0), err
	})
	if err != nil {
		return nil, err
	}
	if bl != gl || gl.calls != uint64(shared) {
		return nil, fmt.Errorf("listener replay: baseline notified %d runs (%d bytes), gmem %d (%d bytes), want %d runs",
			bl.calls, bl.bytes, gl.calls, gl.bytes, shared)
	}
	return []benchRow{{
		Name: "listener replay", Unit: "ns", Baseline: float64(b.Nanoseconds()), Gmem: float64(g.Nanoseconds()), Better: "lower",
		Scale: fmt.Sprintf("%s, %s runs", trace.FormatSize(sz.replayRegion), commas(uint64(sz.replayRuns))),
		Note:  "registering a listener replays the shared runs: QEMU (2026) asks is_populated once per 4 KiB granule, gmem walks the runs",
	}}, nil
}

// granuleReplay is QEMU's replay_by_populated_state for one bitmap source:
// the section is walked one granule at a time, each granule's state asked
// of the source, and maximal populated runs are passed to l.
func granuleReplay(bm *pagemap.Bitmap, s discard.Section, l discard.Listener) error {
	first, last := s.Offset/page, (s.Offset+s.Size)/page
	start, in := uint64(0), false
	emit := func(end uint64) error {
		return l.Populate(discard.Section{Offset: start * page, Size: (end - start) * page, GPA: s.GPA + start*page - s.Offset})
	}
	for p := first; p < last; p++ {
		pop := bm.Get(p) == 1
		switch {
		case pop && !in:
			start, in = p, true
		case !pop && in:
			in = false
			if err := emit(p); err != nil {
				return err
			}
		}
	}
	if in {
		return emit(last)
	}
	return nil
}

// stack is a region with one device, configured as the baseline or as gmem.
type stack struct {
	m      *discard.Manager
	attrs  *memattr.Attributes
	mapper *dma.Mapper
}

func newStack(region uint64, baseline bool) (*stack, error) {
	m := discard.New(region, nil)
	attrs, err := memattr.New(m, memattr.Config{Bitmap: baseline})
	if err != nil {
		return nil, err
	}
	policy := dma.Extent
	if baseline {
		policy = dma.Granule
	}
	// iommufd: no entry limit, so the baseline is measured, not refused.
	mapper, err := dma.New(iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD}), nil, dma.Options{Policy: policy})
	if err != nil {
		return nil, err
	}
	if err := m.Register(mapper, discard.Section{Size: region}); err != nil {
		return nil, err
	}
	return &stack{m: m, attrs: attrs, mapper: mapper}, nil
}

// benchChurn measures random 4 KiB conversions through the whole stack.
func benchChurn(sz benchSizes) ([]benchRow, error) {
	type op struct {
		off uint64
		to  memattr.State
	}
	rng := rand.New(rand.NewPCG(5, 6))
	ops := make([]op, sz.churnOps)
	for i := range ops {
		ops[i] = op{rng.Uint64N(sz.churnRegion/page) * page, memattr.State(rng.IntN(2))}
	}
	run := func(baseline bool) (nsPerOp, mapsPerOp float64, err error) {
		var maps uint64
		d, err := repeat(sz, func() (time.Duration, error) {
			s, err := newStack(sz.churnRegion, baseline)
			if err != nil {
				return 0, err
			}
			t0 := time.Now()
			for _, o := range ops {
				if err := s.attrs.Convert(o.off, page, o.to); err != nil {
					return 0, err
				}
			}
			d := time.Since(t0)
			maps = s.mapper.Stats().MapCalls
			return d, nil
		})
		n := float64(len(ops))
		return float64(d.Nanoseconds()) / n, float64(maps) / n, err
	}
	bt, bm, err := run(true)
	if err != nil {
		return nil, err
	}
	gt, gm, err := run(false)
	if err != nil {
		return nil, err
	}
	scale := fmt.Sprintf("%s, %s conversions", trace.FormatSize(sz.churnRegion), commas(uint64(sz.churnOps)))
	return []benchRow{
		{Name: "4 KiB churn time", Unit: "ns/op", Baseline: bt, Gmem: gt, Better: "lower", Scale: scale,
			Note: "random single-page conversions (half of them to the state the page is in) through manager, mapper and model IOMMU"},
		{Name: "4 KiB churn map calls", Unit: "calls/op", Baseline: bm, Gmem: gm, Better: "lower", Scale: scale,
			Note: "a 4 KiB conversion is one granule: both map once per page made shared, so no gain is expected here"},
	}, nil
}

// benchRoundTrip measures converting a large range to shared and back.
func benchRoundTrip(sz benchSizes) ([]benchRow, error) {
	run := func(baseline bool) (float64, float64, error) {
		var maps uint64
		d, err := repeat(sz, func() (time.Duration, error) {
			s, err := newStack(2*sz.roundTrip, baseline)
			if err != nil {
				return 0, err
			}
			t0 := time.Now()
			if err := s.attrs.Convert(0, sz.roundTrip, memattr.Shared); err != nil {
				return 0, err
			}
			if err := s.attrs.Convert(0, sz.roundTrip, memattr.Private); err != nil {
				return 0, err
			}
			d := time.Since(t0)
			st := s.mapper.Stats()
			if st.Entries != 0 {
				return 0, fmt.Errorf("round trip left %d entries", st.Entries)
			}
			maps = st.MapCalls
			return d, nil
		})
		return float64(maps), float64(d.Nanoseconds()), err
	}
	bm, bt, err := run(true)
	if err != nil {
		return nil, err
	}
	gm, gt, err := run(false)
	if err != nil {
		return nil, err
	}
	scale := trace.FormatSize(sz.roundTrip)
	return []benchRow{
		{Name: "round trip map calls", Unit: "calls", Baseline: bm, Gmem: gm, Better: "lower", Scale: scale,
			Note: "converting the range to shared and back: one map call per 4 KiB granule against one per extent"},
		{Name: "round trip time", Unit: "ns", Baseline: bt, Gmem: gt, Better: "lower", Scale: scale,
			Note: "the same round trip, timed: bookkeeping plus the model IOMMU's map and unmap"},
	}, nil
}

// benchParallel measures conversion throughput with one goroutine and with
// GOMAXPROCS goroutines, each on its own part of one region.
func benchParallel(sz benchSizes) ([]benchRow, error) {
	procs := runtime.GOMAXPROCS(0)
	run := func(workers int) (float64, error) {
		d, err := repeat(sz, func() (time.Duration, error) {
			s, err := newStack(sz.parRegion, false)
			if err != nil {
				return 0, err
			}
			part := sz.parRegion / uint64(procs) / page * page
			perPart := sz.parOps / procs / 2 * 2
			// The same work either way: procs parts, each with its own
			// sequence of conversions; one goroutine does them all in turn.
			work := func(p int) error {
				rng := rand.New(rand.NewPCG(uint64(p), 7))
				base := uint64(p) * part
				for i := 0; i < perPart; i += 2 {
					off := base + rng.Uint64N(part/page)*page
					if err := s.attrs.Convert(off, page, memattr.Shared); err != nil {
						return err
					}
					if err := s.attrs.Convert(off, page, memattr.Private); err != nil {
						return err
					}
				}
				return nil
			}
			errs := make([]error, procs)
			t0 := time.Now()
			var wg sync.WaitGroup
			for w := range workers {
				wg.Go(func() {
					for p := w; p < procs; p += workers {
						if err := work(p); err != nil {
							errs[p] = err
							return
						}
					}
				})
			}
			wg.Wait()
			d := time.Since(t0)
			return d, errors.Join(errs...)
		})
		if err != nil {
			return 0, err
		}
		total := float64(sz.parOps / procs / 2 * 2 * procs)
		return total / d.Seconds(), nil
	}
	one, err := run(1)
	if err != nil {
		return nil, err
	}
	many, err := run(procs)
	if err != nil {
		return nil, err
	}
	return []benchRow{{
		Name: "parallel conversions", Unit: "ops/s", Baseline: one, Gmem: many, Better: "higher",
		Scale: fmt.Sprintf("%s, %s conversions, %d goroutines", trace.FormatSize(sz.parRegion), commas(uint64(sz.parOps)), procs),
		Note:  fmt.Sprintf("gmem with 1 goroutine (baseline column; QEMU converts under one lock) against %d on disjoint ranges (GOMAXPROCS)", procs),
	}}, nil
}

// benchBoot replays the boot trace of a 16 GiB and a 1 TiB guest.
func benchBoot(sz benchSizes) ([]benchRow, error) {
	var rows []benchRow
	for _, ram := range []uint64{16 << 30, 1 << 40} {
		seq, err := trace.Boot(trace.BootOptions{Common: trace.Common{RAM: ram, Events: sz.bootEvents, IOMMU: trace.IOMMUFD, Seed: 1}})
		if err != nil {
			return nil, err
		}
		res := replay.Events(seq, replay.Options{})
		if res.Violations > 0 || res.Rejected > 0 {
			return nil, fmt.Errorf("boot trace of %s: %d violations, %d rejected events: %+v",
				trace.FormatSize(ram), res.Violations, res.Rejected, res.ViolationDetails)
		}
		rows = append(rows, benchRow{
			Name: "boot DMA entries peak, " + trace.FormatSize(ram) + " guest", Unit: "entries",
			Baseline: float64(res.Baseline.EntriesPeak), Gmem: float64(res.Gmem.EntriesPeak), Better: "lower",
			Scale: fmt.Sprintf("%s events, iommufd", commas(res.Events)),
			Note:  "TDX guest: swiotlb pool (6% of RAM, 64 MiB to 1 GiB) shared at boot, then coherent-buffer churn; type1 allows 65,535",
		})
	}
	return rows, nil
}

// printBench writes the table, then what each row measures.
func printBench(w io.Writer, rows []benchRow, quick bool) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "\tscenario\tscale\tbaseline\tgmem\tgmem better by\t")
	for i, r := range rows {
		ratio := fmt.Sprintf("%.2fx", r.Ratio)
		if math.IsInf(r.Ratio, 1) {
			ratio = "inf"
		}
		fmt.Fprintf(tw, "%2d\t%s\t%s\t%s\t%s\t%s\t\n", i+1, r.Name, r.Scale, benchValue(r.Unit, r.Baseline), benchValue(r.Unit, r.Gmem), ratio)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nbaseline: QEMU's algorithm (bitmap, one IOMMU entry per 4 KiB); gmem: runs, one entry per extent")
	for i, r := range rows {
		fmt.Fprintf(w, "%2d  %s\n", i+1, r.Note)
	}
	if quick {
		fmt.Fprintln(w, "\n--quick: small sizes, one run each; run without it for the numbers to quote")
	}
}

// benchValue formats a value in its unit.
func benchValue(unit string, v float64) string {
	switch unit {
	case "bytes":
		return human(uint64(v))
	case "ns", "ns/op":
		s := duration(v)
		if unit == "ns/op" {
			s += "/op"
		}
		return s
	case "calls/op":
		return fmt.Sprintf("%.2f/op", v)
	case "ops/s":
		return commas(uint64(v)) + "/s"
	}
	return commas(uint64(v))
}

func benchHelp(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprint(w, `usage: gmem bench [--quick] [--json]

Runs the standard scenarios with the baseline (QEMU's algorithm: one bit
per 4 KiB page, one IOMMU entry per 4 KiB granule) and with gmem (state as
runs, one IOMMU entry per converted extent), in one process, and prints
one row per measurement with what it means:

  state memory          bytes of page state for a 1 TiB region, realistic
                        and adversarial (alternating pages)
  listener replay       registering a listener on 1 TiB with 100,000 runs
  4 KiB churn           random page conversions: time and map calls per op
  round trip            1 GiB to shared and back: map calls and time
  parallel conversions  throughput with GOMAXPROCS goroutines against 1
  boot DMA entries      peak IOMMU entries of the boot trace of a 16 GiB
                        and a 1 TiB guest

The ratio column says how many times better gmem is (baseline/gmem where
lower is better, gmem/baseline where higher is). A full run takes about a
minute on two cores. --json prints
{"rows":[{"name","unit","baseline","gmem","ratio","better","scale","note"}]}.

flags:
`)
	fs.VisitAll(func(f *flag.Flag) {
		_, usage := flag.UnquoteUsage(f)
		fmt.Fprintf(w, "  --%-8s %s\n", f.Name, usage)
	})
}
