package invariant_test

import (
	"math/rand/v2"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/span"
)

// Benchmarks compare gmem with the baseline it replaces (QEMU's algorithms:
// a bitmap of 4 KiB pages, a per-granule replay, one IOMMU entry per
// granule) in the same run. Run them with a small -benchtime, e.g.
//
//	go test -run '^$' -bench . -benchtime 1x ./internal/invariant
//
// the 1 TiB baseline replay alone scans 2^28 granules per iteration.

// counter is a listener that only counts, so a replay benchmark measures the
// replay and not what a listener does with it.
type counter struct {
	populates, discards uint64
	bytes               uint64
}

func (c *counter) Populate(s discard.Section) error {
	c.populates++
	c.bytes += s.Size
	return nil
}

func (c *counter) Discard(discard.Section) error { c.discards++; return nil }

// replayPattern returns the populated runs of the 1 TiB replay benchmark, in
// pages: n runs spread evenly, of 1 to 64 pages each.
func replayPattern(pages uint64, n int) []span.Range {
	stride := pages / uint64(n)
	out := make([]span.Range, n)
	for i := range n {
		start := uint64(i) * stride
		length := 1 + (uint64(i)*7919)%64
		out[i] = span.Range{Start: start, End: start + length}
	}
	return out
}

// granuleSource is the source interface of QEMU's 2026 aggregating manager:
// one question per granule, through an indirect call.
type granuleSource interface {
	isPopulated(offset, size uint64) bool
}

// bitmapSource answers from a dense bitmap, as RamBlockAttributes does. A
// one-granule question reads one bit, which is the cheapest form of QEMU's
// find_next_zero_bit over [first, last]: generous to the baseline.
type bitmapSource struct{ bm *pagemap.Bitmap }

func (b bitmapSource) isPopulated(offset, _ uint64) bool { return b.bm.Get(offset/page) == 1 }

// granuleReplay is QEMU's 2026 replay_by_populated_state: walk the section
// one granule at a time, ask every source, and hand each maximal populated
// run to fn.
func granuleReplay(srcs []granuleSource, s discard.Section, gran uint64, fn func(discard.Section) error) error {
	var runStart uint64
	in := false
	flush := func(end uint64) error {
		in = false
		return fn(discard.Section{Offset: runStart, Size: end - runStart, GPA: s.GPA + (runStart - s.Offset)})
	}
	end := s.Offset + s.Size
	for off := s.Offset; off < end; off += gran {
		all := true
		for _, src := range srcs {
			if !src.isPopulated(off, gran) {
				all = false
				break
			}
		}
		switch {
		case all && !in:
			runStart, in = off, true
		case !all && in:
			if err := flush(off); err != nil {
				return err
			}
		}
	}
	if in {
		return flush(end)
	}
	return nil
}

