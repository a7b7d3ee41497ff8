package vfio

import (
	"encoding/binary"
	"errors"
	"math"
	"math/bits"
	"os"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/span"
)

// The request numbers of kernel-uapi.md §3.1.
func TestIoctlNumbers(t *testing.T) {
	tests := []struct {
		name      string
		got, want uintptr
	}{
		{"VFIO_GET_API_VERSION", ioctlGetAPIVersion, 0x3B64},
		{"VFIO_CHECK_EXTENSION", ioctlCheckExtension, 0x3B65},
		{"VFIO_SET_IOMMU", ioctlSetIOMMU, 0x3B66},
		{"VFIO_GROUP_GET_STATUS", ioctlGroupGetStatus, 0x3B67},
		{"VFIO_GROUP_SET_CONTAINER", ioctlGroupSetContainer, 0x3B68},
		{"VFIO_GROUP_UNSET_CONTAINER", ioctlGroupUnsetContainer, 0x3B69},
		{"VFIO_GROUP_GET_DEVICE_FD", ioctlGroupGetDeviceFD, 0x3B6A},
		{"VFIO_DEVICE_GET_INFO", ioctlDeviceGetInfo, 0x3B6B},
		{"VFIO_DEVICE_GET_REGION_INFO", ioctlDeviceGetRegionInfo, 0x3B6C},
		{"VFIO_DEVICE_RESET", ioctlDeviceReset, 0x3B6F},
		{"VFIO_IOMMU_GET_INFO", ioctlIOMMUGetInfo, 0x3B70},
		{"VFIO_IOMMU_MAP_DMA", ioctlIOMMUMapDMA, 0x3B71},
		{"VFIO_IOMMU_UNMAP_DMA", ioctlIOMMUUnmapDMA, 0x3B72},
		{"VFIO_DEVICE_BIND_IOMMUFD", ioctlDeviceBindIOMMUFD, 0x3B76},
		{"VFIO_DEVICE_ATTACH_IOMMUFD_PT", ioctlDeviceAttachIOMMUFD, 0x3B77},
		{"VFIO_DEVICE_DETACH_IOMMUFD_PT", ioctlDeviceDetachIOMMUFD, 0x3B78},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %#x, want %#x", tt.name, tt.got, tt.want)
		}
	}
	consts := []struct {
		name      string
		got, want uint64
	}{
		{"VFIO_TYPE1_IOMMU", uint64(Type1IOMMU), 1},
		{"VFIO_TYPE1v2_IOMMU", uint64(Type1v2IOMMU), 3},
		{"VFIO_NOIOMMU_IOMMU", uint64(NoIOMMU), 8},
		{"VFIO_UNMAP_ALL", uint64(UnmapAll), 9},
		{"VFIO_UPDATE_VADDR", uint64(UpdateVaddr), 10},
		{"VFIO_DMA_MAP_FLAG_READ", uint64(MapRead), 1},
		{"VFIO_DMA_MAP_FLAG_WRITE", uint64(MapWrite), 2},
		{"VFIO_DMA_MAP_FLAG_VADDR", uint64(MapVaddr), 4},
		{"VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP", uint64(UnmapGetDirtyBitmap), 1},
		{"VFIO_DMA_UNMAP_FLAG_ALL", uint64(UnmapFlagAll), 2},
		{"VFIO_DMA_UNMAP_FLAG_VADDR", uint64(UnmapVaddr), 4},
		{"VFIO_GROUP_FLAGS_VIABLE", GroupViable, 1},
		{"VFIO_GROUP_FLAGS_CONTAINER_SET", GroupContainerSet, 2},
		{"VFIO_PCI_CONFIG_REGION_INDEX", PCIConfigRegionIndex, 7},
		{"VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL", capDMAAvail, 3},
	}
	for _, c := range consts {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
}

// infoBuilder writes a VFIO_IOMMU_GET_INFO reply the way the kernel lays it
// out, to feed ParseIOMMUInfo.
type infoBuilder struct {
	buf  []byte
	last int // offset of the last capability's header, 0 if none
}

