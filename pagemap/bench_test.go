package pagemap

import (
	"math/rand/v2"
	"runtime"
	"testing"

	"github.com/gmemproject/gmem/span"
)

// The benchmarks model a 1 TiB region of 4 KiB pages with one bit per page
// (shared or private).
const (
	benchPages = 1 << 28
	benchBits  = 1
)

// realisticState gives m the state of a confidential VM that shares a
// contiguous 1 GiB (say, a bounce buffer area), not chunk-aligned, and 50,000
// scattered single pages (say, per-vCPU and per-device pages).
func realisticState(b *testing.B, m Map) {
	const gib = 1 << 18 // pages
	start := uint64(3*chunkPages + 12345)
	if err := m.Set(span.Range{Start: start, End: start + gib}, 1); err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 50000 {
		p := rng.Uint64N(benchPages)
		if err := m.Set(span.Range{Start: p, End: p + 1}, 1); err != nil {
			b.Fatal(err)
		}
	}
}

// adversarialState gives m the worst pattern for runs: pages 0,1,0,1...
func adversarialState(b *testing.B, m Map) {
	for p := uint64(1); p < benchPages; p += 2 {
		if err := m.Set(span.Range{Start: p, End: p + 1}, 1); err != nil {
			b.Fatal(err)
		}
	}
}

// heapInUse returns the live heap after a full collection.
func heapInUse() uint64 {
	var ms runtime.MemStats
	// Twice: objects kept by sync.Pool victim caches only go in the second.
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// BenchmarkStateMemory reports the memory each implementation needs for a
// realistic and an adversarial state of 1 TiB: what Bytes counts ("bytes"),
// the heap really in use ("heap-bytes"), and bytes as a fraction of the
// bitmap's ("of-bitmap"; targets: realistic <= 0.05, adversarial <= 2).
// Run it once: go test ./pagemap -run '^$' -bench StateMemory -benchtime 1x
func BenchmarkStateMemory(b *testing.B) {
	dense := float64((benchPages*benchBits + 63) / 64 * 8)
	for _, pattern := range []struct {
		name  string
		apply func(*testing.B, Map)
	}{{"realistic", realisticState}, {"adversarial", adversarialState}} {
		for _, im := range implementations() {
			b.Run(pattern.name+"/"+im.name, func(b *testing.B) {
				var bytes, heap uint64
				for b.Loop() {
					before := heapInUse()
					m := mustNew(b, im, benchPages, benchBits)
					pattern.apply(b, m)
					heap = heapInUse() - before
					bytes = m.Bytes()
					runtime.KeepAlive(m)
				}
				b.ReportMetric(float64(bytes), "bytes")
				b.ReportMetric(float64(heap), "heap-bytes")
				b.ReportMetric(float64(bytes)/dense, "of-bitmap")
			})
		}
	}
}

// BenchmarkSet4K sets random single pages to random values in a map in the
// realistic state.
func BenchmarkSet4K(b *testing.B) {
	for _, im := range implementations() {
		b.Run(im.name, func(b *testing.B) {
			m := mustNew(b, im, benchPages, benchBits)
			realisticState(b, m)
			rng := rand.New(rand.NewPCG(5, 6))
			for b.Loop() {
				x := rng.Uint64()
				p := x % benchPages
				if err := m.Set(span.Range{Start: p, End: p + 1}, uint8(x>>63)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRuns iterates over every run of a map in the realistic state.
func BenchmarkRuns(b *testing.B) {
	for _, im := range implementations() {
		b.Run(im.name, func(b *testing.B) {
			m := mustNew(b, im, benchPages, benchBits)
			realisticState(b, m)
			var n int
			for b.Loop() {
				n = 0
				for range m.Runs(span.Range{End: benchPages}) {
					n++
				}
			}
			b.ReportMetric(float64(n), "runs")
		})
	}
}

// BenchmarkChurn4K models the single-page conversions of gmem bench's churn
// rows at the map level: a region of 16 maps (the parts of a parted
// discard.StateSource), and per operation a Get of a random page followed by
// a Set of it to the other value. The same ops are replayed in order, so
// every second pass takes the maps back to where they started. "among-runs"
// is 1 TiB holding 500,000 isolated 1s (about 245 runs a chunk); "empty" is
// 16 GiB starting all 0 (its chunks fill up to about 1,500 runs and go
// dense).
func BenchmarkChurn4K(b *testing.B) {
	const parts, ops = 16, 100_000
	for _, sc := range []struct {
		name       string
		partPages  uint64
		background int
	}{{"among-runs", 1 << 24, 500_000}, {"empty", 1 << 18, 0}} {
		for _, im := range implementations() {
			b.Run(sc.name+"/"+im.name, func(b *testing.B) {
				maps := make([]Map, parts)
				for i := range maps {
					maps[i] = mustNew(b, im, sc.partPages, 1)
				}
				total := parts * sc.partPages
				rng := rand.New(rand.NewPCG(8, 9))
				if sc.background > 0 {
					slot := total / uint64(sc.background)
					for i := range uint64(sc.background) {
						p := i*slot + rng.Uint64N(slot-1)
						if err := maps[p/sc.partPages].Set(span.Range{Start: p % sc.partPages, End: p%sc.partPages + 1}, 1); err != nil {
							b.Fatal(err)
						}
					}
				}
				pages := make([]uint64, ops)
				for i := range pages {
					pages[i] = rng.Uint64N(total)
				}
				i := 0
				for b.Loop() {
					p := pages[i]
					if i++; i == ops {
						i = 0
					}
					m, q := maps[p/sc.partPages], p%sc.partPages
					v := m.Get(q)
					if err := m.Set(span.Range{Start: q, End: q + 1}, v^1); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
