package vfio

import (
	"testing"
	"unsafe"

	"github.com/google/go-cmp/cmp"
)

// The expected sizes and offsets are those of kernel-uapi.md §3.1 and §4.1
// and of include/uapi/linux/vfio.h for the device structs.

type field struct {
	Name   string
	Offset uintptr
}

func TestLayoutSizes(t *testing.T) {
	tests := []struct {
		name      string
		got, want uintptr
		constant  uintptr
	}{
		{"vfio_group_status", unsafe.Sizeof(groupStatus{}), 8, sizeofGroupStatus},
		{"vfio_device_info", unsafe.Sizeof(deviceInfo{}), 24, sizeofDeviceInfo},
		{"vfio_region_info", unsafe.Sizeof(regionInfo{}), 32, sizeofRegionInfo},
		{"vfio_iommu_type1_info", unsafe.Sizeof(iommuType1Info{}), 24, sizeofIOMMUType1Info},
		{"vfio_iommu_type1_dma_map", unsafe.Sizeof(dmaMap{}), 32, sizeofDMAMap},
		{"vfio_iommu_type1_dma_unmap", unsafe.Sizeof(dmaUnmap{}), 24, sizeofDMAUnmap},
		{"vfio_device_bind_iommufd", unsafe.Sizeof(bindIOMMUFD{}), 24, sizeofBindIOMMUFD},
		{"vfio_device_attach_iommufd_pt", unsafe.Sizeof(attachIOMMUFDPT{}), 16, sizeofAttachIOMMUFDPT},
		{"vfio_device_detach_iommufd_pt", unsafe.Sizeof(detachIOMMUFDPT{}), 12, sizeofDetachIOMMUFDPT},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("sizeof(%s) = %d, want %d", tt.name, tt.got, tt.want)
		}
		if tt.constant != tt.want {
			t.Errorf("argsz constant for %s = %d, want %d", tt.name, tt.constant, tt.want)
		}
	}
	if iommuInfoSize != unsafe.Sizeof(iommuType1Info{}) {
		t.Errorf("iommuInfoSize = %d, want %d", iommuInfoSize, unsafe.Sizeof(iommuType1Info{}))
	}
}

func TestLayoutOffsets(t *testing.T) {
	var (
		gs groupStatus
		di deviceInfo
		ri regionInfo
		ii iommuType1Info
		dm dmaMap
		du dmaUnmap
		bi bindIOMMUFD
		ap attachIOMMUFDPT
		dp detachIOMMUFDPT
	)
	tests := []struct {
		name      string
		got, want []field
	}{
		{"vfio_group_status",
			[]field{{"argsz", unsafe.Offsetof(gs.Argsz)}, {"flags", unsafe.Offsetof(gs.Flags)}},
			[]field{{"argsz", 0}, {"flags", 4}}},
		{"vfio_device_info",
			[]field{{"argsz", unsafe.Offsetof(di.Argsz)}, {"flags", unsafe.Offsetof(di.Flags)},
				{"num_regions", unsafe.Offsetof(di.NumRegions)}, {"num_irqs", unsafe.Offsetof(di.NumIRQs)},
				{"cap_offset", unsafe.Offsetof(di.CapOffset)}, {"pad", unsafe.Offsetof(di.Pad)}},
			[]field{{"argsz", 0}, {"flags", 4}, {"num_regions", 8}, {"num_irqs", 12}, {"cap_offset", 16}, {"pad", 20}}},
		{"vfio_region_info",
			[]field{{"argsz", unsafe.Offsetof(ri.Argsz)}, {"flags", unsafe.Offsetof(ri.Flags)},
				{"index", unsafe.Offsetof(ri.Index)}, {"cap_offset", unsafe.Offsetof(ri.CapOffset)},
				{"size", unsafe.Offsetof(ri.Size)}, {"offset", unsafe.Offsetof(ri.Offset)}},
			[]field{{"argsz", 0}, {"flags", 4}, {"index", 8}, {"cap_offset", 12}, {"size", 16}, {"offset", 24}}},
		{"vfio_iommu_type1_info",
			[]field{{"argsz", unsafe.Offsetof(ii.Argsz)}, {"flags", unsafe.Offsetof(ii.Flags)},
				{"iova_pgsizes", unsafe.Offsetof(ii.IOVAPgsizes)}, {"cap_offset", unsafe.Offsetof(ii.CapOffset)},
				{"pad", unsafe.Offsetof(ii.Pad)}},
			[]field{{"argsz", 0}, {"flags", 4}, {"iova_pgsizes", 8}, {"cap_offset", 16}, {"pad", 20}}},
		{"vfio_iommu_type1_dma_map",
			[]field{{"argsz", unsafe.Offsetof(dm.Argsz)}, {"flags", unsafe.Offsetof(dm.Flags)},
				{"vaddr", unsafe.Offsetof(dm.Vaddr)}, {"iova", unsafe.Offsetof(dm.IOVA)}, {"size", unsafe.Offsetof(dm.Size)}},
			[]field{{"argsz", 0}, {"flags", 4}, {"vaddr", 8}, {"iova", 16}, {"size", 24}}},
		{"vfio_iommu_type1_dma_unmap",
			[]field{{"argsz", unsafe.Offsetof(du.Argsz)}, {"flags", unsafe.Offsetof(du.Flags)},
				{"iova", unsafe.Offsetof(du.IOVA)}, {"size", unsafe.Offsetof(du.Size)}},
			[]field{{"argsz", 0}, {"flags", 4}, {"iova", 8}, {"size", 16}}},
		{"vfio_device_bind_iommufd",
			[]field{{"argsz", unsafe.Offsetof(bi.Argsz)}, {"flags", unsafe.Offsetof(bi.Flags)},
				{"iommufd", unsafe.Offsetof(bi.IOMMUFD)}, {"out_devid", unsafe.Offsetof(bi.OutDevID)},
				{"token_uuid_ptr", unsafe.Offsetof(bi.TokenUUIDPtr)}},
			[]field{{"argsz", 0}, {"flags", 4}, {"iommufd", 8}, {"out_devid", 12}, {"token_uuid_ptr", 16}}},
		{"vfio_device_attach_iommufd_pt",
			[]field{{"argsz", unsafe.Offsetof(ap.Argsz)}, {"flags", unsafe.Offsetof(ap.Flags)},
				{"pt_id", unsafe.Offsetof(ap.PtID)}, {"pasid", unsafe.Offsetof(ap.Pasid)}},
			[]field{{"argsz", 0}, {"flags", 4}, {"pt_id", 8}, {"pasid", 12}}},
		{"vfio_device_detach_iommufd_pt",
			[]field{{"argsz", unsafe.Offsetof(dp.Argsz)}, {"flags", unsafe.Offsetof(dp.Flags)}, {"pasid", unsafe.Offsetof(dp.Pasid)}},
			[]field{{"argsz", 0}, {"flags", 4}, {"pasid", 8}}},
	}
	for _, tt := range tests {
		if d := cmp.Diff(tt.want, tt.got); d != "" {
			t.Errorf("%s offsets (-want +got):\n%s", tt.name, d)
		}
	}
}

func TestAddrOf(t *testing.T) {
	if got := addrOf(nil); got != 0 {
		t.Errorf("addrOf(nil) = %#x, want 0", got)
	}
	b := make([]byte, 16)
	if got, want := addrOf(b[4:]), addrOf(b)+4; got != want {
		t.Errorf("addrOf(b[4:]) = %#x, want %#x", got, want)
	}
}