func newInfo(flags uint32, pgsizes uint64) *infoBuilder {
	b := &infoBuilder{buf: make([]byte, iommuInfoSize)}
	binary.NativeEndian.PutUint32(b.buf[4:], flags)
	binary.NativeEndian.PutUint64(b.buf[8:], pgsizes)
	return b
}

func (b *infoBuilder) cap(id uint16, body []byte) *infoBuilder {
	off := len(b.buf)
	hdr := make([]byte, capHeaderSize)
	binary.NativeEndian.PutUint16(hdr[0:], id)
	binary.NativeEndian.PutUint16(hdr[2:], 1)
	b.buf = append(b.buf, hdr...)
	b.buf = append(b.buf, body...)
	for len(b.buf)%8 != 0 {
		b.buf = append(b.buf, 0)
	}
	if b.last == 0 {
		binary.NativeEndian.PutUint32(b.buf[16:], uint32(off))
	} else {
		binary.NativeEndian.PutUint32(b.buf[b.last+4:], uint32(off))
	}
	b.last = off
	return b
}

func (b *infoBuilder) bytes() []byte {
	binary.NativeEndian.PutUint32(b.buf[0:], uint32(len(b.buf)))
	return b.buf
}

func iovaRangeBody(r ...IOVARange) []byte {
	body := make([]byte, 8+16*len(r))
	binary.NativeEndian.PutUint32(body[0:], uint32(len(r)))
	for i, x := range r {
		binary.NativeEndian.PutUint64(body[8+16*i:], x.Start)
		binary.NativeEndian.PutUint64(body[16+16*i:], x.End)
	}
	return body
}

func u32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

func migrationBody(flags uint32, pgsizes, max uint64) []byte {
	body := make([]byte, 24)
	binary.NativeEndian.PutUint32(body[0:], flags)
	binary.NativeEndian.PutUint64(body[8:], pgsizes)
	binary.NativeEndian.PutUint64(body[16:], max)
	return body
}

// What the kernel answered in the TCG guest (kernel-uapi.md §3.2).
func measuredInfo() []byte {
	return newInfo(InfoPgsizes|InfoCaps, 0x40201000).
		cap(capIOVARange, iovaRangeBody(IOVARange{0, 0xfedfffff}, IOVARange{0xfef00000, 0x7fffffffff})).
		cap(capMigration, migrationBody(0, 0x1000, 268435456)).
		cap(capDMAAvail, u32(65535)).
		bytes()
}

func TestParseIOMMUInfo(t *testing.T) {
	tests := []struct {
		name string
		buf  []byte
		want IOMMUInfo
	}{
		{
			name: "measured intel-iommu",
			buf:  measuredInfo(),
			want: IOMMUInfo{
				Flags:       InfoPgsizes | InfoCaps,
				IOVAPgsizes: 0x40201000,
				IOVARanges:  []IOVARange{{0, 0xfedfffff}, {0xfef00000, 0x7fffffffff}},
				Migration:   &Migration{PgsizeBitmap: 0x1000, MaxDirtyBitmapSize: 268435456},
				DMAAvail:    65535, HasDMAAvail: true,
			},
		},
		{
			name: "no caps flag ignores cap_offset",
			buf: func() []byte {
				b := newInfo(InfoPgsizes, 0x1000).cap(capDMAAvail, u32(3)).bytes()
				return b
			}(),
			want: IOMMUInfo{Flags: InfoPgsizes, IOVAPgsizes: 0x1000},
		},
		{
			name: "unknown capability skipped",
			buf:  newInfo(InfoPgsizes|InfoCaps, 0x1000).cap(99, make([]byte, 16)).cap(capDMAAvail, u32(7)).bytes(),
			want: IOMMUInfo{Flags: InfoPgsizes | InfoCaps, IOVAPgsizes: 0x1000, DMAAvail: 7, HasDMAAvail: true},
		},
		{
			name: "empty range list",
			buf:  newInfo(InfoCaps, 0).cap(capIOVARange, iovaRangeBody()).bytes(),
			want: IOMMUInfo{Flags: InfoCaps, IOVARanges: []IOVARange{}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseIOMMUInfo(tt.buf)
			if err != nil {
				t.Fatalf("ParseIOMMUInfo: %v", err)
			}
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("ParseIOMMUInfo (-want +got):\n%s", d)
			}
		})
	}
}

