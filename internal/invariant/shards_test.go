package invariant_test

import (
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/internal/invariant"
	"github.com/gmemproject/gmem/internal/randtest"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// TestConcurrentShards converts pages of a 1 GiB region from several
// goroutines around every 64 MiB boundary: the boundaries of the mappers'
// and the models' lock windows, of the state map's parts (256 MiB) and of
// the range lock's stripes, where an operation takes more than one lock.
// Lane goroutines own the areas around boundaries 1-8 (disjoint, so they
// run in parallel), three others convert overlapping ranges around
// boundaries 9-15; Release steps fail at random, so operations roll back
// (Revert of every mapper, splits included) while neighbours run. Six
// mappers see the region: 2 MiB extents on iommufd, 64 KiB extents on type1
// at a GPA whose IOVA windows do not line up with the region's chunks (so
// entries straddle a window boundary 12 KiB past each region boundary),
// unbounded extents, granules around one boundary, 2 MiB extents with
// windows spread over a 16 GiB region, and the Cut policy on an iommufd
// space that cuts (its windows spread the same way). After every failed
// lane conversion the lane's IOMMU entries must be the very ones it had
// (I3; for Cut the same pages, as an undone cut maps them as areas of their
// own); at every quiescent point attributes, I1/I2 and every mapper's
// table, counters and entry bounds are checked against a per-page oracle,
// and the Cut mapper must have had no window and re-pinned nothing.
func TestConcurrentShards(t *testing.T) {
	const (
		size     = 1 << 30
		mib      = 1 << 20
		boundary = 64 * mib
		reach    = 3 * mib // conversions stay within reach of their boundary
		lanes    = 4       // owning boundaries 1-8, two each
		zoneG    = 3       // goroutines converting around boundaries 9-15
	)
	rounds, perRound := 12, 24
	if testing.Short() {
		rounds, perRound = 4, 12
	}
	pages := uint64(size / page)
	m := discard.New(size, nil)
	k := &kernel{t: t, shared: make([]bool, pages), failRate: 8, rng: rand.New(rand.NewPCG(3, 4))}
	attrs, err := memattr.New(m, memattr.Config{Backend: k})
	if err != nil {
		t.Fatal(err)
	}
	type mapperCase struct {
		caps  iommu.Caps
		opts  dma.Options
		sec   discard.Section
		bound uint64
		span  uint64 // the model's (iommu.NewModelSpan)
	}
	cases := []mapperCase{
		{iommu.Caps{Rules: iommu.IOMMUFD}, dma.Options{}, discard.Section{Size: size, GPA: 0x10_0000_0000}, dma.DefaultMaxExtent, 0},
		{iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 60000}, dma.Options{MaxExtent: 64 << 10},
			discard.Section{Offset: 16 * mib, Size: size - 32*mib, GPA: 0x20_0000_0000 + 16*mib - 12<<10}, 64 << 10, 0},
		{iommu.Caps{Rules: iommu.IOMMUFD}, dma.Options{MaxExtent: dma.Unbounded}, discard.Section{Size: size, GPA: 0x40_0000_0000}, 0, 0},
		{iommu.Caps{Rules: iommu.IOMMUFD}, dma.Options{Policy: dma.Granule},
			discard.Section{Offset: boundary - 2*mib, Size: 4 * mib, GPA: 0x80_0000_0000}, page, 0},
		// Windows spread over a 16 GiB region: 256 MiB, whose boundaries
		// fall on every fourth boundary here, for the mapper and the model.
		{iommu.Caps{Rules: iommu.IOMMUFD}, dma.Options{RegionSize: 16 << 30}, discard.Section{Size: size, GPA: 0x100_0000_0000}, dma.DefaultMaxExtent, 16 << 30},
		{iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}, dma.Options{RegionSize: 16 << 30}, discard.Section{Size: size, GPA: 0x200_0000_0000}, dma.DefaultMaxExtent, 16 << 30},
	}
	type live struct {
		mapperCase
		mapper *dma.Mapper
		model  *iommu.Model
	}
	var ls []live
	for _, c := range cases {
		model := iommu.NewModelSpan(c.caps, c.span)
		model.SetFault(func(call iommu.Call) error {
			if call.Op != iommu.OpMap {
				return nil
			}
			off := call.IOVA - c.sec.GPA + c.sec.Offset
			if !attrs.IsShared(span.Range{Start: off, End: off + call.Size}) {
				t.Errorf("I2: mapping IOVA %#x size %#x of a page not shared", call.IOVA, call.Size)
			}
			return nil
		})
		mapper, err := dma.New(model, nil, c.opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Register(mapper, c.sec); err != nil {
			t.Fatal(err)
		}
		ls = append(ls, live{c, mapper, model})
	}
	area := func(b int) span.Range {
		return span.Range{Start: uint64(b)*boundary - reach - mib, End: uint64(b)*boundary + reach + mib}
	}
	// pick returns a random conversion around boundary b.
	pick := func(rng *rand.Rand, b int) (span.Range, memattr.State) {
		lo := uint64(b)*boundary - reach
		first := lo + rng.Uint64N(2*reach/page)*page
		n := 1 + rng.Uint64N(min(2*reach-(first-lo), 512*page)/page)
		if rng.IntN(4) == 0 {
			n = 1 + rng.Uint64N(8)
		}
		return span.Range{Start: first, End: first + n*page}, memattr.State(rng.IntN(2))
	}
	// entriesIn snapshots what every mapper's IOMMU holds around r: the
	// entries, or for the Cut policy the pages.
	entriesIn := func(r span.Range) [][]iommu.Mapping {
		out := make([][]iommu.Mapping, len(ls))
		for i, l := range ls {
			s, ok := l.sec.Intersect(r)
			if ok {
				out[i] = l.model.MappingsIn(s.GPARange())
				if l.mapper.Policy() == dma.Cut {
					out[i] = randtest.Pages(out[i])
				}
			}
		}
		return out
	}
	ok := func(err error) bool {
		if err == nil {
			return true
		}
		if !errors.Is(err, errRelease) {
			t.Errorf("unexpected error: %v", err)
		}
		return false
	}

	laneShared := make([]map[uint64]bool, lanes) // per lane, page -> shared
	for i := range laneShared {
		laneShared[i] = map[uint64]bool{}
	}
	var zoneMu sync.Mutex
	var zoneWrites []zoneWrite
	zoneBefore := map[uint64]bool{}
	failedLane := 0
	var failedMu sync.Mutex

	for round := range rounds {
		var wg sync.WaitGroup
		for lane := range lanes {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(round), uint64(lane)))
				mine := laneShared[lane]
				for range perRound {
					b := 1 + 2*lane + rng.IntN(2)
					r, to := pick(rng, b)
					before := entriesIn(area(b))
					if ok(attrs.Convert(r.Start, r.Len(), to)) {
						for p := r.Start / page; p < r.End/page; p++ {
							mine[p] = to == memattr.Shared
						}
						continue
					}
					// I3: the failed conversion left this lane's entries
					// exactly as they were (Cut: the same pages); no one
					// else works here.
					if after := entriesIn(area(b)); !slices.EqualFunc(before, after, slices.Equal) {
						t.Errorf("I3: lane %d: conversion %v to %v failed and changed the IOMMU entries around it", lane, r, to)
						return
					}
					failedMu.Lock()
					failedLane++
					failedMu.Unlock()
				}
			})
		}
		for g := range zoneG {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(round), 100+uint64(g)))
				for range perRound {
					r, to := pick(rng, 9+rng.IntN(7))
					if ok(attrs.Convert(r.Start, r.Len(), to)) {
						zoneMu.Lock()
						zoneWrites = append(zoneWrites, zoneWrite{span.Range{Start: r.Start / page, End: r.End / page}, to})
						zoneMu.Unlock()
					}
				}
			})
		}
		wg.Wait()
		if t.Failed() {
			t.Fatalf("round %d failed", round)
		}

		// Quiescent point: the state against the kernel's view and the
		// goroutines' own conversions, area by area (nothing else changes).
		var shared uint64
		for b := 1; b <= 15; b++ {
			a := area(b)
			for p := a.Start / page; p < a.End/page; p++ {
				got := attrs.Get(p*page) == memattr.Shared
				if got != k.shared[p] {
					t.Fatalf("round %d: page %d: attributes shared=%v, kernel %v", round, p, got, k.shared[p])
				}
				if got {
					shared += page
				}
				if b <= 2*lanes {
					if want := laneShared[(b-1)/2][p]; got != want {
						t.Fatalf("round %d: lane page %d shared=%v, its conversions imply %v", round, p, got, want)
					}
					continue
				}
				checkZonePage(t, round, p, got, zoneBefore[p], zoneWrites)
				zoneBefore[p] = got
			}
		}
		zoneWrites = zoneWrites[:0]
		if got := attrs.SharedBytes(); got != shared {
			t.Fatalf("round %d: %d bytes shared, the areas hold %d", round, got, shared)
		}
		for i, l := range ls {
			mapped := l.model.Mappings()
			if err := invariant.Mapped(m, l.sec, mapped); err != nil {
				t.Fatalf("round %d: mapper %d: %v", round, i, err)
			}
			if !slices.Equal(mapped, l.mapper.Entries()) {
				t.Fatalf("round %d: mapper %d table differs from its IOMMU", round, i)
			}
			st := l.mapper.Stats()
			var bytes uint64
			for _, e := range mapped {
				bytes += e.Size
				off := e.IOVA - l.sec.GPA + l.sec.Offset
				if l.bound != 0 && off/l.bound != (off+e.Size-1)/l.bound {
					t.Fatalf("round %d: mapper %d: entry %#x+%#x crosses a %#x chunk of the region", round, i, e.IOVA, e.Size, l.bound)
				}
			}
			if st.Entries != uint64(len(mapped)) || st.MappedBytes != bytes || st.PeakEntries < st.Entries {
				t.Fatalf("round %d: mapper %d counts %d entries, %d bytes (peak %d); its IOMMU holds %d, %d", round, i, st.Entries, st.MappedBytes, st.PeakEntries, len(mapped), bytes)
			}
			if n := uint64(l.model.Len()); n != st.Entries {
				t.Fatalf("round %d: mapper %d: model has %d entries, mapper %d", round, i, n, st.Entries)
			}
			if l.mapper.Policy() == dma.Cut && (st.WindowBytes != 0 || st.RepinnedBytes != 0 || st.CutCalls == 0) {
				t.Fatalf("round %d: cut mapper %d: %+v", round, i, st)
			}
			// Pages at the edges of every area are reached exactly when
			// shared.
			for b := 1; b <= 15; b++ {
				for _, off := range []uint64{uint64(b)*boundary - page, uint64(b) * boundary} {
					s, in := l.sec.Intersect(span.Range{Start: off, End: off + page})
					if !in {
						continue
					}
					if got, want := l.model.Reaches(s.GPA), k.shared[off/page]; got != want {
						t.Fatalf("round %d: mapper %d page %#x: reachable %v, shared %v", round, i, off, got, want)
					}
				}
			}
		}
	}
	st := attrs.Stats()
	t.Logf("conversions %d, no-ops %d, failures %d (%d in lanes)", st.Conversions, st.NoOps, st.Failures, failedLane)
	if st.Failures == 0 || failedLane == 0 || st.Conversions == 0 {
		t.Fatalf("the test exercised no failure or no conversion: %+v", st)
	}
	var splits uint64
	for _, l := range ls {
		splits += l.mapper.Stats().Splits
	}
	if splits == 0 {
		t.Fatal("no entry was split")
	}
}

