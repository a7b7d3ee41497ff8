package guesttest

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/iommufd"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/vfio"
)

// Bench sizes: the round trip of gmem bench's row, and a churn run.
const (
	benchRegion    = 1 << 30 // converted to shared and back
	benchChurnOps  = 10_000
	benchGranules  = benchRegion / pageSize
	benchEntryRoom = benchGranules + 1024 // type1 limit for the granule run
)

// benchLine prints one measurement for gmem bench --rig, in one write:
//
//	GMEM-RIG bench <backend> <scenario> <policy> key=value ...
func benchLine(backend, scenario string, policy any, kv ...any) {
	var b strings.Builder
	fmt.Fprintf(&b, "%s bench %s %s %s", "GMEM-RIG", backend, scenario, policy)
	for i := 0; i+1 < len(kv); i += 2 {
		fmt.Fprintf(&b, " %s=%v", kv[i], kv[i+1])
	}
	b.WriteByte('\n')
	os.Stdout.WriteString(b.String())
}

// pinnedPages returns the pages the kernel accounts to this process as
// locked (VmLck: type1's accounting) plus pinned (VmPin).
func pinnedPages(t *testing.T) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	var kib uint64
	for _, line := range strings.Split(string(b), "\n") {
		for _, key := range []string{"VmLck:", "VmPin:"} {
			if rest, ok := strings.CutPrefix(line, key); ok {
				v, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
				if err != nil {
					t.Fatalf("%s: %v", line, err)
				}
				kib += v
			}
		}
	}
	return kib * 1024 / pageSize
}

// benchStack is the stack of gmem bench's rows on a real kernel space: a
// memfd of benchRegion bytes, manager, memattr and a mapper with policy.
func benchStack(t *testing.T, space iommu.Space, policy dma.Policy) (*memattr.Attributes, *dma.Mapper, *discard.Manager) {
	t.Helper()
	host := memfdShared(t, benchRegion)
	m := discard.New(benchRegion, nil)
	attrs, err := memattr.New(m, memattr.Config{})
	if err != nil {
		t.Fatal(err)
	}
	mapper, err := dma.New(space, host, dma.Options{Policy: policy})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Register(mapper, discard.Section{Size: benchRegion, GPA: gmemGPA}); err != nil {
		t.Fatal(err)
	}
	return attrs, mapper, m
}

// benchRoundTrip converts the whole region to shared and back, timing each
// direction, and reports map calls, time and the pages pinned while shared.
func benchRoundTrip(t *testing.T, backend string, space iommu.Space, policy dma.Policy) {
	attrs, mapper, m := benchStack(t, space, policy)
	pinned0 := pinnedPages(t)
	t0 := time.Now()
	if err := attrs.Convert(0, benchRegion, memattr.Shared); err != nil {
		t.Fatal(err)
	}
	toShared := time.Since(t0)
	pinned := pinnedPages(t) - pinned0
	st := mapper.Stats()
	t1 := time.Now()
	if err := attrs.Convert(0, benchRegion, memattr.Private); err != nil {
		t.Fatal(err)
	}
	toPrivate := time.Since(t1)
	end := mapper.Stats()
	if end.Entries != 0 {
		t.Fatalf("%d entries left after the round trip", end.Entries)
	}
	if left := pinnedPages(t) - pinned0; left != 0 {
		t.Errorf("%d pages still pinned after the round trip", left)
	}
	if err := m.Unregister(mapper); err != nil {
		t.Fatal(err)
	}
	benchLine(backend, "roundtrip", policy, "bytes", benchRegion, "map_calls", end.MapCalls, "unmap_calls", end.UnmapCalls,
		"entries_peak", st.PeakEntries, "pinned_pages", pinned,
		"ns", (toShared + toPrivate).Nanoseconds(), "ns_to_shared", toShared.Nanoseconds(), "ns_to_private", toPrivate.Nanoseconds())
}

// benchChurn converts random single pages of the region, each to a random
// state, and reports the time per conversion.
func benchChurn(t *testing.T, backend string, space iommu.Space, policy dma.Policy) {
	attrs, mapper, m := benchStack(t, space, policy)
	rng := rand.New(rand.NewPCG(5, 6))
	t0 := time.Now()
	for range benchChurnOps {
		off := rng.Uint64N(benchGranules) * pageSize
		if err := attrs.Convert(off, pageSize, memattr.State(rng.IntN(2))); err != nil {
			t.Fatal(err)
		}
	}
	d := time.Since(t0)
	st := mapper.Stats()
	if err := m.Unregister(mapper); err != nil {
		t.Fatal(err)
	}
	benchLine(backend, "churn", policy, "ops", benchChurnOps, "map_calls", st.MapCalls, "ns", d.Nanoseconds(),
		"ns_per_op", d.Nanoseconds()/benchChurnOps)
}

// benchOn runs the bench scenarios with both policies on one space.
func benchOn(t *testing.T, backend string, space iommu.Space) {
	for _, policy := range []dma.Policy{dma.Granule, dma.Extent} {
		check(t, backend, "bench-roundtrip-"+policy.String(), func(t *testing.T) { benchRoundTrip(t, backend, space, policy) })
		check(t, backend, "bench-churn-"+policy.String(), func(t *testing.T) { benchChurn(t, backend, space, policy) })
	}
}

