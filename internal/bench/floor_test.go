package bench

import (
	"strings"
	"testing"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
)

// TestFloorModel checks the floor rows on the model: the map calls each
// side made (one for the floor and the unbounded extent, one a granule,
// one a 2 MiB chunk), the same pages pinned on every side, and a row per
// policy against the floor.
func TestFloorModel(t *testing.T) {
	const size = 64 << 20
	model := iommu.NewModelSpan(iommu.Caps{Rules: iommu.IOMMUFD}, 2*size)
	rig := FloorRig{Space: model, Size: size, Pinned: func() (uint64, error) {
		p := model.Pins()
		return p.Pinned - p.Unpinned, nil
	}}
	res, err := rig.Measure(3, true, FloorSides())
	if err != nil {
		t.Fatal(err)
	}
	wantCalls := map[string]uint64{"one-map": 1, "granule": size / page, "extent": size / dma.DefaultMaxExtent, "extent-unbounded": 1}
	for _, r := range res {
		if len(r.Samples) != 3 {
			t.Errorf("%s: %d samples, want 3 (the warm-up left out)", r.Side.Name, len(r.Samples))
		}
		for _, s := range r.Samples {
			if s.MapCalls != wantCalls[r.Side.Name] || s.UnmapCalls == 0 || s.Pinned != size/page {
				t.Errorf("%s: %+v, want %d map calls and %d pages pinned", r.Side.Name, s, wantCalls[r.Side.Name], size/page)
			}
		}
		if r.Time.Median <= 0 {
			t.Errorf("%s: median %v", r.Side.Name, r.Time.Median)
		}
	}
	if model.Len() != 0 {
		t.Errorf("%d mappings left", model.Len())
	}
	rows := FloorRows(res, FloorWhere{Scale: "64MiB, model IOMMU", Space: "the model IOMMU"})
	if len(rows) != 4 {
		t.Fatalf("%d rows, want 3 policies and the pinned pages", len(rows))
	}
	for _, r := range rows[:3] {
		if r.Baseline != res[0].Time.Median || r.Rounds != 3 || r.Ratio != Improvement(r) || !strings.Contains(r.Note, "the floor's time") {
			t.Errorf("row %+v", r)
		}
	}
	if p := rows[3]; p.Baseline != size/page || p.Gmem != size/page || !strings.Contains(rows[1].Note, "default") {
		t.Errorf("pinned row %+v, default note %q", p, rows[1].Note)
	}
}

// TestFloorPinsChecked: a round that leaves pages pinned, or sides that
// pin different pages, fail the measurement.
func TestFloorPinsChecked(t *testing.T) {
	const size = 4 << 20
	model := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
	calls := uint64(0)
	leaky := FloorRig{Space: model, Size: size, Pinned: func() (uint64, error) { calls++; return calls, nil }}
	if _, err := leaky.Measure(1, false, FloorSides()[:1]); err == nil || !strings.Contains(err.Error(), "pinned before") {
		t.Errorf("pins left behind: %v", err)
	}
	// The floor's three readings are true; the policy's reading while it
	// has the range mapped says half the pages.
	reads := 0
	halving := FloorRig{Space: model, Size: size, Pinned: func() (uint64, error) {
		p := model.Pins()
		n := p.Pinned - p.Unpinned
		if reads++; reads > 3 {
			n /= 2
		}
		return n, nil
	}}
	sides := []FloorSide{{Name: "one-map", Floor: true}, {Name: "extent"}}
	if _, err := halving.Measure(1, false, sides); err == nil || !strings.Contains(err.Error(), "extent pinned 512 pages, one-map 1024") {
		t.Errorf("sides pinning differently: %v", err)
	}
}
