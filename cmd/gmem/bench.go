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
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
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
	// Timed rows: Baseline and Gmem are medians over Rounds rounds, in
	// which the two alternate; the ranges are the fastest and slowest
	// round, the IQRs the first and third quartiles. Spread is the larger
	// of the two sides' interquartile range over median, and Noisy says it
	// exceeds the bound the run was given. Rows that count (bytes, calls,
	// entries) are exact: Rounds 0, Spread 0.
	Rounds        int       `json:"rounds,omitempty"`
	BaselineRange []float64 `json:"baseline_range,omitempty"`
	GmemRange     []float64 `json:"gmem_range,omitempty"`
	BaselineIQR   []float64 `json:"baseline_iqr,omitempty"`
	GmemIQR       []float64 `json:"gmem_iqr,omitempty"`
	Spread        float64   `json:"spread"`
	Noisy         bool      `json:"noisy"`
	// Baseline says how the baseline column was obtained when it was not
	// run: "computed" (exact arithmetic, e.g. a bitmap's size) or "not run"
	// (Baseline 0, no ratio: the baseline cannot run at this scale).
	BaselineHow string `json:"baseline_how,omitempty"`
	// Source names where a row was measured when not in this process on
	// the model IOMMU: "rig type1, TCG guest" for rows read with --rig.
	Source string `json:"source,omitempty"`
}

// benchReport is the output of gmem bench --json.
type benchReport struct {
	Rows       []benchRow `json:"rows"`
	Quick      bool       `json:"quick"`
	GOMAXPROCS int        `json:"gomaxprocs"`
	Rounds     int        `json:"rounds"`     // rounds of each timed row
	MaxSpread  float64    `json:"max_spread"` // the bound past which a row is noisy
}

// benchSizes scales the scenarios: full for the numbers to quote, quick for
// tests.
type benchSizes struct {
	stateRegion  uint64 // region of the state-memory rows
	scattered    int    // scattered shared pages of the realistic state
	hugeRegion   uint64 // region of the scale rows (past 2^32 pages)
	advRegion    uint64 // region of the adversarial state row
	replayRegion uint64 // region of the listener replay row
	replayRuns   int    // runs (shared and private) in it
	churnRegion  uint64 // region of the 4 KiB churn rows
	churnOps     int    // conversions of the churn rows
	wideRegion   uint64 // region of the churn rows among many runs
	wideShared   int    // scattered shared pages there (twice as many runs)
	roundTrip    uint64 // size converted to shared and back
	parRegion    uint64 // region of the parallel row
	parOps       int    // conversions in total in the parallel row
	bootEvents   int    // workload events of the boot traces
	rounds       int    // rounds of each timed row
	warmup       bool   // run each side once untimed before the rounds
}

var (
	fullSizes = benchSizes{
		stateRegion: 1 << 40, scattered: 50_000, advRegion: 1 << 40, hugeRegion: 64 << 40,
		replayRegion: 1 << 40, replayRuns: 100_000,
		churnRegion: 16 << 30, churnOps: 100_000,
		wideRegion: 1 << 40, wideShared: 500_000,
		roundTrip: 1 << 30, parRegion: 16 << 30, parOps: 200_000,
		bootEvents: trace.DefaultEvents, rounds: 9, warmup: true,
	}
	quickSizes = benchSizes{
		stateRegion: 1 << 40, scattered: 50_000, advRegion: 1 << 30, hugeRegion: 64 << 40,
		replayRegion: 16 << 30, replayRuns: 10_000,
		churnRegion: 1 << 30, churnOps: 5_000,
		wideRegion: 16 << 30, wideShared: 5_000,
		roundTrip: 64 << 20, parRegion: 1 << 30, parOps: 10_000,
		bootEvents: 200, rounds: 3,
	}
)

