package virtiomem_test

import (
	"errors"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// FuzzPlug decodes bytes into plugs, unplugs and conversions of a region
// with both sources and a DMA mapper: after each, the device reaches exactly
// the shared and plugged pages; invalid requests and refused ones (IOMMU out
// of entries, failed release) change nothing.
func FuzzPlug(f *testing.F) {
	f.Add([]byte{0x01, 0, 0, 2, 0, 0x40, 0, 32, 1})
	f.Add([]byte{0x00, 0, 0, 8, 0, 0x40, 0, 12, 1, 0x80, 1, 1, 0, 0x80, 0, 1, 1})
	f.Add([]byte{0x31, 0, 1, 3, 0, 0x40, 4, 20, 0, 0x80, 2, 1, 0, 0x20, 0, 0, 1, 0x80, 0, 8, 1})
	f.Add([]byte{0x10, 0x40, 0, 32, 1, 0, 0, 8, 0, 0x80, 3, 2, 0, 0, 3, 0xff, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 1 || len(data) > 1+4*128 {
			return
		}
		caps := iommu.Caps{Rules: iommu.IOMMUFD}
		if data[0]&1 == 0 {
			caps = iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 1 + uint64(data[0]>>4)}
		}
		opts := dma.Options{}
		if data[0]&2 != 0 {
			opts.Policy = dma.Granule
		}
		w := newWorld(t, caps, opts)
		shared := make([]bool, pages)
		plugged := make([]bool, blocks)
		ops := data[1:]
		for op := 0; len(ops) >= 4; op++ {
			c, a, n, x := ops[0], ops[1], ops[2], ops[3]
			ops = ops[4:]
			before := w.model.Mappings()
			var err error
			var apply func()
			unit := uint64(block)
			if c&0x40 != 0 {
				unit = pg
			}
			off := uint64(a) * unit
			size := uint64(n) * unit
			if c&0x10 != 0 {
				off += pg / 2 // unaligned
			}
			w.failRel = c&0x20 != 0
			valid := size != 0 && off%unit == 0 && off+size <= pages*pg
			switch {
			case c&0x40 != 0: // convert
				to := memattr.State(x & 1)
				err = w.attrs.Convert(off, size, to)
				apply = func() {
					for p := off / pg; p < (off+size)/pg; p++ {
						shared[p] = to == memattr.Shared
					}
				}
			case c&0x80 != 0:
				err = w.dev.Unplug(off, size)
				apply = func() {
					for b := off / block; b < (off+size)/block; b++ {
						plugged[b] = false
					}
				}
			default:
				err = w.dev.Plug(off, size)
				apply = func() {
					for b := off / block; b < (off+size)/block; b++ {
						plugged[b] = true
					}
				}
			}
			switch {
			case err == nil && !valid:
				t.Fatalf("op %d: an invalid request [%#x+%#x) succeeded", op, off, size)
			case err == nil:
				apply()
			case !valid:
				if !errors.Is(err, span.ErrEmpty) && !errors.Is(err, span.ErrAlign) && !errors.Is(err, span.ErrBounds) {
					t.Fatalf("op %d: invalid request error %v", op, err)
				}
			case errors.Is(err, unix.ENOSPC) && caps.EntryLimit != 0, errors.Is(err, errBoom) && w.failRel:
			default:
				t.Fatalf("op %d: %v", op, err)
			}
			w.failRel = false
			if err != nil && !slices.Equal(before, w.model.Mappings()) {
				t.Fatalf("op %d: a failed request changed the mappings", op)
			}
			for p := range uint64(pages) {
				r := span.Range{Start: p * pg, End: (p + 1) * pg}
				if w.attrs.IsShared(r) != shared[p] || w.dev.IsPlugged(r) != plugged[p*pg/block] {
					t.Fatalf("op %d: page %d state differs from the oracle", op, p)
				}
				if w.model.Reaches(gpa+p*pg) != (shared[p] && plugged[p*pg/block]) {
					t.Fatalf("op %d: page %d: device reach %v, shared=%v plugged=%v", op, p, !(shared[p] && plugged[p*pg/block]), shared[p], plugged[p*pg/block])
				}
			}
		}
	})
}
