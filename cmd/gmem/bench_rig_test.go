package main

import (
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gmemproject/gmem/internal/bench"
)

// rigLogSample is a console log as scripts/rig --bench writes it, kernel
// noise and a message glued in front of a marker included.
const rigLogSample = `[    1.0] vfio-pci 0000:00:03.0: enabling device
GMEM-RIG bench type1 roundtrip granule bytes=1073741824 map_calls=262144 unmap_calls=1 entries_peak=262144 pinned_pages=262144 ns=50000000000 ns_to_shared=45000000000 ns_to_private=5000000000
GMEM-RIG check type1 bench-roundtrip-granule pass
GMEM-RIG bench type1 churn granule ops=10000 map_calls=4881 ns=2000000000 ns_per_op=200000
[    9.9] some kernel message GMEM-RIG bench type1 roundtrip extent bytes=1073741824 map_calls=1 unmap_calls=1 entries_peak=1 pinned_pages=262144 ns=1000000000 ns_to_shared=900000000 ns_to_private=100000000
GMEM-RIG bench type1 churn extent ops=10000 map_calls=4881 ns=1000000000 ns_per_op=100000
` + rigFloorSample

// rigLatencySample is the kvm backend's latency lines, as latency_test.go
// prints them.
const rigLatencySample = `GMEM-RIG bench kvm latency 4KiB-type1 exits=800 bytes=4096 p50_ns=200000 p99_ns=900000 own_p50_ns=20000 own_p99_ns=90000 kernel_p50_ns=150000 kernel_p99_ns=700000 vmm_p50_ns=30000 attr_p50_ns=50000 punch_p50_ns=40000 iommu_p50_ns=60000 own_share_pct=10.5
GMEM-RIG bench kvm latency 2MiB-type1 exits=800 bytes=2097152 p50_ns=5000000 p99_ns=9000000 own_p50_ns=100000 own_p99_ns=400000 kernel_p50_ns=4800000 kernel_p99_ns=8000000 vmm_p50_ns=30000 attr_p50_ns=50000 punch_p50_ns=400000 iommu_p50_ns=4000000 own_share_pct=2.0
`

// rigSplitSample is the split lines of iommufd, as bench_test.go prints
// them.
const rigSplitSample = `GMEM-RIG bench iommufd split cut splits=64 ns=18800181 ns_per_split=293752 ns_median=49624 repinned_bytes=0 window_bytes=0
GMEM-RIG bench iommufd split extent splits=64 ns=175450538 ns_per_split=2741414 ns_median=2146292 repinned_bytes=133955584 window_bytes=133955584
`

// rigFloorSample is the floor comparison of one backend, as floor_test.go
// prints it.
const rigFloorSample = `GMEM-RIG bench type1 floor one-map rounds=5 bytes=1073741824 ns=2000000000 ns_min=1900000000 ns_q1=1950000000 ns_q3=2050000000 ns_max=2100000000 ns_to_shared=1800000000 ns_to_private=200000000 ns_space=1990000000 map_calls=1 unmap_calls=1 pinned_pages=262144 default=0
GMEM-RIG bench type1 floor granule rounds=5 bytes=1073741824 ns=16000000000 ns_min=15000000000 ns_q1=15500000000 ns_q3=16800000000 ns_max=17000000000 ns_to_shared=9000000000 ns_to_private=7000000000 map_calls=262144 unmap_calls=1 pinned_pages=262144 default=0
GMEM-RIG bench type1 floor extent rounds=5 bytes=1073741824 ns=2400000000 ns_min=2300000000 ns_q1=2350000000 ns_q3=2450000000 ns_max=2500000000 ns_to_shared=2100000000 ns_to_private=300000000 ns_space=2300000000 map_calls=512 unmap_calls=1 pinned_pages=262144 default=1
GMEM-RIG bench type1 floor extent-unbounded rounds=5 bytes=1073741824 ns=2100000000 ns_min=2000000000 ns_q1=2050000000 ns_q3=2150000000 ns_max=2200000000 ns_to_shared=1900000000 ns_to_private=200000000 map_calls=1 unmap_calls=1 pinned_pages=262144 default=0
`

