package iommu

import (
	"errors"
	"slices"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/span"
)

// TestModelLargeAndSpanning checks mappings that span lock windows (kept as
// pieces) and ones that meet every shard (kept whole) against the rules: the
// lookups, overlap, the unmap answers of both rule sets and DMA reach.
//
// It runs with the default 64 MiB windows and with windows spread over a
// 16 GiB region (NewModelSpan: 256 MiB, a 64th of it).
func TestModelLargeAndSpanning(t *testing.T) {
	for _, tc := range []struct {
		size  uint64
		shift uint
	}{{0, modelWindowShift}, {1 << 30, modelWindowShift}, {16 << 30, 28}, {16<<30 + 1, 29}} {
		for _, rules := range []Rules{Type1v2, IOMMUFD} {
			testModelLargeAndSpanning(t, rules, tc.size, tc.shift)
		}
	}
}

func testModelLargeAndSpanning(t *testing.T, rules Rules, size uint64, shift uint) {
	t.Helper()
	m := NewModelSpan(Caps{Rules: rules}, size)
	if m.shift != shift {
		t.Fatalf("span %#x: windows of 2^%d bytes, want 2^%d", size, m.shift, shift)
	}
	w := uint64(1) << m.shift
	{
		small := Mapping{IOVA: 3*w - 8<<10, Size: 16 << 10}          // two windows
		large := Mapping{IOVA: 100 * w, Size: (modelShards + 3) * w} // every shard
		after := Mapping{IOVA: large.IOVA + large.Size, Size: 4 << 10}
		for _, x := range []Mapping{small, large, after} {
			if err := m.Map(x.IOVA, x.Size, nil); err != nil {
				t.Fatalf("%v: map %+v: %v", rules, x, err)
			}
		}
		if got := m.Mappings(); !slices.Equal(got, []Mapping{small, large, after}) {
			t.Fatalf("%v: mappings %+v", rules, got)
		}
		for _, a := range []uint64{small.IOVA, 3 * w, small.IOVA + small.Size - 1, large.IOVA, large.IOVA + 37*w + 5, after.IOVA - 1} {
			if !m.Reaches(a) {
				t.Fatalf("%v: %#x not reached", rules, a)
			}
		}
		for _, a := range []uint64{small.IOVA - 1, small.IOVA + small.Size, large.IOVA - 1, after.IOVA + after.Size} {
			if m.Reaches(a) {
				t.Fatalf("%v: %#x reached", rules, a)
			}
		}
		if err := m.Map(large.IOVA+50*w, 4<<10, nil); !errors.Is(err, unix.EEXIST) {
			t.Fatalf("%v: map inside the large mapping: %v", rules, err)
		}
		if err := m.Map(3*w, 4<<10, nil); !errors.Is(err, unix.EEXIST) {
			t.Fatalf("%v: map inside the spanning mapping's second piece: %v", rules, err)
		}
		if got := m.MappingsIn(span.Range{Start: 3 * w, End: large.IOVA + 1}); !slices.Equal(got, []Mapping{small, large}) {
			t.Fatalf("%v: mappings in: %+v", rules, got)
		}
		// An unmap cutting the large mapping changes nothing.
		_, err := m.Unmap(large.IOVA+w, w)
		want := unix.EINVAL
		if rules == IOMMUFD {
			want = unix.ENOENT
		}
		if !errors.Is(err, want) || m.Len() != 3 {
			t.Fatalf("%v: cutting unmap: %v, %d entries", rules, err, m.Len())
		}
		n, err := m.Unmap(large.IOVA, large.Size+after.Size)
		if err != nil || n != large.Size+after.Size {
			t.Fatalf("%v: unmap: %d, %v", rules, n, err)
		}
		if m.Reaches(large.IOVA+37*w) || m.Len() != 1 {
			t.Fatalf("%v: the large mapping is still there", rules)
		}
		if n, err := m.Unmap(0, 1<<62); err != nil || n != small.Size || m.Len() != 0 {
			t.Fatalf("%v: unmap of everything: %d, %v, %d left", rules, n, err, m.Len())
		}
		if p := m.Pins(); p.Pinned != p.Unpinned {
			t.Fatalf("%v: pins %+v", rules, p)
		}
	}
}

