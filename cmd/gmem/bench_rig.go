package main

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/gmemproject/gmem/internal/bench"
	"github.com/gmemproject/gmem/trace"
)

// rigMarker starts a measurement line of the rig's guest tests
// (rig/guesttest: bench_test.go, floor_test.go), found anywhere in a
// console line:
//
//	GMEM-RIG bench <backend> <scenario> <side> key=value ...
const rigMarker = "GMEM-RIG bench "

// rigMeasure is one measurement line's values.
type rigMeasure map[string]float64

// rigLine is one measurement line.
type rigLine struct {
	backend, scenario, side string
	m                       rigMeasure
}

// rigLog is the measurement lines of a rig console log, in log order.
type rigLog []rigLine

// readRig reads the bench lines of a rig console log. A backend, scenario
// and side ("type1 roundtrip granule") is measured once.
func readRig(r io.Reader) (rigLog, error) {
	var out rigLog
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	n := 0
	for sc.Scan() {
		n++
		line := sc.Text()
		i := strings.Index(line, rigMarker)
		if i < 0 {
			continue
		}
		f := strings.Fields(line[i+len(rigMarker):])
		if len(f) < 3 {
			return nil, fmt.Errorf("line %d: bench line without backend, scenario and side: %q", n, line)
		}
		m := rigMeasure{}
		for _, kv := range f[3:] {
			k, v, ok := strings.Cut(kv, "=")
			x, err := strconv.ParseFloat(v, 64)
			// Counts and times: a NaN, an infinity or a negative value is
			// a damaged line (and a NaN cannot be written as JSON).
			if !ok || err != nil || math.IsNaN(x) || math.IsInf(x, 0) || x < 0 {
				return nil, fmt.Errorf("line %d: %q is not key=number (finite, not negative)", n, kv)
			}
			m[k] = x
		}
		if _, dup := out.get(f[0], f[1], f[2]); dup {
			return nil, fmt.Errorf("line %d: second measurement of %s", n, strings.Join(f[:3], " "))
		}
		out = append(out, rigLine{f[0], f[1], f[2], m})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no %q lines: was the rig run with --bench?", strings.TrimSpace(rigMarker))
	}
	return out, nil
}

// get returns the measurement of backend, scenario and side.
func (l rigLog) get(backend, scenario, side string) (rigMeasure, bool) {
	i := slices.IndexFunc(l, func(x rigLine) bool { return x.backend == backend && x.scenario == scenario && x.side == side })
	if i < 0 {
		return nil, false
	}
	return l[i].m, true
}

// backends returns the backends in the order the log first names them.
func (l rigLog) backends() []string {
	var out []string
	for _, x := range l {
		if !slices.Contains(out, x.backend) {
			out = append(out, x.backend)
		}
	}
	return out
}

// has reports whether backend measured any of the scenarios.
func (l rigLog) has(backend string, scenarios ...string) bool {
	return slices.ContainsFunc(l, func(x rigLine) bool { return x.backend == backend && slices.Contains(scenarios, x.scenario) })
}

// value returns key of backend, scenario and side, or an error naming what
// is missing.
func (l rigLog) value(backend, scenario, side, key string) (float64, error) {
	m, ok := l.get(backend, scenario, side)
	if !ok {
		return 0, fmt.Errorf("rig log: %s %s lacks the %s run", backend, scenario, side)
	}
	v, ok := m[key]
	if !ok {
		return 0, fmt.Errorf("rig log: %s %s %s lacks %s", backend, scenario, side, key)
	}
	return v, nil
}

