package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/gmemproject/gmem/internal/bench"
)

// benchReport is the output of gmem bench --json.
type benchReport struct {
	Rows       []bench.Row `json:"rows"`
	Quick      bool        `json:"quick"`
	GOMAXPROCS int         `json:"gomaxprocs"`
	Rounds     int         `json:"rounds"`     // rounds of each timed row
	MaxSpread  float64     `json:"max_spread"` // the bound past which a row is noisy
}

// defaultMaxSpread is the spread past which a timed row is marked noisy:
// the middle half of its rounds more than a tenth of the median wide. (The
// interquartile range, not the fastest and slowest round: one round that a
// collection or a stray process slowed says little about the median, while
// a middle half that wide says the load came and went throughout.)
const defaultMaxSpread = 0.1

// runBench implements "gmem bench".
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	const cmd = "gmem bench"
	fs := newFlagSet(cmd)
	asJSON := fs.Bool("json", false, `print {"rows":[...]} as JSON`)
	quick := fs.Bool("quick", false, "smaller sizes and 3 rounds: fast, for tests; the numbers are rougher")
	rounds := fs.Int("rounds", 0, "`N` rounds of each timed row, baseline and gmem alternating (default 9, 3 with --quick)")
	only := fs.String("only", "", "run only the scenarios in `LIST` (comma-separated: state, replay, churn, churn-runs, roundtrip, parallel, boot, split, scale, floor; rig, with --rig, for the real-kernel rows alone)")
	rigLog := fs.String("rig", "", "also print the real-kernel rows from `LOG`, the console log of scripts/rig --bench")
	maxSpread := fs.Float64("max-spread", defaultMaxSpread, fmt.Sprintf("mark a timed row noisy when its interquartile range over median exceeds `F` (default %v)", defaultMaxSpread))
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the measuring to `FILE`, for go tool pprof; timed rows carry the labels side=baseline|gmem and row=NAME (pprof -tagfocus)")
	if err := parseFlags(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			benchHelp(stdout, fs)
			return exitOK
		}
		flagUsage(stderr, cmd, err)
		return exitUsage
	}
	if fs.NArg() > 0 {
		flagUsage(stderr, cmd, fmt.Errorf("unexpected argument %q", fs.Arg(0)))
		return exitUsage
	}
	sz := bench.FullSizes
	if *quick {
		sz = bench.QuickSizes
	}
	if *rounds < 0 || *maxSpread <= 0 || math.IsNaN(*maxSpread) {
		flagUsage(stderr, cmd, errors.New("--rounds must be at least 1 and --max-spread above 0"))
		return exitUsage
	}
	if *rounds > 0 {
		sz.Rounds = *rounds
	}
	scenarios, rigNamed, err := selectScenarios(*only)
	if err != nil {
		flagUsage(stderr, cmd, err)
		return exitUsage
	}
	if rigNamed && *rigLog == "" {
		flagUsage(stderr, cmd, errors.New("--only rig needs --rig LOG, the console log of scripts/rig --bench"))
		return exitUsage
	}
	var rig []bench.Row
	if *rigLog != "" {
		// Read first: a bad log fails before minutes of measuring.
		f, err := os.Open(*rigLog)
		if err != nil {
			fmt.Fprintf(stderr, "gmem bench: %v\n", err)
			return exitUsage
		}
		l, err := readRig(f)
		f.Close()
		if err == nil {
			rig, err = rigRows(l)
		}
		if err != nil {
			fmt.Fprintf(stderr, "gmem bench: %s: %v\n", *rigLog, err)
			return exitUsage
		}
		for i := range rig {
			rig[i].Noisy = rig[i].Spread > *maxSpread
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
	rows, err := bench.Run(ctx, scenarios, sz, *maxSpread)
	if err != nil {
		fmt.Fprintf(stderr, "gmem bench: %v\n", err)
		return exitFail
	}
	rows = append(rows, rig...)
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		rep := benchReport{Rows: rows, Quick: *quick, GOMAXPROCS: runtime.GOMAXPROCS(0), Rounds: sz.Rounds, MaxSpread: *maxSpread}
		if err := enc.Encode(rep); err != nil {
			fmt.Fprintf(stderr, "gmem bench: %v\n", err)
			return exitFail
		}
		return exitOK
	}
	printBench(stdout, rows, sz, *quick, *maxSpread)
	return exitOK
}

