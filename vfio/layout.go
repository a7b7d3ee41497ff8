package vfio

// Struct layouts of the VFIO uAPI (x86_64), written from
// include/uapi/linux/vfio.h and checked by layout_unsafe_test.go.

// groupStatus is struct vfio_group_status (8 bytes).
type groupStatus struct {
	Argsz uint32
	Flags uint32
}

// deviceInfo is struct vfio_device_info (24 bytes).
type deviceInfo struct {
	Argsz      uint32
	Flags      uint32
	NumRegions uint32
	NumIRQs    uint32
	CapOffset  uint32
	Pad        uint32
}

// regionInfo is struct vfio_region_info (32 bytes).
type regionInfo struct {
	Argsz     uint32
	Flags     uint32
	Index     uint32
	CapOffset uint32
	Size      uint64
	Offset    uint64
}

// iommuType1Info is struct vfio_iommu_type1_info (24 bytes); the capability
// chain follows it in the same buffer.
type iommuType1Info struct {
	Argsz       uint32
	Flags       uint32
	IOVAPgsizes uint64
	CapOffset   uint32
	Pad         uint32
}

// dmaMap is struct vfio_iommu_type1_dma_map (32 bytes).
type dmaMap struct {
	Argsz uint32
	Flags uint32
	Vaddr uint64
	IOVA  uint64
	Size  uint64
}

// dmaUnmap is struct vfio_iommu_type1_dma_unmap without its trailing data[]
// (24 bytes). Size is written back with the bytes unmapped, on success only.
type dmaUnmap struct {
	Argsz uint32
	Flags uint32
	IOVA  uint64
	Size  uint64
}

// bindIOMMUFD is struct vfio_device_bind_iommufd (24 bytes with the
// token_uuid_ptr added after 6.18; 16 before it). The kernel reads argsz
// bytes and accepts any argsz >= 16, so the longer form works on both.
type bindIOMMUFD struct {
	Argsz        uint32
	Flags        uint32
	IOMMUFD      int32
	OutDevID     uint32
	TokenUUIDPtr uint64
}

// attachIOMMUFDPT is struct vfio_device_attach_iommufd_pt (16 bytes; 12
// before the pasid field was added; argsz-based like bindIOMMUFD).
type attachIOMMUFDPT struct {
	Argsz uint32
	Flags uint32
	PtID  uint32
	Pasid uint32
}

// detachIOMMUFDPT is struct vfio_device_detach_iommufd_pt (12 bytes; 8
// before the pasid field was added; argsz-based).
type detachIOMMUFDPT struct {
	Argsz uint32
	Flags uint32
	Pasid uint32
}

// Byte offsets inside the VFIO_IOMMU_GET_INFO capability chain, from
// struct vfio_info_cap_header (8 bytes: id u16, version u16, next u32) and
// the type1 capability structs that embed it.
const (
	capHeaderSize = 8

	// struct vfio_iommu_type1_info_cap_iova_range: nr_iovas u32 at 8,
	// reserved u32 at 12, iova_ranges[] of {start, end u64} at 16.
	iovaRangeNrOff     = 8
	iovaRangeArrayOff  = 16
	iovaRangeEntrySize = 16

	// struct vfio_iommu_type1_info_cap_migration (32 bytes): flags u32 at
	// 8, pgsize_bitmap u64 at 16, max_dirty_bitmap_size u64 at 24.
	migrationFlagsOff   = 8
	migrationPgsizesOff = 16
	migrationMaxOff     = 24
	migrationSize       = 32

	// struct vfio_iommu_type1_info_dma_avail (12 bytes): avail u32 at 8.
	dmaAvailOff  = 8
	dmaAvailSize = 12

	// Size of struct vfio_iommu_type1_info, where the chain may start.
	iommuInfoSize = 24
)
