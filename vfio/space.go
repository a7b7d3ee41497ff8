package vfio

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

// Space is an iommu.Space over a VFIO type1 v2 container: Map and Unmap
// are VFIO_IOMMU_MAP_DMA and VFIO_IOMMU_UNMAP_DMA, Avail reads the DMA_AVAIL
// capability. It does not own the container.
type Space struct {
	c    *Container
	caps iommu.Caps
}

var _ iommu.Space = (*Space)(nil)

// NewSpace describes c, whose IOMMU must already be set to Type1v2IOMMU
// (with a group attached), as an iommu.Space. Caps come from
// VFIO_IOMMU_GET_INFO at this moment: PageSize is the smallest of
// iova_pgsizes, Ranges the IOVA_RANGE capability, and EntryLimit the
// DMA_AVAIL count (so create the Space before mapping anything if
// EntryLimit is to be the container's whole budget). The Space borrows c:
// c must outlive it, and once c is closed its calls fail with ErrClosed.
func NewSpace(c *Container) (*Space, error) {
	info, err := c.GetIOMMUInfo()
	if err != nil {
		return nil, err
	}
	caps := iommu.Caps{Rules: iommu.Type1v2, PageSize: info.MinPageSize()}
	if caps.PageSize == 0 {
		return nil, fmt.Errorf("vfio: container reports no IOMMU page size (flags %#x)", info.Flags)
	}
	if info.HasDMAAvail {
		caps.EntryLimit = uint64(info.DMAAvail)
	}
	for _, r := range info.IOVARanges {
		caps.Ranges = append(caps.Ranges, r.Span())
	}
	return &Space{c: c, caps: caps}, nil
}

// Map maps [iova, iova+size) to host, readable and writable by the device
// (VFIO_IOMMU_MAP_DMA). len(host) must be size.
func (s *Space) Map(iova, size uint64, host []byte) error {
	if uint64(len(host)) != size {
		return fmt.Errorf("vfio: map iova %#x size %#x with %d host bytes: %w", iova, size, len(host), unix.EINVAL)
	}
	return s.c.MapDMA(iova, host, MapRead|MapWrite)
}

// Unmap removes the whole mappings inside [iova, iova+size) and returns the
// bytes they covered (VFIO_IOMMU_UNMAP_DMA): EINVAL if the range cuts a
// mapping, success with 0 if it covers none.
func (s *Space) Unmap(iova, size uint64) (uint64, error) {
	return s.c.UnmapDMA(iova, size, 0)
}

// Caps returns what NewSpace read from the container.
func (s *Space) Caps() iommu.Caps {
	c := s.caps
	c.Ranges = append([]span.Range(nil), s.caps.Ranges...)
	return c
}

// Avail returns the mappings the container still accepts, from the
// DMA_AVAIL capability; limited is false if the kernel does not report it
// (kernels before 5.10).
func (s *Space) Avail() (uint64, bool, error) {
	info, err := s.c.GetIOMMUInfo()
	if err != nil {
		return 0, false, err
	}
	return uint64(info.DMAAvail), info.HasDMAAvail, nil
}