// rigRows turns the rig's measurements into rows, backend by backend:
// granule (the baseline) against extent (gmem) for the round trip and the
// churn, each a single run; the round trip against its floor, medians of
// interleaved rounds; one split, the bounded extent's unmap and maps
// against a cut; and the latency of conversions as a guest sees them.
func rigRows(l rigLog) ([]bench.Row, error) {
	var rows []bench.Row
	for _, b := range l.backends() {
		for _, g := range rigGroups {
			if !l.has(b, g.scenarios...) {
				continue
			}
			rs, err := g.rows(l, b)
			if err != nil {
				return nil, err
			}
			rows = append(rows, rs...)
		}
	}
	if len(rows) == 0 {
		var names []string
		for _, g := range rigGroups {
			names = append(names, g.scenarios...)
		}
		return nil, fmt.Errorf("rig log: no scenario these rows are made of (%s)", strings.Join(names, ", "))
	}
	for i := range rows {
		rows[i].Ratio = bench.Improvement(rows[i])
	}
	return rows, nil
}

// rigGroups are the scenarios of the rig's lines, each with what makes a
// backend's rows of them, in the order of the rows.
var rigGroups = []struct {
	scenarios []string
	rows      func(l rigLog, backend string) ([]bench.Row, error)
}{
	{[]string{"roundtrip", "churn"}, rigPolicyRows},
	{[]string{"floor"}, rigFloorRows},
	{[]string{"split"}, rigSplitRows},
	{[]string{"latency"}, rigLatencyRows},
}

// rigPolicyRows are backend b's round trip and churn, granule against
// extent: single runs inside a TCG guest, where the absolute times mean
// little and the ratio is what carries over.
func rigPolicyRows(l rigLog, b string) ([]bench.Row, error) {
	get := func(scenario, key string) (g, e float64, err error) {
		if g, err = l.value(b, scenario, "granule", key); err != nil {
			return 0, 0, err
		}
		e, err = l.value(b, scenario, "extent", key)
		return g, e, err
	}
	src := "rig " + b + ", TCG guest"
	gBytes, _, err := get("roundtrip", "bytes")
	if err != nil {
		return nil, err
	}
	rt := trace.FormatSize(uint64(gBytes)) + ", real " + b + ", TCG guest"
	var rows []bench.Row
	for _, x := range []struct{ key, name, unit, note string }{
		{"map_calls", "round trip map calls", "calls", "converting the range to shared and back on the real driver: granule policy (QEMU's) against extent"},
		{"ns", "round trip time", "ns", "the same, timed inside a TCG guest (one run each): only the ratio is meaningful"},
		{"pinned_pages", "round trip pinned pages", "pages", "pages the kernel pinned while the range was shared (VmLck+VmPin): both policies pin every shared page"},
	} {
		g, e, err := get("roundtrip", x.key)
		if err != nil {
			return nil, err
		}
		rows = append(rows, bench.Row{Name: "rig " + b + ": " + x.name, Unit: x.unit, Baseline: g, Gmem: e, Better: "lower", Scale: rt, Note: x.note, Source: src})
	}
	ops, eops, err := get("churn", "ops")
	if err != nil {
		return nil, err
	}
	if ops == 0 || eops != ops {
		return nil, fmt.Errorf("rig log: %s churn ran %v conversions with the granule policy and %v with the extent policy, want the same number, not 0", b, ops, eops)
	}
	g, e, err := get("churn", "ns")
	if err != nil {
		return nil, err
	}
	return append(rows, bench.Row{Name: "rig " + b + ": 4 KiB churn time", Unit: "ns/op", Baseline: g / ops, Gmem: e / ops, Better: "lower",
		Scale: fmt.Sprintf("%s conversions in %s, real %s, TCG guest", commas(uint64(ops)), trace.FormatSize(uint64(gBytes)), b), Source: src,
		Note: "random single-page conversions on the real driver, timed inside a TCG guest (one run each): only the ratio is meaningful"}), nil
}

// rigFloorSide is the floor's own side in the rig's floor lines.
const rigFloorSide = "one-map"

