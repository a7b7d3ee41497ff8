// Package vfio wraps the Linux VFIO uAPI for PCI devices behind an IOMMU:
// the type1 container (/dev/vfio/vfio), IOMMU groups (/dev/vfio/N), device
// file descriptors (from a group, or from the device cdev
// /dev/vfio/devices/vfioN that binds to an iommufd), and Space, an
// iommu.Space over a type1 v2 container.
//
// One Go type per file descriptor and one method per ioctl, named after it.
// Constants and struct layouts are written by hand from the uAPI and checked
// by tests. Errors carry the kernel's unix.Errno, wrapped with the ioctl's
// name, so errors.Is(err, unix.ENOSPC) and friends work.
//
// Every type's methods are safe for concurrent use, Close included. Each
// ioctl, pread, pwrite and mmap runs with the descriptor held open (inside
// its RawConn.Control), so a Close racing it can never make it reach a
// recycled descriptor number: Close refuses new calls with ErrClosed
// (which matches fs.ErrClosed), waits for the calls in flight and then
// closes.
//
// The package does not import package iommufd: the cdev methods take the
// iommufd file descriptor as a plain int, which the caller holds open for
// the call with the iommufd's Control where its Close may race.
package vfio

// ioctl request numbers: _IO(VFIO_TYPE ';', VFIO_BASE 100 + n). VFIO ioctls
// carry no size or direction bits; every struct starts with argsz instead.
const (
	vfioType = 0x3B
	vfioBase = 100

	ioctlGetAPIVersion       = vfioType<<8 | (vfioBase + 0)  // VFIO_GET_API_VERSION
	ioctlCheckExtension      = vfioType<<8 | (vfioBase + 1)  // VFIO_CHECK_EXTENSION
	ioctlSetIOMMU            = vfioType<<8 | (vfioBase + 2)  // VFIO_SET_IOMMU
	ioctlGroupGetStatus      = vfioType<<8 | (vfioBase + 3)  // VFIO_GROUP_GET_STATUS
	ioctlGroupSetContainer   = vfioType<<8 | (vfioBase + 4)  // VFIO_GROUP_SET_CONTAINER
	ioctlGroupUnsetContainer = vfioType<<8 | (vfioBase + 5)  // VFIO_GROUP_UNSET_CONTAINER
	ioctlGroupGetDeviceFD    = vfioType<<8 | (vfioBase + 6)  // VFIO_GROUP_GET_DEVICE_FD
	ioctlDeviceGetInfo       = vfioType<<8 | (vfioBase + 7)  // VFIO_DEVICE_GET_INFO
	ioctlDeviceGetRegionInfo = vfioType<<8 | (vfioBase + 8)  // VFIO_DEVICE_GET_REGION_INFO
	ioctlDeviceReset         = vfioType<<8 | (vfioBase + 11) // VFIO_DEVICE_RESET
	ioctlIOMMUGetInfo        = vfioType<<8 | (vfioBase + 12) // VFIO_IOMMU_GET_INFO
	ioctlIOMMUMapDMA         = vfioType<<8 | (vfioBase + 13) // VFIO_IOMMU_MAP_DMA
	ioctlIOMMUUnmapDMA       = vfioType<<8 | (vfioBase + 14) // VFIO_IOMMU_UNMAP_DMA
	ioctlDeviceBindIOMMUFD   = vfioType<<8 | (vfioBase + 18) // VFIO_DEVICE_BIND_IOMMUFD
	ioctlDeviceAttachIOMMUFD = vfioType<<8 | (vfioBase + 19) // VFIO_DEVICE_ATTACH_IOMMUFD_PT
	ioctlDeviceDetachIOMMUFD = vfioType<<8 | (vfioBase + 20) // VFIO_DEVICE_DETACH_IOMMUFD_PT
)

// APIVersion is VFIO_API_VERSION, what VFIO_GET_API_VERSION returns.
const APIVersion = 0

// Extension is an argument of VFIO_CHECK_EXTENSION, and for the IOMMU
// types also of VFIO_SET_IOMMU.
type Extension uint32

// Extensions (VFIO_*), numbered as in the uAPI.
const (
	// Type1IOMMU is VFIO_TYPE1_IOMMU, the legacy type1 whose unmap removes a
	// whole mapping when the request touches its first IOVA.
	Type1IOMMU Extension = 1
	// SPAPRTCEIOMMU is VFIO_SPAPR_TCE_IOMMU (POWER only).
	SPAPRTCEIOMMU Extension = 2
	// Type1v2IOMMU is VFIO_TYPE1v2_IOMMU, the type1 whose unmap must not cut
	// a mapping (EINVAL); the only type gmem uses.
	Type1v2IOMMU Extension = 3
	// DMACCIOMMU is VFIO_DMA_CC_IOMMU: DMA is cache coherent.
	DMACCIOMMU Extension = 4
	// EEH is VFIO_EEH (POWER only).
	EEH Extension = 5
	// SPAPRTCEv2IOMMU is VFIO_SPAPR_TCE_v2_IOMMU (POWER only).
	SPAPRTCEv2IOMMU Extension = 7
	// NoIOMMU is VFIO_NOIOMMU_IOMMU: no translation, no MAP_DMA.
	NoIOMMU Extension = 8
	// UnmapAll is VFIO_UNMAP_ALL: VFIO_DMA_UNMAP_FLAG_ALL is supported.
	UnmapAll Extension = 9
	// UpdateVaddr is VFIO_UPDATE_VADDR: the VADDR map/unmap flags are
	// supported.
	UpdateVaddr Extension = 10
)