// TestRigBench measures gmem bench's round trip and churn rows on the real
// type1 and iommufd drivers, granule policy against extent, and on iommufd
// the cost of one split, a cut against an unmap and maps (benchSplit). It runs only
// when the rig boots with --bench (GMEM_RIG_BENCH=1): the granule round trip
// is 262,144 map calls, minutes under TCG. It closes every descriptor
// before TestRig runs.
func TestRigBench(t *testing.T) {
	requireGuest(t)
	if os.Getenv("GMEM_RIG_BENCH") != "1" {
		t.Skip("bench rows run only with scripts/rig --bench")
	}
	benchSpaces(t, func(t *testing.T, backend string, space iommu.Space) {
		benchOn(t, backend, space)
		if sp, ok := space.(*iommufd.Space); ok {
			check(t, backend, "bench-split", func(t *testing.T) { benchSplit(t, sp) })
		}
	})
}

// Split-cost sizes: a 2 MiB extent (one bounded chunk), split this many
// times each way, at an IOVA none of the other bench rows use.
const (
	benchSplitExtent = 2 << 20
	benchSplits      = 64
	benchSplitIOVA   = 0x80000000
)

// benchSplit times one split of a mapped 2 MiB extent on a cutting space,
// both ways: a cut of one page (Space.Cut, the rest stays mapped and
// pinned) against what the bounded Extent policy does, an unmap of the
// extent and maps of the head and tail around the page (re-pinning them).
// Every split starts from the extent mapped whole, and the two ways
// alternate, first one, then the other. It prints one line per way:
//
//	GMEM-RIG bench iommufd split cut splits=64 ns=... ns_per_split=... ns_median=... repinned_bytes=0 window_bytes=0
//	GMEM-RIG bench iommufd split extent splits=64 ns=... ns_per_split=... ns_median=... repinned_bytes=... window_bytes=...
func benchSplit(t *testing.T, sp *iommufd.Space) {
	if !sp.Caps().Cut {
		t.Fatalf("the space does not cut: %s", sp.CutReason())
	}
	host := memfdShared(t, benchSplitExtent)
	clear(host) // fault the pages in: the timing is of the kernel, not of page faults
	const iova = benchSplitIOVA
	whole := func() {
		t.Helper()
		if err := sp.Map(iova, benchSplitExtent, host); err != nil {
			t.Fatal(err)
		}
	}
	drop := func() {
		t.Helper()
		if _, err := sp.Unmap(iova, benchSplitExtent); err != nil {
			t.Fatal(err)
		}
	}
	cut := func(off uint64) time.Duration {
		whole()
		t0 := time.Now()
		n, err := sp.Cut(iova+off, pageSize)
		d := time.Since(t0)
		if err != nil || n != pageSize {
			t.Fatalf("cut at %#x = %#x, %v", off, n, err)
		}
		drop()
		return d
	}
	var repinned uint64
	bounded := func(off uint64) time.Duration {
		whole()
		t0 := time.Now()
		if _, err := sp.Unmap(iova, benchSplitExtent); err != nil {
			t.Fatal(err)
		}
		if err := sp.Map(iova, off, host[:off]); err != nil {
			t.Fatal(err)
		}
		rest := off + pageSize
		if err := sp.Map(iova+rest, benchSplitExtent-rest, host[rest:]); err != nil {
			t.Fatal(err)
		}
		d := time.Since(t0)
		repinned += benchSplitExtent - pageSize
		drop()
		return d
	}
	var cuts, bounds []time.Duration
	for i := range benchSplits {
		off := uint64(1+(i*37)%(benchSplitExtent/pageSize-2)) * pageSize // never the first or last page
		if i%2 == 0 {
			cuts = append(cuts, cut(off))
			bounds = append(bounds, bounded(off))
		} else {
			bounds = append(bounds, bounded(off))
			cuts = append(cuts, cut(off))
		}
	}
	sum := func(ds []time.Duration) (total, median time.Duration) {
		for _, d := range ds {
			total += d
		}
		s := slices.Clone(ds)
		slices.Sort(s)
		return total, s[len(s)/2]
	}
	ct, cm := sum(cuts)
	bt, bm := sum(bounds)
	benchLine("iommufd", "split", dma.Cut, "splits", benchSplits, "ns", ct.Nanoseconds(), "ns_per_split", ct.Nanoseconds()/benchSplits,
		"ns_median", cm.Nanoseconds(), "repinned_bytes", 0, "window_bytes", 0)
	benchLine("iommufd", "split", dma.Extent, "splits", benchSplits, "ns", bt.Nanoseconds(), "ns_per_split", bt.Nanoseconds()/benchSplits,
		"ns_median", bm.Nanoseconds(), "repinned_bytes", repinned, "window_bytes", repinned)
}

// openIOMMUFDSpace binds the edu device's cdev to a new iommufd, attaches it
// to a new IOAS and returns that IOAS as a Space, and a function closing
// everything, device first.
func openIOMMUFDSpace(bdf string) (*iommufd.Space, func() error, error) {
	f, err := iommufd.Open()
	if err != nil {
		return nil, nil, err
	}
	var d *vfio.Device
	closeAll := func() error {
		var errs []error
		if d != nil {
			errs = append(errs, d.Close())
		}
		return errors.Join(append(errs, f.Close())...)
	}
	fail := func(err error) (*iommufd.Space, func() error, error) {
		return nil, nil, errors.Join(err, closeAll())
	}
	ioas, err := f.IOASAlloc()
	if err != nil {
		return fail(err)
	}
	path, err := vfio.CdevPath(bdf)
	if err != nil {
		return fail(err)
	}
	if d, err = vfio.OpenCdev(path); err != nil {
		return fail(err)
	}
	if _, err := d.BindIOMMUFD(f.Fd()); err != nil {
		return fail(err)
	}
	if _, err := d.AttachIOMMUFDPT(ioas); err != nil {
		return fail(err)
	}
	sp, err := iommufd.NewSpace(f, ioas)
	if err != nil {
		return fail(err)
	}
	return sp, closeAll, nil
}
