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
