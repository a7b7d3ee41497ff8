package guesttest

import (
	"os"
	"testing"
	"time"

	"github.com/gmemproject/gmem/internal/bench"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/vfio"
)

// floorRounds is how many round trips each side of the floor comparison
// makes, interleaved: single runs through TCG are noisy, and the middle
// half of nine rounds says how much.
const floorRounds = 9

// TestRigFloor measures the round trip of benchRegion against its floor
// on the real type1 and iommufd drivers: one map call of the whole range
// and one unmap (what the kernel spends anyway: pinning every page) beside
// gmem's policies through attributes, manager and mapper, on the same
// space and the same memfd, interleaved over floorRounds rounds. Every
// side must pin the same pages. It runs only with scripts/rig --bench.
func TestRigFloor(t *testing.T) {
	requireGuest(t)
	if os.Getenv("GMEM_RIG_BENCH") != "1" {
		t.Skip("bench rows run only with scripts/rig --bench")
	}
	benchSpaces(t, floorOn)
}

// floorOn measures the floor comparison on one space and prints one
// GMEM-RIG bench line per side:
//
//	GMEM-RIG bench <backend> floor <side> rounds=N ns=<median> ns_min= ns_q1= ns_q3= ns_max= ns_space= ...
//
// ns_space is the median time inside the driver's map and unmap calls.
func floorOn(t *testing.T, backend string, space iommu.Space) {
	check(t, backend, "bench-floor", func(t *testing.T) {
		host := memfdShared(t, benchRegion)
		// Every page allocated before the first round, so that no side
		// pays shmem's allocation in its pinning.
		for off := 0; off < len(host); off += pageSize {
			host[off] = 1
		}
		rig := bench.FloorRig{Space: space, Host: host, GPA: gmemGPA, Size: benchRegion,
			Pinned: func() (uint64, error) { return pinnedPages(t), nil }}
		start := time.Now()
		res, err := rig.Measure(floorRounds, false, bench.FloorSides(space.Caps()))
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range res {
			var toShared, toPrivate []float64
			for _, s := range r.Samples {
				toShared = append(toShared, float64(s.ToShared.Nanoseconds()))
				toPrivate = append(toPrivate, float64(s.ToPrivate.Nanoseconds()))
			}
			median := func(xs []float64) int64 { return int64(bench.Summarize(xs).Median) }
			def := 0
			if r.Side.Default {
				def = 1
			}
			benchLine(backend, "floor", r.Side.Name, "rounds", r.Rounds, "bytes", benchRegion,
				"ns", int64(r.Time.Median), "ns_min", int64(r.Time.Range[0]), "ns_q1", int64(r.Time.IQR[0]),
				"ns_q3", int64(r.Time.IQR[1]), "ns_max", int64(r.Time.Range[1]),
				"ns_to_shared", median(toShared), "ns_to_private", median(toPrivate), "ns_space", int64(r.InSpace),
				"map_calls", r.MapCalls, "unmap_calls", r.Samples[0].UnmapCalls, "pinned_pages", r.Pinned, "default", def)
			t.Logf("%s %s: median %v (%.2fx the floor), spread %.0f%%, %d map calls, %v in the driver's calls",
				backend, r.Side.Name, time.Duration(r.Time.Median), r.Time.Median/res[0].Time.Median, 100*r.Time.Spread, r.MapCalls,
				time.Duration(r.InSpace))
		}
		t.Logf("%s floor comparison: %d rounds of %d sides in %v", backend, res[0].Rounds, len(res), time.Since(start).Round(time.Second))
	})
}

// benchSpaces runs f on the edu device's type1 container and on an iommufd
// IOAS in turn, as each backend is wanted, each space closed before the
// next opens (the group and the cdev cannot own the device at once). The
// type1 container's entry limit is raised to benchEntryRoom for the
// granule policy's one entry per page, and put back afterwards.
func benchSpaces(t *testing.T, f func(t *testing.T, backend string, space iommu.Space)) {
	bdf := findEdu(t)
	if wantBackend("type1") {
		t.Run("type1", func(t *testing.T) {
			group, err := vfio.IOMMUGroup(bdf)
			if err != nil {
				t.Fatal(err)
			}
			old := entryLimit(t)
			setEntryLimit(t, benchEntryRoom)
			defer setEntryLimit(t, old)
			s, err := openType1(bdf, group)
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := s.close(); err != nil {
					t.Errorf("closing type1: %v", err)
				}
			}()
			f(t, "type1", s.sp)
		})
	}
	if wantBackend("iommufd") {
		t.Run("iommufd", func(t *testing.T) {
			sp, closeAll, err := openIOMMUFDSpace(bdf)
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := closeAll(); err != nil {
					t.Errorf("closing iommufd: %v", err)
				}
			}()
			f(t, "iommufd", sp)
		})
	}
}
