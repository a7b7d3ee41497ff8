package bench

import (
	"context"
	"runtime"
	"runtime/pprof"
	"slices"
	"time"
)

// Sizes scales the scenarios: Full for the numbers to quote, Quick for
// tests.
type Sizes struct {
	StateRegion  uint64 // region of the state-memory rows
	Scattered    int    // scattered shared pages of the realistic state
	HugeRegion   uint64 // region of the scale rows (past 2^32 pages)
	AdvRegion    uint64 // region of the adversarial state row
	ReplayRegion uint64 // region of the listener replay row
	ReplayRuns   int    // runs (shared and private) in it
	ChurnRegion  uint64 // region of the 4 KiB churn rows
	ChurnOps     int    // conversions of the churn rows
	WideRegion   uint64 // region of the churn rows among many runs
	WideShared   int    // scattered shared pages there (twice as many runs)
	RoundTrip    uint64 // size converted to shared and back
	ParRegion    uint64 // region of the parallel row
	ParOps       int    // conversions in total in the parallel row
	BootEvents   int    // workload events of the boot traces
	Rounds       int    // rounds of each timed row
	Warmup       bool   // run each side once untimed before the rounds
}

// Side is one way of running a timed row: a function that runs one round
// and returns its value (time per op, throughput, ...), under a name for
// the profiler.
type Side struct {
	Name string
	Run  func() (float64, error)
}

// Rounds runs the sides for n rounds (at least one), each side once a
// round, and returns each side's values in side order. The order rotates
// every round (with two sides: swapped), so that load that comes and goes
// touches every side alike; each side's run starts after a collection, so
// that the garbage of earlier rows and rounds is not collected on its
// clock. With warmup every side first runs once untimed. Each side runs
// under the profiler labels row=row and side=its name, so a CPU profile
// can be split by side with go tool pprof -tagfocus.
func Rounds(row string, n int, warmup bool, sides ...Side) ([][]float64, error) {
	runs := make([]func() (float64, error), len(sides))
	for i, s := range sides {
		runs[i] = labelled(row, s.Name, s.Run)
	}
	if warmup {
		for _, run := range runs {
			if _, err := run(); err != nil {
				return nil, err
			}
		}
	}
	n = max(n, 1)
	out := make([][]float64, len(sides))
	for i := range out {
		out[i] = make([]float64, 0, n)
	}
	for r := range n {
		for k := range runs {
			i := (r + k) % len(runs)
			runtime.GC()
			v, err := runs[i]()
			if err != nil {
				return nil, err
			}
			out[i] = append(out[i], v)
		}
	}
	return out, nil
}

// Timed measures row's two sides: base and gm each run one round and
// return its value. They alternate for sz.Rounds rounds (see Rounds), and
// the row gets the medians, ranges and spread. A nil base times gmem alone.
func Timed(sz Sizes, row Row, base, gm func() (float64, error)) (Row, error) {
	alone := base == nil
	if alone {
		base = func() (float64, error) { return 0, nil }
	}
	vs, err := Rounds(row.Name, sz.Rounds, sz.Warmup, Side{"baseline", base}, Side{"gmem", gm})
	if err != nil {
		return row, err
	}
	row.SetSides(len(vs[0]), Summarize(vs[0]), Summarize(vs[1]))
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

// Summary is the distribution of one side's rounds.
type Summary struct {
	Median float64
	Range  []float64 // fastest and slowest round: [min, max]
	IQR    []float64 // first and third quartiles
	Spread float64   // (q3-q1)/median
}

// Summarize returns the median of xs (not empty), its range, its first
// and third quartiles and (q3-q1)/median.
func Summarize(xs []float64) Summary {
	s := slices.Clone(xs)
	slices.Sort(s)
	sum := Summary{
		Median: Quantile(s, 0.5),
		Range:  []float64{s[0], s[len(s)-1]},
		IQR:    []float64{Quantile(s, 0.25), Quantile(s, 0.75)},
	}
	if sum.Median > 0 {
		sum.Spread = (sum.IQR[1] - sum.IQR[0]) / sum.Median
	}
	return sum
}

// Quantile returns the q-quantile of sorted s (not empty), interpolating
// linearly between the two nearest values.
func Quantile(s []float64, q float64) float64 {
	pos := q * float64(len(s)-1)
	i := int(pos)
	if i+1 >= len(s) {
		return s[len(s)-1]
	}
	return s[i] + (pos-float64(i))*(s[i+1]-s[i])
}

// MinRound is the least time one round of a short operation takes: an
// operation of a few microseconds or milliseconds, timed once a round,
// measures the caches and the scheduler as much as itself (a 2.5 ms
// listener replay ranged over 2 to 10 ms), so such a round repeats it
// until this much time has gone and reports the mean.
const MinRound = 50 * time.Millisecond

// Repeated runs once (which returns the time of its timed part and does
// its untimed part itself) until the timed parts add up to at least min,
// and returns their mean in nanoseconds.
func Repeated(min time.Duration, once func() (time.Duration, error)) (float64, error) {
	var total time.Duration
	n := 0
	for total < min || n == 0 {
		d, err := once()
		if err != nil {
			return 0, err
		}
		total += d
		n++
	}
	return perOp(total, n), nil
}

// perOp returns the nanoseconds per op of d for n ops.
func perOp(d time.Duration, n int) float64 { return float64(d.Nanoseconds()) / float64(n) }
