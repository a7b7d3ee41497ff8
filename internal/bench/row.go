// Package bench holds gmem's benchmark scenarios: the stacks they run (a
// region with memattr, a discard manager and a DMA mapper on a model IOMMU,
// configured as QEMU's algorithm or as gmem's), the workloads, and the
// interleaved timing that compares the sides in one process (alternating
// rounds, medians, interquartile spread). "gmem bench" prints its rows; the
// testing.B benchmarks of this package run the same stacks and workloads.
package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Row is one measurement: the baseline against gmem. Ratio is how many
// times better gmem is: baseline/gmem when lower is better, gmem/baseline
// when higher is.
type Row struct {
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
	// BaselineHow says how the baseline column was obtained when it was
	// not QEMU's algorithm run here: Computed (exact arithmetic, e.g. a
	// bitmap's size) or NotRun (Baseline 0, no ratio: the baseline cannot
	// run at this scale), or Floor.
	// Floor: the baseline column is the floor, what the kernel must spend
	// anyway (one map call of the whole range), not QEMU's algorithm; such a
	// row has no ratio, and ToFloor says how many times the floor's time
	// gmem took.
	BaselineHow string  `json:"baseline_how,omitempty"`
	ToFloor     float64 `json:"to_floor,omitempty"`
	// Source names where a row was measured when not in this process on
	// the model IOMMU: "rig type1, TCG guest" for rows read from the rig.
	Source string `json:"source,omitempty"`
}

// Values of Row.BaselineHow.
const (
	Computed = "computed"
	NotRun   = "not run"
	Floor    = "floor"
)

// Improvement returns how many times better gmem is than the baseline: NaN
// for a row whose baseline was not run or is the floor, and for a cost the baseline does
// not pay at all (a lower-is-better row with baseline 0, such as the bytes
// an extent split re-pins), where no ratio means anything.
func Improvement(r Row) float64 {
	if r.BaselineHow == NotRun || r.BaselineHow == Floor {
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

// SetSides fills the row's two columns from the summaries of their rounds.
func (r *Row) SetSides(rounds int, base, gm Summary) {
	r.Rounds = rounds
	r.Baseline, r.BaselineRange, r.BaselineIQR = base.Median, base.Range, base.IQR
	r.Gmem, r.GmemRange, r.GmemIQR = gm.Median, gm.Range, gm.IQR
	r.Spread = max(base.Spread, gm.Spread)
}

// MarshalJSON writes an infinite ratio (gmem needs nothing where the
// baseline needs something) as null, which JSON can carry.
func (r Row) MarshalJSON() ([]byte, error) {
	type plain Row
	if math.IsInf(r.Ratio, 0) || math.IsNaN(r.Ratio) {
		return json.Marshal(struct {
			plain
			Ratio *float64 `json:"ratio"`
		}{plain: plain(r)})
	}
	return json.Marshal(plain(r))
}

// Commas formats n with thousands separators.
func Commas(n uint64) string {
	s := strconv.FormatUint(n, 10)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// Human formats a byte count with a binary unit and three significant
// digits.
func Human(n uint64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return strconv.FormatUint(n, 10) + " B"
	}
	v, u := float64(n), -1
	for v >= 1024 && u < len(units)-1 {
		v /= 1024
		u++
	}
	// What rounds up to 1024 of a unit is 1.00 of the next.
	if v >= 1023.5 && u < len(units)-1 {
		v /= 1024
		u++
	}
	switch {
	case v >= 99.95:
		return fmt.Sprintf("%.0f %ciB", v, units[u])
	case v >= 9.995:
		return fmt.Sprintf("%.1f %ciB", v, units[u])
	}
	return fmt.Sprintf("%.2f %ciB", v, units[u])
}

// Duration formats nanoseconds with a unit.
func Duration(ns float64) string {
	switch {
	case ns >= 1e9:
		return fmt.Sprintf("%.2f s", ns/1e9)
	case ns >= 1e6:
		return fmt.Sprintf("%.2f ms", ns/1e6)
	case ns >= 1e3:
		return fmt.Sprintf("%.2f µs", ns/1e3)
	}
	return fmt.Sprintf("%.0f ns", ns)
}