// MapFlags are the flags of VFIO_IOMMU_MAP_DMA.
type MapFlags uint32

// VFIO_DMA_MAP_FLAG_*.
const (
	// MapRead lets the device read the mapping (VFIO_DMA_MAP_FLAG_READ).
	MapRead MapFlags = 1 << 0
	// MapWrite lets the device write the mapping (VFIO_DMA_MAP_FLAG_WRITE).
	MapWrite MapFlags = 1 << 1
	// MapVaddr updates the host address of an existing mapping
	// (VFIO_DMA_MAP_FLAG_VADDR).
	MapVaddr MapFlags = 1 << 2
)

// UnmapFlags are the flags of VFIO_IOMMU_UNMAP_DMA.
type UnmapFlags uint32

// VFIO_DMA_UNMAP_FLAG_*.
const (
	// UnmapGetDirtyBitmap is VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP (not
	// supported by these wrappers: it needs a trailing vfio_bitmap).
	UnmapGetDirtyBitmap UnmapFlags = 1 << 0
	// UnmapFlagAll removes every mapping (VFIO_DMA_UNMAP_FLAG_ALL); iova and
	// size must be 0.
	UnmapFlagAll UnmapFlags = 1 << 1
	// UnmapVaddr invalidates the host address only
	// (VFIO_DMA_UNMAP_FLAG_VADDR).
	UnmapVaddr UnmapFlags = 1 << 2
)

// IOMMU info flags (VFIO_IOMMU_INFO_*).
const (
	// InfoPgsizes means IOMMUInfo.IOVAPgsizes is valid
	// (VFIO_IOMMU_INFO_PGSIZES).
	InfoPgsizes = 1 << 0
	// InfoCaps means the reply has a capability chain (VFIO_IOMMU_INFO_CAPS).
	InfoCaps = 1 << 1
)

// Capability ids of the VFIO_IOMMU_GET_INFO chain.
const (
	capIOVARange = 1 // VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE
	capMigration = 2 // VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION
	capDMAAvail  = 3 // VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL
)

// Group status flags (VFIO_GROUP_FLAGS_*).
const (
	// GroupViable means every device of the group is bound to a VFIO driver
	// or none (VFIO_GROUP_FLAGS_VIABLE).
	GroupViable = 1 << 0
	// GroupContainerSet means the group is in a container
	// (VFIO_GROUP_FLAGS_CONTAINER_SET).
	GroupContainerSet = 1 << 1
)

// Device info flags (VFIO_DEVICE_FLAGS_*).
const (
	// DeviceReset means VFIO_DEVICE_RESET is supported.
	DeviceReset = 1 << 0
	// DevicePCI means a PCI device (VFIO_DEVICE_FLAGS_PCI).
	DevicePCI = 1 << 1
	// DeviceCaps means the reply has a capability chain
	// (VFIO_DEVICE_FLAGS_CAPS).
	DeviceCaps = 1 << 7
)

// Region info flags (VFIO_REGION_INFO_FLAG_*).
const (
	// RegionRead means the region can be read.
	RegionRead = 1 << 0
	// RegionWrite means the region can be written.
	RegionWrite = 1 << 1
	// RegionMmap means the region can be mmap'ed.
	RegionMmap = 1 << 2
	// RegionCaps means the reply has a capability chain.
	RegionCaps = 1 << 3
)

// Region indexes of a vfio-pci device (VFIO_PCI_*_REGION_INDEX).
const (
	PCIBAR0RegionIndex   = 0
	PCIBAR1RegionIndex   = 1
	PCIBAR2RegionIndex   = 2
	PCIBAR3RegionIndex   = 3
	PCIBAR4RegionIndex   = 4
	PCIBAR5RegionIndex   = 5
	PCIROMRegionIndex    = 6
	PCIConfigRegionIndex = 7
	PCIVGARegionIndex    = 8
)

// PCI configuration space: the command register and its bits (PCI_COMMAND
// in pci_regs.h).
const (
	PCICommand          = 0x04
	PCICommandIO        = 1 << 0
	PCICommandMemory    = 1 << 1
	PCICommandBusMaster = 1 << 2
	PCIVendorID         = 0x00
	PCIDeviceID         = 0x02
)