// defaultMaxSpread is the spread past which a timed row is marked noisy:
// the middle half of its rounds more than a tenth of the median wide. (The
// interquartile range, not the fastest and slowest round: one round that a
// collection or a stray process slowed says little about the median, while
// a middle half that wide says the load came and went throughout.)
const defaultMaxSpread = 0.1

// runBench implements "gmem bench".
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("gmem bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {}
	asJSON := fs.Bool("json", false, `print {"rows":[...]} as JSON`)
	quick := fs.Bool("quick", false, "smaller sizes and 3 rounds: fast, for tests; the numbers are rougher")
	rounds := fs.Int("rounds", 0, "rounds of each timed row, baseline and gmem alternating (default 9, 3 with --quick)")
	only := fs.String("only", "", "run only these `scenarios` (comma-separated: state, replay, churn, churn-runs, roundtrip, parallel, boot, split, scale; rig, with --rig, for the real-kernel rows alone)")
	rigLog := fs.String("rig", "", "also print the real-kernel rows from the console `log` of scripts/rig --bench")
	maxSpread := fs.Float64("max-spread", defaultMaxSpread, "mark a timed row noisy when its interquartile range over median exceeds this")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the measuring to `file`, for go tool pprof; timed rows carry the labels side=baseline|gmem and row=NAME (pprof -tagfocus)")
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
	if *rounds < 0 || *maxSpread <= 0 || math.IsNaN(*maxSpread) {
		fmt.Fprintln(stderr, "gmem bench: --rounds must be at least 1 and --max-spread above 0")
		return exitUsage
	}
	if *rounds > 0 {
		sz.rounds = *rounds
	}
	scenarios, rigNamed, err := selectScenarios(*only)
	if err != nil {
		fmt.Fprintf(stderr, "gmem bench: %v\n", err)
		return exitUsage
	}
	if rigNamed && *rigLog == "" {
		fmt.Fprintln(stderr, "gmem bench: --only rig needs --rig LOG, the console log of scripts/rig --bench")
		return exitUsage
	}
	var rig []benchRow
	if *rigLog != "" {
		// Read first: a bad log fails before minutes of measuring.
		f, err := os.Open(*rigLog)
		if err != nil {
			fmt.Fprintf(stderr, "gmem bench: %v\n", err)
			return exitUsage
		}
		ms, backends, err := readRig(f)
		f.Close()
		if err == nil {
			rig, err = rigRows(ms, backends)
		}
		if err != nil {
			fmt.Fprintf(stderr, "gmem bench: %s: %v\n", *rigLog, err)
			return exitUsage
		}
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fmt.Fprintf(stderr, "gmem bench: %v\n", err)
			return exitUsage
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintf(stderr, "gmem bench: %v\n", err)
			return exitFail
		}
		defer pprof.StopCPUProfile()
	}
	rows, err := benchRows(ctx, scenarios, sz, *maxSpread)
	if err != nil {
		fmt.Fprintf(stderr, "gmem bench: %v\n", err)
		return exitFail
	}
	rows = append(rows, rig...)
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		rep := benchReport{Rows: rows, Quick: *quick, GOMAXPROCS: runtime.GOMAXPROCS(0), Rounds: sz.rounds, MaxSpread: *maxSpread}
		if err := enc.Encode(rep); err != nil {
			fmt.Fprintf(stderr, "gmem bench: %v\n", err)
			return exitFail
		}
		return exitOK
	}
	printBench(stdout, rows, sz, *quick, *maxSpread)
	return exitOK
}

// scenario measures one or more rows. Counted values go into Baseline and
// Gmem directly; timed ones come from timed, which alternates the two sides.
type scenario func(sz benchSizes) ([]benchRow, error)

// namedScenario is a scenario with the name --only selects it by.
type namedScenario struct {
	name string
	run  scenario
}

