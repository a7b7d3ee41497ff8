package iommu_test

import (
	"errors"
	"math"
	"slices"
	"sort"
	"testing"

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
