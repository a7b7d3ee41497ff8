package dma_test

import (
	"errors"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
)

var errBoom = errors.New("injected IOMMU failure")

// FuzzMapper drives a mapper directly with arbitrary populates and discards
// (each then either settled or reverted, some with an IOMMU call made to
// fail) on a model IOMMU (type1, iommufd, or iommufd that cuts, where the
// default policy is Cut), against a per-page oracle: after a success the
// section's pages are mapped (or not), after a failure, and after a revert,
// the entries are exactly as before; after the revert of a cut, the same
// pages are mapped (the kernel cannot join areas). Cut never has a window
// or re-pins.
func FuzzMapper(f *testing.F) {
	f.Add([]byte{0x00, 0x00, 0, 16, 0x80, 4, 4})
	f.Add([]byte{0x31, 0x01, 0, 8, 0x01, 8, 8, 0x80, 6, 4, 0xc0, 2, 2})
	f.Add([]byte{0x10, 0x02, 0, 32, 0x80, 3, 1, 0x80, 9, 9, 0x40, 1, 30})
	f.Add([]byte{0x20, 0x00, 0, 4, 0x00, 8, 4, 0x80, 2, 8, 0xc0, 2, 8, 0x80, 0, 12})
	// Two straddlers and an entry inside; the second split's unmap fails.
	f.Add([]byte{0x01, 0x00, 0x00, 0, 4, 0x00, 4, 2, 0x00, 6, 2, 0x00, 8, 4, 0xa2, 2, 8})
	// 4-page extents: a populate of 20 pages is five entries, cut twice.
	f.Add([]byte{0x01, 0x04, 0x00, 1, 20, 0x80, 6, 1, 0x80, 9, 5})
	// Cut: a middle page, reverted; a span of entries; a failed cut.
	f.Add([]byte{0x03, 0x00, 0x00, 0, 16, 0xc0, 4, 1, 0x80, 4, 1, 0x00, 20, 4, 0x80, 2, 20, 0xa0, 8, 2})
	f.Add([]byte{0x03, 0x04, 0x00, 1, 20, 0x80, 6, 1, 0xc0, 3, 9, 0x80, 0, 48})
	f.Fuzz(func(t *testing.T, data []byte) {
		const pages = 48
		if len(data) < 2 || len(data) > 2+3*160 {
			return
		}
		// Header: rules and entry limit; policy and granularity.
		caps := iommu.Caps{Rules: iommu.IOMMUFD, Cut: data[0]&2 != 0}
		if data[0]&1 == 0 {
			caps = iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 1 + uint64(data[0]>>4)}
		}
		opts := dma.Options{}
		if data[1]&3 != 0 {
			opts = dma.Options{Policy: dma.Granule, Granularity: pg << (data[1]&3 - 1)}
		} else {
			opts.MaxExtent = [4]uint64{0, 4 * pg, 16 * pg, dma.Unbounded}[data[1]>>2&3]
		}
		chunk := opts.MaxExtent
		if chunk == 0 {
			chunk = dma.DefaultMaxExtent
		}
		model := iommu.NewModel(caps)
		host := make([]byte, pages*pg)
		m, err := dma.New(model, host, opts)
		if err != nil {
			t.Fatal(err)
		}
		policy := m.Policy()
		if want := map[bool]dma.Policy{false: dma.Extent, true: dma.Cut}[caps.Cut]; opts.Policy == dma.Auto && policy != want {
			t.Fatalf("Auto on %+v resolved to %v, want %v", caps, policy, want)
		}
		var mapped [pages]bool
		ops := data[2:]
		for op := 0; len(ops) >= 3; op++ {
			c, a, n := ops[0], ops[1], ops[2]
			ops = ops[3:]
			first := uint64(a) % pages
			count := uint64(n) % (pages - first + 1)
			s := discard.Section{Offset: first * pg, Size: count * pg, GPA: gpa + first*pg}
			populate := c&0x80 == 0
			before := model.Mappings()
			stats := m.Stats()
			inject := c&0x20 != 0
			if inject {
				// Fail the k-th IOMMU call of this notification.
				k, calls := int(c&3)+1, 0
				model.SetFault(func(iommu.Call) error {
					if calls++; calls == k {
						return errBoom
					}
					return nil
				})
			}
			if populate {
				err = m.Populate(s)
			} else {
				err = m.Discard(s)
			}
			model.SetFault(nil)
			after := model.Mappings()
			switch {
			case err != nil:
				if !(errors.Is(err, unix.ENOSPC) && caps.EntryLimit != 0) && !(inject && errors.Is(err, errBoom)) {
					t.Fatalf("op %d: %v", op, err)
				}
				if !slices.Equal(before, after) {
					t.Fatalf("op %d: a failed notification changed the entries from %v to %v", op, before, after)
				}
				if st := m.Stats(); st.Splits != stats.Splits || st.Entries != stats.Entries || st.Failures != stats.Failures+1 {
					t.Fatalf("op %d: failed notification stats %+v after %+v", op, st, stats)
				}
			case c&0x40 != 0 && count > 0:
				// Revert: back to exactly the entries before; after a
				// cut, to the same pages, as at least as many entries.
				if err := m.Revert(s); err != nil {
					t.Fatalf("op %d: Revert: %v", op, err)
				}
				got := model.Mappings()
				st := m.Stats()
				if policy == dma.Cut && !populate {
					if !slices.Equal(pagesOf(got), pagesOf(before)) || st.Entries < stats.Entries {
						t.Fatalf("op %d: Revert of a cut left %v, had %v", op, got, before)
					}
					stats.Entries = st.Entries
				} else if !slices.Equal(got, before) {
					t.Fatalf("op %d: Revert left %v, had %v", op, got, before)
				}
				if st.Splits != stats.Splits || st.Entries != stats.Entries || st.MappedBytes != stats.MappedBytes {
					t.Fatalf("op %d: Revert stats %+v, had %+v", op, st, stats)
				}
			default:
				m.Settle(s)
				for p := first; p < first+count; p++ {
					mapped[p] = populate
				}
			}
			// The IOMMU, the mapper's table and the oracle agree, entries
			// are disjoint and (granule policy) none crosses a granule.
			got := model.Mappings()
			if !slices.Equal(got, m.Entries()) {
				t.Fatalf("op %d: mapper table %v, IOMMU %v", op, m.Entries(), got)
			}
			var bytes uint64
			for i, x := range got {
				bytes += x.Size
				if i > 0 && got[i-1].IOVA+got[i-1].Size > x.IOVA {
					t.Fatalf("op %d: entries overlap: %v", op, got)
				}
				if policy == dma.Granule && (x.IOVA-gpa)/opts.Granularity != (x.IOVA-gpa+x.Size-1)/opts.Granularity {
					t.Fatalf("op %d: granule entry %v crosses a granule of %#x", op, x, opts.Granularity)
				}
				if policy != dma.Granule && chunk != dma.Unbounded && (x.IOVA-gpa)/chunk != (x.IOVA-gpa+x.Size-1)/chunk {
					t.Fatalf("op %d: extent entry %v crosses a multiple of MaxExtent %#x", op, x, chunk)
				}
			}
			st := m.Stats()
			if st.PinnedBytes-st.UnpinnedBytes != st.MappedBytes || st.WindowBytes > st.RepinnedBytes || st.MaxWindow > st.WindowBytes {
				t.Fatalf("op %d: pinned %d, unpinned %d, mapped %d, re-pinned %d, window %d (largest %d)",
					op, st.PinnedBytes, st.UnpinnedBytes, st.MappedBytes, st.RepinnedBytes, st.WindowBytes, st.MaxWindow)
			}
			if policy == dma.Extent && chunk != dma.Unbounded && st.MaxWindow > 2*chunk {
				t.Fatalf("op %d: a window of %#x bytes with MaxExtent %#x", op, st.MaxWindow, chunk)
			}
			if policy == dma.Cut && (st.WindowBytes != 0 || st.RepinnedBytes != 0) {
				t.Fatalf("op %d: cut policy: window %#x, re-pinned %#x", op, st.WindowBytes, st.RepinnedBytes)
			}
			if pins := model.Pins(); pins.Pinned*pg != st.PinnedBytes || pins.Unpinned*pg != st.UnpinnedBytes {
				t.Fatalf("op %d: model pinned %d / unpinned %d pages, mapper counted %#x / %#x bytes", op, pins.Pinned, pins.Unpinned, st.PinnedBytes, st.UnpinnedBytes)
			}
			if st.Entries != uint64(len(got)) || st.MappedBytes != bytes || st.PeakEntries < st.Entries {
				t.Fatalf("op %d: stats %+v for %d entries of %#x bytes", op, st, len(got), bytes)
			}
			if caps.EntryLimit != 0 && uint64(len(got)) > caps.EntryLimit {
				t.Fatalf("op %d: %d entries over the limit %d", op, len(got), caps.EntryLimit)
			}
			for p := range uint64(pages) {
				if model.Reaches(gpa+p*pg) != mapped[p] {
					t.Fatalf("op %d: page %d reachable=%v, oracle %v", op, p, !mapped[p], mapped[p])
				}
			}
		}
	})
}

// pagesOf normalises mappings to one page each, so that two layouts of the
// same pages compare equal.
func pagesOf(ms []iommu.Mapping) []uint64 {
	var out []uint64
	for _, x := range ms {
		for a := x.IOVA; a < x.IOVA+x.Size; a += pg {
			out = append(out, a)
		}
	}
	return out
}
