package invariant_test

import (
	"math/rand/v2"
	"testing"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
)

// TestConvertAllocs checks that a single-page conversion to shared and back
// through the whole stack (attributes, manager, a mapper of each policy,
// cut included, and the model IOMMU) allocates nothing once warm: every allocation on this
// path is garbage the collector must chase, and with several vCPUs
// converting it takes the cores they would use.
func TestConvertAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector makes sync.Pool drop items: allocation counts do not hold")
	}
	const size = 1 << 30
	for _, policy := range []dma.Policy{dma.Extent, dma.Granule, dma.Cut} {
		m := discard.New(size, nil)
		a, err := memattr.New(m, memattr.Config{})
		if err != nil {
			t.Fatal(err)
		}
		caps := iommu.Caps{Rules: iommu.IOMMUFD, Cut: policy == dma.Cut}
		mp, err := dma.New(iommu.NewModelSpan(caps, size), nil, dma.Options{Policy: policy, RegionSize: size})
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Register(mp, discard.Section{Size: size}); err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(1, 2))
		roundTrip := func() {
			off := rng.Uint64N(size/page) * page
			if err := a.Convert(off, page, memattr.Shared); err != nil {
				t.Fatal(err)
			}
			if err := a.Convert(off, page, memattr.Private); err != nil {
				t.Fatal(err)
			}
		}
		for range 1000 {
			roundTrip()
		}
		if n := testing.AllocsPerRun(2000, roundTrip); n != 0 {
			t.Errorf("%v: %v allocations per single-page round trip, want 0", policy, n)
		}
		if st := mp.Stats(); st.Entries != 0 || st.MapCalls < 3000 {
			t.Errorf("%v: %d entries left, %d map calls", policy, st.Entries, st.MapCalls)
		}
	}
}
