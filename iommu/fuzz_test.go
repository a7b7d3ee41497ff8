package iommu_test

import (
	"errors"
	"math"
	"slices"
	"sort"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/iommu"
)

// naive is a list-of-mappings oracle of the kernel rules, written
// independently of the model: it answers with the set of errors a request
// may get (several rules may apply to one bad request; the kernel's order of
// checks is not what is under test here) or success.
type naive struct {
	rules iommu.Rules
	limit int
	maps  []iommu.Mapping
}

func (o *naive) overlapping(iova, last uint64) []int {
	var out []int
	for i, x := range o.maps {
		if x.IOVA <= last && iova <= x.IOVA+x.Size-1 {
			out = append(out, i)
		}
	}
	return out
}

// mapErrs returns the errors Map(iova, size) may fail with; nil if it must
// succeed.
func (o *naive) mapErrs(iova, size uint64) []error {
	var errs []error
	if size == 0 || iova%pg != 0 || size%pg != 0 {
		errs = append(errs, unix.EINVAL)
	}
	if size != 0 && iova+size-1 < iova {
		errs = append(errs, o.wrapErr())
	}
	if size != 0 && iova+size-1 >= iova && len(o.overlapping(iova, iova+size-1)) > 0 {
		errs = append(errs, unix.EEXIST)
	}
	if o.limit > 0 && len(o.maps) >= o.limit {
		errs = append(errs, unix.ENOSPC)
	}
	return errs
}

// wrapErr is the answer to a range that wraps past 2^64: EINVAL from type1
// (as measured on 6.12), EOVERFLOW from iommufd.
func (o *naive) wrapErr() error {
	if o.rules == iommu.Type1v2 {
		return unix.EINVAL
	}
	return unix.EOVERFLOW
}

func (o *naive) doMap(iova, size uint64) {
	o.maps = append(o.maps, iommu.Mapping{IOVA: iova, Size: size})
	sort.Slice(o.maps, func(i, j int) bool { return o.maps[i].IOVA < o.maps[j].IOVA })
}

// unmap applies Unmap to the oracle and returns what the kernel answers.
func (o *naive) unmap(iova, size uint64) (uint64, error) {
	if o.rules == iommu.IOMMUFD && iova == 0 && size == math.MaxUint64 {
		var n uint64
		for _, x := range o.maps {
			n += x.Size
		}
		o.maps = nil
		return n, nil
	}
	if size == 0 {
		return 0, unix.EINVAL
	}
	last := iova + size - 1
	if last < iova {
		return 0, o.wrapErr()
	}
	hits := o.overlapping(iova, last)
	if o.rules == iommu.Type1v2 {
		if iova%pg != 0 || size%pg != 0 {
			return 0, unix.EINVAL
		}
		for _, i := range hits {
			if x := o.maps[i]; x.IOVA < iova || x.IOVA+x.Size-1 > last {
				return 0, unix.EINVAL
			}
		}
		var n uint64
		for _, i := range slices.Backward(hits) {
			n += o.maps[i].Size
			o.maps = slices.Delete(o.maps, i, i+1)
		}
		return n, nil
	}
	// iommufd: whole areas go in ascending order until one sticks out.
	var n uint64
	for len(hits) > 0 {
		i := hits[0]
		x := o.maps[i]
		if x.IOVA < iova || x.IOVA+x.Size-1 > last {
			return n, unix.ENOENT
		}
		n += x.Size
		o.maps = slices.Delete(o.maps, i, i+1)
		hits = o.overlapping(iova, last)
	}
	if n == 0 {
		return 0, unix.ENOENT
	}
	return n, nil
}