func TestParseIOMMUInfoMalformed(t *testing.T) {
	loop := newInfo(InfoCaps, 0x1000).cap(capDMAAvail, u32(1)).bytes()
	binary.NativeEndian.PutUint32(loop[iommuInfoSize+4:], iommuInfoSize) // next points at itself
	tooMany := newInfo(InfoCaps, 0).cap(capIOVARange, iovaRangeBody(IOVARange{0, 1})).bytes()
	binary.NativeEndian.PutUint32(tooMany[iommuInfoSize+8:], 1000)
	shortAvail := newInfo(InfoCaps, 0).cap(capDMAAvail, nil).bytes()
	shortAvail = shortAvail[:iommuInfoSize+capHeaderSize]
	binary.NativeEndian.PutUint32(shortAvail[0:], uint32(len(shortAvail)))
	intoHeader := newInfo(InfoCaps, 0).bytes()
	binary.NativeEndian.PutUint32(intoHeader[16:], 8)
	beyondArgsz := newInfo(InfoCaps, 0).cap(capDMAAvail, u32(1)).bytes()
	binary.NativeEndian.PutUint32(beyondArgsz[0:], iommuInfoSize) // argsz says: no room for caps
	tests := []struct {
		name string
		buf  []byte
	}{
		{"short header", make([]byte, 23)},
		{"self loop", loop},
		{"too many ranges", tooMany},
		{"short dma avail", shortAvail},
		{"cap inside the header", intoHeader},
		{"cap beyond argsz", beyondArgsz},
		{"short migration", newInfo(InfoCaps, 0).cap(capMigration, nil).bytes()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got, err := ParseIOMMUInfo(tt.buf); !errors.Is(err, ErrMalformed) {
				t.Errorf("ParseIOMMUInfo = %+v, %v; want ErrMalformed", got, err)
			}
		})
	}
}

func FuzzParseIOMMUInfo(f *testing.F) {
	f.Add(measuredInfo())
	f.Add(newInfo(InfoCaps, 0x1000).cap(capDMAAvail, u32(3)).bytes())
	f.Add(newInfo(InfoCaps, 0).cap(capIOVARange, iovaRangeBody(IOVARange{1, 2})).cap(99, nil).bytes())
	f.Add(make([]byte, 24))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, buf []byte) {
		info, err := ParseIOMMUInfo(buf)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		// Whatever was decoded came from inside buf.
		if uint64(len(info.IOVARanges))*iovaRangeEntrySize > uint64(len(buf)) {
			t.Fatalf("%d ranges decoded from %d bytes", len(info.IOVARanges), len(buf))
		}
		if info.HasDMAAvail && info.Flags&InfoCaps == 0 {
			t.Fatalf("DMA avail decoded without the caps flag")
		}
	})
}

