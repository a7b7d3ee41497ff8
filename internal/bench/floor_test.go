package bench

import (
	"math"
	"strings"
	"testing"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
)

// TestFloorModel checks the floor rows on a cutting model: the map calls
// each side made (one for the floor and the unbounded extent, one a
// granule, one a 2 MiB chunk for extents and cuts), the same pages pinned
// on every side, and a row per policy against the floor, the cut policy
// the default.
func TestFloorModel(t *testing.T) {
	const size = 64 << 20
	model := iommu.NewModelSpan(iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}, 2*size)
	rig := FloorRig{Space: model, Size: size, Pinned: func() (uint64, error) {
		p := model.Pins()
		return p.Pinned - p.Unpinned, nil
	}}
	res, err := rig.Measure(3, true, FloorSides(model.Caps()))
	if err != nil {
		t.Fatal(err)
	}
	wantCalls := map[string]uint64{"one-map": 1, "granule": size / page, "extent": size / dma.DefaultMaxExtent, "extent-unbounded": 1,
		"cut": size / dma.DefaultMaxExtent}
	if len(res) != 5 {
		t.Fatalf("%d sides, want the floor and four policies", len(res))
	}
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
	if len(rows) != 5 {
		t.Fatalf("%d rows, want 4 policies and the pinned pages", len(rows))
	}
	for _, r := range rows[:4] {
		if r.Baseline != res[0].Time.Median || r.Rounds != 3 || !math.IsNaN(r.Ratio) || r.BaselineHow != Floor ||
			math.Abs(r.ToFloor-r.Gmem/r.Baseline) > 1e-9*r.ToFloor || !strings.Contains(r.Note, "the floor's time") {
			t.Errorf("row %+v", r)
		}
	}
	if p := rows[4]; p.Baseline != size/page || p.Gmem != size/page || !strings.Contains(rows[3].Note, "default") || strings.Contains(rows[1].Note, "default") {
		t.Errorf("pinned row %+v, notes %q, %q", p, rows[1].Note, rows[3].Note)
	}
	// Without cutting, the extent policy is the default and cut is no side.
	sides := FloorSides(iommu.Caps{Rules: iommu.Type1v2})
	if len(sides) != 4 || !sides[2].Default || sides[2].Name != "extent" {
		t.Errorf("sides on type1: %+v", sides)
	}
}

// TestFloorPinsChecked: a round that leaves pages pinned, or sides that
// pin different pages, fail the measurement.
func TestFloorPinsChecked(t *testing.T) {
	const size = 4 << 20
	model := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
	calls := uint64(0)
	leaky := FloorRig{Space: model, Size: size, Pinned: func() (uint64, error) { calls++; return calls, nil }}
	if _, err := leaky.Measure(1, false, FloorSides(model.Caps())[:1]); err == nil || !strings.Contains(err.Error(), "pinned before") {
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