// FuzzModel drives the model with arbitrary maps and unmaps and compares
// every answer and the resulting mappings with the naive oracle.
func FuzzModel(f *testing.F) {
	f.Add([]byte{0x00, 0, 1, 4, 0, 0x80, 2, 1, 0})
	f.Add([]byte{0x01, 0, 1, 4, 0, 0, 6, 2, 0, 0x80, 0, 8, 0, 0x80, 2, 1, 0})
	f.Add([]byte{0x12, 0, 0, 1, 0, 0, 1, 1, 0, 0, 2, 1, 0, 0, 3, 1, 0, 0x80, 0, 0xff, 0})
	f.Add([]byte{0x01, 0, 1, 1, 0, 0, 3, 2, 0, 0x80, 1, 3, 0, 0xc0, 0, 0, 0})
	f.Add([]byte{0x00, 0x40, 1, 1, 0, 0x20, 0, 1, 3, 0xa0, 1, 1, 1})
	// A mapping that ends at the last IOVA, then an unmap straddling its
	// start (the model once lost such mappings to a wrapping end).
	f.Add([]byte("0A000\xdd001"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 1 || len(data) > 1+4*200 {
			return
		}
		rules := iommu.Type1v2
		if data[0]&1 != 0 {
			rules = iommu.IOMMUFD
		}
		limit := int(data[0] >> 4)
		m := iommu.NewModel(iommu.Caps{Rules: rules, EntryLimit: uint64(limit)})
		o := &naive{rules: rules}
		if rules == iommu.Type1v2 {
			if limit == 0 {
				limit = 65535
			}
			o.limit = limit
		}
		ops := data[1:]
		for op := 0; len(ops) >= 4; op++ {
			c, a, s, x := ops[0], ops[1], ops[2], ops[3]
			ops = ops[4:]
			iova := uint64(a) * pg
			size := uint64(s) * pg
			switch {
			case c&0x20 != 0: // unaligned by a few bytes
				iova += uint64(x & 7)
			case c&0x40 != 0: // near the top of the IOVA space
				iova = math.MaxUint64 - uint64(x)*pg + 1
			}
			if c&0x80 == 0 {
				want := o.mapErrs(iova, size)
				err := m.Map(iova, size, nil)
				switch {
				case len(want) == 0 && err != nil:
					t.Fatalf("op %d: Map(%#x, %#x) = %v, want success", op, iova, size, err)
				case len(want) > 0 && !slices.ContainsFunc(want, func(e error) bool { return errors.Is(err, e) }):
					t.Fatalf("op %d: Map(%#x, %#x) = %v, want one of %v", op, iova, size, err, want)
				case err == nil:
					o.doMap(iova, size)
				}
			} else {
				if c&0x10 != 0 && rules == iommu.IOMMUFD {
					iova, size = 0, math.MaxUint64
				}
				wn, werr := o.unmap(iova, size)
				n, err := m.Unmap(iova, size)
				if n != wn || !errors.Is(err, werr) || (err == nil) != (werr == nil) {
					t.Fatalf("op %d: %v Unmap(%#x, %#x) = %#x, %v; want %#x, %v", op, rules, iova, size, n, err, wn, werr)
				}
			}
			got := m.Mappings()
			if len(got) == 0 {
				got = nil
			}
			if !slices.Equal(got, o.maps) {
				t.Fatalf("op %d: model holds %v, oracle %v", op, got, o.maps)
			}
			if m.Len() != len(o.maps) {
				t.Fatalf("op %d: Len %d, oracle %d", op, m.Len(), len(o.maps))
			}
			if avail, limited, _ := m.Avail(); limited && avail != uint64(o.limit-len(o.maps)) {
				t.Fatalf("op %d: Avail %d, oracle %d", op, avail, o.limit-len(o.maps))
			}
			probe := uint64(x) * pg / 2
			want := len(o.overlapping(probe, probe)) > 0
			if m.Reaches(probe) != want {
				t.Fatalf("op %d: Reaches(%#x) = %v, oracle %v", op, probe, !want, want)
			}
		}
	})
}

// pageOracle is a per-page oracle of an iommufd IOAS that cuts, written
// from the kernel's steps rather than from the model: every mapped page
// carries the id of the area holding it, so an area is a run of pages with
// one id, a split gives the pages after its point a new id, and removing an
// area deletes its pages.
type pageOracle struct {
	area map[uint64]int // page number -> area id
	next int
}

// find returns the id and the first and last byte of the area holding byte
// a.
func (o *pageOracle) find(a uint64) (id int, first, last uint64, ok bool) {
	p := a / pg
	id, ok = o.area[p]
	if !ok {
		return 0, 0, 0, false
	}
	// Ids start at 1, so a page not mapped (0) never matches.
	lo, hi := p, p
	for lo > 0 && o.area[lo-1] == id {
		lo--
	}
	for hi < math.MaxUint64/pg && o.area[hi+1] == id {
		hi++
	}
	return id, lo * pg, hi*pg + pg - 1, true
}

