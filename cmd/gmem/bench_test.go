package main

import (
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/gmemproject/gmem/dma"
)

func TestBenchQuickJSON(t *testing.T) {
	if testing.Short() {
		t.Skip("bench --quick takes seconds; skipped in -short")
	}
	code, out, errOut := runCmd(context.Background(), "bench", "--quick", "--json")
	if code != exitOK || errOut != "" {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	var rep struct {
		Rows []struct {
			Name     string    `json:"name"`
			Unit     string    `json:"unit"`
			Baseline float64   `json:"baseline"`
			Gmem     float64   `json:"gmem"`
			Ratio    *float64  `json:"ratio"`
			Better   string    `json:"better"`
			Note     string    `json:"note"`
			Rounds   int       `json:"rounds"`
			BRange   []float64 `json:"baseline_range"`
			GRange   []float64 `json:"gmem_range"`
			BIQR     []float64 `json:"baseline_iqr"`
			GIQR     []float64 `json:"gmem_iqr"`
			Spread   *float64  `json:"spread"`
			Noisy    *bool     `json:"noisy"`
			How      string    `json:"baseline_how"`
			ToFloor  float64   `json:"to_floor"`
		} `json:"rows"`
		Quick     bool    `json:"quick"`
		Rounds    int     `json:"rounds"`
		MaxSpread float64 `json:"max_spread"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	units := map[string]string{
		"state memory, realistic":                 "bytes",
		"state memory, adversarial":               "bytes",
		"listener replay":                         "ns",
		"4 KiB churn time":                        "ns/op",
		"4 KiB churn map calls":                   "calls/op",
		"4 KiB churn among runs time":             "ns/op",
		"4 KiB churn among runs map calls":        "calls/op",
		"round trip map calls":                    "calls",
		"round trip time":                         "ns",
		"floor: granule round trip time":          "ns",
		"floor: extent round trip time":           "ns",
		"floor: extent-unbounded round trip time": "ns",
		"floor: cut round trip time":              "ns",
		"floor: round trip pinned pages":          "pages",
		"parallel conversions":                    "ops/s",
		"boot DMA entries peak, 16GiB guest":      "entries",
		"boot DMA entries peak, 1TiB guest":       "entries",
		"split: re-pinned by one cut":             "bytes",
		"split: window of one cut":                "bytes",
		"split trace: window":                     "bytes",
		"split trace: entries peak":               "entries",
		"scale: state memory, realistic":          "bytes",
		"scale: listener replay":                  "ns",
		"scale: 4 KiB churn time":                 "ns/op",
	}
	got := map[string]float64{}
	for _, r := range rep.Rows {
		if want, ok := units[r.Name]; !ok || r.Unit != want {
			t.Errorf("row %q in %q: unexpected (want unit %q)", r.Name, r.Unit, want)
		}
		if strings.HasPrefix(r.Name, "split") {
			continue // costs the baseline never has; TestBenchSplit checks them
		}
		if r.How == "not run" {
			// gmem alone: no baseline, no ratio.
			if r.Baseline != 0 || r.Ratio != nil || r.Gmem <= 0 || len(r.BRange) != 0 || len(r.BIQR) != 0 || r.Rounds != rep.Rounds {
				t.Errorf("row %q without baseline: baseline %v ratio %v gmem %v", r.Name, r.Baseline, r.Ratio, r.Gmem)
			}
			continue
		}
		if r.How == "floor" {
			// The floor is no algorithm gmem competes with: no ratio, and
			// to_floor is how many times the floor's time gmem took.
			if r.Baseline <= 0 || r.Gmem <= 0 || r.Ratio != nil || math.Abs(r.ToFloor-r.Gmem/r.Baseline) > 1e-9*r.ToFloor {
				t.Errorf("floor row %q: baseline %v gmem %v ratio %v to_floor %v", r.Name, r.Baseline, r.Gmem, r.Ratio, r.ToFloor)
			}
			continue
		}
		if r.Baseline <= 0 || r.Gmem <= 0 || r.Ratio == nil || *r.Ratio <= 0 || r.Note == "" {
			t.Errorf("row %q: baseline %v gmem %v ratio %v note %q", r.Name, r.Baseline, r.Gmem, r.Ratio, r.Note)
			continue
		}
		want := r.Baseline / r.Gmem
		switch r.Better {
		case "lower":
		case "higher":
			want = r.Gmem / r.Baseline
		default:
			t.Errorf("row %q: better %q", r.Name, r.Better)
		}
		if math.Abs(*r.Ratio-want) > 1e-9*want {
			t.Errorf("row %q: ratio %v, want %v", r.Name, *r.Ratio, want)
		}
		got[r.Name+"/b"], got[r.Name+"/g"] = r.Baseline, r.Gmem
		if r.Spread == nil || r.Noisy == nil {
			t.Errorf("row %q: no spread or noisy field", r.Name)
			continue
		}
		if r.Unit == "ns" || r.Unit == "ns/op" || r.Unit == "ops/s" {
			// Timed: medians inside their quartiles, quartiles inside the
			// ranges, the spread computed from the quartiles, noisy exactly
			// when the spread passes the bound.
			if r.Rounds != rep.Rounds || len(r.BRange) != 2 || len(r.GRange) != 2 || len(r.BIQR) != 2 || len(r.GIQR) != 2 {
				t.Errorf("row %q: rounds %d (report %d), ranges %v %v, quartiles %v %v", r.Name, r.Rounds, rep.Rounds, r.BRange, r.GRange, r.BIQR, r.GIQR)
				continue
			}
			inOrder := func(xs ...float64) bool { return slices.IsSorted(xs) }
			if !inOrder(r.BRange[0], r.BIQR[0], r.Baseline, r.BIQR[1], r.BRange[1]) || !inOrder(r.GRange[0], r.GIQR[0], r.Gmem, r.GIQR[1], r.GRange[1]) {
				t.Errorf("row %q: median, quartiles and range out of order: %v %v %v, %v %v %v", r.Name, r.BRange, r.BIQR, r.Baseline, r.GRange, r.GIQR, r.Gmem)
			}
			want := max((r.BIQR[1]-r.BIQR[0])/r.Baseline, (r.GIQR[1]-r.GIQR[0])/r.Gmem)
			if math.Abs(*r.Spread-want) > 1e-9*want || *r.Noisy != (*r.Spread > rep.MaxSpread) {
				t.Errorf("row %q: spread %v noisy %v, want %v against bound %v", r.Name, *r.Spread, *r.Noisy, want, rep.MaxSpread)
			}
		} else if r.Rounds != 0 || *r.Spread != 0 || *r.Noisy {
			t.Errorf("counted row %q: rounds %d spread %v noisy %v", r.Name, r.Rounds, *r.Spread, *r.Noisy)
		}
	}
	if len(rep.Rows) != len(units) || !rep.Quick {
		t.Errorf("%d rows, quick %v; want %d rows", len(rep.Rows), rep.Quick, len(units))
	}
	// Values computed by hand for the quick sizes: a bitmap of 1 TiB is
	// 2^28 pages / 8 = 32 MiB, of 1 GiB 32 KiB; 64 MiB to shared and back is
	// 16,384 granules against one extent; single pages map once either way.
	for k, want := range map[string]float64{
		"state memory, realistic/b":   32 << 20,
		"state memory, adversarial/b": 32 << 10,
		"round trip map calls/b":      16384,
		"round trip map calls/g":      float64(64<<20) / dma.DefaultMaxExtent, // one entry per chunk
		// 64 MiB pinned whatever the policy, the floor's one call too.
		"floor: round trip pinned pages/b": 16384,
		"floor: round trip pinned pages/g": 16384,
		// 64 TiB is 2^34 pages: a 2 GiB bitmap.
		"scale: state memory, realistic/b": 2 << 30,
	} {
		if got[k] != want {
			t.Errorf("%s = %v, want %v", k, got[k], want)
		}
	}
	for _, name := range []string{"4 KiB churn map calls", "4 KiB churn among runs map calls"} {
		if b, g := got[name+"/b"], got[name+"/g"]; b != g || b == 0 {
			t.Errorf("%s: baseline %v, gmem %v; want equal and above 0", name, b, g)
		}
	}
	// The baseline maps the swiotlb pool page by page: at least 64 MiB / 4 KiB.
	if b := got["boot DMA entries peak, 16GiB guest/b"]; b < 16384 {
		t.Errorf("boot 16 GiB baseline peak %v", b)
	}
}

func TestBenchUsage(t *testing.T) {
	ctx := context.Background()
	if code, _, errOut := runCmd(ctx, "bench", "extra"); code != exitUsage || !strings.Contains(errOut, `unexpected argument "extra"`) {
		t.Errorf("bench extra: exit %d, %q", code, errOut)
	}
	if code, _, errOut := runCmd(ctx, "bench", "--nope"); code != exitUsage || !strings.Contains(errOut, "not defined") {
		t.Errorf("bench --nope: exit %d, %q", code, errOut)
	}
	if code, _, errOut := runCmd(ctx, "bench", "--rounds", "-1"); code != exitUsage || !strings.Contains(errOut, "--rounds") {
		t.Errorf("bench --rounds -1: exit %d, %q", code, errOut)
	}
	if code, _, errOut := runCmd(ctx, "bench", "--only", "nope"); code != exitUsage || !strings.Contains(errOut, `unknown scenario "nope"`) {
		t.Errorf("bench --only nope: exit %d, %q", code, errOut)
	}
	if code, out, errOut := runCmd(ctx, "bench", "--quick", "--only", "state,roundtrip"); code != exitOK || !strings.Contains(out, "round trip map calls") || strings.Contains(out, "boot") {
		t.Errorf("bench --only state,roundtrip: exit %d, %q %q", code, out, errOut)
	}
	if code, _, errOut := runCmd(ctx, "bench", "--quick", "--only", "state", "--cpuprofile", filepath.Join(t.TempDir(), "no", "such", "dir")); code != exitUsage || !strings.Contains(errOut, "no such file") {
		t.Errorf("bench --cpuprofile in a missing folder: exit %d, %q", code, errOut)
	}
	prof := filepath.Join(t.TempDir(), "cpu.pprof")
	if code, _, errOut := runCmd(ctx, "bench", "--quick", "--only", "churn", "--cpuprofile", prof); code != exitOK {
		t.Errorf("bench --cpuprofile: exit %d, %q", code, errOut)
	} else if fi, err := os.Stat(prof); err != nil || fi.Size() == 0 {
		t.Errorf("bench --cpuprofile wrote no profile: %v", err)
	}
	if code, out, _ := runCmd(ctx, "bench", "-h"); code != exitOK || !strings.Contains(out, "usage: gmem bench") {
		t.Errorf("bench -h: exit %d, %q", code, out)
	}
	ctx, cancel := context.WithCancel(ctx)
	cancel()
	if code, _, errOut := runCmd(ctx, "bench", "--quick"); code != exitFail || !strings.Contains(errOut, "interrupted") {
		t.Errorf("cancelled bench: exit %d, %q", code, errOut)
	}
}
