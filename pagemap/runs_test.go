package pagemap

import (
	"math/rand/v2"
	"reflect"
	"runtime"
	"slices"
	"testing"

	"github.com/gmemproject/gmem/span"
)

func newRunsT(t testing.TB, pages uint64, bits uint) *Runs {
	t.Helper()
	m, err := NewRuns(pages, bits)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func mustSet(t testing.TB, m Map, start, end uint64, v uint8) {
	t.Helper()
	if err := m.Set(span.Range{Start: start, End: end}, v); err != nil {
		t.Fatalf("Set([%#x, %#x), %d): %v", start, end, v, err)
	}
}

// TestStructSizes ties the sizes Bytes counts to the types.
func TestStructSizes(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"seg", reflect.TypeFor[seg]().Size(), segBytes},
		{"chunk", reflect.TypeFor[chunk]().Size(), chunkStructBytes},
		{"hotEntry", reflect.TypeFor[hotEntry]().Size(), hotEntryBytes},
	} {
		if c.got != c.want {
			t.Errorf("size of %s is %d, Bytes counts %d", c.name, c.got, c.want)
		}
	}
	// A Runs header is allocated in the 128-byte size class.
	if s := reflect.TypeFor[Runs]().Size(); s <= 112 || s > runsStructBytes {
		t.Errorf("size of Runs is %d, Bytes counts %d (its size class)", s, runsStructBytes)
	}
}

// chunkOf returns the chunk of chunk segment ci, or nil if ci is uniform.
func chunkOf(m *Runs, ci uint64) *chunk { return m.find(ci).c }

// TestDenseSwitch drives one chunk past the dense threshold and back, for
// both widths, checking the form and the structure at every step.
func TestDenseSwitch(t *testing.T) {
	for _, bits := range []uint{1, 2} {
		m := newRunsT(t, 3*chunkPages, bits)
		o := newOracle(3*chunkPages, bits)
		base := uint64(chunkPages)
		limit := runsLimit(chunkPages, bits)
		// Stripes of 1 over 0: run count 2k+1 after k pages.
		becameDense := -1
		for k := 0; k < chunkPages/2; k++ {
			p := base + 1 + 2*uint64(k)
			mustSet(t, m, p, p+1, 1)
			_ = o.set(span.Range{Start: p, End: p + 1}, 1)
			c := chunkOf(m, 1)
			if c.dense != nil {
				becameDense = 2*k + 3
				break
			}
			if b := cap(c.starts)*2 + cap(c.vals); b > limit {
				t.Fatalf("bits=%d: %d runs hold %d bytes in runs form, over the dense %d", bits, len(c.starts), b, limit)
			}
		}
		if err := checkInvariants(m); err != nil {
			t.Fatalf("bits=%d: %v", bits, err)
		}
		// The switch happens once runs would outgrow the dense form: not
		// much before limit/runBytes runs, never after.
		if max := limit / runBytes(bits); becameDense < 0 || becameDense > max+1 || becameDense < max*3/4 {
			t.Fatalf("bits=%d: chunk became dense at %d runs, want close to %d", bits, becameDense, max)
		}
		t.Logf("bits=%d: dense at %d runs (dense form %d bytes)", bits, becameDense, limit)
		// Thin the stripes out from the front; the chunk must stay dense
		// until runs take less than half the dense form, then turn back.
		backAt := -1
		const step = 16 // pages cleared at a time: step runs fewer each time
		for q := base; q < base+chunkPages; q += step {
			mustSet(t, m, q, q+step, 0)
			_ = o.set(span.Range{Start: q, End: q + step}, 0)
			c := chunkOf(m, 1)
			if c == nil {
				t.Fatalf("bits=%d: chunk collapsed early", bits)
			}
			if c.dense == nil {
				backAt = len(c.starts)
				break
			}
			if 2*int(c.nruns)*runBytes(bits) < limit {
				t.Fatalf("bits=%d: still dense with %d runs", bits, c.nruns)
			}
		}
		if backAt < 0 || 2*backAt*runBytes(bits) >= limit || 2*(backAt+step)*runBytes(bits) < limit {
			t.Fatalf("bits=%d: back to runs at %d runs, want just under %d", bits, backAt, limit/2/runBytes(bits))
		}
		if err := checkInvariants(m); err != nil {
			t.Fatalf("bits=%d: %v", bits, err)
		}
		if err := verifyAllRuns(m, o); err != nil {
			t.Fatalf("bits=%d: %v", bits, err)
		}
		// Clearing the chunk collapses it: one segment, header only, plus
		// at most one spare segment and one small spare chunk.
		mustSet(t, m, base, base+chunkPages, 0)
		spare := uint64(0)
		if m.spareSeg != nil {
			spare += segBytes
		}
		if m.spareChunk != nil {
			spare += m.spareChunk.bytes()
		}
		if m.segs != 1 || m.chunkBytes != 0 || m.Bytes() != runsStructBytes+uint64(cap(m.hot))*hotEntryBytes+segBytes+spare || spare > segBytes+chunkStructBytes+2*spareChunkRuns*2 {
			t.Fatalf("bits=%d: cleared map has %d segments, %d chunk bytes, Bytes %d", bits, m.segs, m.chunkBytes, m.Bytes())
		}
	}
}

