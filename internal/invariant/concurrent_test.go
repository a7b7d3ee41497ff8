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
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/virtiomem"
)

// errRelease is the failure the concurrent test injects into Release steps,
// the last step of a conversion or unplug, so the whole change is undone.
var errRelease = errors.New("injected release failure")

// kernel is the test's model of the kernel's view of the region: the state
// SetAttributes leaves, changed only by SetAttributes. It is the witness of
// the order in which overlapping conversions took effect, and it checks that
// every call changes what it says it changes: two conversions of the same
// page running at once would make one of them "change" a page already in
// the target state.
type kernel struct {
	t        *testing.T
	mu       sync.Mutex
	shared   []bool
	failRate int // one Release in failRate fails (0: never)
	rng      *rand.Rand
}

func (k *kernel) SetAttributes(runs []span.Range, to memattr.State) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, r := range runs {
		for p := r.Start / page; p < r.End/page; p++ {
			if k.shared[p] == (to == memattr.Shared) {
				k.t.Errorf("kernel: page %d made %v twice: two conversions of it overlapped", p, to)
			}
			k.shared[p] = to == memattr.Shared
		}
	}
	return nil
}

func (k *kernel) Release([]span.Range, memattr.State) error { return k.maybeFail() }

func (k *kernel) maybeFail() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.failRate > 0 && k.rng.IntN(k.failRate) == 0 {
		return errRelease
	}
	return nil
}

// liveMapper is one registered DMA mapper with its own IOMMU.
type liveMapper struct {
	mapper *dma.Mapper
	model  *iommu.Model
	sec    discard.Section
}