// BenchmarkRegisterReplay registers a listener on a 1 TiB region with
// 100,000 populated runs: the baseline replays by asking the bitmap about
// each of the 2^28 granules; gmem merges the sources' runs. Each iteration
// registers and unregisters (one whole-section discard) the listener.
func BenchmarkRegisterReplay(b *testing.B) {
	const (
		size = 1 << 40
		runs = 100_000
	)
	pages := uint64(size / page)
	pattern := replayPattern(pages, runs)
	whole := discard.Section{Size: size}

	b.Run("baseline-granule-scan", func(b *testing.B) {
		bm, err := pagemap.NewBitmap(pages, 1)
		if err != nil {
			b.Fatal(err)
		}
		for _, r := range pattern {
			if err := bm.Set(r, 1); err != nil {
				b.Fatal(err)
			}
		}
		srcs := []granuleSource{bitmapSource{bm}}
		var c counter
		for b.Loop() {
			c = counter{}
			if err := granuleReplay(srcs, whole, page, c.Populate); err != nil {
				b.Fatal(err)
			}
			if err := c.Discard(whole); err != nil {
				b.Fatal(err)
			}
		}
		if c.populates != runs {
			b.Fatalf("baseline replayed %d runs, want %d", c.populates, runs)
		}
		b.ReportMetric(float64(c.populates), "runs/op")
		b.ReportMetric(float64(pages), "source-calls/op")
		b.ReportMetric(float64(bm.Bytes()), "state-bytes")
	})

	b.Run("gmem-runs", func(b *testing.B) {
		m := discard.New(size, nil)
		a, err := memattr.New(m, memattr.Config{})
		if err != nil {
			b.Fatal(err)
		}
		for _, r := range pattern {
			if err := a.Convert(r.Start*page, r.Len()*page, memattr.Shared); err != nil {
				b.Fatal(err)
			}
		}
		var c counter
		for b.Loop() {
			c = counter{}
			if err := m.Register(&c, whole); err != nil {
				b.Fatal(err)
			}
			if err := m.Unregister(&c); err != nil {
				b.Fatal(err)
			}
		}
		if c.populates != runs {
			b.Fatalf("gmem replayed %d runs, want %d", c.populates, runs)
		}
		b.ReportMetric(float64(c.populates), "runs/op")
		b.ReportMetric(float64(runs), "source-calls/op") // runs visited
		b.ReportMetric(float64(a.StateBytes()), "state-bytes")
	})

	// The same with a real listener: a DMA mapper on a model IOMMU without
	// entry limit, both sides mapping 100,000 entries per iteration.
	b.Run("baseline-granule-scan-mapper", func(b *testing.B) {
		bm, _ := pagemap.NewBitmap(pages, 1)
		for _, r := range pattern {
			if err := bm.Set(r, 1); err != nil {
				b.Fatal(err)
			}
		}
		srcs := []granuleSource{bitmapSource{bm}}
		var model *iommu.Model
		for b.Loop() {
			model = iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
			mp, err := dma.New(model, nil, dma.Options{})
			if err != nil {
				b.Fatal(err)
			}
			if err := granuleReplay(srcs, whole, page, mp.Populate); err != nil {
				b.Fatal(err)
			}
			if model.Len() != runs {
				b.Fatalf("%d entries", model.Len())
			}
			if err := mp.Discard(whole); err != nil {
				b.Fatal(err)
			}
		}
		maps, _ := model.Calls()
		b.ReportMetric(float64(maps), "map-calls/op")
	})
	b.Run("gmem-runs-mapper", func(b *testing.B) {
		m := discard.New(size, nil)
		a, err := memattr.New(m, memattr.Config{})
		if err != nil {
			b.Fatal(err)
		}
		for _, r := range pattern {
			if err := a.Convert(r.Start*page, r.Len()*page, memattr.Shared); err != nil {
				b.Fatal(err)
			}
		}
		var model *iommu.Model
		for b.Loop() {
			model = iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
			mp, err := dma.New(model, nil, dma.Options{})
			if err != nil {
				b.Fatal(err)
			}
			if err := m.Register(mp, whole); err != nil {
				b.Fatal(err)
			}
			if model.Len() != runs {
				b.Fatalf("%d entries", model.Len())
			}
			if err := m.Unregister(mp); err != nil {
				b.Fatal(err)
			}
		}
		maps, _ := model.Calls()
		b.ReportMetric(float64(maps), "map-calls/op")
	})
}

// convWorld is a region with memattr, a manager and one DMA mapper on a
// model IOMMU, in one of the shapes below.
type convWorld struct {
	m      *discard.Manager
	a      *memattr.Attributes
	model  *iommu.Model
	mapper *dma.Mapper
}

func newConvWorld(b *testing.B, size uint64, sh shape) *convWorld {
	b.Helper()
	w := &convWorld{m: discard.New(size, nil)}
	var err error
	w.a, err = memattr.New(w.m, memattr.Config{Bitmap: sh.bitmap})
	if err != nil {
		b.Fatal(err)
	}
	w.model = iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
	w.mapper, err = dma.New(w.model, nil, dma.Options{Policy: sh.policy})
	if err != nil {
		b.Fatal(err)
	}
	if err := w.m.Register(w.mapper, discard.Section{Size: size}); err != nil {
		b.Fatal(err)
	}
	return w
}

func (w *convWorld) report(b *testing.B, ops int) {
	st := w.mapper.Stats()
	b.ReportMetric(float64(st.MapCalls)/float64(ops), "map-calls/op")
	b.ReportMetric(float64(st.UnmapCalls)/float64(ops), "unmap-calls/op")
	b.ReportMetric(float64(st.PeakEntries), "peak-entries")
	b.ReportMetric(float64(w.a.StateBytes()), "state-bytes")
}

// shape is the state map and mapper policy of a convWorld.
type shape struct {
	name   string
	bitmap bool // the baseline's one bitmap, not gmem's runs
	policy dma.Policy
}

// shapes are the two sides of a comparison: the baseline and gmem.
var shapes = []shape{
	{"baseline-bitmap-granule", true, dma.Granule},
	{"gmem-runs-extent", false, dma.Extent},
}

// splitShapes adds to shapes the baseline's bitmap under gmem's mapper, which
// splits a difference between the two sides into what the state map makes
// (bitmap-extent against gmem) and what the mapper policy makes (baseline
// against bitmap-extent).
var splitShapes = append(slices.Clone(shapes), shape{"bitmap-extent", true, dma.Extent})

