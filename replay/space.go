package replay

import (
	"sync"

	"github.com/google/btree"

	"gmem/iommu"
	"gmem/span"
)

// tracked is an iommu.Space that passes every call to a Model and keeps its
// own ordered record of the entries the Model accepted, so that the replay can
// ask which entries meet a range in O(log n + k) after every event, where the
// Model only lists all of them.
//
// The record follows what the Model answers: a Map that succeeded adds an
// entry, and an Unmap that reports n bytes removed drops the whole entries
// inside the request, lowest first, until n bytes are accounted for (both
// kernels remove whole entries in ascending order, iommufd stopping at the
// first one that sticks out). Finish compares the record with the Model.
type tracked struct {
	model *iommu.Model

	mu      sync.Mutex
	entries *btree.BTreeG[iommu.Mapping]
}

var _ iommu.Space = (*tracked)(nil)

func newTracked(m *iommu.Model) *tracked {
	return &tracked{
		model:   m,
		entries: btree.NewG(32, func(a, b iommu.Mapping) bool { return a.IOVA < b.IOVA }),
	}
}

// Map implements iommu.Space.
func (t *tracked) Map(iova, size uint64, host []byte) error {
	if err := t.model.Map(iova, size, host); err != nil {
		return err
	}
	t.mu.Lock()
	t.entries.ReplaceOrInsert(iommu.Mapping{IOVA: iova, Size: size})
	t.mu.Unlock()
	return nil
}

// Unmap implements iommu.Space.
func (t *tracked) Unmap(iova, size uint64) (uint64, error) {
	n, err := t.model.Unmap(iova, size)
	if n == 0 {
		return n, err
	}
	last := iova + size - 1 // the Model refused a request that wraps
	t.mu.Lock()
	defer t.mu.Unlock()
	var gone []iommu.Mapping
	var sum uint64
	t.entries.AscendGreaterOrEqual(iommu.Mapping{IOVA: iova}, func(x iommu.Mapping) bool {
		if sum >= n || x.IOVA > last || x.IOVA+x.Size-1 > last {
			return false
		}
		gone = append(gone, x)
		sum += x.Size
		return true
	})
	for _, x := range gone {
		t.entries.Delete(x)
	}
	return n, err
}

// Caps implements iommu.Space.
func (t *tracked) Caps() iommu.Caps { return t.model.Caps() }

// Avail implements iommu.Space.
func (t *tracked) Avail() (uint64, bool, error) { return t.model.Avail() }

// within returns the recorded entries that meet r, ascending.
func (t *tracked) within(r span.Range) []iommu.Mapping {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []iommu.Mapping
	t.entries.DescendLessOrEqual(iommu.Mapping{IOVA: r.Start}, func(x iommu.Mapping) bool {
		if x.IOVA+x.Size > r.Start && x.IOVA < r.End {
			out = append(out, x)
		}
		return false
	})
	t.entries.AscendGreaterOrEqual(iommu.Mapping{IOVA: r.Start}, func(x iommu.Mapping) bool {
		if x.IOVA >= r.End {
			return false
		}
		if len(out) == 0 || out[len(out)-1] != x {
			out = append(out, x)
		}
		return true
	})
	return out
}

// hull returns r grown to cover every entry that meets it.
func (t *tracked) hull(r span.Range) span.Range {
	for _, x := range t.within(r) {
		r.Start = min(r.Start, x.IOVA)
		r.End = max(r.End, x.IOVA+x.Size)
	}
	return r
}

// all returns every recorded entry, ascending.
func (t *tracked) all() []iommu.Mapping {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]iommu.Mapping, 0, t.entries.Len())
	t.entries.Ascend(func(x iommu.Mapping) bool { out = append(out, x); return true })
	return out
}

// len returns the number of recorded entries.
func (t *tracked) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.entries.Len()
}
