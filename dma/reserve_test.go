package dma_test

import (
	"errors"
	"math/rand/v2"
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
// to one entry short of where populates are refused: every buffer takes the
// last entry populates may use, so every split takes one of the reserve,
// however the vCPUs are scheduled. A populate may be refused; a
// conversion to private never is: populates stop SplitReserve entries short
// of the limit, and with one split outstanding per vCPU at most, a reserve
// of one entry per vCPU always holds the entry a split needs. Without the
// reserve the same run refuses conversions to private (how many depends on
// scheduling; that some are is certain, since every cut meets a full table).
func TestReserveUnderConcurrency(t *testing.T) {
	const (
		limit  = 24
		vcpus  = 8
		rounds = 300
		lane   = 64 * pg
		filler = vcpus * lane // the filler's pages lie above the lanes
	)
	run := func(reserve uint64) (refusedPrivate, refusedShared, cuts, peak uint64) {
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
		// Filler: single pages, leaving room for one buffer before
		// populates are refused.
		r := min(reserve, limit)
		if reserve == dma.NoReserve {
			r = 0
		}
		for i := uint64(0); i < limit-r-1; i++ {
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
		if got := model.Len(); got != limit-int(r)-1 {
			t.Errorf("reserve %d: %d entries left, want the filler's %d", reserve, got, limit-int(r)-1)
		}
		return rp.Load(), rs.Load(), c.Load(), m.Stats().PeakEntries
	}
	rp, rs, cuts, peak := run(vcpus)
	if rp != 0 {
		t.Errorf("with a reserve of %d: %d conversions to private refused", vcpus, rp)
	}
	// The splits must have needed the reserve: more entries at once than
	// populates may take.
	if cuts == 0 || peak <= limit-vcpus {
		t.Errorf("with a reserve: %d splits, peak %d entries; the run did not reach into the reserve (%d)", cuts, peak, limit-vcpus)
	}
	t.Logf("reserve %d: %d splits, peak %d entries, %d populates refused, %d conversions to private refused", vcpus, cuts, peak, rs, rp)
	rp, rs, cuts, peak = run(dma.NoReserve)
	t.Logf("no reserve: %d splits, peak %d entries, %d populates refused, %d conversions to private refused", cuts, peak, rs, rp)
	// Without it, the table is full whenever a buffer is shared, and the cut
	// finds no entry.
	if rp == 0 {
		t.Errorf("no reserve: no conversion to private refused; the run did not fill the table")
	}
}

// TestReserveUserWorkload replays, deterministically, the workload a new
// user tried on a type1 table of 200 entries: 8 vCPUs (taking turns, each
// with its own generator and 64 MiB lane), 3,000 conversions each of 4 KiB
// to 4 MiB, aligned, to a random state. Without the reserve conversions to
// private are refused once the table fills; with the default reserve, none
// is, bounded extents or not. The counts are logged.
func TestReserveUserWorkload(t *testing.T) {
	const (
		vcpus = 8
		lane  = 64 << 20
		limit = 200
	)
	run := func(reserve, maxExtent uint64) (refusedPrivate, refusedShared uint64) {
		model := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2, EntryLimit: limit})
		mgr := discard.New(vcpus*lane, nil)
		attrs, err := memattr.New(mgr, memattr.Config{})
		if err != nil {
			t.Fatal(err)
		}
		m, err := dma.New(model, nil, dma.Options{SplitReserve: reserve, MaxExtent: maxExtent})
		if err != nil {
			t.Fatal(err)
		}
		if err := mgr.Register(m, discard.Section{Size: vcpus * lane}); err != nil {
			t.Fatal(err)
		}
		var rngs [vcpus]*rand.Rand
		for v := range rngs {
			rngs[v] = rand.New(rand.NewPCG(uint64(v), 9))
		}
		for range 3000 {
			for v, rng := range rngs {
				pages := uint64(1) << rng.IntN(11)
				off := uint64(v)*lane + rng.Uint64N(lane/(pages*pg))*pages*pg
				to := memattr.State(rng.IntN(2))
				err := attrs.Convert(off, pages*pg, to)
				switch {
				case err == nil:
				case !errors.Is(err, unix.ENOSPC):
					t.Fatalf("vcpu %d: %v", v, err)
				case to == memattr.Private:
					refusedPrivate++
				default:
					refusedShared++
				}
			}
		}
		return refusedPrivate, refusedShared
	}
	for _, c := range []struct {
		name      string
		reserve   uint64
		maxExtent uint64
	}{
		{"unbounded, no reserve", dma.NoReserve, dma.Unbounded},
		{"bounded, no reserve", dma.NoReserve, 0},
		{"unbounded, default reserve", 0, dma.Unbounded},
		{"bounded, default reserve", 0, 0},
	} {
		rp, rs := run(c.reserve, c.maxExtent)
		t.Logf("%s: %d conversions to private refused, %d to shared", c.name, rp, rs)
		if withReserve := c.reserve != dma.NoReserve; withReserve && rp != 0 || !withReserve && rp == 0 {
			t.Errorf("%s: %d conversions to private refused", c.name, rp)
		}
	}
}
