package iommufd

import (
	"errors"
	"math"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/span"
)

// The request numbers and flag values of kernel-uapi.md §4.1.
func TestIoctlNumbers(t *testing.T) {
	tests := []struct {
		name      string
		got, want uint64
	}{
		{"IOMMU_DESTROY", ioctlDestroy, 0x3B80},
		{"IOMMU_IOAS_ALLOC", ioctlIOASAlloc, 0x3B81},
		{"IOMMU_IOAS_ALLOW_IOVAS", ioctlIOASAllowIOVAs, 0x3B82},
		{"IOMMU_IOAS_COPY", ioctlIOASCopy, 0x3B83},
		{"IOMMU_IOAS_IOVA_RANGES", ioctlIOASIOVARanges, 0x3B84},
		{"IOMMU_IOAS_MAP", ioctlIOASMap, 0x3B85},
		{"IOMMU_IOAS_UNMAP", ioctlIOASUnmap, 0x3B86},
		{"IOMMU_OPTION", ioctlOption, 0x3B87},
		{"IOMMU_IOAS_MAP_FILE", ioctlIOASMapFile, 0x3B8F},
		{"IOMMU_VFIO_IOAS", ioctlVFIOIOAS, 0x3B88},
		{"VFIO_IOMMU_UNMAP_DMA", ioctlVFIOUnmapDMA, 0x3B72},
		{"IOMMU_VFIO_IOAS_GET", vfioIOASGet, 0},
		{"IOMMU_VFIO_IOAS_SET", vfioIOASSet, 1},
		{"IOMMU_VFIO_IOAS_CLEAR", vfioIOASClear, 2},
		{"IOMMU_IOAS_MAP_FIXED_IOVA", uint64(MapFixedIOVA), 1},
		{"IOMMU_IOAS_MAP_WRITEABLE", uint64(MapWriteable), 2},
		{"IOMMU_IOAS_MAP_READABLE", uint64(MapReadable), 4},
		{"IOMMU_OPTION_RLIMIT_MODE", uint64(OptionRlimitMode), 0},
		{"IOMMU_OPTION_HUGE_PAGES", uint64(OptionHugePages), 1},
		{"IOMMU_OPTION_OP_SET", optionOpSet, 0},
		{"IOMMU_OPTION_OP_GET", optionOpGet, 1},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %#x, want %#x", tt.name, tt.got, tt.want)
		}
	}
}

func TestIOVARangeSpan(t *testing.T) {
	tests := []struct {
		in   IOVARange
		want span.Range
	}{
		{IOVARange{0, 0xfedfffff}, span.Range{Start: 0, End: 0xfee00000}},
		{IOVARange{0xfef00000, 0x7fffffffff}, span.Range{Start: 0xfef00000, End: 0x8000000000}},
		{IOVARange{0, math.MaxUint64}, span.Range{Start: 0, End: math.MaxUint64}},
	}
	for _, tt := range tests {
		if got := tt.in.Span(); got != tt.want {
			t.Errorf("%+v.Span() = %v, want %v", tt.in, got, tt.want)
		}
	}
}

// TestIOAS exercises an IOAS without any device where the host has
// /dev/iommu. The device tests run in the QEMU guest of scripts/rig.
func TestIOAS(t *testing.T) {
	if _, err := os.Stat(Path); err != nil {
		t.Skipf("no %s on this host (%v); the real iommufd tests run inside the guest booted by scripts/rig", Path, err)
	}
	f, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ioas, err := f.IOASAlloc()
	if err != nil {
		t.Fatal(err)
	}
	r, err := f.IOASIOVARanges(ioas)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Ranges) != 1 || r.Ranges[0] != (IOVARange{0, math.MaxUint64}) {
		t.Errorf("fresh IOAS ranges = %+v, want one full range", r.Ranges)
	}
	if _, err := f.IOASUnmap(ioas, 0x1000, 0x1000); !errors.Is(err, unix.ENOENT) {
		t.Errorf("unmap of nothing = %v, want ENOENT", err)
	}
	// Without a device an IOAS pins nothing, but its areas split as with
	// one: a cutting space removes the middle page of four.
	s, err := NewSpace(f, ioas)
	if err != nil {
		t.Fatal(err)
	}
	if !s.Caps().Cut {
		t.Fatalf("a fresh IOAS does not cut: %s", s.CutReason())
	}
	if got, err := f.VFIOIOASGet(); err != nil || got != ioas {
		t.Errorf("compat IOAS = %d, %v; want %d", got, err, ioas)
	}
	mem, err := unix.Mmap(-1, 0, 4*4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	if err := s.Map(0x100000, 4*4096, mem); err != nil {
		t.Fatal(err)
	}
	if n, err := s.Cut(0x101000, 4096); err != nil || n != 4096 {
		t.Errorf("cut of the second page = %#x, %v; want 0x1000", n, err)
	}
	if n, err := s.Cut(0x101000, 4096); err != nil || n != 0 {
		t.Errorf("cut of the same page again = %#x, %v; want 0, nil", n, err)
	}
	if n, err := s.Unmap(0x100000, 4*4096); err != nil || n != 3*4096 {
		t.Errorf("unmap of what is left = %#x, %v; want 0x3000", n, err)
	}
	if err := f.VFIOIOASClear(); err != nil {
		t.Error(err)
	}
	if _, err := f.VFIOIOASGet(); !errors.Is(err, unix.ENODEV) {
		t.Errorf("compat IOAS after clear: %v, want ENODEV", err)
	}
	if err := f.Destroy(ioas); err != nil {
		t.Error(err)
	}
}

func FuzzIOVARangeSpan(f *testing.F) {
	f.Add(uint64(0), uint64(0xfedfffff))
	f.Add(uint64(0xfef00000), uint64(0x7fffffffff))
	f.Add(uint64(0), uint64(math.MaxUint64))
	f.Fuzz(func(t *testing.T, start, last uint64) {
		if last < start {
			return // the kernel never reports one
		}
		s := IOVARange{Start: start, Last: last}.Span()
		if s.Start != start || s.Len() == 0 {
			t.Fatalf("Span of [%#x, %#x] = %v", start, last, s)
		}
		if last != math.MaxUint64 && (s.End != last+1 || !s.Contains(last)) {
			t.Fatalf("Span of [%#x, %#x] = %v, want End %#x", start, last, s, last+1)
		}
	})
}
