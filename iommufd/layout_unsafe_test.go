package iommufd

import (
	"testing"
	"unsafe"

	"github.com/google/go-cmp/cmp"
)

// Expected sizes and offsets: kernel-uapi.md §4.1.

type field struct {
	Name   string
	Offset uintptr
}

func TestLayoutSizes(t *testing.T) {
	tests := []struct {
		name          string
		got, constant uintptr
		want          uintptr
	}{
		{"iommu_destroy", unsafe.Sizeof(destroy{}), sizeofDestroy, 8},
		{"iommu_ioas_alloc", unsafe.Sizeof(ioasAlloc{}), sizeofIOASAlloc, 12},
		{"iommu_iova_range", unsafe.Sizeof(iovaRange{}), sizeofIOVARange, 16},
		{"iommu_ioas_iova_ranges", unsafe.Sizeof(ioasIOVARanges{}), sizeofIOASIOVARanges, 32},
		{"iommu_ioas_allow_iovas", unsafe.Sizeof(ioasAllowIOVAs{}), sizeofIOASAllowIOVAs, 24},
		{"iommu_ioas_map", unsafe.Sizeof(ioasMap{}), sizeofIOASMap, 40},
		{"iommu_ioas_map_file", unsafe.Sizeof(ioasMapFile{}), sizeofIOASMapFile, 40},
		{"iommu_ioas_copy", unsafe.Sizeof(ioasCopy{}), sizeofIOASCopy, 40},
		{"iommu_ioas_unmap", unsafe.Sizeof(ioasUnmap{}), sizeofIOASUnmap, 24},
		{"iommu_option", unsafe.Sizeof(option{}), sizeofOption, 24},
		{"iommu_vfio_ioas", unsafe.Sizeof(vfioIOAS{}), sizeofVFIOIOAS, 12},
		{"vfio_iommu_type1_dma_unmap", unsafe.Sizeof(dmaUnmap{}), sizeofDMAUnmap, 24},
	}
	for _, tt := range tests {
		if tt.got != tt.want || tt.constant != tt.want {
			t.Errorf("sizeof(%s) = %d, constant %d, want %d", tt.name, tt.got, tt.constant, tt.want)
		}
	}
}

