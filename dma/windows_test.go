package dma

import (
	"testing"

	"github.com/gmemproject/gmem/iommu"
)

// TestWindows checks the size of a mapper's lock windows: 64 MiB, the
// bound if larger, a 64th of the region (RegionSize, or the host memory's
// length) if larger still, and one window for an unbounded mapper.
func TestWindows(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opts  Options
		host  []byte
		shift uint
	}{
		{"default", Options{}, nil, 26},
		{"small region", Options{RegionSize: 1 << 30}, nil, 26},
		{"16 GiB region", Options{RegionSize: 16 << 30}, nil, 28},
		{"region past a power of two", Options{RegionSize: 16<<30 + 4096}, nil, 29},
		{"64 TiB region", Options{RegionSize: 64 << 40}, nil, 40},
		{"host memory", Options{}, make([]byte, 8<<20), 26},
		{"bound above the region's share", Options{MaxExtent: 1 << 30, RegionSize: 16 << 30}, nil, 30},
		{"unbounded", Options{MaxExtent: Unbounded, RegionSize: 16 << 30}, nil, 64},
		{"granule", Options{Policy: Granule, RegionSize: 16 << 30}, nil, 28},
	} {
		m, err := New(iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD}), tc.host, tc.opts)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if m.shift != tc.shift {
			t.Errorf("%s: windows of 2^%d bytes, want 2^%d", tc.name, m.shift, tc.shift)
		}
	}
}