// rigScenario is the name --only selects the real-kernel rows by: they are
// read from --rig's log, not measured, so it is not in benchScenarios.
const rigScenario = "rig"

// selectScenarios returns the scenarios named in only (comma-separated; all
// when empty), and whether only names the rig rows.
func selectScenarios(only string) ([]bench.Scenario, bool, error) {
	all := bench.Scenarios()
	if only == "" {
		return all, false, nil
	}
	var out []bench.Scenario
	rig := false
	for _, name := range strings.Split(only, ",") {
		if name == rigScenario {
			rig = true
			continue
		}
		i := slices.IndexFunc(all, func(s bench.Scenario) bool { return s.Name == name })
		if i < 0 {
			var names []string
			for _, s := range all {
				names = append(names, s.Name)
			}
			names = append(names, rigScenario)
			return nil, false, fmt.Errorf("unknown scenario %q (want %s)", name, strings.Join(names, ", "))
		}
		out = append(out, all[i])
	}
	return out, rig, nil
}

// printBench writes the table, then what each row measures.
func printBench(w io.Writer, rows []bench.Row, sz bench.Sizes, quick bool, maxSpread float64) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "\tscenario\tscale\tbaseline\tgmem\tspread\tgmem better by\t")
	noisy := 0
	for i, r := range rows {
		ratio := fmt.Sprintf("%.2fx", r.Ratio)
		if r.Ratio > 0 && r.Ratio < 0.01 {
			ratio = fmt.Sprintf("%.2gx", r.Ratio)
		}
		base := benchValue(r.Unit, r.Baseline)
		switch {
		case math.IsInf(r.Ratio, 1):
			ratio = "inf"
		case r.BaselineHow == bench.NotRun:
			ratio, base = "-", "not run"
		case r.BaselineHow == bench.Floor:
			ratio, base = fmt.Sprintf("%.2fx the floor", r.ToFloor), base+" (floor)"
		case math.IsNaN(r.Ratio):
			ratio = "-"
		case r.BaselineHow == bench.Computed:
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
	if slices.ContainsFunc(rows, func(r bench.Row) bool { return r.Rounds > 0 && r.Source == "" }) {
		fmt.Fprintf(w, "timed rows: medians of %d rounds, baseline and gmem alternating; spread: interquartile range/median of the worse side\n", sz.Rounds)
	}
	if slices.ContainsFunc(rows, func(r bench.Row) bool { return r.Rounds > 0 && r.Source != "" }) {
		fmt.Fprintln(w, "rig rows with a spread: the sides interleaved inside the guest over the rounds their scale gives, the median of each")
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
	fmt.Fprint(w, `usage: gmem bench [flags]

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
  floor                 the 1 GiB round trip against its floor, one map
                        call of the whole 1 GiB and one unmap on the same
                        model IOMMU (the baseline column), for granule,
                        bounded and unbounded extents and cuts (the
                        default on a space that cuts): gmem's own cost,
                        with no kernel's; pinned pages equal on every side
  rig                   with --rig LOG: the 1 GiB round trip (map calls,
                        time, pinned pages) and churn measured on the real
                        type1 and iommufd drivers inside the rig's TCG
                        guest (scripts/rig --bench), granule policy against
                        extent; one run each, only the ratio is meaningful.
                        Then the same round trip against its floor on each
                        driver (one map call of 1 GiB, one unmap), medians
                        of interleaved rounds with their spread, and the
                        time inside the driver's calls. On iommufd, one
                        split of a 2 MiB extent, unmap and maps against a
                        cut. And conversion latency as the guest sees it
                        (KVM_EXIT_HYPERCALL to re-entry, 4 KiB and 2 MiB,
                        p50 and p99): the kernel calls gmem makes (baseline
                        column) against gmem's own work. Read from the log,
                        not measured: --only rig --rig LOG prints these rows
                        alone

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
	printFlags(w, fs)
	fmt.Fprint(w, `
Exit status: 0 done (NOISY rows included), 1 a scenario failed or the run
was interrupted, 2 usage errors: a bad flag, an unknown scenario, a --rig
log that is missing or damaged, a profile file that cannot be created.
`)
}