// pagesIn returns the mapped pages holding bytes of [first, last],
// ascending.
func (o *pageOracle) pagesIn(first, last uint64) []uint64 {
	var out []uint64
	for p := range o.area {
		if p >= first/pg && p <= last/pg {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}

// mapErr is the answer to an aligned Map of at most 255 pages.
func (o *pageOracle) mapErr(iova, size uint64) error {
	switch {
	case size == 0 || iova%pg != 0 || size%pg != 0:
		return unix.EINVAL
	case iova+size-1 < iova:
		return unix.EOVERFLOW
	case len(o.pagesIn(iova, iova+size-1)) > 0:
		return unix.EEXIST
	}
	return nil
}

func (o *pageOracle) doMap(iova, size uint64) {
	o.next++
	for p := iova / pg; p <= (iova+size-1)/pg; p++ {
		o.area[p] = o.next
	}
}

// split is iopt_area_split at byte p.
func (o *pageOracle) split(p uint64) error {
	id, first, last, ok := o.find(p)
	if !ok || p == first || p == last {
		return nil
	}
	if (p+1)%pg != 0 {
		return unix.EINVAL
	}
	o.next++
	for q := (p + 1) / pg; q <= last/pg; q++ {
		if o.area[q] != id {
			panic("oracle: area not contiguous")
		}
		o.area[q] = o.next
	}
	return nil
}

// removeInside is iopt_unmap_iova_range: areas meeting [first, last] go in
// ascending order until one sticks out (ENOENT).
func (o *pageOracle) removeInside(first, last uint64) (uint64, error) {
	var n uint64
	for _, p := range o.pagesIn(first, last) {
		id, ok := o.area[p]
		if !ok {
			continue // its area went already
		}
		_, a, b, _ := o.find(p * pg)
		if a < first || b > last {
			return n, unix.ENOENT
		}
		for q := a / pg; q <= b/pg; q++ {
			if o.area[q] != id {
				panic("oracle: area not contiguous")
			}
			delete(o.area, q)
		}
		n += b - a + 1
	}
	return n, nil
}

// cut is iommufd_vfio_unmap_dma on a compat IOAS with huge pages off.
func (o *pageOracle) cut(iova, size uint64) (uint64, error) {
	last := iova + size - 1
	if err := o.split(last); err != nil {
		return 0, err
	}
	if iova != 0 {
		if err := o.split(iova - 1); err != nil {
			return 0, err
		}
	}
	if size == 0 {
		return 0, unix.EINVAL
	}
	if last < iova {
		return 0, unix.EOVERFLOW
	}
	return o.removeInside(iova, last)
}

// unmap is the native IOMMU_IOAS_UNMAP as the model answers it: ENOENT for
// a split or for nothing unmapped; (0, 2^64-1) unmaps all.
func (o *pageOracle) unmap(iova, size uint64) (uint64, error) {
	if iova == 0 && size == math.MaxUint64 {
		n := uint64(len(o.area)) * pg
		clear(o.area)
		return n, nil
	}
	if size == 0 {
		return 0, unix.EINVAL
	}
	if iova+size-1 < iova {
		return 0, unix.EOVERFLOW
	}
	n, err := o.removeInside(iova, iova+size-1)
	if err == nil && n == 0 {
		err = unix.ENOENT
	}
	return n, err
}

// mappings returns the areas, ascending.
func (o *pageOracle) mappings() []iommu.Mapping {
	var out []iommu.Mapping
	for _, p := range o.pagesIn(0, math.MaxUint64) {
		if n := len(out); n > 0 {
			x := &out[n-1]
			if x.IOVA+x.Size == p*pg && o.area[p] == o.area[x.IOVA/pg] {
				x.Size += pg
				continue
			}
		}
		out = append(out, iommu.Mapping{IOVA: p * pg, Size: pg})
	}
	return out
}

// pageByte is the byte a page's host memory starts with.
func pageByte(p uint64) byte { return byte(p*7 + 1) }

// FuzzCut drives a model that cuts with arbitrary maps, cuts (aligned or
// not, empty, wrapping, near the top of the IOVA space) and native unmaps,
// and compares every answer, the areas, the pins and what a device reaches
// (and reads: split areas keep the right host memory) with the per-page
// oracle.
func FuzzCut(f *testing.F) {
	f.Add([]byte{0x00, 1, 8, 0, 0x01, 3, 1, 0, 0x01, 3, 1, 0, 0x02, 1, 8, 0})
	f.Add([]byte{0x00, 0, 16, 0, 0x00, 16, 16, 0, 0x01, 10, 20, 0, 0x21, 3, 1, 1, 0x11, 2, 1, 0x10})
	f.Add([]byte{0x00, 1, 8, 0, 0x01, 3, 0, 0, 0x41, 0, 6, 1, 0x82, 0, 0, 0})
	f.Add([]byte{0x40, 0, 4, 4, 0x41, 0, 1, 1, 0x41, 0, 2, 3, 0x03, 2, 9, 0x11})
	f.Add([]byte{0x00, 2, 1, 0, 0x00, 4, 2, 0, 0x11, 2, 2, 0x10})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4*200 {
			return
		}
		m := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD, Cut: true})
		o := &pageOracle{area: map[uint64]int{}}
		var unpinned uint64
		for op := 0; len(data) >= 4; op++ {
			c, a, s, x := data[0], data[1], data[2], data[3]
			data = data[4:]
			iova, size := uint64(a)*pg, uint64(s)*pg
			if c&0x40 != 0 {
				iova = math.MaxUint64 - uint64(x)*pg + 1
			}
			switch c & 3 {
			case 0: // map, aligned
				host := make([]byte, size)
				for off := uint64(0); off < size; off += pg {
					host[off] = pageByte((iova + off) / pg)
				}
				want := o.mapErr(iova, size)
				err := m.Map(iova, size, host)
				if !errors.Is(err, want) || (err == nil) != (want == nil) {
					t.Fatalf("op %d: Map(%#x, %#x) = %v, want %v", op, iova, size, err, want)
				}
				if err == nil {
					o.doMap(iova, size)
				}
			case 2: // native unmap
				if c&0x80 != 0 {
					iova, size = 0, math.MaxUint64
				}
				wn, werr := o.unmap(iova, size)
				n, err := m.Unmap(iova, size)
				if n != wn || !errors.Is(err, werr) || (err == nil) != (werr == nil) {
					t.Fatalf("op %d: Unmap(%#x, %#x) = %#x, %v; want %#x, %v", op, iova, size, n, err, wn, werr)
				}
				unpinned += n / pg
			default: // cut, possibly unaligned at either end
				if c&0x20 != 0 {
					iova += uint64(x & 7)
				}
				if c&0x10 != 0 {
					size += uint64(x >> 4)
				}
				wn, werr := o.cut(iova, size)
				n, err := m.Cut(iova, size)
				if n != wn || !errors.Is(err, werr) || (err == nil) != (werr == nil) {
					t.Fatalf("op %d: Cut(%#x, %#x) = %#x, %v; want %#x, %v", op, iova, size, n, err, wn, werr)
				}
				unpinned += n / pg
			}
			want := o.mappings()
			if got := m.Mappings(); !cmp.Equal(got, want, cmpEmpty) {
				t.Fatalf("op %d: model holds %v, oracle %v", op, got, want)
			}
			if m.Len() != len(want) {
				t.Fatalf("op %d: Len %d, oracle %d areas", op, m.Len(), len(want))
			}
			if p := m.Pins(); p.Unpinned != unpinned || p.Pinned-p.Unpinned != uint64(len(o.area)) {
				t.Fatalf("op %d: pins %+v, oracle %d unpinned, %d pages mapped", op, p, unpinned, len(o.area))
			}
			for _, probe := range []uint64{uint64(x) * pg / 2, iova, iova + size} {
				_, mapped := o.area[probe/pg]
				if m.Reaches(probe) != mapped {
					t.Fatalf("op %d: Reaches(%#x) = %v, oracle %v", op, probe, !mapped, mapped)
				}
				buf := []byte{0xff}
				err := m.DMARead(probe&^(pg-1), buf)
				if mapped && (err != nil || buf[0] != pageByte(probe/pg)) {
					t.Fatalf("op %d: DMA read at page %#x = %#x, %v; want %#x", op, probe/pg, buf[0], err, pageByte(probe/pg))
				}
			}
		}
	})
}