// TestWorstCaseBound checks the bounded worst case: every page its own run
// (and random values) costs no more than the dense array plus a constant
// per chunk.
func TestWorstCaseBound(t *testing.T) {
	for _, bits := range []uint{1, 2} {
		for _, pattern := range []string{"alternating", "random"} {
			const pages = 4*chunkPages + 1000
			m := newRunsT(t, pages, bits)
			rng := rand.New(rand.NewPCG(7, uint64(bits)))
			for p := uint64(0); p < pages; p++ {
				v := uint8(p & 1)
				if pattern == "random" {
					v = uint8(rng.IntN(1 << bits))
				}
				if v != 0 {
					mustSet(t, m, p, p+1, v)
				}
			}
			if err := checkInvariants(m); err != nil {
				t.Fatal(err)
			}
			chunks := uint64(5)
			dense := (pages*uint64(bits) + 63) / 64 * 8
			bound := dense + chunks*(chunkStructBytes+segBytes) + runsStructBytes + minHot*hotEntryBytes
			if got := m.Bytes(); got > bound {
				t.Errorf("bits=%d %s: Bytes() = %d, over the bound %d (dense %d)", bits, pattern, got, bound, dense)
			}
		}
	}
}

// TestBytesHonest compares Bytes with the heap the map really holds.
func TestBytesHonest(t *testing.T) {
	const pages = 1 << 26
	rng := rand.New(rand.NewPCG(3, 4))
	points := make([]uint64, 60000)
	for i := range points {
		points[i] = rng.Uint64N(pages)
	}
	var before, after runtime.MemStats
	// Twice: objects kept by sync.Pool victim caches only go in the second.
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&before)
	m := newRunsT(t, pages, 2)
	mustSet(t, m, 1000, 1<<18+1000, 1)
	for i, p := range points {
		mustSet(t, m, p, p+1, uint8(1+i%3))
	}
	// A few dense chunks too.
	for p := uint64(5 * chunkPages); p < 7*chunkPages; p += 2 {
		mustSet(t, m, p, p+1, 3)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	heap := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	got := int64(m.Bytes())
	runtime.KeepAlive(m)
	runtime.KeepAlive(points) // live across both measurements
	t.Logf("Bytes() = %d, heap growth %d", got, heap)
	if err := checkInvariants(m); err != nil {
		t.Fatal(err)
	}
	// A little slack for whatever else the runtime allocates meanwhile.
	if d := heap - got; d > got/50+8192 || d < -(got/50+8192) {
		t.Errorf("Bytes() = %d, but the heap grew by %d", got, heap)
	}
}

// TestHugeMap checks a map far larger than memory could hold densely.
func TestHugeMap(t *testing.T) {
	const pages = 1 << 62
	m := newRunsT(t, pages, 2)
	mustSet(t, m, pages-5, pages, 2)
	mustSet(t, m, 1<<40, 1<<41, 1)
	mustSet(t, m, 1<<40+7, 1<<40+8, 3)
	if got := m.Get(pages - 1); got != 2 {
		t.Errorf("Get(last) = %d", got)
	}
	if p, ok := m.Next(0, 2); !ok || p != pages-5 {
		t.Errorf("Next(0, 2) = %#x, %v", p, ok)
	}
	if p, ok := m.NextNot(1<<40+8, 1); !ok || p != 1<<41 {
		t.Errorf("NextNot(2^40+8, 1) = %#x, %v", p, ok)
	}
	if n := m.Count(span.Range{End: pages}, 1); n != 1<<40-1 {
		t.Errorf("Count(1) = %#x", n)
	}
	want := []Run{
		{span.Range{Start: 0, End: 1 << 40}, 0},
		{span.Range{Start: 1 << 40, End: 1<<40 + 7}, 1},
		{span.Range{Start: 1<<40 + 7, End: 1<<40 + 8}, 3},
		{span.Range{Start: 1<<40 + 8, End: 1 << 41}, 1},
		{span.Range{Start: 1 << 41, End: pages - 5}, 0},
		{span.Range{Start: pages - 5, End: pages}, 2},
	}
	if got := collect(m, span.Range{End: ^uint64(0)}); !runsEqual(got, want) {
		t.Errorf("Runs = %v, want %v", got, want)
	}
	if err := checkInvariants(m); err != nil {
		t.Fatal(err)
	}
	if b := m.Bytes(); b > 4096 { // the header, the smallest hot cache (2.6 KiB), segments, two small chunks
		t.Errorf("Bytes() = %d for six runs", b)
	}
	// The last chunk of a map whose size is a multiple of the chunk.
	mustSet(t, m, 0, pages, 0)
	if m.segs != 1 {
		t.Errorf("uniform map has %d segments", m.segs)
	}
}

