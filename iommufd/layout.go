package iommufd

// Struct layouts of the iommufd uAPI (include/uapi/linux/iommufd.h),
// checked by layout_unsafe_test.go against kernel-uapi.md §4.1.

// destroy is struct iommu_destroy (8 bytes).
type destroy struct {
	Size uint32
	ID   uint32
}

// ioasAlloc is struct iommu_ioas_alloc (12 bytes).
type ioasAlloc struct {
	Size      uint32
	Flags     uint32
	OutIOASID uint32
}

// iovaRange is struct iommu_iova_range (16 bytes).
type iovaRange struct {
	Start uint64
	Last  uint64
}

// ioasIOVARanges is struct iommu_ioas_iova_ranges (32 bytes). AllowedIOVAs
// is a user pointer to an array of NumIOVAs iovaRange.
type ioasIOVARanges struct {
	Size             uint32
	IOASID           uint32
	NumIOVAs         uint32
	Reserved         uint32
	AllowedIOVAs     uint64
	OutIOVAAlignment uint64
}

// ioasAllowIOVAs is struct iommu_ioas_allow_iovas (24 bytes).
type ioasAllowIOVAs struct {
	Size         uint32
	IOASID       uint32
	NumIOVAs     uint32
	Reserved     uint32
	AllowedIOVAs uint64
}

// ioasMap is struct iommu_ioas_map (40 bytes).
type ioasMap struct {
	Size     uint32
	Flags    uint32
	IOASID   uint32
	Reserved uint32
	UserVA   uint64
	Length   uint64
	IOVA     uint64
}

// ioasMapFile is struct iommu_ioas_map_file (40 bytes).
type ioasMapFile struct {
	Size   uint32
	Flags  uint32
	IOASID uint32
	FD     int32
	Start  uint64
	Length uint64
	IOVA   uint64
}

// ioasCopy is struct iommu_ioas_copy (40 bytes).
type ioasCopy struct {
	Size      uint32
	Flags     uint32
	DstIOASID uint32
	SrcIOASID uint32
	Length    uint64
	DstIOVA   uint64
	SrcIOVA   uint64
}

// ioasUnmap is struct iommu_ioas_unmap (24 bytes).
type ioasUnmap struct {
	Size   uint32
	IOASID uint32
	IOVA   uint64
	Length uint64
}

// option is struct iommu_option (24 bytes).
type option struct {
	Size     uint32
	OptionID uint32
	Op       uint16
	Reserved uint16
	ObjectID uint32
	Val64    uint64
}

// vfioIOAS is struct iommu_vfio_ioas (12 bytes).
type vfioIOAS struct {
	Size     uint32
	IOASID   uint32
	Op       uint16
	Reserved uint16
}

// dmaUnmap is struct vfio_iommu_type1_dma_unmap without its trailing data[]
// (24 bytes), the argument of VFIO_IOMMU_UNMAP_DMA on an iommufd. The
// kernel writes the bytes unmapped back into Size.
type dmaUnmap struct {
	Argsz uint32
	Flags uint32
	IOVA  uint64
	Size  uint64
}

// Struct sizes, the values of each struct's size field. Written out so the
// ioctl code stays free of unsafe; layout_unsafe_test.go checks them.
const (
	sizeofDestroy        = 8
	sizeofIOASAlloc      = 12
	sizeofIOVARange      = 16
	sizeofIOASIOVARanges = 32
	sizeofIOASAllowIOVAs = 24
	sizeofIOASMap        = 40
	sizeofIOASMapFile    = 40
	sizeofIOASCopy       = 40
	sizeofIOASUnmap      = 24
	sizeofOption         = 24
	sizeofVFIOIOAS       = 12
	sizeofDMAUnmap       = 24
)
