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
// (rig/guesttest/bench_test.go), found anywhere in a console line:
//
//	GMEM-RIG bench <backend> <scenario> <policy> key=value ...
const rigMarker = "GMEM-RIG bench "

// rigMeasure is one measurement line.
type rigMeasure map[string]float64

// readRig reads the bench lines of a rig console log, keyed by backend,
// scenario and policy ("type1 roundtrip granule").
func readRig(r io.Reader) (map[string]rigMeasure, []string, error) {
	out := map[string]rigMeasure{}
	var backends []string
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
			return nil, nil, fmt.Errorf("line %d: bench line without backend, scenario and policy: %q", n, line)
		}
		m := rigMeasure{}
		for _, kv := range f[3:] {
			k, v, ok := strings.Cut(kv, "=")
			x, err := strconv.ParseFloat(v, 64)
			// Counts and times: a NaN, an infinity or a negative value is
			// a damaged line (and a NaN cannot be written as JSON).
			if !ok || err != nil || math.IsNaN(x) || math.IsInf(x, 0) || x < 0 {
				return nil, nil, fmt.Errorf("line %d: %q is not key=number (finite, not negative)", n, kv)
			}
			m[k] = x
		}
		key := strings.Join(f[:3], " ")
		if _, dup := out[key]; dup {
			return nil, nil, fmt.Errorf("line %d: second measurement of %s", n, key)
		}
		out[key] = m
		if !slices.Contains(backends, f[0]) {
			backends = append(backends, f[0])
		}
	}
	if err := sc.Err(); err != nil {
		return nil, nil, err
	}
	if len(out) == 0 {
		return nil, nil, fmt.Errorf("no %q lines: was the rig run with --bench?", strings.TrimSpace(rigMarker))
	}
	return out, backends, nil
}

// rigRows turns the rig's measurements into rows: granule (the baseline)
// against extent (gmem) on each real driver. Each is a single run inside a
// TCG guest, where the absolute times mean little and the ratio is what
// carries over.
func rigRows(ms map[string]rigMeasure, backends []string) ([]bench.Row, error) {
	var rows []bench.Row
	for _, b := range backends {
		get := func(scenario, key string) (g, e float64, err error) {
			gm, ok1 := ms[b+" "+scenario+" granule"]
			em, ok2 := ms[b+" "+scenario+" extent"]
			if !ok1 || !ok2 {
				return 0, 0, fmt.Errorf("rig log: %s %s lacks the granule or the extent run", b, scenario)
			}
			g, ok1 = gm[key]
			e, ok2 = em[key]
			if !ok1 || !ok2 {
				return 0, 0, fmt.Errorf("rig log: %s %s lacks %s", b, scenario, key)
			}
			return g, e, nil
		}
		src := "rig " + b + ", TCG guest"
		gBytes, _, err := get("roundtrip", "bytes")
		if err != nil {
			return nil, err
		}
		rt := trace.FormatSize(uint64(gBytes)) + ", real " + b + ", TCG guest"
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
		rows = append(rows, bench.Row{Name: "rig " + b + ": 4 KiB churn time", Unit: "ns/op", Baseline: g / ops, Gmem: e / ops, Better: "lower",
			Scale: fmt.Sprintf("%s conversions in %s, real %s, TCG guest", commas(uint64(ops)), trace.FormatSize(uint64(gBytes)), b), Source: src,
			Note: "random single-page conversions on the real driver, timed inside a TCG guest (one run each): only the ratio is meaningful"})
	}
	for i := range rows {
		rows[i].Ratio = bench.Improvement(rows[i])
	}
	return rows, nil
}