// rigFloorRows are backend b's round trip against its floor: every side
// of the floor lines, the floor first, as bench.FloorRows makes them.
func rigFloorRows(l rigLog, b string) ([]bench.Row, error) {
	var res []bench.FloorResult
	var bytes, rounds float64
	for _, x := range l {
		if x.backend != b || x.scenario != "floor" {
			continue
		}
		v := map[string]float64{"default": x.m["default"]}
		for _, key := range []string{"rounds", "bytes", "ns", "ns_min", "ns_q1", "ns_q3", "ns_max", "map_calls", "pinned_pages"} {
			var err error
			if v[key], err = l.value(b, "floor", x.side, key); err != nil {
				return nil, err
			}
		}
		if len(res) == 0 {
			bytes, rounds = v["bytes"], v["rounds"]
		}
		if v["rounds"] != rounds || v["bytes"] != bytes || rounds < 1 || bytes == 0 || v["map_calls"] == 0 {
			return nil, fmt.Errorf("rig log: %s floor %s: %v rounds of %v bytes, %v map calls; want the rounds and bytes of the other sides, not 0",
				b, x.side, v["rounds"], v["bytes"], v["map_calls"])
		}
		t := bench.Summary{Median: v["ns"], Range: []float64{v["ns_min"], v["ns_max"]}, IQR: []float64{v["ns_q1"], v["ns_q3"]}}
		if !slices.IsSorted([]float64{t.Range[0], t.IQR[0], t.Median, t.IQR[1], t.Range[1]}) || t.Median == 0 {
			return nil, fmt.Errorf("rig log: %s floor %s: median, quartiles and range out of order or 0", b, x.side)
		}
		if x.m["ns_space"] > t.Median {
			return nil, fmt.Errorf("rig log: %s floor %s: more time inside the driver's calls than in all", b, x.side)
		}
		t.Spread = (t.IQR[1] - t.IQR[0]) / t.Median
		r := bench.FloorResult{Side: bench.FloorSide{Name: x.side, Floor: x.side == rigFloorSide, Default: v["default"] == 1},
			Rounds: int(rounds), Time: t, InSpace: x.m["ns_space"], MapCalls: uint64(v["map_calls"]), Pinned: uint64(v["pinned_pages"])}
		if r.Side.Floor {
			res = slices.Insert(res, 0, r)
		} else {
			res = append(res, r)
		}
	}
	if len(res) < 2 || !res[0].Side.Floor {
		return nil, fmt.Errorf("rig log: %s floor lacks the %s run or every policy", b, rigFloorSide)
	}
	for _, r := range res[1:] {
		if r.Pinned != res[0].Pinned {
			return nil, fmt.Errorf("rig log: %s floor: %s pinned %d pages, the floor %d", b, r.Side.Name, r.Pinned, res[0].Pinned)
		}
	}
	return bench.FloorRows(res, bench.FloorWhere{
		Prefix: "rig " + b + ": ", Scale: fmt.Sprintf("%s, real %s, TCG guest, %v rounds", trace.FormatSize(uint64(bytes)), b, rounds),
		Space: "the real " + b + " driver", Source: "rig " + b + ", TCG guest",
	}), nil
}

