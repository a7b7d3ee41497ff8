package iommufd

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

// ErrNoCut is returned by Cut on a Space that does not cut; the error also
// wraps unix.EOPNOTSUPP and says why (Space.CutReason).
var ErrNoCut = errors.New("iommufd: the space does not cut")

// Space is an iommu.Space over one IOAS: Map and Unmap are
// IOMMU_IOAS_MAP (FIXED_IOVA, READABLE, WRITEABLE) and IOMMU_IOAS_UNMAP.
// iommufd has no mapping-count limit. It owns neither the iommufd nor the
// IOAS.
//
// A Space made by NewSpace also cuts where the kernel lets it (Caps().Cut):
// Cut removes pages from the middle of an area with the VFIO-compatibility
// unmap, leaving the rest of the area mapped and pinned. The price is the
// IOMMU page size: the IOAS maps with 4 KiB IOPTEs only (the same IOTLB
// reach as one mapping per 4 KiB page, with one area per extent instead of
// one per page). SpaceOptions.HugePages keeps large IOPTEs and gives up the
// cut.
type Space struct {
	f    *IOMMUFD
	ioas uint32
	caps iommu.Caps
	// cutReason says why the space does not cut, "" when it does.
	cutReason string
}

var (
	_ iommu.Space  = (*Space)(nil)
	_ iommu.Cutter = (*Space)(nil)
)

// SpaceOptions are the choices of NewSpaceOptions.
type SpaceOptions struct {
	// HugePages keeps the IOAS's large IOPTEs (the kernel's default): fewer
	// IOTLB misses where the host backs guest memory with huge pages, but
	// the kernel cannot cut an area, so the space does not cut and a split
	// unmaps and maps again.
	HugePages bool
	// Logger, if set, is told once at Info level when the space does not
	// cut and why.
	Logger *slog.Logger
}

// NewSpace describes ioas as an iommu.Space that cuts where the kernel
// allows it: NewSpaceOptions with the zero SpaceOptions.
func NewSpace(f *IOMMUFD, ioas uint32) (*Space, error) {
	return NewSpaceOptions(f, ioas, SpaceOptions{})
}

// NewSpaceOptions describes ioas as an iommu.Space. Attach the devices
// first: the IOVA ranges, read here with IOMMU_IOAS_IOVA_RANGES, narrow at
// attach. PageSize is the IOAS's IOVA alignment, at least the host page size
// (the kernel pins whole host pages). The Space borrows f: f must outlive
// it, and once f is closed its calls fail with ErrClosed.
//
// Unless o.HugePages is set it makes the space cut, before anything is
// mapped: it forbids large pages in ioas (IOMMU_OPTION HUGE_PAGES = 0,
// which the kernel refuses once a device is attached and anything is
// mapped) and makes ioas the file's VFIO-compatibility IOAS
// (IOMMU_VFIO_IOAS SET), through which Cut unmaps. If the kernel refuses a
// step the space does not cut, the IOAS is left as it was, and CutReason
// says why; only a failure to read the IOVA ranges is an error.
//
// The compat IOAS is the file's, not the IOAS's: cutting Spaces of several
// IOASes on one IOMMUFD take turns through it (see Cut), and nothing else
// may use IOMMU_VFIO_IOAS or the VFIO compat ioctls on that file while they
// live, not even through another descriptor of it.
func NewSpaceOptions(f *IOMMUFD, ioas uint32, o SpaceOptions) (*Space, error) {
	r, err := f.IOASIOVARanges(ioas)
	if err != nil {
		return nil, err
	}
	caps := iommu.Caps{Rules: iommu.IOMMUFD, PageSize: max(r.Alignment, uint64(os.Getpagesize()))}
	for _, x := range r.Ranges {
		caps.Ranges = append(caps.Ranges, x.Span())
	}
	s := &Space{f: f, ioas: ioas, caps: caps}
	if o.HugePages {
		s.cutReason = "large IOMMU pages kept (SpaceOptions.HugePages)"
	} else {
		s.cutReason = s.enableCut()
	}
	s.caps.Cut = s.cutReason == ""
	if !s.caps.Cut && o.Logger != nil {
		o.Logger.Info("iommufd: the space does not cut; splits unmap and map again", "ioas", ioas, "reason", s.cutReason)
	}
	return s, nil
}

// enableCut forbids large pages in the IOAS and makes it the compat IOAS,
// and returns "" or why the space cannot cut. On failure the IOAS is left
// as it was found.
func (s *Space) enableCut() string {
	f := s.f
	on, err := f.HugePages(s.ioas)
	if err != nil {
		return "IOMMU_OPTION get HUGE_PAGES: " + errnoText(err)
	}
	if on {
		if err := f.SetHugePages(s.ioas, false); err != nil {
			why := "IOMMU_OPTION set HUGE_PAGES=0: " + errnoText(err)
			if errors.Is(err, unix.EINVAL) {
				why += " (a device is attached and the IOAS maps pages already)"
			}
			return why
		}
	}
	if err := f.VFIOIOASSet(s.ioas); err != nil {
		why := "IOMMU_VFIO_IOAS set: " + errnoText(err)
		if on {
			if err := f.SetHugePages(s.ioas, true); err != nil {
				why += "; allowing large pages again: " + errnoText(err)
			}
		}
		return why
	}
	return ""
}

// errnoText names the errno inside err ("EINVAL"), or gives err's text if
// it carries none.
func errnoText(err error) string {
	var e unix.Errno
	if errors.As(err, &e) {
		if n := unix.ErrnoName(e); n != "" {
			return n
		}
	}
	return err.Error()
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

// CutReason says why the space does not cut (Caps().Cut is false), "" when
// it does.
func (s *Space) CutReason() string { return s.cutReason }

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

// Cut unmaps the pages of [iova, iova+size) from whatever areas hold them
// and returns the bytes unmapped: an area that sticks out of the range is
// split by the kernel and keeps its pages outside the range mapped and
// pinned, so the device never loses them. Nothing mapped there is success
// with 0. The range must be page-aligned and not empty (EINVAL). It is
// VFIO_IOMMU_UNMAP_DMA on the iommufd, issued with the IOAS as the file's
// compat IOAS: the IOMMUFD's lock is held from setting it (only when
// another Space of the file had it) through the unmap. A space that does
// not cut answers ErrNoCut without calling the kernel.
func (s *Space) Cut(iova, size uint64) (uint64, error) {
	if !s.caps.Cut {
		return 0, fmt.Errorf("%w (%s): %w", ErrNoCut, s.cutReason, unix.EOPNOTSUPP)
	}
	return s.f.cutIn(s.ioas, iova, size)
}

// Caps returns what NewSpace read and whether the space cuts; EntryLimit is
// 0 (unlimited).
func (s *Space) Caps() iommu.Caps {
	c := s.caps
	c.Ranges = append([]span.Range(nil), s.caps.Ranges...)
	return c
}

// Avail reports no limit: an IOAS holds any number of areas.
func (s *Space) Avail() (uint64, bool, error) { return 0, false, nil }
