package iommufd

import (
	"fmt"
	"math"
	"os"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

// Space is an iommu.Space over one IOAS: Map and Unmap are
// IOMMU_IOAS_MAP (FIXED_IOVA, READABLE, WRITEABLE) and IOMMU_IOAS_UNMAP.
// iommufd has no mapping-count limit. It owns neither the iommufd nor the
// IOAS.
type Space struct {
	f    *IOMMUFD
	ioas uint32
	caps iommu.Caps
}

var _ iommu.Space = (*Space)(nil)

// NewSpace describes ioas as an iommu.Space. Attach the devices first: the
// IOVA ranges, read here with IOMMU_IOAS_IOVA_RANGES, narrow at attach.
// PageSize is the IOAS's IOVA alignment, at least the host page size (the
// kernel pins whole host pages). The Space borrows f: f must outlive it,
// and once f is closed its calls fail with ErrClosed.
func NewSpace(f *IOMMUFD, ioas uint32) (*Space, error) {
	r, err := f.IOASIOVARanges(ioas)
	if err != nil {
		return nil, err
	}
	caps := iommu.Caps{Rules: iommu.IOMMUFD, PageSize: max(r.Alignment, uint64(os.Getpagesize()))}
	for _, x := range r.Ranges {
		caps.Ranges = append(caps.Ranges, x.Span())
	}
	return &Space{f: f, ioas: ioas, caps: caps}, nil
}

// Span returns r as a half-open span.Range; a Last of 2^64-1 is clamped to
// [Start, 2^64-1), since span.Range cannot express the last address.
func (r IOVARange) Span() span.Range {
	if r.Last == math.MaxUint64 {
		return span.Range{Start: r.Start, End: math.MaxUint64}
	}
	return span.Range{Start: r.Start, End: r.Last + 1}
}

// IOAS returns the IOAS id.
func (s *Space) IOAS() uint32 { return s.ioas }

// Map maps [iova, iova+size) to host at exactly iova, readable and writable
// (IOMMU_IOAS_MAP with FIXED_IOVA). len(host) must be size.
func (s *Space) Map(iova, size uint64, host []byte) error {
	if uint64(len(host)) != size {
		return fmt.Errorf("iommufd: map iova %#x size %#x with %d host bytes: %w", iova, size, len(host), unix.EINVAL)
	}
	_, err := s.f.IOASMap(s.ioas, iova, host, MapFixedIOVA|MapReadable|MapWriteable)
	return err
}

// Unmap removes the whole areas inside [iova, iova+size) and returns the
// bytes they covered (IOMMU_IOAS_UNMAP): ENOENT if the range cuts an area
// or contains none.
func (s *Space) Unmap(iova, size uint64) (uint64, error) {
	return s.f.IOASUnmap(s.ioas, iova, size)
}

// Caps returns what NewSpace read; EntryLimit is 0 (unlimited).
func (s *Space) Caps() iommu.Caps {
	c := s.caps
	c.Ranges = append([]span.Range(nil), s.caps.Ranges...)
	return c
}

// Avail reports no limit: an IOAS holds any number of areas.
func (s *Space) Avail() (uint64, bool, error) { return 0, false, nil }