// benchScenarios lists the scenarios in the order of the table. A new row
// is a scenario added here.
func benchScenarios() []namedScenario {
	return []namedScenario{
		{"state", benchState}, {"replay", benchListenerReplay}, {"churn", benchChurn}, {"churn-runs", benchWideChurn},
		{"roundtrip", benchRoundTrip}, {"parallel", benchParallel}, {"boot", benchBoot}, {"split", benchSplit}, {"scale", benchHuge},
	}
}

// rigScenario is the name --only selects the real-kernel rows by: they are
// read from --rig's log, not measured, so it is not in benchScenarios.
const rigScenario = "rig"

// selectScenarios returns the scenarios named in only (comma-separated; all
// when empty), and whether only names the rig rows.
func selectScenarios(only string) ([]namedScenario, bool, error) {
	all := benchScenarios()
	if only == "" {
		return all, false, nil
	}
	var out []namedScenario
	rig := false
	for _, name := range strings.Split(only, ",") {
		if name == rigScenario {
			rig = true
			continue
		}
		i := slices.IndexFunc(all, func(s namedScenario) bool { return s.name == name })
		if i < 0 {
			var names []string
			for _, s := range all {
				names = append(names, s.name)
			}
			names = append(names, rigScenario)
			return nil, false, fmt.Errorf("unknown scenario %q (want %s)", name, strings.Join(names, ", "))
		}
		out = append(out, all[i])
	}
	return out, rig, nil
}

// benchRows runs the scenarios in order and fills in ratios and noise.
func benchRows(ctx context.Context, scenarios []namedScenario, sz benchSizes, maxSpread float64) ([]benchRow, error) {
	var rows []benchRow
	for _, s := range scenarios {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("interrupted: %w", err)
		}
		rs, err := s.run(sz)
		if err != nil {
			return nil, err
		}
		rows = append(rows, rs...)
	}
	for i := range rows {
		rows[i].Ratio = improvement(rows[i])
		rows[i].Noisy = rows[i].Spread > maxSpread
	}
	return rows, nil
}

