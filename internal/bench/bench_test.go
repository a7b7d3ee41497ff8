package bench

import (
	"math/rand/v2"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// The benchmarks compare gmem with the baseline it replaces (QEMU's
// algorithms: a bitmap of 4 KiB pages, a per-granule replay, one IOMMU
// entry per granule) in the same run, on the stacks and workloads of gmem
// bench's rows. Run them with a small -benchtime, e.g.
//
//	go test -run '^$' -bench . -benchtime 1x ./internal/bench
//
// the 1 TiB baseline replay alone scans 2^28 granules per iteration.

// shapes are the two sides of a comparison; splitShapes add BitmapExtent,
// which tells what the mapper policy makes from what the page map makes.
var (
	shapes      = []Shape{Baseline, Gmem}
	splitShapes = []Shape{Baseline, Gmem, BitmapExtent}
)

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

// BenchmarkRegisterReplay registers a listener on the listener replay row's
// 1 TiB region with 100,000 runs (50,000 shared): the baseline replays by
// asking the bitmap about each of the 2^28 granules; gmem merges the
// sources' runs. Each iteration registers and unregisters (one
// whole-section discard) the listener.
func BenchmarkRegisterReplay(b *testing.B) {
	const size = 1 << 40
	st, err := NewReplayState(size, FullSizes.ReplayRuns)
	if err != nil {
		b.Fatal(err)
	}
	whole := discard.Section{Size: size}
	srcs := []GranuleSource{BitmapSource{st.Bitmap}}
	runs := uint64(st.Shared)

	b.Run("baseline-granule-scan", func(b *testing.B) {
		var c CountListener
		for b.Loop() {
			c = CountListener{}
			if err := GranuleReplay(srcs, whole, page, c.Populate); err != nil {
				b.Fatal(err)
			}
			if err := c.Discard(whole); err != nil {
				b.Fatal(err)
			}
		}
		if c.Calls != runs {
			b.Fatalf("baseline replayed %d runs, want %d", c.Calls, runs)
		}
		b.ReportMetric(float64(c.Calls), "runs/op")
		b.ReportMetric(float64(size/page), "source-calls/op")
		b.ReportMetric(float64(st.Bitmap.Bytes()), "state-bytes")
	})
	b.Run("gmem-runs", func(b *testing.B) {
		var c CountListener
		for b.Loop() {
			c = CountListener{}
			if err := st.Manager.Register(&c, whole); err != nil {
				b.Fatal(err)
			}
			if err := st.Manager.Unregister(&c); err != nil {
				b.Fatal(err)
			}
		}
		if c.Calls != runs {
			b.Fatalf("gmem replayed %d runs, want %d", c.Calls, runs)
		}
		b.ReportMetric(float64(c.Calls), "runs/op")
		b.ReportMetric(float64(2*runs), "source-calls/op") // runs visited
	})

	// The same with a real listener: a DMA mapper on a model IOMMU without
	// entry limit, both sides mapping one entry per run per iteration
	// (unbounded extents: a run that crosses a 2 MiB boundary stays one).
	withMapper := func(b *testing.B, register func(*dma.Mapper) error, unregister func(*dma.Mapper) error) {
		var model *iommu.Model
		for b.Loop() {
			model = iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
			mp, err := dma.New(model, nil, dma.Options{MaxExtent: dma.Unbounded})
			if err != nil {
				b.Fatal(err)
			}
			if err := register(mp); err != nil {
				b.Fatal(err)
			}
			if uint64(model.Len()) != runs {
				b.Fatalf("%d entries, want %d", model.Len(), runs)
			}
			if err := unregister(mp); err != nil {
				b.Fatal(err)
			}
		}
		maps, _ := model.Calls()
		b.ReportMetric(float64(maps), "map-calls/op")
	}
	b.Run("baseline-granule-scan-mapper", func(b *testing.B) {
		withMapper(b, func(mp *dma.Mapper) error { return GranuleReplay(srcs, whole, page, mp.Populate) },
			func(mp *dma.Mapper) error { return mp.Discard(whole) })
	})
	b.Run("gmem-runs-mapper", func(b *testing.B) {
		withMapper(b, func(mp *dma.Mapper) error { return st.Manager.Register(mp, whole) },
			func(mp *dma.Mapper) error { return st.Manager.Unregister(mp) })
	})
}

// BenchmarkConvert4K converts random 4 KiB pages of a 4 GiB region to shared
// and back (one op = both), with 1,000 other shared runs in the region.
func BenchmarkConvert4K(b *testing.B) {
	const size = 4 << 30
	for _, sh := range splitShapes {
		b.Run(sh.Name, func(b *testing.B) {
			s, err := NewStack(size, sh)
			if err != nil {
				b.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(4, 4))
			// Background: shared runs in the first half, conversions in the
			// second, so every conversion changes exactly one page.
			for i := range uint64(1000) {
				if err := s.Attrs.Convert(i*(size/2/page/1000)*page, 16*page, memattr.Shared); err != nil {
					b.Fatal(err)
				}
			}
			base := s.Mapper.Stats()
			ops := 0
			collected(b)
			for b.Loop() {
				off := size/2 + uint64(rng.IntN(size/2/page))*page
				if err := s.Attrs.Convert(off, page, memattr.Shared); err != nil {
					b.Fatal(err)
				}
				if err := s.Attrs.Convert(off, page, memattr.Private); err != nil {
					b.Fatal(err)
				}
				ops++
			}
			st := s.Mapper.Stats()
			b.ReportMetric(float64(st.MapCalls-base.MapCalls)/float64(ops), "map-calls/op")
			b.ReportMetric(float64(st.UnmapCalls-base.UnmapCalls)/float64(ops), "unmap-calls/op")
			b.ReportMetric(float64(s.Attrs.StateBytes()), "state-bytes")
		})
	}
}

// BenchmarkConvert1G is the round trip row: 1 GiB to shared and back (one
// op = both); the baseline maps it as 262,144 granules, gmem as one entry
// per 2 MiB chunk.
func BenchmarkConvert1G(b *testing.B) {
	const size = 1 << 30
	for _, sh := range shapes {
		b.Run(sh.Name, func(b *testing.B) {
			s, err := NewStack(2*size, sh)
			if err != nil {
				b.Fatal(err)
			}
			ops := 0
			collected(b)
			for b.Loop() {
				if _, err := RoundTrip(s, size); err != nil {
					b.Fatal(err)
				}
				ops++
			}
			st := s.Mapper.Stats()
			b.ReportMetric(float64(st.MapCalls)/float64(ops), "map-calls/op")
			b.ReportMetric(float64(st.UnmapCalls)/float64(ops), "unmap-calls/op")
			b.ReportMetric(float64(st.PeakEntries), "peak-entries")
			b.ReportMetric(float64(s.Attrs.StateBytes()), "state-bytes")
		})
	}
}

// BenchmarkParallelConvert converts random pages of disjoint lanes of one
// region (the parallel row's Lanes) from GOMAXPROCS goroutines, against one
// goroutine doing the same work. One op is 1,024 conversions (512 pages to
// shared and back) in total. The kernel=20us variants give each conversion
// a backend step that takes 20 µs of CPU, as a KVM_SET_MEMORY_ATTRIBUTES
// or guest_memfd ioctl does: no lock is held across it, so there the
// goroutines overlap.
func BenchmarkParallelConvert(b *testing.B) {
	const (
		size = 1 << 30
		work = 512
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
			b.Run(name, func(b *testing.B) {
				n := runtime.GOMAXPROCS(0)
				cfg := StackConfig{Region: size, Shape: Gmem, NoDevice: v.listeners == 0}
				if v.kernel > 0 {
					cfg.Backend = spinBackend(v.kernel)
				}
				s, err := NewStackConfig(cfg)
				if err != nil {
					b.Fatal(err)
				}
				lanes := NewLanes(s, size, n, 9)
				workers := 1
				if parallel {
					workers = n
				}
				iters := 0
				for b.Loop() {
					iters++
					if err := lanes.Run(workers, work/n); err != nil {
						b.Fatal(err)
					}
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

// benchChurn runs workload w one conversion an op, on each shape: after a
// pass over its conversions they are undone, untimed, so every pass
// starts from the same state.
func benchChurn(b *testing.B, w ChurnWorkload) {
	for _, sh := range splitShapes {
		b.Run(sh.Name, func(b *testing.B) {
			c, err := NewChurn(sh, w)
			if err != nil {
				b.Fatal(err)
			}
			collected(b)
			i := 0
			for b.Loop() {
				if i == len(c.Ops) {
					b.StopTimer()
					if err := c.Undo(); err != nil {
						b.Fatal(err)
					}
					i = 0
					b.StartTimer()
				}
				if err := c.Step(i); err != nil {
					b.Fatal(err)
				}
				i++
			}
			b.ReportMetric(float64(c.Stack.Attrs.StateBytes()), "state-bytes")
		})
	}
}

// BenchmarkChurnScattered is the 4 KiB churn row's workload
// (ScatteredChurn): 100,000 random single-page conversions of a 16 GiB
// region that starts private, each to a random state (half of them to the
// state the page is in), which leaves about 49,000 scattered shared pages.
// One op is one conversion.
func BenchmarkChurnScattered(b *testing.B) { benchChurn(b, ScatteredChurn(FullSizes)) }

// BenchmarkChurnAmongRuns is the workload of the churn row among runs
// (ChurnAmongRuns): 100,000 random single-page conversions, each to a
// random state, of a 1 TiB region that holds 500,000 scattered shared
// pages, no two adjacent (1,000,000 runs). One op is one conversion.
func BenchmarkChurnAmongRuns(b *testing.B) { benchChurn(b, ChurnAmongRuns(FullSizes)) }