// rigLatencyRows are backend b's conversion latencies, a side a size and
// IOMMU ("4KiB-type1"): the time from KVM_EXIT_HYPERCALL to re-entry,
// split into the kernel calls gmem makes (the baseline column) and gmem's
// own work (the gmem column), at the median and the 99th percentile.
func rigLatencyRows(l rigLog, b string) ([]bench.Row, error) {
	var rows []bench.Row
	for _, x := range l {
		if x.backend != b || x.scenario != "latency" {
			continue
		}
		size, iommu, ok := strings.Cut(x.side, "-")
		if !ok || size == "" || iommu == "" {
			return nil, fmt.Errorf("rig log: %s latency %s: want SIZE-IOMMU", b, x.side)
		}
		v := map[string]float64{}
		for _, key := range []string{"exits", "p50_ns", "p99_ns", "own_p50_ns", "own_p99_ns", "kernel_p50_ns", "kernel_p99_ns",
			"vmm_p50_ns", "attr_p50_ns", "punch_p50_ns", "iommu_p50_ns", "own_share_pct"} {
			var err error
			if v[key], err = l.value(b, "latency", x.side, key); err != nil {
				return nil, err
			}
		}
		if v["exits"] == 0 || v["p50_ns"] == 0 || v["p50_ns"] > v["p99_ns"] || v["own_p50_ns"] > v["own_p99_ns"] ||
			v["kernel_p50_ns"] > v["kernel_p99_ns"] || v["own_share_pct"] > 100 {
			return nil, fmt.Errorf("rig log: %s latency %s: %v exits, percentiles out of order or a share over 100%%", b, x.side, v["exits"])
		}
		scale := fmt.Sprintf("%s conversions, %s exits, SW-protected VM, real %s, TCG guest", size, commas(uint64(v["exits"])), iommu)
		note := fmt.Sprintf("KVM_EXIT_HYPERCALL to the vCPU's re-entry: p50 %s, p99 %s; gmem's own work %.1f%% of it. "+
			"Baseline column: the kernel calls gmem makes (p50: KVM_SET_MEMORY_ATTRIBUTES %s, punch %s, IOMMU map/unmap %s); "+
			"gmem column: the rest of the executor's time (with the VMM's model device's mapper); the VMM's own p50 %s",
			duration(v["p50_ns"]), duration(v["p99_ns"]), v["own_share_pct"],
			duration(v["attr_p50_ns"]), duration(v["punch_p50_ns"]), duration(v["iommu_p50_ns"]), duration(v["vmm_p50_ns"]))
		for _, q := range []string{"p50", "p99"} {
			rows = append(rows, bench.Row{
				Name: fmt.Sprintf("rig %s: %s conversion latency %s, %s", b, size, q, iommu), Unit: "ns", Better: "lower",
				Baseline: v["kernel_"+q+"_ns"], Gmem: v["own_"+q+"_ns"], Scale: scale, Source: "rig " + b + ", TCG guest", Note: note,
			})
		}
	}
	return rows, nil
}

// rigSplitRows are backend b's split of a mapped 2 MiB extent: the bounded
// extent's unmap and maps of what is left (the baseline column) against a
// cut (the gmem column), the median time of one split and the bytes one
// split re-pins.
func rigSplitRows(l rigLog, b string) ([]bench.Row, error) {
	get := func(key string) (e, c float64, err error) {
		if e, err = l.value(b, "split", "extent", key); err != nil {
			return 0, 0, err
		}
		c, err = l.value(b, "split", "cut", key)
		return e, c, err
	}
	n, cn, err := get("splits")
	if err != nil {
		return nil, err
	}
	if n == 0 || cn != n {
		return nil, fmt.Errorf("rig log: %s split: %v splits with the extent policy and %v with cuts, want the same number, not 0", b, n, cn)
	}
	em, cm, err := get("ns_median")
	if err != nil {
		return nil, err
	}
	er, cr, err := get("repinned_bytes")
	if err != nil {
		return nil, err
	}
	scale := fmt.Sprintf("a page out of a 2MiB extent, %s splits, real %s, TCG guest", commas(uint64(n)), b)
	src := "rig " + b + ", TCG guest"
	return []bench.Row{
		{Name: "rig " + b + ": one split, median time", Unit: "ns", Baseline: em, Gmem: cm, Better: "lower", Scale: scale, Source: src,
			Note: "making one page of a mapped extent private: the bounded extent's unmap of the extent and maps of what is left (baseline column) against one cut, the rest staying mapped"},
		{Name: "rig " + b + ": one split, re-pinned bytes", Unit: "bytes", Baseline: er / n, Gmem: cr / n, Better: "lower", Scale: scale, Source: src,
			Note: "bytes unmapped and pinned again by one split: the rest of the extent, against none for a cut"},
	}, nil
}