// TestConcurrentBudget populates from several goroutines at once into one
// type1 space until it refuses: the entry budget and the split reserve are
// checked and taken as one step, so the table ends exactly at the limit
// less the reserve, however the populates interleaved, and the entries
// every goroutine was granted add up to it. Then splitting discards from
// every goroutine use the reserve, never more.
func TestConcurrentBudget(t *testing.T) {
	const (
		limit    = 300
		reserve  = 40
		workers  = 6
		stride   = 64 << 20 // each goroutine's sections are a window apart
		sections = 100
	)
	for round := range 5 {
		model := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2, EntryLimit: limit})
		mp, err := dma.New(model, nil, dma.Options{SplitReserve: reserve, MaxExtent: 64 << 10})
		if err != nil {
			t.Fatal(err)
		}
		granted := make([]int, workers)
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				for i := range sections {
					// Two entries each: 128 KiB over two 64 KiB chunks.
					off := uint64(w)*stride + uint64(i)*256<<10
					s := discard.Section{Offset: off, Size: 128 << 10, GPA: off}
					switch err := mp.Populate(s); {
					case err == nil:
						granted[w] += 2
					case errors.Is(err, unix.ENOSPC):
					default:
						t.Errorf("populate %v: %v", s, err)
					}
					mp.Settle(s)
				}
			})
		}
		wg.Wait()
		total := 0
		for _, g := range granted {
			total += g
		}
		if n := model.Len(); n != limit-reserve || total != n || mp.Stats().Entries != uint64(n) {
			t.Fatalf("round %d: %d entries mapped, %d granted, mapper counts %d; want %d (limit %d less reserve %d)",
				round, n, total, mp.Stats().Entries, limit-reserve, limit, reserve)
		}
		// Every goroutine cuts the middle page out of its first entries:
		// each cut needs one more entry, which only the reserve has.
		var cuts, refused [workers]int
		for w := range workers {
			wg.Go(func() {
				for i := range sections {
					off := uint64(w)*stride + uint64(i)*256<<10
					s := discard.Section{Offset: off + 16<<10, Size: 4 << 10, GPA: off + 16<<10}
					if !model.Reaches(s.GPA) {
						continue // its populate was refused
					}
					switch err := mp.Discard(s); {
					case err == nil:
						cuts[w]++
					case errors.Is(err, unix.ENOSPC):
						refused[w]++
					default:
						t.Errorf("discard %v: %v", s, err)
					}
					mp.Settle(s)
				}
			})
		}
		wg.Wait()
		if n := model.Len(); n != limit {
			t.Fatalf("round %d: %d entries after the splits, want the limit %d", round, n, limit)
		}
		nc, nr := 0, 0
		for w := range workers {
			nc, nr = nc+cuts[w], nr+refused[w]
		}
		if st := mp.Stats(); st.Splits != reserve || nc != reserve || nr != (limit-reserve)/2-reserve || st.Entries != limit {
			t.Fatalf("round %d: %d splits (%d cuts, %d refused), %d entries; want %d splits, %d refused, %d entries",
				round, st.Splits, nc, nr, st.Entries, reserve, (limit-reserve)/2-reserve, limit)
		}
	}
}