// collected runs a collection with b's timer stopped. A side's sub-benchmark
// calls it after its setup, so that it does not run on the garbage, and the
// collector's pacing, that the side before it left: without it, the second
// side of BenchmarkChurnScattered ran 9% faster in one process than alone
// (p=0.004, n=6), and a comparison of the sides in one run favoured gmem.
func collected(b *testing.B) {
	b.StopTimer()
	runtime.GC()
	b.StartTimer()
}

// BenchmarkConvert4K converts random 4 KiB pages of a 4 GiB region to shared
// and back (one op = both), with 1,000 other shared runs in the region.
func BenchmarkConvert4K(b *testing.B) {
	const size = 4 << 30
	for _, sh := range splitShapes {
		b.Run(sh.name, func(b *testing.B) {
			w := newConvWorld(b, size, sh)
			rng := rand.New(rand.NewPCG(4, 4))
			// Background: shared runs in the first half, conversions in the
			// second, so every conversion changes exactly one page.
			for i := range uint64(1000) {
				if err := w.a.Convert(i*(size/2/page/1000)*page, 16*page, memattr.Shared); err != nil {
					b.Fatal(err)
				}
			}
			base := w.mapper.Stats()
			ops := 0
			collected(b)
			for b.Loop() {
				off := size/2 + uint64(rng.IntN(size/2/page))*page
				if err := w.a.Convert(off, page, memattr.Shared); err != nil {
					b.Fatal(err)
				}
				if err := w.a.Convert(off, page, memattr.Private); err != nil {
					b.Fatal(err)
				}
				ops++
			}
			st := w.mapper.Stats()
			b.ReportMetric(float64(st.MapCalls-base.MapCalls)/float64(ops), "map-calls/op")
			b.ReportMetric(float64(st.UnmapCalls-base.UnmapCalls)/float64(ops), "unmap-calls/op")
			b.ReportMetric(float64(w.a.StateBytes()), "state-bytes")
		})
	}
}

// BenchmarkConvert1G converts 1 GiB to shared and back (one op = both): the
// baseline maps it as 262,144 granules, gmem as one entry.
func BenchmarkConvert1G(b *testing.B) {
	const size = 2 << 30
	for _, sh := range shapes {
		b.Run(sh.name, func(b *testing.B) {
			w := newConvWorld(b, size, sh)
			ops := 0
			collected(b)
			for b.Loop() {
				if err := w.a.Convert(0, 1<<30, memattr.Shared); err != nil {
					b.Fatal(err)
				}
				if err := w.a.Convert(0, 1<<30, memattr.Private); err != nil {
					b.Fatal(err)
				}
				ops++
			}
			if w.model.Len() != 0 {
				b.Fatalf("%d entries left", w.model.Len())
			}
			w.report(b, ops)
		})
	}
}

// BenchmarkParallelConvert converts random pages of disjoint lanes of one
// region from GOMAXPROCS goroutines, against one goroutine doing the same
// work. One op is 1,024 conversions (512 pages to shared and back) in total.
// The kernel=20us variants give each conversion a backend step that takes 20 µs
// of CPU, as a KVM_SET_MEMORY_ATTRIBUTES or guest_memfd ioctl does: no lock is
// held across it, so there the goroutines overlap.
func BenchmarkParallelConvert(b *testing.B) {
	const (
		size  = 1 << 30
		work  = 512
		procs = 0 // GOMAXPROCS
	)
	type variant struct {
		listeners int
		kernel    time.Duration
	}
	for _, v := range []variant{{0, 0}, {1, 0}, {1, 20 * time.Microsecond}} {
		for _, parallel := range []bool{false, true} {
			name := "serial"
			if parallel {
				name = "parallel"
			}
			name += "/listeners=" + strconv.Itoa(v.listeners)
			if v.kernel > 0 {
				name += "/kernel=" + strconv.FormatInt(v.kernel.Microseconds(), 10) + "us"
			}
			listeners := v.listeners
			b.Run(name, func(b *testing.B) {
				n := runtime.GOMAXPROCS(procs)
				m := discard.New(size, nil)
				var cfg memattr.Config
				if v.kernel > 0 {
					cfg.Backend = spinBackend(v.kernel)
				}
				a, err := memattr.New(m, cfg)
				if err != nil {
					b.Fatal(err)
				}
				if listeners > 0 {
					mp, err := dma.New(iommu.NewModelSpan(iommu.Caps{Rules: iommu.IOMMUFD}, size), nil, dma.Options{RegionSize: size})
					if err != nil {
						b.Fatal(err)
					}
					if err := m.Register(mp, discard.Section{Size: size}); err != nil {
						b.Fatal(err)
					}
				}
				lane := uint64(size / n)
				// convert does count pages of lane l, to shared and back.
				convert := func(rng *rand.Rand, l, count int) {
					for range count {
						off := uint64(l)*lane + uint64(rng.IntN(int(lane/page)))*page
						if err := a.Convert(off, page, memattr.Shared); err != nil {
							b.Error(err)
							return
						}
						if err := a.Convert(off, page, memattr.Private); err != nil {
							b.Error(err)
							return
						}
					}
				}
				rngs := make([]*rand.Rand, n)
				for i := range rngs {
					rngs[i] = rand.New(rand.NewPCG(uint64(i), 9))
				}
				iters := 0
				for b.Loop() {
					iters++
					if !parallel {
						for l := range n {
							convert(rngs[0], l, work/n)
						}
						continue
					}
					var wg sync.WaitGroup
					for l := range n {
						wg.Go(func() { convert(rngs[l], l, work/n) })
					}
					wg.Wait()
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(iters*work*2), "ns/conversion")
				b.ReportMetric(float64(n), "goroutines")
			})
		}
	}
}