func TestLayoutOffsets(t *testing.T) {
	var (
		d  destroy
		a  ioasAlloc
		r  iovaRange
		rs ioasIOVARanges
		al ioasAllowIOVAs
		m  ioasMap
		mf ioasMapFile
		c  ioasCopy
		u  ioasUnmap
		o  option
		v  vfioIOAS
		du dmaUnmap
	)
	tests := []struct {
		name      string
		got, want []field
	}{
		{"iommu_destroy",
			[]field{{"size", unsafe.Offsetof(d.Size)}, {"id", unsafe.Offsetof(d.ID)}},
			[]field{{"size", 0}, {"id", 4}}},
		{"iommu_ioas_alloc",
			[]field{{"size", unsafe.Offsetof(a.Size)}, {"flags", unsafe.Offsetof(a.Flags)}, {"out_ioas_id", unsafe.Offsetof(a.OutIOASID)}},
			[]field{{"size", 0}, {"flags", 4}, {"out_ioas_id", 8}}},
		{"iommu_iova_range",
			[]field{{"start", unsafe.Offsetof(r.Start)}, {"last", unsafe.Offsetof(r.Last)}},
			[]field{{"start", 0}, {"last", 8}}},
		{"iommu_ioas_iova_ranges",
			[]field{{"size", unsafe.Offsetof(rs.Size)}, {"ioas_id", unsafe.Offsetof(rs.IOASID)},
				{"num_iovas", unsafe.Offsetof(rs.NumIOVAs)}, {"__reserved", unsafe.Offsetof(rs.Reserved)},
				{"allowed_iovas", unsafe.Offsetof(rs.AllowedIOVAs)}, {"out_iova_alignment", unsafe.Offsetof(rs.OutIOVAAlignment)}},
			[]field{{"size", 0}, {"ioas_id", 4}, {"num_iovas", 8}, {"__reserved", 12}, {"allowed_iovas", 16}, {"out_iova_alignment", 24}}},
		{"iommu_ioas_allow_iovas",
			[]field{{"size", unsafe.Offsetof(al.Size)}, {"ioas_id", unsafe.Offsetof(al.IOASID)},
				{"num_iovas", unsafe.Offsetof(al.NumIOVAs)}, {"__reserved", unsafe.Offsetof(al.Reserved)},
				{"allowed_iovas", unsafe.Offsetof(al.AllowedIOVAs)}},
			[]field{{"size", 0}, {"ioas_id", 4}, {"num_iovas", 8}, {"__reserved", 12}, {"allowed_iovas", 16}}},
		{"iommu_ioas_map",
			[]field{{"size", unsafe.Offsetof(m.Size)}, {"flags", unsafe.Offsetof(m.Flags)},
				{"ioas_id", unsafe.Offsetof(m.IOASID)}, {"__reserved", unsafe.Offsetof(m.Reserved)},
				{"user_va", unsafe.Offsetof(m.UserVA)}, {"length", unsafe.Offsetof(m.Length)}, {"iova", unsafe.Offsetof(m.IOVA)}},
			[]field{{"size", 0}, {"flags", 4}, {"ioas_id", 8}, {"__reserved", 12}, {"user_va", 16}, {"length", 24}, {"iova", 32}}},
		{"iommu_ioas_map_file",
			[]field{{"size", unsafe.Offsetof(mf.Size)}, {"flags", unsafe.Offsetof(mf.Flags)},
				{"ioas_id", unsafe.Offsetof(mf.IOASID)}, {"fd", unsafe.Offsetof(mf.FD)},
				{"start", unsafe.Offsetof(mf.Start)}, {"length", unsafe.Offsetof(mf.Length)}, {"iova", unsafe.Offsetof(mf.IOVA)}},
			[]field{{"size", 0}, {"flags", 4}, {"ioas_id", 8}, {"fd", 12}, {"start", 16}, {"length", 24}, {"iova", 32}}},
		{"iommu_ioas_copy",
			[]field{{"size", unsafe.Offsetof(c.Size)}, {"flags", unsafe.Offsetof(c.Flags)},
				{"dst_ioas_id", unsafe.Offsetof(c.DstIOASID)}, {"src_ioas_id", unsafe.Offsetof(c.SrcIOASID)},
				{"length", unsafe.Offsetof(c.Length)}, {"dst_iova", unsafe.Offsetof(c.DstIOVA)}, {"src_iova", unsafe.Offsetof(c.SrcIOVA)}},
			[]field{{"size", 0}, {"flags", 4}, {"dst_ioas_id", 8}, {"src_ioas_id", 12}, {"length", 16}, {"dst_iova", 24}, {"src_iova", 32}}},
		{"iommu_ioas_unmap",
			[]field{{"size", unsafe.Offsetof(u.Size)}, {"ioas_id", unsafe.Offsetof(u.IOASID)},
				{"iova", unsafe.Offsetof(u.IOVA)}, {"length", unsafe.Offsetof(u.Length)}},
			[]field{{"size", 0}, {"ioas_id", 4}, {"iova", 8}, {"length", 16}}},
		{"iommu_option",
			[]field{{"size", unsafe.Offsetof(o.Size)}, {"option_id", unsafe.Offsetof(o.OptionID)},
				{"op", unsafe.Offsetof(o.Op)}, {"__reserved", unsafe.Offsetof(o.Reserved)},
				{"object_id", unsafe.Offsetof(o.ObjectID)}, {"val64", unsafe.Offsetof(o.Val64)}},
			[]field{{"size", 0}, {"option_id", 4}, {"op", 8}, {"__reserved", 10}, {"object_id", 12}, {"val64", 16}}},
		{"iommu_vfio_ioas",
			[]field{{"size", unsafe.Offsetof(v.Size)}, {"ioas_id", unsafe.Offsetof(v.IOASID)},
				{"op", unsafe.Offsetof(v.Op)}, {"__reserved", unsafe.Offsetof(v.Reserved)}},
			[]field{{"size", 0}, {"ioas_id", 4}, {"op", 8}, {"__reserved", 10}}},
		{"vfio_iommu_type1_dma_unmap",
			[]field{{"argsz", unsafe.Offsetof(du.Argsz)}, {"flags", unsafe.Offsetof(du.Flags)},
				{"iova", unsafe.Offsetof(du.IOVA)}, {"size", unsafe.Offsetof(du.Size)}},
			[]field{{"argsz", 0}, {"flags", 4}, {"iova", 8}, {"size", 16}}},
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
	if got, want := addrOf(b[8:]), addrOf(b)+8; got != want {
		t.Errorf("addrOf(b[8:]) = %#x, want %#x", got, want)
	}
}