// TestModelConcurrentLimit maps from several goroutines, each in its own
// windows, until type1 refuses: the limit is checked and taken in one step,
// so exactly the limit is mapped.
func TestModelConcurrentLimit(t *testing.T) {
	const limit, workers = 500, 8
	for range 10 {
		m := NewModel(Caps{Rules: Type1v2, EntryLimit: limit})
		got := make([]int, workers)
		var wg sync.WaitGroup
		for g := range workers {
			wg.Go(func() {
				for i := range uint64(limit) {
					switch err := m.Map(uint64(g)<<modelWindowShift+i<<12, 4<<10, nil); {
					case err == nil:
						got[g]++
					case !errors.Is(err, unix.ENOSPC):
						t.Error(err)
					}
				}
			})
		}
		wg.Wait()
		total := 0
		for _, n := range got {
			total += n
		}
		if avail, _, _ := m.Avail(); total != limit || m.Len() != limit || avail != 0 || len(m.Mappings()) != limit {
			t.Fatalf("%d maps succeeded, Len %d, avail %d; want the limit %d", total, m.Len(), avail, limit)
		}
	}
}

// TestModelCutSpanning cuts mappings kept as pieces across windows and
// whole in large, where a split point's area reaches windows the cut's own
// range does not meet (so Cut must lock more shards than its range's):
// pages at the cuts and at window edges, the pieces left, and concurrent
// cuts of one large mapping from goroutines in far-apart windows while a
// device DMAs to pages that stay mapped.
func TestModelCutSpanning(t *testing.T) {
	for _, size := range []uint64{0, 16 << 30} {
		m := NewModelSpan(Caps{Rules: IOMMUFD, Cut: true}, size)
		w := uint64(1) << m.shift
		const pg = 4 << 10
		large := Mapping{IOVA: 4 * w, Size: (modelShards + 6) * w} // every shard
		small := Mapping{IOVA: w - 8*pg, Size: 16 * pg}            // two windows
		host := make([]byte, small.Size)
		for _, x := range []Mapping{large, small} {
			var h []byte
			if x == small {
				h = host
			}
			if err := m.Map(x.IOVA, x.Size, h); err != nil {
				t.Fatal(err)
			}
		}
		// A page of the small mapping at the window boundary.
		if n, err := m.Cut(w, pg); err != nil || n != pg {
			t.Fatalf("cut at the window boundary: %#x, %v", n, err)
		}
		if m.Reaches(w) || !m.Reaches(w-1) || !m.Reaches(w+pg) {
			t.Fatal("reach around the cut at the window boundary")
		}
		if err := m.DMAWrite(w+pg, []byte{7}); err != nil || host[9*pg] != 7 {
			t.Fatalf("DMA after the cut landed wrong: %v", err)
		}
		// A page in the middle of the large mapping: both halves stay, the
		// first still large, the second a set of pieces.
		mid := large.IOVA + (modelShards+1)*w + 5*pg
		if n, err := m.Cut(mid, pg); err != nil || n != pg {
			t.Fatalf("cut in the large mapping: %#x, %v", n, err)
		}
		want := []Mapping{
			{small.IOVA, 8 * pg}, {w + pg, 7 * pg},
			{large.IOVA, mid - large.IOVA}, {mid + pg, large.IOVA + large.Size - mid - pg},
		}
		if got := m.Mappings(); !slices.Equal(got, want) {
			t.Fatalf("span %#x: areas %+v, want %+v", size, got, want)
		}
		if m.Len() != 4 || len(m.large) != 1 {
			t.Fatalf("span %#x: Len %d, %d large", size, m.Len(), len(m.large))
		}
		// Concurrent single-page cuts of the large half, one goroutine per
		// window, with DMA to pages that stay mapped.
		var wg sync.WaitGroup
		const workers = 8
		for g := range uint64(workers) {
			wg.Go(func() {
				base := large.IOVA + (1+7*g)*w
				for i := range uint64(16) {
					a := base + 2*i*pg
					if n, err := m.Cut(a, pg); err != nil || n != pg {
						t.Errorf("concurrent cut at %#x: %#x, %v", a, n, err)
					}
					if !m.Reaches(a+pg) || m.Reaches(a) {
						t.Errorf("reach around the concurrent cut at %#x", a)
					}
				}
			})
		}
		wg.Wait()
		if got := m.Len(); got != 4+workers*16 {
			t.Fatalf("span %#x: %d areas after the concurrent cuts, want %d", size, got, 4+workers*16)
		}
		var mapped uint64
		for _, x := range m.Mappings() {
			mapped += x.Size
		}
		if p := m.Pins(); p.Pinned-p.Unpinned != mapped/pg || p.Unpinned != 2+workers*16 {
			t.Fatalf("span %#x: pins %+v with %#x bytes mapped", size, p, mapped)
		}
		if n, err := m.Unmap(0, 1<<62); err != nil || n != mapped || m.Len() != 0 || len(m.large) != 0 {
			t.Fatalf("span %#x: unmap of everything: %#x, %v, %d left", size, n, err, m.Len())
		}
	}
}