// spinBackend is a memattr.Backend whose attribute change takes CPU time, as
// a kernel call does.
type spinBackend time.Duration

func (d spinBackend) SetAttributes([]span.Range, memattr.State) error {
	for start := time.Now(); time.Since(start) < time.Duration(d); {
	}
	return nil
}

func (spinBackend) Release([]span.Range, memattr.State) error { return nil }

// churnOp is one conversion of the churn benchmarks: a page and its new
// state.
type churnOp struct {
	off uint64
	to  memattr.State
}

// BenchmarkChurnScattered is row 4 of gmem bench: 100,000 random
// single-page conversions of a 16 GiB region that starts private, each to a
// random state (half of them to the state the page is in), which leaves about
// 49,000 scattered shared pages. One op is one conversion; the region is
// built anew (untimed) after every 100,000.
func BenchmarkChurnScattered(b *testing.B) {
	const (
		size = 16 << 30
		ops  = 100_000
	)
	rng := rand.New(rand.NewPCG(5, 6))
	seq := make([]churnOp, ops)
	for i := range seq {
		seq[i] = churnOp{rng.Uint64N(size/page) * page, memattr.State(rng.IntN(2))}
	}
	for _, sh := range splitShapes {
		b.Run(sh.name, func(b *testing.B) {
			var w *convWorld
			i := 0
			for b.Loop() {
				if i%ops == 0 {
					b.StopTimer()
					w = nil // garbage for the collection below
					w = newConvWorld(b, size, sh)
					collected(b)
				}
				o := seq[i%ops]
				if err := w.a.Convert(o.off, page, o.to); err != nil {
					b.Fatal(err)
				}
				i++
			}
			b.ReportMetric(float64(w.a.StateBytes()), "state-bytes")
		})
	}
}

// BenchmarkChurnAmongRuns is row 6 of gmem bench: 100,000 random
// single-page conversions, each to a random state, of a 1 TiB region that
// holds 500,000 scattered shared pages, no two adjacent (1,000,000 runs).
// One op is one conversion; after every 100,000 the conversions are undone,
// untimed, so every pass starts from the same state.
func BenchmarkChurnAmongRuns(b *testing.B) {
	const (
		size   = 1 << 40
		shared = 500_000
		ops    = 100_000
	)
	rng := rand.New(rand.NewPCG(8, 9))
	slot := uint64(size / page / shared)
	background := make([]uint64, shared)
	for i := range background {
		background[i] = (uint64(i)*slot + rng.Uint64N(slot-1)) * page
	}
	rng = rand.New(rand.NewPCG(10, 6))
	seq := make([]churnOp, ops)
	for i := range seq {
		seq[i] = churnOp{rng.Uint64N(size/page) * page, memattr.State(rng.IntN(2))}
	}
	for _, sh := range splitShapes {
		b.Run(sh.name, func(b *testing.B) {
			w := newConvWorld(b, size, sh)
			for _, off := range background {
				if err := w.a.Convert(off, page, memattr.Shared); err != nil {
					b.Fatal(err)
				}
			}
			// Each op's page before it, to undo a pass in reverse.
			prev := make([]memattr.State, ops)
			last := make(map[uint64]memattr.State, ops)
			for i, o := range seq {
				st, ok := last[o.off]
				if !ok {
					st = w.a.Get(o.off)
				}
				prev[i], last[o.off] = st, o.to
			}
			collected(b)
			i := 0
			for b.Loop() {
				if i == ops {
					b.StopTimer()
					for j := ops - 1; j >= 0; j-- {
						if err := w.a.Convert(seq[j].off, page, prev[j]); err != nil {
							b.Fatal(err)
						}
					}
					i = 0
					b.StartTimer()
				}
				o := seq[i]
				if err := w.a.Convert(o.off, page, o.to); err != nil {
					b.Fatal(err)
				}
				i++
			}
			b.ReportMetric(float64(w.a.StateBytes()), "state-bytes")
		})
	}
}
