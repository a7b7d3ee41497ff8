package guestmem_test

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
)

// TestCheckWhileConverting calls Check in a loop while goroutines convert
// pages (within a block and across two), plug and unplug: every answer
// must be nil, since the executor keeps the invariants at every moment a
// caller can observe. Check compares the mappers' bookkeeping and the
// model's table, both read with the operations held off.
func TestCheckWhileConverting(t *testing.T) {
	cfg := testLayout
	cfg.Blocks = append(cfg.Blocks[:len(cfg.Blocks):len(cfg.Blocks)], guestmem.BlockConfig{Name: "vmem", GPA: 8 * mib, Size: 8 * mib, Hotplug: 2 * mib})
	mem, err := guestmem.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	_, type1 := attachModel(t, mem, iommu.Caps{Rules: iommu.Type1v2}, dma.Options{MaxExtent: 16 * page})
	_, iommufd := attachModel(t, mem, iommu.Caps{Rules: iommu.IOMMUFD}, dma.Options{Policy: dma.Granule})
	atts := []*guestmem.Attachment{type1, iommufd}
	var stop atomic.Bool
	var ops atomic.Uint64
	var wg sync.WaitGroup
	// Two goroutines in their own block, one across lo and mid.
	for g, base := range []uint64{0, 3 * mib, mib - 32*page} {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			for !stop.Load() {
				to := memattr.State(rng.IntN(2))
				gpa := base + uint64(rng.IntN(64))*page
				mem.Convert(guestmem.Request{GPA: gpa, Size: uint64(1+rng.IntN(8)) * page, To: to})
				ops.Add(1)
			}
		})
	}
	wg.Go(func() {
		rng := rand.New(rand.NewPCG(9, 1))
		for !stop.Load() {
			gpa := 8*mib + uint64(rng.IntN(4))*2*mib
			if rng.IntN(2) == 0 {
				mem.Plug(gpa, 2*mib)
			} else {
				mem.Unplug(gpa, 2*mib)
			}
			mem.Convert(guestmem.Request{GPA: gpa, Size: 4 * page, To: memattr.Shared})
			ops.Add(1)
		}
	})
	bad := 0
	calls := 2000
	if testing.Short() {
		calls = 400
	}
	for i := range calls {
		if err := atts[i%len(atts)].Check(); err != nil {
			if bad == 0 {
				t.Error(err)
			}
			bad++
		}
	}
	stop.Store(true)
	wg.Wait()
	if bad != 0 {
		t.Errorf("%d of %d checks reported a violation (%d operations ran)", bad, calls, ops.Load())
	}
	for _, att := range atts {
		if err := att.Check(); err != nil {
			t.Errorf("quiescent: %v", err)
		}
	}
}