// TestConcurrentConvert converts pages from many goroutines at once, some on
// disjoint lanes, some on one overlapping zone, while one goroutine plugs and
// unplugs blocks and another registers and unregisters DMA mappers, with
// injected failures. At each quiescent point it checks I1/I2 for every live
// mapper, that attributes equal the kernel's view, and that each lane, and
// the plug state, equal what the owning goroutine's successful operations
// imply; pages of the overlapping zone must hold the state of one of the
// successful conversions that covered them in the round.
func TestConcurrentConvert(t *testing.T) {
	const (
		pages     = 256
		lanes     = 4
		lanePages = 32 // lanes cover pages [0, 128)
		zoneStart = lanes * lanePages
		overlaps  = 3 // goroutines converting in [128, 256)
		blk       = 4 * page
		gpaBase   = 0x10_0000_0000
	)
	rounds, perRound := 100, 60
	if testing.Short() {
		rounds, perRound = 20, 40
	}
	host := make([]byte, pages*page)
	m := discard.New(pages*page, nil)
	k := &kernel{t: t, shared: make([]bool, pages), failRate: 25, rng: rand.New(rand.NewPCG(1, 2))}
	attrs, err := memattr.New(m, memattr.Config{Backend: k})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := virtiomem.New(m, virtiomem.Config{BlockSize: blk, Release: func([]span.Range) error { return k.maybeFail() }})
	if err != nil {
		t.Fatal(err)
	}

	// What each goroutine's successful operations imply.
	laneShared := make([][]bool, lanes) // per lane, owned by its goroutine
	for i := range laneShared {
		laneShared[i] = make([]bool, lanePages)
	}
	plugged := make([]bool, pages/(blk/page)) // owned by the plug goroutine
	var live []*liveMapper                    // owned by the mapper goroutine
	var dead []*liveMapper                    // unregistered: must map nothing

	// hook makes every map call check I2 at that moment.
	hook := func(model *iommu.Model) {
		model.SetFault(func(c iommu.Call) error {
			if c.Op != iommu.OpMap {
				return nil
			}
			r := span.Range{Start: c.IOVA - gpaBase, End: c.IOVA - gpaBase + c.Size}
			if !attrs.IsShared(r) || !dev.IsPlugged(r) {
				t.Errorf("I2: mapping IOVA %#x size %#x of a page not shared and plugged", c.IOVA, c.Size)
			}
			return nil
		})
	}
	ok := func(err error) bool {
		if err == nil {
			return true
		}
		if !errors.Is(err, errRelease) && !errors.Is(err, unix.ENOSPC) {
			t.Errorf("unexpected error: %v", err)
		}
		return false
	}

	// zoneWrites collects, per round, the states that successful conversions
	// wrote to each page of the overlapping zone.
	var zoneMu sync.Mutex
	var zoneWrites []zoneWrite
	zoneBefore := make([]bool, pages-zoneStart)

	for round := range rounds {
		var wg sync.WaitGroup
		for lane := range lanes {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(round), uint64(lane)))
				mine := laneShared[lane]
				base := uint64(lane * lanePages)
				for range perRound {
					first := uint64(rng.IntN(lanePages))
					n := 1 + uint64(rng.IntN(lanePages-int(first)))
					to := memattr.State(rng.IntN(2))
					if ok(attrs.Convert((base+first)*page, n*page, to)) {
						for p := first; p < first+n; p++ {
							mine[p] = to == memattr.Shared
						}
					}
					// Nobody else converts this lane: it must read back
					// exactly, at any moment.
					for p := range uint64(lanePages) {
						if (attrs.Get((base+p)*page) == memattr.Shared) != mine[p] {
							t.Errorf("lane %d page %d: attributes disagree with the lane's own conversions", lane, p)
							return
						}
					}
				}
			})
		}
		for g := range overlaps {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(round), 100+uint64(g)))
				for range perRound {
					first := zoneStart + uint64(rng.IntN(pages-zoneStart))
					n := 1 + uint64(rng.IntN(min(48, pages-int(first))))
					to := memattr.State(rng.IntN(2))
					if ok(attrs.Convert(first*page, n*page, to)) {
						zoneMu.Lock()
						zoneWrites = append(zoneWrites, zoneWrite{span.Range{Start: first, End: first + n}, to})
						zoneMu.Unlock()
					}
				}
			})
		}
		wg.Go(func() { // plug / unplug
			rng := rand.New(rand.NewPCG(uint64(round), 200))
			for range perRound / 2 {
				first := uint64(rng.IntN(len(plugged)))
				n := 1 + uint64(rng.IntN(min(8, len(plugged)-int(first))))
				plug := rng.IntN(3) != 0
				var err error
				if plug {
					err = dev.Plug(first*blk, n*blk)
				} else {
					err = dev.Unplug(first*blk, n*blk)
				}
				if ok(err) {
					for b := first; b < first+n; b++ {
						plugged[b] = plug
					}
				}
			}
		})
		wg.Go(func() { // register / unregister mappers
			rng := rand.New(rand.NewPCG(uint64(round), 300))
			for range 4 {
				if len(live) > 0 && (len(live) >= 4 || rng.IntN(2) == 0) {
					i := rng.IntN(len(live))
					l := live[i]
					if err := m.Unregister(l.mapper); err != nil {
						t.Errorf("unregister: %v", err)
						continue
					}
					if n := l.model.Len(); n != 0 {
						t.Errorf("unregistered mapper left %d entries", n)
					}
					live = slices.Delete(live, i, i+1)
					dead = append(dead, l)
					continue
				}
				caps := iommu.Caps{Rules: iommu.IOMMUFD, Cut: rng.IntN(2) == 0}
				if rng.IntN(3) == 0 {
					caps = iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 200}
				}
				model := iommu.NewModel(caps)
				hook(model)
				policy := dma.Auto // Cut where the space cuts, else Extent
				if rng.IntN(3) == 0 {
					policy = dma.Granule
				}
				mapper, err := dma.New(model, host, dma.Options{Policy: policy})
				if err != nil {
					t.Error(err)
					return
				}
				first := uint64(rng.IntN(pages))
				n := 1 + uint64(rng.IntN(pages-int(first)))
				sec := discard.Section{Offset: first * page, Size: n * page, GPA: gpaBase + first*page}
				if err := m.Register(mapper, sec); err != nil {
					if !errors.Is(err, unix.ENOSPC) {
						t.Errorf("register: %v", err)
					}
					if model.Len() != 0 {
						t.Errorf("a failed registration left %d entries", model.Len())
					}
					continue
				}
				live = append(live, &liveMapper{mapper, model, sec})
			}
		})
		wg.Wait()
		if t.Failed() {
			t.Fatalf("round %d failed", round)
		}

		// Quiescent point.
		for p := range uint64(pages) {
			got := attrs.Get(p*page) == memattr.Shared
			if got != k.shared[p] {
				t.Fatalf("round %d: page %d: attributes shared=%v, kernel %v", round, p, got, k.shared[p])
			}
			if p < zoneStart {
				if want := laneShared[p/lanePages][p%lanePages]; got != want {
					t.Fatalf("round %d: lane page %d shared=%v, its conversions imply %v", round, p, got, want)
				}
			}
		}
		for z := range uint64(pages - zoneStart) {
			p := zoneStart + z
			got := attrs.Get(p*page) == memattr.Shared
			checkZonePage(t, round, p, got, zoneBefore[z], zoneWrites)
			zoneBefore[z] = got
		}
		zoneWrites = zoneWrites[:0]
		for b, want := range plugged {
			if got := dev.IsPlugged(span.Range{Start: uint64(b) * blk, End: uint64(b+1) * blk}); got != want {
				t.Fatalf("round %d: block %d plugged=%v, the plug goroutine's operations imply %v", round, b, got, want)
			}
		}
		for i, l := range live {
			mapped := l.model.Mappings()
			if err := invariant.Mapped(m, l.sec, mapped); err != nil {
				t.Fatalf("round %d: mapper %d: %v", round, i, err)
			}
			if !slices.Equal(mapped, l.mapper.Entries()) {
				t.Fatalf("round %d: mapper %d table differs from its IOMMU", round, i)
			}
			if st := l.mapper.Stats(); l.mapper.Policy() == dma.Cut && (st.WindowBytes != 0 || st.RepinnedBytes != 0) {
				t.Fatalf("round %d: cut mapper %d had a window: %+v", round, i, st)
			}
			// The device reaches exactly the shared and plugged pages of
			// its section.
			for p := l.sec.Offset / page; p < (l.sec.Offset+l.sec.Size)/page; p += 7 {
				want := k.shared[p] && plugged[p*page/blk]
				err := l.model.DMAWrite(l.sec.GPA+(p*page-l.sec.Offset), []byte{1})
				if (err == nil) != want {
					t.Fatalf("round %d: mapper %d page %d: DMA %v, want reachable=%v", round, i, p, err, want)
				}
			}
		}
		for _, l := range dead {
			if l.model.Len() != 0 {
				t.Fatalf("round %d: an unregistered mapper's IOMMU holds entries", round)
			}
		}
	}
	st := attrs.Stats()
	t.Logf("conversions %d, no-ops %d, failures %d; %d mappers live", st.Conversions, st.NoOps, st.Failures, len(live))
	if st.Failures == 0 || st.Conversions == 0 {
		t.Fatalf("the test exercised no failure or no conversion: %+v", st)
	}
}

// zoneWrite is a successful conversion of a zone's pages (page numbers).
type zoneWrite struct {
	r  span.Range
	to memattr.State
}

// checkZonePage checks page p of a zone that several goroutines convert at
// once, after a round: with no successful conversion covering it, it kept
// its state (before); otherwise it holds the state one of them wrote.
func checkZonePage(t *testing.T, round int, p uint64, got, before bool, writes []zoneWrite) {
	t.Helper()
	var wrote []bool
	for _, w := range writes {
		if w.r.Contains(p) {
			wrote = append(wrote, w.to == memattr.Shared)
		}
	}
	switch {
	case len(wrote) == 0 && got != before:
		t.Fatalf("round %d: zone page %d changed with no successful conversion covering it", round, p)
	case len(wrote) > 0 && !slices.Contains(wrote, got):
		t.Fatalf("round %d: zone page %d shared=%v, but every conversion covering it wrote %v", round, p, got, wrote[0])
	}
}
