// Package iommu defines Space, the IOMMU address space a DMA mapper keeps in
// step with guest memory, and Model, an in-process IOMMU that answers as the
// Linux kernel does (VFIO type1 v2 or iommufd) and has a DMA engine, so tests
// can prove what a device can and cannot reach.
//
// The real backends (packages vfio and iommufd) implement Space too.
package iommu

import "github.com/gmemproject/gmem/span"

// Rules names the kernel interface whose answers a Space gives. The two differ
// where gmem cares: how a partial or empty unmap is answered, and whether the
// number of mappings is limited.
type Rules int

const (
	// Type1v2 is VFIO_TYPE1v2_IOMMU: unmapping part of a mapping is EINVAL,
	// unmapping nothing succeeds with size 0, and each container holds at most
	// dma_entry_limit mappings (default 65,535; ENOSPC past it).
	Type1v2 Rules = iota + 1
	// IOMMUFD is an iommufd IOAS: unmapping part of an area or nothing at all
	// is ENOENT, and the number of areas is not limited.
	IOMMUFD
)

// String returns "type1" or "iommufd".
func (r Rules) String() string {
	switch r {
	case Type1v2:
		return "type1"
	case IOMMUFD:
		return "iommufd"
	}
	return "unknown"
}

// Caps describes a Space.
type Caps struct {
	// Rules is the kernel interface the space follows.
	Rules Rules
	// PageSize is the smallest IOMMU page; IOVAs, sizes and host addresses of
	// a mapping must be multiples of it.
	PageSize uint64
	// EntryLimit is the most mappings the space holds at once, 0 if unlimited.
	EntryLimit uint64
	// Ranges are the IOVA windows a mapping may use (all of them, if nil).
	Ranges []span.Range
	// Cut reports that the space is a Cutter whose Cut works.
	Cut bool
}

// Cutter removes the pages of [iova, iova+size) from whatever mappings hold
// them, keeping the rest of those mappings mapped and pinned, and returns the
// bytes unmapped (0, with no error, when nothing is mapped there).
type Cutter interface {
	Cut(iova, size uint64) (uint64, error)
}

// Space is one IOMMU address space: a VFIO type1 container or an iommufd IOAS
// with its devices attached, or the Model.
//
// Errors are unix.Errno values (possibly wrapped) exactly as the kernel
// returns them, so callers test them with errors.Is(err, unix.ENOSPC) and so
// on. A Space is safe for concurrent use.
type Space interface {
	// Map makes [iova, iova+size) reach host, readable and writable by the
	// device. host is the guest memory behind the range, len(host) == size; it
	// may be nil only for a Model used without DMA. (VFIO_IOMMU_MAP_DMA,
	// IOMMU_IOAS_MAP with IOMMU_IOAS_MAP_FIXED_IOVA.)
	Map(iova, size uint64, host []byte) error
	// Unmap removes every mapping inside [iova, iova+size) and returns the
	// number of bytes they covered. Whether a request that cuts a mapping or
	// covers none is an error depends on Caps().Rules.
	// (VFIO_IOMMU_UNMAP_DMA, IOMMU_IOAS_UNMAP.)
	Unmap(iova, size uint64) (uint64, error)
	// Caps describes the space.
	Caps() Caps
	// Avail returns how many more mappings the space accepts now; limited is
	// false when there is no limit. (VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL.)
	Avail() (avail uint64, limited bool, err error)
}
