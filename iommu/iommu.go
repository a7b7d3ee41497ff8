// Package iommu defines Space, the IOMMU address space a DMA mapper keeps in
// step with guest memory, Cutter, a space that can remove part of a mapping,
// and Model, an in-process IOMMU that answers as the Linux kernel does (VFIO
// type1 v2 or iommufd) and has a DMA engine, so tests can prove what a device
// can and cannot reach.
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
	// Cut says the space can remove part of a mapping and keep the rest
	// mapped and pinned: it implements Cutter, and Cut works. It holds for
	// an iommufd IOAS whose huge pages are disabled and which is its
	// iommufd file's compat IOAS (see Cutter); never for VFIO type1, which
	// refuses a partial unmap (v2) or removes whole mappings (v1).
	Cut bool
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

// Cutter is a Space that can remove part of a mapping without touching the
// rest of it: the hitless split.
//
// On Linux it is iommufd's VFIO-compatible unmap: VFIO_IOMMU_UNMAP_DMA
// (struct vfio_iommu_type1_dma_unmap, flags 0) issued on the /dev/iommu fd
// acts on that file's compat IOAS (the one IOMMU_VFIO_IOAS SET named), and
// when that IOAS has huge pages disabled (IOMMU_OPTION, option
// IOMMU_OPTION_HUGE_PAGES, value 0, set before anything is mapped) the
// kernel first splits the areas at both ends of the range and then unmaps
// only what lies inside (drivers/iommu/iommufd/vfio_compat.c,
// iommufd_vfio_unmap_dma; io_pagetable.c, iopt_cut_iova and
// iopt_area_split). The two halves of a split area keep the same pinned
// pages, so nothing outside the range is unmapped, re-mapped or re-pinned,
// and a device never loses memory the cut was not asked to remove. The
// price is that such an IOAS maps with 4 KiB IOPTEs only. The native
// IOMMU_IOAS_UNMAP still refuses a partial unmap (ENOENT).
//
// A space's Caps().Cut says whether Cut works; where it does not, Cut fails
// and changes nothing.
type Cutter interface {
	// Cut removes the IOMMU pages of [iova, iova+size) from whatever
	// mappings hold them, keeping the parts of those mappings outside the
	// range mapped and pinned, and returns the bytes it unmapped: 0, and
	// success, when nothing is mapped there.
	//
	// The kernel refuses with EINVAL an end of the range that is not page
	// aligned inside a mapping, a size of 0, and a split of an area with
	// in-kernel accesses (emulated or mdev devices); with EBUSY an area
	// being mapped or unmapped; with EOVERFLOW a range that wraps. A
	// refused call unmaps nothing, but a split it made at one end before
	// refusing stays: the pages are all still mapped, as one more area. An
	// unmap that fails part way (EBUSY after some areas went) returns the
	// bytes it removed with the error; areas go in ascending IOVA order, so
	// they are the lowest mapped bytes of the range. (The kernel writes
	// that count to the request's size field on success and on a failed
	// unmap, and leaves the field as it was when it fails before
	// unmapping: a failed call whose size field still holds the request's
	// size removed nothing, since a failure always leaves an area of the
	// range mapped.)
	Cut(iova, size uint64) (uint64, error)
}
