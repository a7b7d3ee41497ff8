package dma_test

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
)

// TestReserveUnderConcurrency drives vCPUs that each share a 4-page buffer,
// make its middle page private (a split: one more entry) and then the rest
// (the entries go), on a type1 table of 24 entries that a filler has brought
// close to where populates are refused. A populate may be refused; a
// conversion to private never is: populates stop SplitReserve entries short
// of the limit, and with one split outstanding per vCPU at most, a reserve
// of one entry per vCPU always holds the entry a split needs. Without the
// reserve the same run refuses conversions to private as soon as the table
// fills; that count is logged, not asserted, as it depends on scheduling.
func TestReserveUnderConcurrency(t *testing.T) {
	const (
		limit  = 24
		vcpus  = 8
		rounds = 300
		lane   = 64 * pg
		filler = vcpus * lane // the filler's pages lie above the lanes
	)
	run := func(reserve uint64) (refusedPrivate, refusedShared, cuts uint64) {
		model := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2, EntryLimit: limit})
		mgr := discard.New(filler+64*pg, nil)
		attrs, err := memattr.New(mgr, memattr.Config{})
		if err != nil {
			t.Fatal(err)
		}
		m, err := dma.New(model, nil, dma.Options{SplitReserve: reserve})
		if err != nil {
			t.Fatal(err)
		}
		if err := mgr.Register(m, discard.Section{Size: filler + 64*pg, GPA: gpa}); err != nil {
			t.Fatal(err)
		}
		// Filler: single pages, leaving room for four buffers before
		// populates are refused.
		r := min(reserve, limit)
		if reserve == dma.NoReserve {
			r = 0
		}
		for i := uint64(0); i < limit-r-4; i++ {
			if err := attrs.Convert(filler+2*i*pg, pg, memattr.Shared); err != nil {
				t.Fatalf("filler page %d: %v", i, err)
			}
		}
		var rp, rs, c atomic.Uint64
		var wg sync.WaitGroup
		for v := range uint64(vcpus) {
			wg.Go(func() {
				for i := range uint64(rounds) {
					buf := v*lane + (i%8)*8*pg
					if err := attrs.Convert(buf, 4*pg, memattr.Shared); err != nil {
						if !errors.Is(err, unix.ENOSPC) {
							t.Errorf("vcpu %d: share: %v", v, err)
						}
						rs.Add(1)
						continue
					}
					if err := attrs.Convert(buf+pg, pg, memattr.Private); err != nil {
						if !errors.Is(err, unix.ENOSPC) {
							t.Errorf("vcpu %d: cut: %v", v, err)
						}
						rp.Add(1)
					} else {
						c.Add(1)
					}
					// Whole remainders only: gives entries back, never
					// splits.
					if err := attrs.Convert(buf, 4*pg, memattr.Private); err != nil {
						if !errors.Is(err, unix.ENOSPC) {
							t.Errorf("vcpu %d: free: %v", v, err)
						}
						rp.Add(1)
					}
				}
			})
		}
		wg.Wait()
		if got := model.Len(); got != limit-int(r)-4 {
			t.Errorf("reserve %d: %d entries left, want the filler's %d", reserve, got, limit-int(r)-4)
		}
		return rp.Load(), rs.Load(), c.Load()
	}
	rp, rs, cuts := run(vcpus)
	if rp != 0 {
		t.Errorf("with a reserve of %d: %d conversions to private refused", vcpus, rp)
	}
	if cuts == 0 || rs == 0 {
		t.Errorf("with a reserve: %d splits, %d refused populates; the run did not reach the limit", cuts, rs)
	}
	t.Logf("reserve %d: %d splits, %d populates refused, %d conversions to private refused", vcpus, cuts, rs, rp)
	rp, rs, cuts = run(dma.NoReserve)
	t.Logf("no reserve: %d splits, %d populates refused, %d conversions to private refused", cuts, rs, rp)
}