// TestRunsOverflowEdge checks a map whose last chunk ends near the top of
// the page space, where chunk arithmetic could wrap.
func TestRunsOverflowEdge(t *testing.T) {
	const pages = ^uint64(0) - 3 // the last chunk is partial
	m := newRunsT(t, pages, 1)
	mustSet(t, m, pages-chunkPages-10, pages, 1)
	mustSet(t, m, pages-3, pages-2, 0)
	want := []Run{
		{span.Range{Start: 0, End: pages - chunkPages - 10}, 0},
		{span.Range{Start: pages - chunkPages - 10, End: pages - 3}, 1},
		{span.Range{Start: pages - 3, End: pages - 2}, 0},
		{span.Range{Start: pages - 2, End: pages}, 1},
	}
	if got := collect(m, span.Range{End: ^uint64(0)}); !runsEqual(got, want) {
		t.Errorf("Runs = %v, want %v", got, want)
	}
	if n := m.Count(span.Range{Start: pages - 100, End: ^uint64(0)}, 1); n != 99 {
		t.Errorf("Count = %d, want 99", n)
	}
	if err := checkInvariants(m); err != nil {
		t.Fatal(err)
	}
}

// TestSetOne checks the in-place single-page edit of a 1-bit runs chunk
// against the general edit, setRuns, on random chunks whose runs crowd
// together and against both ends (so single-page runs, and runs at offset 0
// and at the last page, are common), with pages picked at and beside the
// boundaries.
func TestSetOne(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	const size = chunkPages
	inPlace, refused := 0, 0
	for iter := range 200_000 {
		// Boundaries: a few clustered near 0, near the end and around a
		// random middle.
		set := map[int]bool{}
		for range 1 + rng.IntN(12) {
			var p int
			switch rng.IntN(3) {
			case 0:
				p = 1 + rng.IntN(6)
			case 1:
				p = size - 1 - rng.IntN(6)
			default:
				p = size/2 + rng.IntN(8)
			}
			set[p] = true
		}
		starts := []uint16{0}
		for p := range set {
			starts = append(starts, uint16(p))
		}
		slices.Sort(starts)
		// Room for 0 to 3 more starts, or the most a chunk of these runs may
		// hold, from which removing a start makes splice shrink the slice.
		room := len(starts) + rng.IntN(4)
		if rng.IntN(4) == 0 {
			room = max(4*len(starts)-1, len(starts))
		}
		first := uint8(rng.IntN(2))
		mk := func() *chunk { return &chunk{first: first, starts: append(make([]uint16, 0, room), starts...)} }
		if err := checkChunk(mk(), 1, size, true); err != nil {
			t.Fatalf("iter %d: the chunk before: %v", iter, err)
		}
		var a int
		switch rng.IntN(4) {
		case 0:
			a = 0
		case 1:
			a = size - 1
		default:
			b := int(starts[rng.IntN(len(starts))])
			a = min(max(b+rng.IntN(3)-1, 0), size-1)
		}
		v := uint8(rng.IntN(2))
		got, want := mk(), mk()
		before := slices.Clone(got.starts)
		if !got.setOne(size, a, v) {
			refused++
			if !slices.Equal(got.starts, before) || got.first != first || cap(got.starts) != room {
				t.Fatalf("iter %d: setOne(%d, %d) refused but changed the chunk: %v first %d -> %v first %d",
					iter, a, v, before, first, got.starts, got.first)
			}
			continue
		}
		inPlace++
		want.setRuns(1, size, a, a+1, v)
		if want.dense != nil {
			t.Fatalf("iter %d: %d runs went dense", iter, len(starts))
		}
		if !slices.Equal(got.starts, want.starts) || got.first != want.first {
			t.Fatalf("iter %d: setOne(%d, %d) of %v first %d: got %v first %d, want %v first %d",
				iter, a, v, before, first, got.starts, got.first, want.starts, want.first)
		}
		if err := checkChunk(got, 1, size, true); err != nil {
			t.Fatalf("iter %d: %v", iter, err)
		}
	}
	// Most edits fit in place, and some need a reallocation; a test that
	// never reached either would prove nothing about it.
	t.Logf("%d of 200,000 edits made in place, %d refused", inPlace, refused)
	if inPlace < 100_000 || refused == 0 {
		t.Fatalf("%d of 200,000 edits made in place, %d refused: want most in place and some refused", inPlace, refused)
	}
}
