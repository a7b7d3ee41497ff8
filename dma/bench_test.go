package dma_test

import (
	"testing"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
)

// BenchmarkSplit times one split of a 2 MiB extent on the model IOMMU, both
// ways in the same run (compare with benchstat -col /side): "extent" unmaps
// the entry and maps its two remainders (the bounded extent on iommufd
// without cuts), "cut" sends one cut request and leaves the remainders in
// place. Every iteration discards
// one page from the middle of an entry: page 1, 3, 5, ... of each 2 MiB
// extent of a 1 GiB region in turn, so the entry it cuts is the rest of the
// extent from the page before. What the model measures (window and
// re-pinned bytes, IOMMU calls) is reported per split.
func BenchmarkSplit(b *testing.B) {
	const (
		extent  = dma.DefaultMaxExtent
		extents = 512
		region  = extents * extent
		rounds  = extent/pg/2 - 1 // odd pages 1 .. 509 of each extent
	)
	for _, side := range []struct {
		name string
		caps iommu.Caps
	}{
		{"side=extent", iommu.Caps{Rules: iommu.IOMMUFD}},
		{"side=cut", iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}},
	} {
		b.Run(side.name, func(b *testing.B) {
			model := iommu.NewModelSpan(side.caps, region)
			m, err := dma.New(model, nil, dma.Options{RegionSize: region})
			if err != nil {
				b.Fatal(err)
			}
			if got := "side=" + m.Policy().String(); got != side.name {
				b.Fatalf("policy %s, want %s", got, side.name)
			}
			whole := discard.Section{Size: region}
			fill := func() {
				for j := range uint64(extents) {
					s := discard.Section{Offset: j * extent, Size: extent, GPA: j * extent}
					if err := m.Populate(s); err != nil {
						b.Fatal(err)
					}
					m.Settle(s)
				}
			}
			fill()
			// reset counts what refilling the region costs, to take it
			// out of the splits' counts.
			var reset dma.Stats
			before := m.Stats()
			i := 0
			for b.Loop() {
				if i == extents*rounds {
					b.StopTimer()
					st := m.Stats()
					if err := m.Discard(whole); err != nil {
						b.Fatal(err)
					}
					m.Settle(whole)
					fill()
					after := m.Stats()
					reset.MapCalls += after.MapCalls - st.MapCalls
					reset.UnmapCalls += after.UnmapCalls - st.UnmapCalls
					reset.CutCalls += after.CutCalls - st.CutCalls
					i = 0
					b.StartTimer()
				}
				j, k := uint64(i%extents), uint64(i/extents)
				off := j*extent + (2*k+1)*pg
				s := discard.Section{Offset: off, Size: pg, GPA: off}
				if err := m.Discard(s); err != nil {
					b.Fatal(err)
				}
				m.Settle(s)
				i++
			}
			st := m.Stats()
			if st.Splits == before.Splits {
				b.Fatal("no split")
			}
			n := float64(b.N)
			calls := st.MapCalls + st.UnmapCalls + st.CutCalls - before.MapCalls - before.UnmapCalls - before.CutCalls -
				reset.MapCalls - reset.UnmapCalls - reset.CutCalls
			b.ReportMetric(float64(calls)/n, "calls/split")
			b.ReportMetric(float64(st.WindowBytes-before.WindowBytes)/n, "window-B/split")
			b.ReportMetric(float64(st.RepinnedBytes-before.RepinnedBytes)/n, "repinned-B/split")
		})
	}
}