// improvement returns how many times better gmem is than the baseline: NaN
// for a row whose baseline was not run, and for a cost the baseline does
// not pay at all (a lower-is-better row with baseline 0, such as the bytes
// an extent split re-pins), where no ratio means anything.
func improvement(r benchRow) float64 {
	if r.BaselineHow == notRun {
		return math.NaN()
	}
	b, g := r.Baseline, r.Gmem
	if r.Better == "higher" {
		b, g = g, b
	}
	switch {
	case b == g:
		return 1
	case g == 0:
		return math.Inf(1)
	case b == 0:
		return math.NaN()
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

// timed measures row's two sides: base and gm each run one round and return
// its value (time per op, throughput, ...). They alternate for sz.rounds
// rounds, the order swapped every round, so that load that comes and goes
// touches both sides alike (after one untimed round of each when
// sz.warmup). The row gets the medians, ranges and spread. A nil base
// times gmem alone.
func timed(sz benchSizes, row benchRow, base, gm func() (float64, error)) (benchRow, error) {
	alone := base == nil
	if alone {
		base = func() (float64, error) { return 0, nil }
	}
	// Each side runs under a profiler label (side=baseline or side=gmem,
	// row=name), so a --cpuprofile can be split by side with
	// go tool pprof -tagfocus.
	base, gm = labelled(row.Name, "baseline", base), labelled(row.Name, "gmem", gm)
	if sz.warmup {
		if _, err := base(); err != nil {
			return row, err
		}
		if _, err := gm(); err != nil {
			return row, err
		}
	}
	rounds := max(sz.rounds, 1)
	bs, gs := make([]float64, 0, rounds), make([]float64, 0, rounds)
	for i := range rounds {
		first, second := base, gm
		if i%2 == 1 {
			first, second = gm, base
		}
		// Each round starts after a collection, so that the garbage of
		// earlier rows and rounds is not collected on either side's clock.
		runtime.GC()
		x, err := first()
		if err != nil {
			return row, err
		}
		runtime.GC()
		y, err := second()
		if err != nil {
			return row, err
		}
		if i%2 == 1 {
			x, y = y, x
		}
		bs, gs = append(bs, x), append(gs, y)
	}
	var bSpread, gSpread float64
	row.Baseline, row.BaselineRange, row.BaselineIQR, bSpread = summarize(bs)
	row.Gmem, row.GmemRange, row.GmemIQR, gSpread = summarize(gs)
	row.Rounds = rounds
	row.Spread = max(bSpread, gSpread)
	if alone {
		row.Baseline, row.BaselineRange, row.BaselineIQR = 0, nil, nil
	}
	return row, nil
}

// labelled returns f run under the profiler labels row and side.
func labelled(row, side string, f func() (float64, error)) func() (float64, error) {
	labels := pprof.Labels("row", row, "side", side)
	return func() (v float64, err error) {
		pprof.Do(context.Background(), labels, func(context.Context) { v, err = f() })
		return v, err
	}
}

// summarize returns the median of xs, its [min, max], its first and third
// quartiles and (q3-q1)/median.
func summarize(xs []float64) (median float64, minMax, iqr []float64, spread float64) {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	median = quantile(s, 0.5)
	minMax = []float64{s[0], s[n-1]}
	iqr = []float64{quantile(s, 0.25), quantile(s, 0.75)}
	if median > 0 {
		spread = (iqr[1] - iqr[0]) / median
	}
	return median, minMax, iqr, spread
}

// quantile returns the q-quantile of sorted s (not empty), interpolating
// linearly between the two nearest values.
func quantile(s []float64, q float64) float64 {
	pos := q * float64(len(s)-1)
	i := int(pos)
	if i+1 >= len(s) {
		return s[len(s)-1]
	}
	return s[i] + (pos-float64(i))*(s[i+1]-s[i])
}

// perOp returns the nanoseconds per op of d for n ops.
func perOp(d time.Duration, n int) float64 { return float64(d.Nanoseconds()) / float64(n) }

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

	var gl, bl countListener
	row := benchRow{
		Name: "listener replay", Unit: "ns", Better: "lower",
		Scale: fmt.Sprintf("%s, %s runs", trace.FormatSize(sz.replayRegion), commas(uint64(sz.replayRuns))),
		Note:  "registering a listener replays the shared runs: QEMU (2026) asks is_populated once per 4 KiB granule, gmem walks the runs",
	}
	row, err = timed(sz, row, func() (float64, error) {
		bl = countListener{}
		t0 := time.Now()
		err := granuleReplay(bm, whole, &bl)
		return float64(time.Since(t0).Nanoseconds()), err
	}, func() (float64, error) {
		gl = countListener{}
		t0 := time.Now()
		err := m.Register(&gl, whole)
		d := time.Since(t0)
		if err != nil {
			return 0, err
		}
		return float64(d.Nanoseconds()), m.Unregister(&gl)
	})
	if err != nil {
		return nil, err
	}
	if bl != gl || gl.calls != uint64(shared) {
		return nil, fmt.Errorf("listener replay: baseline notified %d runs (%d bytes), gmem %d (%d bytes), want %d runs",
			bl.calls, bl.bytes, gl.calls, gl.bytes, shared)
	}
	return []benchRow{row}, nil
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

// newStack returns a stack with the mapper's default extent bound.
func newStack(region uint64, baseline bool) (*stack, error) {
	return newBoundedStack(region, baseline, 0)
}

// newBoundedStack returns a stack whose gmem mapper bounds its extents at
// maxExtent (0: dma.DefaultMaxExtent). The device's IOMMU is an iommufd
// model: no entry limit, so the baseline is measured, not refused.
func newBoundedStack(region uint64, baseline bool, maxExtent uint64) (*stack, error) {
	m := discard.New(region, nil)
	attrs, err := memattr.New(m, memattr.Config{Bitmap: baseline})
	if err != nil {
		return nil, err
	}
	policy := dma.Extent
	if baseline {
		policy = dma.Granule
	}
	// Both sized to the region, so that conversions in distant parts of it
	// take different lock shards (the parallel row).
	model := iommu.NewModelSpan(iommu.Caps{Rules: iommu.IOMMUFD}, region)
	mapper, err := dma.New(model, nil, dma.Options{Policy: policy, MaxExtent: maxExtent, RegionSize: region})
	if err != nil {
		return nil, err
	}
	if err := m.Register(mapper, discard.Section{Size: region}); err != nil {
		return nil, err
	}
	return &stack{m: m, attrs: attrs, mapper: mapper}, nil
}

// churnOp is one conversion of a churn row.
type churnOp struct {
	off uint64
	to  memattr.State
}

// churnSide is one side of a churn row: a stack that a round converts ops
// on and then takes back to where it was, so that every round starts from
// the same state.
type churnSide struct {
	s    *stack
	ops  []churnOp
	prev []memattr.State // each op's page before it, known after the first round
	maps uint64          // map calls of one round
}

func newChurnSide(region uint64, baseline bool, background []uint64, ops []churnOp) (*churnSide, error) {
	s, err := newStack(region, baseline)
	if err != nil {
		return nil, err
	}
	for _, off := range background {
		if err := s.attrs.Convert(off, page, memattr.Shared); err != nil {
			return nil, err
		}
	}
	return &churnSide{s: s, ops: ops}, nil
}

// round times the ops and returns ns per op; undoing them is not timed.
func (c *churnSide) round() (float64, error) {
	if c.prev == nil {
		// A page's state before op i is that of the last earlier op on it,
		// or the state the round starts from.
		c.prev = make([]memattr.State, len(c.ops))
		last := make(map[uint64]memattr.State, len(c.ops))
		for i, o := range c.ops {
			st, ok := last[o.off]
			if !ok {
				st = c.s.attrs.Get(o.off)
			}
			c.prev[i], last[o.off] = st, o.to
		}
	}
	before := c.s.mapper.Stats().MapCalls
	t0 := time.Now()
	for _, o := range c.ops {
		if err := c.s.attrs.Convert(o.off, page, o.to); err != nil {
			return 0, err
		}
	}
	d := time.Since(t0)
	c.maps = c.s.mapper.Stats().MapCalls - before
	for i := len(c.ops) - 1; i >= 0; i-- {
		if err := c.s.attrs.Convert(c.ops[i].off, page, c.prev[i]); err != nil {
			return 0, err
		}
	}
	return perOp(d, len(c.ops)), nil
}

// churnRows measures random 4 KiB conversions through the whole stack of a
// region that holds the background shared pages, as a time row and a map
// calls row.
func churnRows(sz benchSizes, name, scale, note string, region uint64, background []uint64, seed uint64) ([]benchRow, error) {
	rng := rand.New(rand.NewPCG(seed, 6))
	ops := make([]churnOp, sz.churnOps)
	for i := range ops {
		ops[i] = churnOp{rng.Uint64N(region/page) * page, memattr.State(rng.IntN(2))}
	}
	bside, err := newChurnSide(region, true, background, ops)
	if err != nil {
		return nil, err
	}
	gside, err := newChurnSide(region, false, background, ops)
	if err != nil {
		return nil, err
	}
	row, err := timed(sz, benchRow{Name: name + " time", Unit: "ns/op", Better: "lower", Scale: scale, Note: note}, bside.round, gside.round)
	if err != nil {
		return nil, err
	}
	n := float64(len(ops))
	return []benchRow{row, {
		Name: name + " map calls", Unit: "calls/op", Baseline: float64(bside.maps) / n, Gmem: float64(gside.maps) / n, Better: "lower", Scale: scale,
		Note: "a 4 KiB conversion is one granule: both map once per page made shared, so no gain is expected here",
	}}, nil
}

// benchChurn measures random 4 KiB conversions of a region that starts
// private: they leave about half the pages they touch shared, scattered.
func benchChurn(sz benchSizes) ([]benchRow, error) {
	return churnRows(sz, "4 KiB churn",
		fmt.Sprintf("%s, %s conversions", trace.FormatSize(sz.churnRegion), commas(uint64(sz.churnOps))),
		"random single-page conversions (half of them to the state the page is in) through manager, mapper and model IOMMU",
		sz.churnRegion, nil, 5)
}

// benchWideChurn is benchChurn in a large region that already holds many
// scattered runs: single shared pages, no two adjacent.
func benchWideChurn(sz benchSizes) ([]benchRow, error) {
	rng := rand.New(rand.NewPCG(8, 9))
	slot := sz.wideRegion / page / uint64(sz.wideShared)
	background := make([]uint64, sz.wideShared)
	for i := range background {
		background[i] = (uint64(i)*slot + rng.Uint64N(slot-1)) * page
	}
	return churnRows(sz, "4 KiB churn among runs",
		fmt.Sprintf("%s, %s runs, %s conversions", trace.FormatSize(sz.wideRegion), commas(2*uint64(sz.wideShared)), commas(uint64(sz.churnOps))),
		fmt.Sprintf("the same conversions in a region holding %s scattered shared pages, each a run", commas(uint64(sz.wideShared))),
		sz.wideRegion, background, 10)
}

// benchRoundTrip measures converting a large range to shared and back.
func benchRoundTrip(sz benchSizes) ([]benchRow, error) {
	maps := map[bool]uint64{}
	run := func(baseline bool) func() (float64, error) {
		return func() (float64, error) {
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
			maps[baseline] = st.MapCalls
			return float64(d.Nanoseconds()), nil
		}
	}
	scale := trace.FormatSize(sz.roundTrip)
	row, err := timed(sz, benchRow{Name: "round trip time", Unit: "ns", Better: "lower", Scale: scale,
		Note: "the same round trip, timed: bookkeeping plus the model IOMMU's map and unmap"}, run(true), run(false))
	if err != nil {
		return nil, err
	}
	return []benchRow{
		{Name: "round trip map calls", Unit: "calls", Baseline: float64(maps[true]), Gmem: float64(maps[false]), Better: "lower", Scale: scale,
			Note: "converting the range to shared and back: one map call per 4 KiB granule against one per extent"},
		row,
	}, nil
}

// benchParallel measures conversion throughput with one goroutine and with
// GOMAXPROCS goroutines, each on its own part of one region.
func benchParallel(sz benchSizes) ([]benchRow, error) {
	procs := runtime.GOMAXPROCS(0)
	run := func(workers int) func() (float64, error) {
		return func() (float64, error) {
			s, err := newStack(sz.parRegion, false)
			if err != nil {
				return 0, err
			}
			// Collect what building the stack left, off the clock: a
			// collection during the timed part runs on the core one
			// goroutine leaves idle but takes time from two.
			runtime.GC()
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
			if err := errors.Join(errs...); err != nil {
				return 0, err
			}
			return float64(perPart*procs) / d.Seconds(), nil
		}
	}
	row, err := timed(sz, benchRow{
		Name: "parallel conversions", Unit: "ops/s", Better: "higher",
		Scale: fmt.Sprintf("%s, %s conversions, %d goroutines", trace.FormatSize(sz.parRegion), commas(uint64(sz.parOps)), procs),
		Note:  fmt.Sprintf("gmem with 1 goroutine (baseline column; QEMU converts under one lock) against %d on disjoint ranges (GOMAXPROCS)", procs),
	}, run(1), run(procs))
	if err != nil {
		return nil, err
	}
	return []benchRow{row}, nil
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

// Values of benchRow.BaselineHow.
const (
	computed = "computed"
	notRun   = "not run"
)

// benchHuge runs gmem alone on a region past 2^32 pages, where the
// baseline's bitmap is computed, not allocated, and its per-granule replay
// and churn are not run: state memory, listener replay and 4 KiB churn.
func benchHuge(sz benchSizes) ([]benchRow, error) {
	region := sz.hugeRegion
	pages := region / page
	size := trace.FormatSize(region)
	bitmap := float64((pages + 63) / 64 * 8)
	why := fmt.Sprintf("%s pages, past 2^32: the baseline would need a %s bitmap", commas(pages), human(uint64(bitmap)))

	// State memory: as the realistic row, at this size.
	rm, err := pagemap.NewRuns(pages, 1)
	if err != nil {
		return nil, err
	}
	if err := rm.Set(span.Range{Start: 3 << 30 / page, End: 4 << 30 / page}, 1); err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewPCG(11, 12))
	for range sz.scattered {
		p := rng.Uint64N(pages)
		if err := rm.Set(span.Range{Start: p, End: p + 1}, 1); err != nil {
			return nil, err
		}
	}
	rows := []benchRow{{
		Name: "scale: state memory, realistic", Unit: "bytes", Baseline: bitmap, Gmem: float64(rm.Bytes()), Better: "lower", Scale: size,
		BaselineHow: computed, Note: why + " (1 bit a page, computed); gmem's state as in the 1 TiB realistic row",
	}}

	// Listener replay and churn through the whole stack.
	s, err := newStack(region, false)
	if err != nil {
		return nil, err
	}
	shared := sz.replayRuns / 2
	slot := region / uint64(shared) / page
	for i := range uint64(shared) {
		off := (i*slot + rng.Uint64N(slot-64)) * page
		if err := s.attrs.Convert(off, (1+rng.Uint64N(64))*page, memattr.Shared); err != nil {
			return nil, err
		}
	}
	var l countListener
	reg := benchRow{Name: "scale: listener replay", Unit: "ns", Better: "lower", BaselineHow: notRun,
		Scale: fmt.Sprintf("%s, %s runs", size, commas(uint64(sz.replayRuns))),
		Note:  why + " and would ask is_populated 2^34 times per replay; gmem walks the runs"}
	reg, err = timed(sz, reg, nil, func() (float64, error) {
		l = countListener{}
		t0 := time.Now()
		err := s.m.Register(&l, discard.Section{Size: region})
		d := time.Since(t0)
		if err != nil {
			return 0, err
		}
		return float64(d.Nanoseconds()), s.m.Unregister(&l)
	})
	if err != nil {
		return nil, err
	}
	if l.calls != uint64(shared) {
		return nil, fmt.Errorf("listener replay of %s: %d runs notified, want %d", size, l.calls, shared)
	}
	ops := make([]churnOp, sz.churnOps)
	for i := range ops {
		ops[i] = churnOp{rng.Uint64N(pages) * page, memattr.State(rng.IntN(2))}
	}
	side := &churnSide{s: s, ops: ops}
	churn := benchRow{Name: "scale: 4 KiB churn time", Unit: "ns/op", Better: "lower", BaselineHow: notRun,
		Scale: fmt.Sprintf("%s, %s runs, %s conversions", size, commas(uint64(sz.replayRuns)), commas(uint64(sz.churnOps))),
		Note:  why + "; gmem: random single-page conversions among the replay row's runs"}
	churn, err = timed(sz, churn, nil, side.round)
	if err != nil {
		return nil, err
	}
	return append(rows, reg, churn), nil
}

// printBench writes the table, then what each row measures.
func printBench(w io.Writer, rows []benchRow, sz benchSizes, quick bool, maxSpread float64) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "\tscenario\tscale\tbaseline\tgmem\tspread\tgmem better by\t")
	noisy := 0
	for i, r := range rows {
		ratio := fmt.Sprintf("%.2fx", r.Ratio)
		base := benchValue(r.Unit, r.Baseline)
		switch {
		case math.IsInf(r.Ratio, 1):
			ratio = "inf"
		case r.BaselineHow == notRun:
			ratio, base = "-", "not run"
		case math.IsNaN(r.Ratio):
			ratio = "-"
		case r.BaselineHow == computed:
			base += " (computed)"
		}
		spread := "exact"
		switch {
		case r.Rounds > 0:
			spread = fmt.Sprintf("%.0f%%", 100*r.Spread)
		case r.Source != "" && (r.Unit == "ns" || r.Unit == "ns/op"):
			spread = "1 run"
		}
		if r.Noisy {
			ratio += "  NOISY"
			noisy++
		}
		fmt.Fprintf(tw, "%2d\t%s\t%s\t%s\t%s\t%s\t%s\t\n", i+1, r.Name, r.Scale, base, benchValue(r.Unit, r.Gmem), spread, ratio)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nbaseline: QEMU's algorithm (bitmap, one IOMMU entry per 4 KiB); gmem: runs, one entry per extent")
	if slices.ContainsFunc(rows, func(r benchRow) bool { return r.Rounds > 0 }) {
		fmt.Fprintf(w, "timed rows: medians of %d rounds, baseline and gmem alternating; spread: interquartile range/median of the worse side\n", sz.rounds)
	}
	for i, r := range rows {
		fmt.Fprintf(w, "%2d  %s\n", i+1, r.Note)
	}
	if noisy > 0 {
		fmt.Fprintf(w, "\n%d timed rows NOISY (spread over %.0f%%): the machine is busy; do not quote them\n", noisy, 100*maxSpread)
	}
	if quick {
		fmt.Fprintln(w, "\n--quick: small sizes, few rounds; run without it for the numbers to quote")
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
	fmt.Fprint(w, `usage: gmem bench [--quick] [--json] [--rounds N] [--max-spread F] [--only LIST] [--rig LOG] [--cpuprofile FILE]

Runs the standard scenarios with the baseline (QEMU's algorithm: one bit
per 4 KiB page, one IOMMU entry per 4 KiB granule) and with gmem (state as
runs, one IOMMU entry per converted extent), in one process, and prints
one row per measurement with what it means:

  state memory          bytes of page state for a 1 TiB region, realistic
                        and adversarial (alternating pages)
  listener replay       registering a listener on 1 TiB with 100,000 runs
  4 KiB churn           random page conversions: time and map calls per op,
                        in 16 GiB and among 1,000,000 runs in 1 TiB
  round trip            1 GiB to shared and back: map calls and time
  parallel conversions  throughput with GOMAXPROCS goroutines against 1
  boot DMA entries      peak IOMMU entries of the boot trace of a 16 GiB
                        and a 1 TiB guest
  scale                 state memory, listener replay and churn of a
                        64 TiB region (2^34 pages): gmem alone, the
                        baseline's bitmap size computed
  rig                   with --rig LOG: the 1 GiB round trip (map calls,
                        time, pinned pages) and churn measured on the real
                        type1 and iommufd drivers inside the rig's TCG
                        guest (scripts/rig --bench), granule policy against
                        extent; one run each, only the ratio is meaningful.
                        Read from the log, not measured: --only rig --rig LOG
                        prints these rows alone

The ratio column says how many times better gmem is (baseline/gmem where
lower is better, gmem/baseline where higher is). Timed rows run baseline and
gmem alternately for several rounds and show medians; their spread is the
interquartile range over the median of the worse side, and a row past
--max-spread is marked NOISY (a busy machine: do not quote it). Counted rows
are exact. A full run takes a few minutes on two cores. --json prints
{"rows":[{"name","unit","baseline","gmem","ratio","better","scale","note",
"rounds","baseline_range","gmem_range","baseline_iqr","gmem_iqr","spread",
"noisy","baseline_how","source"}]}.

flags:
`)
	fs.VisitAll(func(f *flag.Flag) {
		_, usage := flag.UnquoteUsage(f)
		fmt.Fprintf(w, "  --%-11s %s\n", f.Name, usage)
	})
}