func TestIOVARangeSpan(t *testing.T) {
	tests := []struct {
		in   IOVARange
		want span.Range
	}{
		{IOVARange{0, 0xfedfffff}, span.Range{Start: 0, End: 0xfee00000}},
		{IOVARange{0xfef00000, 0x7fffffffff}, span.Range{Start: 0xfef00000, End: 0x8000000000}},
		{IOVARange{0, math.MaxUint64}, span.Range{Start: 0, End: math.MaxUint64}},
		{IOVARange{5, 5}, span.Range{Start: 5, End: 6}},
	}
	for _, tt := range tests {
		if got := tt.in.Span(); got != tt.want {
			t.Errorf("%+v.Span() = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestMinPageSize(t *testing.T) {
	for _, tt := range []struct{ pg, want uint64 }{{0x40201000, 0x1000}, {0, 0}, {0x200000, 0x200000}} {
		if got := (IOMMUInfo{IOVAPgsizes: tt.pg}).MinPageSize(); got != tt.want {
			t.Errorf("MinPageSize(%#x) = %#x, want %#x", tt.pg, got, tt.want)
		}
	}
}

func TestRegionBounds(t *testing.T) {
	r := RegionInfo{Index: 0, Size: 0x100}
	for _, tt := range []struct {
		off uint64
		n   int
		ok  bool
	}{
		{0, 0x100, true}, {0xfc, 4, true}, {0xfd, 4, false}, {0x100, 0, true},
		{0x101, 0, false}, {math.MaxUint64, 8, false}, {8, math.MaxInt, false},
	} {
		err := regionIO(r, tt.off, tt.n)
		if (err == nil) != tt.ok {
			t.Errorf("regionIO(off %#x, n %#x) = %v, want ok=%v", tt.off, tt.n, err, tt.ok)
		}
		if err != nil && !errors.Is(err, unix.EINVAL) {
			t.Errorf("regionIO error %v is not EINVAL", err)
		}
	}
}

func TestMMIOAccess(t *testing.T) {
	b := make([]byte, 16)
	Store32(b, 4, 0xdeadbeef)
	Store64(b, 8, 0x0102030405060708)
	if got := Load32(b, 4); got != 0xdeadbeef {
		t.Errorf("Load32 = %#x", got)
	}
	if got := Load64(b, 8); got != 0x0102030405060708 {
		t.Errorf("Load64 = %#x", got)
	}
	if got := binary.NativeEndian.Uint32(b[4:]); got != 0xdeadbeef {
		t.Errorf("bytes after Store32 = %#x", got)
	}
	for _, bad := range []func(){
		func() { Load32(b, 2) }, func() { Load32(b, 16) }, func() { Store64(b, 4, 0) },
		func() { Load64(b, 16) }, func() { Store32(b, -4, 0) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("misaligned or out-of-range MMIO access did not panic")
				}
			}()
			bad()
		}()
	}
}

// TestContainer runs where the host has VFIO (not this project's build
// machine: the real device tests run in the QEMU guest of scripts/rig).
func TestContainer(t *testing.T) {
	if _, err := os.Stat(ContainerPath); err != nil {
		t.Skipf("no %s on this host (%v); the real VFIO tests run inside the guest booted by scripts/rig", ContainerPath, err)
	}
	c, err := OpenContainer()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v, err := c.GetAPIVersion()
	if err != nil || v != APIVersion {
		t.Fatalf("GetAPIVersion = %d, %v; want %d", v, err, APIVersion)
	}
	// Without a group and IOMMU set, GET_INFO must fail (EINVAL), not
	// return garbage.
	if _, err := c.GetIOMMUInfo(); err == nil {
		t.Errorf("GetIOMMUInfo on a bare container succeeded")
	}
}

func FuzzRegionIO(f *testing.F) {
	f.Add(uint64(0x100), uint64(0), 4)
	f.Add(uint64(0x100), uint64(0xfc), 8)
	f.Add(uint64(0), uint64(0), 0)
	f.Add(uint64(math.MaxUint64), uint64(math.MaxUint64-3), 4)
	f.Fuzz(func(t *testing.T, size, off uint64, n int) {
		if n < 0 {
			n = -n
		}
		err := regionIO(RegionInfo{Size: size}, off, n)
		// The access fits exactly when off+n <= size, computed without
		// overflow.
		end, carry := bits.Add64(off, uint64(n), 0)
		fits := carry == 0 && end <= size
		if fits != (err == nil) {
			t.Fatalf("regionIO(size %#x, off %#x, n %#x) = %v, fits %v", size, off, n, err, fits)
		}
	})
}

func FuzzIOVARangeSpan(f *testing.F) {
	f.Add(uint64(0), uint64(0xfedfffff))
	f.Add(uint64(0), uint64(math.MaxUint64))
	f.Fuzz(func(t *testing.T, start, end uint64) {
		if end < start {
			return // the kernel never reports one
		}
		s := IOVARange{Start: start, End: end}.Span()
		if s.Start != start || s.Len() == 0 {
			t.Fatalf("Span of [%#x, %#x] = %v", start, end, s)
		}
		if end != math.MaxUint64 && (s.End != end+1 || !s.Contains(end)) {
			t.Fatalf("Span of [%#x, %#x] = %v, want End %#x", start, end, s, end+1)
		}
	})
}
