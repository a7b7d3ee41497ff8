package memattr_test

import (
	"errors"
	"math"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// FuzzConvert decodes bytes into conversions of a small region with a DMA
// mapper on a model IOMMU listening to part of it. After every conversion
// the device must reach exactly the shared pages of its section; a request
// that fails (invalid, or out of IOMMU entries) must change nothing.
func FuzzConvert(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 8, 1})
	f.Add([]byte{0x13, 0x40, 0, 8, 16, 1, 0, 12, 2, 0, 0, 0, 32, 1, 0, 9, 1, 1, 5, 0})
	f.Add([]byte{0x2a, 0x08, 2, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 0, 0, 1, 0, 3, 1, 0, 0, 7, 1, 1, 0})
	f.Add([]byte{0x05, 0x3f, 0, 0, 16, 1, 0, 1, 1, 0, 0, 3, 1, 0, 0, 5, 1, 0, 0, 7, 1, 0, 0, 9, 1, 0})
	f.Add([]byte{0x11, 0x00, 0xc0, 0, 4, 1, 0x81, 0, 4, 1, 0, 0, 0, 0, 0xfe, 1, 0, 31, 0x21, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		const pages = 32
		if len(data) < 2 || len(data) > 2+4*128 {
			return
		}
		h, sh := data[0], data[1]
		// Header byte: IOMMU rules and entry limit, mapper policy, backing
		// mode, state representation.
		rules := iommu.Type1v2
		var limit uint64
		if h&1 != 0 {
			rules = iommu.IOMMUFD
		} else {
			limit = 2 + uint64(h>>4) // small enough to run out
		}
		policy := dma.Extent
		if h&2 != 0 {
			policy = dma.Granule
		}
		m := discard.New(pages*pg, nil)
		a, err := memattr.New(m, memattr.Config{InPlace: h&4 != 0, Bitmap: h&8 != 0})
		if err != nil {
			t.Fatal(err)
		}
		host := make([]byte, pages*pg)
		model := iommu.NewModel(iommu.Caps{Rules: rules, EntryLimit: limit})
		mapper, err := dma.New(model, host, dma.Options{Policy: policy})
		if err != nil {
			t.Fatal(err)
		}
		// Second byte: the mapper's section.
		first := uint64(sh&0x1f) % pages
		n := uint64(sh>>5)*8 + 1
		n = min(n, pages-first)
		sec := discard.Section{Offset: first * pg, Size: n * pg, GPA: gpa + first*pg}
		if err := m.Register(mapper, sec); err != nil {
			t.Fatal(err)
		}
		shared := make([]bool, pages)
		check := func(op int) {
			t.Helper()
			for p := range uint64(pages) {
				if got := a.Get(p * pg); (got == memattr.Shared) != shared[p] {
					t.Fatalf("op %d: page %d is %v, oracle shared=%v", op, p, got, shared[p])
				}
				want := shared[p] && sec.Range().Contains(p*pg)
				if model.Reaches(gpa+p*pg) != want {
					t.Fatalf("op %d: device reaches page %d: %v, want %v (shared=%v)", op, p, !want, want, shared[p])
				}
			}
			if !slices.Equal(model.Mappings(), mapper.Entries()) {
				t.Fatalf("op %d: mapper table %v, IOMMU %v", op, mapper.Entries(), model.Mappings())
			}
		}
		ops := data[2:]
		for op := 0; len(ops) >= 4; op++ {
			b0, b1, b2, b3 := ops[0], ops[1], ops[2], ops[3]
			ops = ops[4:]
			// Offsets and sizes in 1 KiB steps, so a quarter of the requests
			// are page aligned at both ends... and the rest are not.
			off := uint64(b0&0x7f) * 1024
			size := uint64(b1) * 1024
			if b2&0x80 != 0 {
				off *= 4 // aligned
				size = uint64(b1&0x3f) * pg
			}
			if b2&0x40 != 0 {
				size = math.MaxUint64 - uint64(b2&0x3f) // overflows
			}
			to := memattr.State(b3 & 1)
			before := slices.Clone(shared)
			mapsBefore := model.Mappings()
			err := a.Convert(off, size, to)
			valid := size != 0 && off%pg == 0 && size%pg == 0 && off+size >= off && off+size <= pages*pg
			switch {
			case err == nil && !valid:
				t.Fatalf("op %d: invalid Convert(%#x, %#x) succeeded", op, off, size)
			case err == nil:
				for p := off / pg; p < (off+size)/pg; p++ {
					shared[p] = to == memattr.Shared
				}
			case !valid:
				if !errors.Is(err, span.ErrEmpty) && !errors.Is(err, span.ErrOverflow) &&
					!errors.Is(err, span.ErrAlign) && !errors.Is(err, span.ErrBounds) {
					t.Fatalf("op %d: invalid Convert(%#x, %#x) = %v, want a span error", op, off, size, err)
				}
			case errors.Is(err, unix.ENOSPC) && limit != 0:
				// Out of IOMMU entries: refused cleanly.
			default:
				t.Fatalf("op %d: Convert(%#x, %#x, %v) = %v", op, off, size, to, err)
			}
			if err != nil {
				if !slices.Equal(before, shared) {
					t.Fatal("oracle changed on failure")
				}
				if got := model.Mappings(); !slices.Equal(got, mapsBefore) {
					t.Fatalf("op %d: failed conversion changed the IOMMU entries from %v to %v", op, mapsBefore, got)
				}
			}
			check(op)
			// The device's writes land only in shared pages of its section.
			p := uint64(b2&0x1f) % pages
			werr := model.DMAWrite(gpa+p*pg+uint64(b0), []byte{b1, b3})
			if reach := shared[p] && sec.Range().Contains(p*pg); (werr == nil) != reach {
				t.Fatalf("op %d: DMA write to page %d: %v, want reachable=%v", op, p, werr, reach)
			}
		}
		if err := m.Unregister(mapper); err != nil {
			t.Fatal(err)
		}
		if model.Len() != 0 {
			t.Fatalf("%d entries left after unregister", model.Len())
		}
	})
}