func TestRigRows(t *testing.T) {
	l, err := readRig(strings.NewReader(rigLogSample))
	if err != nil {
		t.Fatal(err)
	}
	rows, err := rigRows(l)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][4]float64{ // baseline, gmem, ratio, spread
		"rig type1: round trip map calls":                    {262144, 1, 262144, 0},
		"rig type1: round trip time":                         {50e9, 1e9, 50, 0},
		"rig type1: round trip pinned pages":                 {262144, 262144, 1, 0},
		"rig type1: 4 KiB churn time":                        {200000, 100000, 2, 0},
		"rig type1: floor: granule round trip time":          {2e9, 16e9, 0.125, 1.3 / 16},
		"rig type1: floor: extent round trip time":           {2e9, 2.4e9, 2 / 2.4, 0.05},
		"rig type1: floor: extent-unbounded round trip time": {2e9, 2.1e9, 2 / 2.1, 0.05},
		"rig type1: floor: round trip pinned pages":          {262144, 262144, 1, 0},
	}
	if len(rows) != len(want) {
		t.Fatalf("%d rows, want %d: %+v", len(rows), len(want), rows)
	}
	for _, r := range rows {
		w, ok := want[r.Name]
		if !ok || r.Baseline != w[0] || r.Gmem != w[1] || math.Abs(r.Ratio-w[2]) > 1e-12 || math.Abs(r.Spread-w[3]) > 1e-12 || !strings.Contains(r.Source, "TCG guest") {
			t.Errorf("row %q: %v %v %v spread %v %q, want %v", r.Name, r.Baseline, r.Gmem, r.Ratio, r.Spread, r.Source, w)
		}
		if strings.Contains(r.Name, "floor") && strings.HasSuffix(r.Name, "time") &&
			(r.Rounds != 5 || len(r.BaselineIQR) != 2 || len(r.GmemRange) != 2 || !strings.Contains(r.Scale, "5 rounds")) {
			t.Errorf("floor row %q: rounds %d, quartiles %v, range %v, scale %q", r.Name, r.Rounds, r.BaselineIQR, r.GmemRange, r.Scale)
		}
	}
	if n := rows[5].Note; !strings.Contains(n, "default policy") || !strings.Contains(n, "1.20x the floor") ||
		!strings.Contains(n, "inside the space's calls 2.30 s (the floor 1.99 s), gmem's own work 100.00 ms") {
		t.Errorf("extent floor row's note %q", rows[5].Note)
	}
	// The latency rows: the kernel calls against gmem's own work.
	rows = rowsOf(t, rigLatencySample, 4)
	for i, w := range [][3]float64{{150000, 20000, 7.5}, {700000, 90000, 700.0 / 90}, {4.8e6, 1e5, 48}, {8e6, 4e5, 20}} {
		if r := rows[i]; r.Baseline != w[0] || r.Gmem != w[1] || math.Abs(r.Ratio-w[2]) > 1e-9 || !strings.Contains(r.Name, "type1") {
			t.Errorf("latency row %d %q: %v %v %v, want %v", i, r.Name, r.Baseline, r.Gmem, r.Ratio, w)
		}
	}
	if n := rows[0].Note; !strings.Contains(n, "p50 200.00 µs, p99 900.00 µs; gmem's own work 10.5% of it") || !strings.Contains(n, "IOMMU map/unmap 60.00 µs") {
		t.Errorf("latency note %q", n)
	}
	// The split rows: the bounded extent's unmap and maps against a cut.
	rows = rowsOf(t, rigSplitSample, 2)
	if r := rows[0]; r.Baseline != 2146292 || r.Gmem != 49624 || math.Abs(r.Ratio-2146292.0/49624) > 1e-9 {
		t.Errorf("split time row %+v", r)
	}
	if r := rows[1]; r.Baseline != 2<<20-4096 || r.Gmem != 0 || !math.IsInf(r.Ratio, 1) {
		t.Errorf("split re-pinned row %+v", r)
	}
	// A backend that measured only the floor has only floor rows.
	rowsOf(t, strings.ReplaceAll(rigFloorSample, "type1", "iommufd"), 4)
}

// rowsOf returns the rows of log, which must be n.
func rowsOf(t *testing.T, log string, n int) []bench.Row {
	t.Helper()
	l, err := readRig(strings.NewReader(log))
	if err != nil {
		t.Fatal(err)
	}
	rows, err := rigRows(l)
	if err != nil || len(rows) != n {
		t.Fatalf("%d rows, want %d: %+v, %v", len(rows), n, rows, err)
	}
	return rows
}

