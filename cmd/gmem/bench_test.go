package main

import (
	"context"
	"encoding/json"
	"math"
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
			Name     string   `json:"name"`
			Unit     string   `json:"unit"`
			Baseline float64  `json:"baseline"`
			Gmem     float64  `json:"gmem"`
			Ratio    *float64 `json:"ratio"`
			Better   string   `json:"better"`
			Note     string   `json:"note"`
		} `json:"rows"`
		Quick bool `json:"quick"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	units := map[string]string{
		"state memory, realistic":            "bytes",
		"state memory, adversarial":          "bytes",
		"listener replay":                    "ns",
		"4 KiB churn time":                   "ns/op",
		"4 KiB churn map calls":              "calls/op",
		"round trip map calls":               "calls",
		"round trip time":                    "ns",
		"parallel conversions":               "ops/s",
		"boot DMA entries peak, 16GiB guest": "entries",
		"boot DMA entries peak, 1TiB guest":  "entries",
		"split: re-pinned by one cut":        "bytes",
		"split: window of one cut":           "bytes",
		"split trace: window":                "bytes",
		"split trace: entries peak":          "entries",
	}
	got := map[string]float64{}
	for _, r := range rep.Rows {
		if want, ok := units[r.Name]; !ok || r.Unit != want {
			t.Errorf("row %q in %q: unexpected (want unit %q)", r.Name, r.Unit, want)
		}
		if strings.HasPrefix(r.Name, "split") {
			continue // costs the baseline never has; TestBenchSplit checks them
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
	} {
		if got[k] != want {
			t.Errorf("%s = %v, want %v", k, got[k], want)
		}
	}
	if b, g := got["4 KiB churn map calls/b"], got["4 KiB churn map calls/g"]; b != g {
		t.Errorf("4 KiB churn map calls: baseline %v, gmem %v; want equal", b, g)
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
	if code, out, _ := runCmd(ctx, "bench", "-h"); code != exitOK || !strings.Contains(out, "usage: gmem bench") {
		t.Errorf("bench -h: exit %d, %q", code, out)
	}
	ctx, cancel := context.WithCancel(ctx)
	cancel()
	if code, _, errOut := runCmd(ctx, "bench", "--quick"); code != exitFail || !strings.Contains(errOut, "interrupted") {
		t.Errorf("cancelled bench: exit %d, %q", code, errOut)
	}
}
