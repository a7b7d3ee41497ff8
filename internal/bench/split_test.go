package bench

import (
	"testing"

	"github.com/gmemproject/gmem/dma"
)

// TestSplit checks the split rows against values computed by hand: a
// 4 KiB cut in the middle of a 64 MiB extent re-pins and hides the rest of
// its 2 MiB chunk under the bound, nothing with granule entries; over the
// trace, no bounded window exceeds two chunks, and the bound costs entries
// the baseline needs many more of.
func TestSplit(t *testing.T) {
	if testing.Short() {
		t.Skip("replays a generated trace; skipped in -short")
	}
	rows, err := Split(QuickSizes)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]Row{}
	for _, r := range rows {
		got[r.Name] = r
	}
	const chunkRest = dma.DefaultMaxExtent - page
	for _, name := range []string{"split: re-pinned by one cut", "split: window of one cut"} {
		if r := got[name]; r.Baseline != 0 || r.Gmem != chunkRest {
			t.Errorf("%s: baseline %v gmem %v, want 0 and %v", name, r.Baseline, r.Gmem, chunkRest)
		}
	}
	if r := got["split trace: window"]; r.Baseline != 0 || r.Gmem <= 0 {
		t.Errorf("trace window: baseline %v gmem %v", r.Baseline, r.Gmem)
	}
	if r := got["split trace: entries peak"]; r.Gmem <= 0 || r.Gmem >= r.Baseline {
		t.Errorf("trace entries peak: baseline %v gmem %v", r.Baseline, r.Gmem)
	}
	if len(rows) != 4 {
		t.Errorf("%d rows, want 4", len(rows))
	}
}