func TestRigRowsBad(t *testing.T) {
	for name, log := range map[string]string{
		"none":      "no bench here\n",
		"malformed": "GMEM-RIG bench type1 roundtrip granule ns=abc\n",
		"short":     "GMEM-RIG bench type1\n",
		"twice":     "GMEM-RIG bench type1 churn extent ns=1\nGMEM-RIG bench type1 churn extent ns=1\n",
		"nan":       "GMEM-RIG bench type1 churn extent ns=NaN\n",
		"infinite":  "GMEM-RIG bench type1 churn extent ns=+Inf\n",
		"negative":  "GMEM-RIG bench type1 churn extent ns=-1\n",
	} {
		if _, err := readRig(strings.NewReader(log)); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	// One policy missing.
	l, err := readRig(strings.NewReader("GMEM-RIG bench iommufd roundtrip extent bytes=1 ns=1 map_calls=1 pinned_pages=1\n"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rigRows(l); err == nil || !strings.Contains(err.Error(), "granule") {
		t.Errorf("rigRows without the granule run: %v", err)
	}
	// Lines of no scenario rows are made of.
	if l, err := readRig(strings.NewReader("GMEM-RIG bench type1 other extent ns=1\n")); err != nil {
		t.Fatal(err)
	} else if _, err := rigRows(l); err == nil {
		t.Errorf("rigRows of an unknown scenario: no error")
	}
	// Floors that cannot be compared, latencies that cannot be.
	for name, log := range map[string]string{
		"no floor":         strings.ReplaceAll(rigFloorSample, "one-map", "other"),
		"floor alone":      strings.SplitAfter(rigFloorSample, "\n")[0],
		"pinned differs":   strings.Replace(rigFloorSample, "pinned_pages=262144 default=1", "pinned_pages=131072 default=1", 1),
		"rounds differ":    strings.Replace(rigFloorSample, "floor extent rounds=5", "floor extent rounds=4", 1),
		"quartiles":        strings.Replace(rigFloorSample, "ns_q1=2350000000", "ns_q1=2450000001", 1),
		"median 0":         strings.Replace(rigFloorSample, "ns=2000000000 ns_min=1900000000", "ns=0 ns_min=0", 1),
		"no map calls":     strings.Replace(rigFloorSample, "map_calls=512", "map_calls=0", 1),
		"lacks a quartile": strings.Replace(rigFloorSample, " ns_q3=2450000000", "", 1),
		"space over all":   strings.Replace(rigFloorSample, "ns_space=2300000000", "ns_space=2400000001", 1),
		"latency no size":  strings.Replace(rigLatencySample, "4KiB-type1", "4KiB", 1),
		"latency order":    strings.Replace(rigLatencySample, "p99_ns=900000", "p99_ns=100000", 1),
		"latency share":    strings.Replace(rigLatencySample, "own_share_pct=10.5", "own_share_pct=100.5", 1),
		"latency no exits": strings.Replace(rigLatencySample, "exits=800", "exits=0", 1),
		"latency lacks":    strings.Replace(rigLatencySample, " vmm_p50_ns=30000", "", 1),
		"split alone":      strings.SplitAfter(rigSplitSample, "\n")[0],
		"split counts":     strings.Replace(rigSplitSample, "splits=64", "splits=32", 1),
		"split none":       strings.ReplaceAll(rigSplitSample, "splits=64", "splits=0"),
	} {
		l, err := readRig(strings.NewReader(log))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if _, err := rigRows(l); err == nil || (!strings.Contains(err.Error(), "floor") && !strings.Contains(err.Error(), "latency") && !strings.Contains(err.Error(), "split")) {
			t.Errorf("%s: %v", name, err)
		}
	}
	// Churns of no conversions, or of different numbers on the two sides,
	// have no time per conversion to compare.
	for _, log := range []string{
		strings.ReplaceAll(rigLogSample, "ops=10000", "ops=0"),
		strings.Replace(rigLogSample, "ops=10000", "ops=5000", 1),
	} {
		l, err := readRig(strings.NewReader(log))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := rigRows(l); err == nil || !strings.Contains(err.Error(), "conversions") {
			t.Errorf("rigRows of churns %q: %v", log, err)
		}
	}
}

func TestBenchRigFlag(t *testing.T) {
	if testing.Short() {
		t.Skip("bench --quick takes seconds; skipped in -short")
	}
	path := filepath.Join(t.TempDir(), "rig.log")
	if err := os.WriteFile(path, []byte(rigLogSample), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runCmd(context.Background(), "bench", "--quick", "--json", "--rig", path)
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	var rep benchReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, r := range rep.Rows {
		if strings.HasPrefix(r.Name, "rig type1: ") {
			n++
		}
	}
	if n != 8 {
		t.Errorf("%d rig rows, want 8", n)
	}
	if code, _, errOut := runCmd(context.Background(), "bench", "--rig", filepath.Join(t.TempDir(), "missing")); code != exitUsage || errOut == "" {
		t.Errorf("missing rig log: exit %d, %q", code, errOut)
	}
}

// TestBenchOnlyRig checks that --only rig prints the rows of the rig's log
// and measures nothing, and that it needs --rig.
func TestBenchOnlyRig(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rig.log")
	if err := os.WriteFile(path, []byte(rigLogSample), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"--json"}, {}} {
		code, out, errOut := runCmd(context.Background(), append([]string{"bench", "--only", "rig", "--rig", path}, args...)...)
		if code != exitOK {
			t.Fatalf("bench --only rig %v: exit %d: %s", args, code, errOut)
		}
		if len(args) == 0 {
			if !strings.Contains(out, "rig type1: 4 KiB churn time") || strings.Contains(out, "state memory") || strings.Contains(out, "medians of") {
				t.Errorf("bench --only rig: table %q", out)
			}
			continue
		}
		var rep benchReport
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatal(err)
		}
		if len(rep.Rows) != 8 {
			t.Errorf("bench --only rig --json: %d rows, want the log's 8", len(rep.Rows))
		}
		for _, r := range rep.Rows {
			if !strings.HasPrefix(r.Name, "rig type1: ") {
				t.Errorf("bench --only rig --json: row %q", r.Name)
			}
		}
	}
	code, out, errOut := runCmd(context.Background(), "bench", "--only", "rig")
	if code != exitUsage || out != "" || !strings.Contains(errOut, "--only rig needs --rig") {
		t.Errorf("bench --only rig without --rig: exit %d, %q, %q", code, out, errOut)
	}
}

// FuzzReadRig checks the rig log parser: no panic, and a log it and rigRows
// accept gives rows of finite, non-negative values that encode as JSON (a
// NaN would fail --json only at the end of minutes of measuring).
func FuzzReadRig(f *testing.F) {
	f.Add(rigLogSample)
	f.Add("GMEM-RIG bench type1 churn extent ops=0 ns=1\n")
	f.Add("GMEM-RIG bench type1 roundtrip granule bytes=NaN ns=1 map_calls=1 pinned_pages=1\n")
	f.Add(strings.ReplaceAll(rigLogSample, "ops=10000", "ops=0"))
	f.Add(strings.ReplaceAll(rigLogSample, "ns=1000000000", "ns=-1"))
	f.Add(rigFloorSample)
	f.Add(rigLatencySample)
	f.Add(rigSplitSample)
	f.Add(strings.Replace(rigLatencySample, "own_share_pct=10.5", "own_share_pct=1e308", 1))
	f.Add(strings.Replace(rigFloorSample, "ns=2000000000 ns_min=1900000000", "ns=0 ns_min=0", 1))
	f.Add(strings.ReplaceAll(rigFloorSample, "rounds=5", "rounds=0"))
	f.Fuzz(func(t *testing.T, log string) {
		l, err := readRig(strings.NewReader(log))
		if err != nil {
			return
		}
		for _, x := range l {
			for k, v := range x.m {
				if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
					t.Fatalf("accepted %s %s %s %s=%v", x.backend, x.scenario, x.side, k, v)
				}
			}
		}
		rows, err := rigRows(l)
		if err != nil {
			return
		}
		for _, r := range rows {
			for _, v := range []float64{r.Baseline, r.Gmem, r.Spread} {
				if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
					t.Fatalf("row %q has %v", r.Name, v)
				}
			}
		}
		if _, err := json.Marshal(benchReport{Rows: rows}); err != nil {
			t.Fatalf("rows do not encode: %v", err)
		}
	})
}
