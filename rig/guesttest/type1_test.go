package guesttest

import (
	"errors"
	"os"
	"strconv"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/vfio"
)

// measuredRanges are the IOVA windows of QEMU's intel-iommu, MSI window
// excluded (vfio-rig.md).
var measuredRanges = []span.Range{{Start: 0, End: 0xfee00000}, {Start: 0xfef00000, End: 0x8000000000}}

// type1 is one type1 setup: container, group and device, in that order of
// opening.
type type1 struct {
	c   *vfio.Container
	g   *vfio.Group
	d   *vfio.Device
	edu *Edu
	sp  *vfio.Space
}

// openType1 opens a container for the edu device's group with the current
// dma_entry_limit and creates its Space before anything is mapped.
func openType1(bdf string, group int) (*type1, error) {
	s := &type1{}
	var err error
	if s.c, err = vfio.OpenContainer(); err != nil {
		return nil, err
	}
	if s.g, err = vfio.OpenGroup(group); err != nil {
		s.close()
		return nil, err
	}
	if err = s.g.SetContainer(s.c); err != nil {
		s.close()
		return nil, err
	}
	if err = s.c.SetIOMMU(vfio.Type1v2IOMMU); err != nil {
		s.close()
		return nil, err
	}
	if s.sp, err = vfio.NewSpace(s.c); err != nil {
		s.close()
		return nil, err
	}
	if s.d, err = s.g.GetDeviceFD(bdf); err != nil {
		s.close()
		return nil, err
	}
	if s.edu, err = NewEdu(s.d); err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

// close releases everything, device first: the group cannot leave its
// container while a device fd is open.
func (s *type1) close() error {
	var errs []error
	if s.edu != nil {
		errs = append(errs, s.edu.Close())
	}
	if s.d != nil {
		errs = append(errs, s.d.Close())
	}
	if s.g != nil {
		if st, err := s.g.GetStatus(); err == nil && st.ContainerSet() {
			errs = append(errs, s.g.UnsetContainer())
		}
		errs = append(errs, s.g.Close())
	}
	if s.c != nil {
		errs = append(errs, s.c.Close())
	}
	*s = type1{}
	return errors.Join(errs...)
}

func runType1(t *testing.T, bdf string) {
	const b = "type1"
	group, err := vfio.IOMMUGroup(bdf)
	if err != nil {
		t.Fatal(err)
	}
	s := &type1{}
	t.Cleanup(func() {
		if err := s.close(); err != nil {
			t.Errorf("closing type1: %v", err)
		}
	})
	// The kernel command line sets dma_entry_limit low, so the limit is
	// reached with a few mappings; the rig says which value it set.
	limit := entryLimit(t)
	if want := os.Getenv("GMEM_RIG_ENTRY_LIMIT"); want != "" && want != strconv.FormatUint(limit, 10) {
		t.Fatalf("dma_entry_limit is %d, the kernel command line set %s", limit, want)
	}

	must(t, check(t, b, "container", func(t *testing.T) {
		c, err := vfio.OpenContainer()
		if err != nil {
			t.Fatal(err)
		}
		s.c = c
		if v, err := c.GetAPIVersion(); err != nil || v != vfio.APIVersion {
			t.Errorf("VFIO_GET_API_VERSION = %d, %v; want %d", v, err, vfio.APIVersion)
		}
		// (VFIO_UPDATE_VADDR is not checked: 6.12 answers 0 before an IOMMU
		// is set, since it depends on the container having no emulated
		// devices.)
		for _, ext := range []vfio.Extension{vfio.Type1IOMMU, vfio.Type1v2IOMMU, vfio.UnmapAll} {
			if v, err := c.CheckExtension(ext); err != nil || v <= 0 {
				t.Errorf("VFIO_CHECK_EXTENSION %d = %d, %v; want > 0", ext, v, err)
			}
		}
		if v, err := c.CheckExtension(vfio.SPAPRTCEIOMMU); err != nil || v != 0 {
			t.Errorf("VFIO_CHECK_EXTENSION SPAPR_TCE = %d, %v; want 0 on x86", v, err)
		}
		if _, err := c.GetIOMMUInfo(); err == nil {
			t.Errorf("VFIO_IOMMU_GET_INFO before VFIO_SET_IOMMU succeeded")
		}
	}))

	must(t, check(t, b, "group", func(t *testing.T) {
		g, err := vfio.OpenGroup(group)
		if err != nil {
			t.Fatal(err)
		}
		s.g = g
		st, err := g.GetStatus()
		if err != nil {
			t.Fatal(err)
		}
		if !st.Viable() || st.ContainerSet() {
			t.Errorf("fresh group status %#x, want viable and no container", st.Flags)
		}
		if err := g.SetContainer(s.c); err != nil {
			t.Fatal(err)
		}
		if st, err = g.GetStatus(); err != nil || !st.ContainerSet() {
			t.Errorf("status after SET_CONTAINER = %#x, %v; want CONTAINER_SET", st.Flags, err)
		}
		if err := s.c.SetIOMMU(vfio.Type1v2IOMMU); err != nil {
			t.Fatal(err)
		}
		// Setting the IOMMU twice is refused.
		if err := s.c.SetIOMMU(vfio.Type1v2IOMMU); err == nil {
			t.Errorf("second VFIO_SET_IOMMU succeeded")
		}
		if s.sp, err = vfio.NewSpace(s.c); err != nil {
			t.Fatal(err)
		}
	}))

	check(t, b, "iommu-info", func(t *testing.T) {
		info, err := s.c.GetIOMMUInfo()
		if err != nil {
			t.Fatal(err)
		}
		if info.Flags&(vfio.InfoPgsizes|vfio.InfoCaps) != vfio.InfoPgsizes|vfio.InfoCaps {
			t.Errorf("flags %#x, want PGSIZES|CAPS", info.Flags)
		}
		if info.MinPageSize() != 4096 {
			t.Errorf("iova_pgsizes %#x, smallest page %#x; want 4 KiB", info.IOVAPgsizes, info.MinPageSize())
		}
		want := []vfio.IOVARange{{Start: 0, End: 0xfedfffff}, {Start: 0xfef00000, End: 0x7fffffffff}}
		if d := cmp.Diff(want, info.IOVARanges); d != "" {
			t.Errorf("IOVA ranges (-want +got):\n%s", d)
		}
		if !info.HasDMAAvail || uint64(info.DMAAvail) != limit {
			t.Errorf("DMA_AVAIL = %d (present %v), want dma_entry_limit %d", info.DMAAvail, info.HasDMAAvail, limit)
		}
		if info.Migration == nil || info.Migration.PgsizeBitmap&4096 == 0 {
			t.Errorf("migration capability %+v, want one with a 4 KiB page", info.Migration)
		}
	})

	check(t, b, "space-caps", func(t *testing.T) {
		want := iommu.Caps{Rules: iommu.Type1v2, PageSize: 4096, EntryLimit: limit, Ranges: measuredRanges}
		if d := cmp.Diff(want, s.sp.Caps()); d != "" {
			t.Errorf("Caps (-want +got):\n%s", d)
		}
		if avail, limited, err := s.sp.Avail(); err != nil || !limited || avail != limit {
			t.Errorf("Avail = %d, %v, %v; want %d, true", avail, limited, err, limit)
		}
	})

	must(t, check(t, b, "device", func(t *testing.T) {
		d, err := s.g.GetDeviceFD(bdf)
		if err != nil {
			t.Fatal(err)
		}
		s.d = d
		deviceChecks(t, d)
		if s.edu, err = NewEdu(d); err != nil {
			t.Fatal(err)
		}
		// With a device open, the group cannot leave its container.
		if err := s.g.UnsetContainer(); !errors.Is(err, unix.EBUSY) {
			t.Errorf("UNSET_CONTAINER with an open device = %v, want EBUSY", err)
		}
	}))

	check(t, b, "edu-registers", func(t *testing.T) { eduRegisterChecks(t, s.edu) })

	check(t, b, "map-unmap", func(t *testing.T) {
		mem := mmapShared(t, 16*4096)
		const base = 0x100000
		avail := func() uint64 {
			t.Helper()
			a, _, err := s.sp.Avail()
			if err != nil {
				t.Fatal(err)
			}
			return a
		}
		if err := s.c.MapDMA(base, mem[:4*4096], vfio.MapRead|vfio.MapWrite); err != nil {
			t.Fatal(err)
		}
		if got := avail(); got != limit-1 {
			t.Errorf("DMA_AVAIL after one map = %d, want %d", got, limit-1)
		}
		if err := s.c.MapDMA(base+4096, mem[:4096], vfio.MapRead); !errors.Is(err, unix.EEXIST) {
			t.Errorf("overlapping map = %v, want EEXIST", err)
		}
		if err := s.c.MapDMA(base+0x10000, mem[:0], vfio.MapRead); !errors.Is(err, unix.EINVAL) {
			t.Errorf("map of size 0 = %v, want EINVAL", err)
		}
		if err := s.c.MapDMA(base+0x10000, mem[:4096], 0); !errors.Is(err, unix.EINVAL) {
			t.Errorf("map without READ or WRITE = %v, want EINVAL", err)
		}
		if err := s.c.MapDMA(base+0x10000, mem[1:4097], vfio.MapRead); !errors.Is(err, unix.EINVAL) {
			t.Errorf("map of an unaligned vaddr = %v, want EINVAL", err)
		}
		if err := s.c.MapDMA(0xfee00000, mem[:4096], vfio.MapRead); !errors.Is(err, unix.EINVAL) {
			t.Errorf("map in the MSI window = %v, want EINVAL", err)
		}
		for _, r := range []struct{ iova, size uint64 }{{base, 4096}, {base + 4096, 4096}, {base + 3*4096, 2 * 4096}} {
			if n, err := s.c.UnmapDMA(r.iova, r.size, 0); !errors.Is(err, unix.EINVAL) {
				t.Errorf("unmap [%#x,+%#x) cutting the mapping = %#x, %v; want EINVAL", r.iova, r.size, n, err)
			}
		}
		if n, err := s.c.UnmapDMA(base+0x20000, 0x4000, 0); err != nil || n != 0 {
			t.Errorf("unmap of nothing = %#x, %v; want 0, nil", n, err)
		}
		if n, err := s.c.UnmapDMA(base-0x1000, 6*4096, 0); err != nil || n != 4*4096 {
			t.Errorf("unmap of a superset = %#x, %v; want %#x", n, err, 4*4096)
		}
		// Two adjacent one-page mappings go with one two-page request.
		for i := uint64(0); i < 2; i++ {
			if err := s.c.MapDMA(base+i*4096, mem[i*4096:(i+1)*4096], vfio.MapRead|vfio.MapWrite); err != nil {
				t.Fatal(err)
			}
		}
		if n, err := s.c.UnmapDMA(base, 2*4096, 0); err != nil || n != 2*4096 {
			t.Errorf("unmap covering two adjacent mappings = %#x, %v; want %#x", n, err, 2*4096)
		}
		// UNMAP_ALL takes everything and needs iova = size = 0.
		for i := uint64(0); i < 3; i++ {
			if err := s.c.MapDMA(base+i*0x10000, mem[:4096], vfio.MapRead); err != nil {
				t.Fatal(err)
			}
		}
		if n, err := s.c.UnmapDMA(base, 4096, vfio.UnmapFlagAll); !errors.Is(err, unix.EINVAL) {
			t.Errorf("UNMAP_ALL with a range = %#x, %v; want EINVAL", n, err)
		}
		if n, err := s.c.UnmapAllDMA(); err != nil || n != 3*4096 {
			t.Errorf("UnmapAllDMA = %#x, %v; want %#x", n, err, 3*4096)
		}
		if got := avail(); got != limit {
			t.Errorf("DMA_AVAIL after unmapping everything = %d, want %d", got, limit)
		}
	})

	check(t, b, "entry-limit", func(t *testing.T) {
		mem := mmapShared(t, 4096)
		const base = 0x200000
		for i := range limit {
			if err := s.sp.Map(base+i*4096, 4096, mem); err != nil {
				t.Fatalf("map %d of %d: %v", i+1, limit, err)
			}
		}
		if err := s.sp.Map(base+limit*4096, 4096, mem); !errors.Is(err, unix.ENOSPC) {
			t.Errorf("map number limit+1 = %v, want ENOSPC", err)
		}
		if a, _, err := s.sp.Avail(); err != nil || a != 0 {
			t.Errorf("Avail at the limit = %d, %v; want 0", a, err)
		}
		if n, err := s.c.UnmapAllDMA(); err != nil || n != limit*4096 {
			t.Errorf("UnmapAllDMA = %#x, %v", n, err)
		}
	})

	// A VMM's own descriptors, adopted by duplicates, drive guestmem.
	check(t, b, "adopt-embed", func(t *testing.T) {
		var fe *vfio.FdError
		if _, err := vfio.NewContainer(s.d.Fd()); !errors.As(err, &fe) {
			t.Errorf("NewContainer(device fd) = %v, want an *FdError", err)
		}
		if _, err := vfio.NewDevice(s.c.Fd(), "container"); !errors.As(err, &fe) {
			t.Errorf("NewDevice(container fd) = %v, want an *FdError", err)
		}
		if _, err := vfio.NewGroup(s.c.Fd(), group); !errors.As(err, &fe) {
			t.Errorf("NewGroup(container fd) = %v, want an *FdError", err)
		}
		c, err := vfio.ContainerFromFile(dupFile(t, s.c.Fd(), "container"))
		if err != nil {
			t.Fatal(err)
		}
		g, err := vfio.GroupFromFile(dupFile(t, s.g.Fd(), "group"), group)
		if err != nil {
			t.Fatal(err)
		}
		if st, err := g.GetStatus(); err != nil || !st.ContainerSet() {
			t.Errorf("adopted group status %#x, %v; want CONTAINER_SET", st.Flags, err)
		}
		d, err := vfio.DeviceFromFile(dupFile(t, s.d.Fd(), "edu"), bdf)
		if err != nil {
			t.Fatal(err)
		}
		sp, err := vfio.NewSpace(c)
		if err != nil {
			t.Fatal(err)
		}
		embedChecks(t, sp, s.edu, 0x800000)
		for _, cl := range []interface{ Close() error }{d, g, c} {
			if err := cl.Close(); err != nil {
				t.Error(err)
			}
		}
		if _, err := c.GetAPIVersion(); !errors.Is(err, vfio.ErrClosed) {
			t.Errorf("adopted container after Close: %v, want ErrClosed", err)
		}
		if v, err := s.c.GetAPIVersion(); err != nil || v != vfio.APIVersion {
			t.Errorf("the original container after closing its dup: %d, %v", v, err)
		}
		if _, err := s.d.GetInfo(); err != nil {
			t.Errorf("the original device after closing its dup: %v", err)
		}
	})

	dmaChecks(t, b, s.sp, s.edu, 0x400000)

	check(t, b, "model-fidelity", func(t *testing.T) {
		fidelity(t, s.sp, func() error { _, err := s.c.UnmapAllDMA(); return err })
	})

	check(t, b, "gmem-extent", func(t *testing.T) {
		gmemChecks(t, s.sp, s.edu, dmaPolicyExtent)
	})
	splitChecks(t, b, s.sp, s.edu)

	// The granule policy spends one entry per page: give it a container
	// with a larger budget, still small enough to run out.
	must(t, check(t, b, "reopen", func(t *testing.T) {
		if err := s.close(); err != nil {
			t.Fatal(err)
		}
		setEntryLimit(t, granuleEntryLimit)
		ns, err := openType1(bdf, group)
		if err != nil {
			t.Fatal(err)
		}
		*s = *ns
		if c := s.sp.Caps(); c.EntryLimit != granuleEntryLimit {
			t.Errorf("EntryLimit after reopening = %d, want %d", c.EntryLimit, granuleEntryLimit)
		}
	}))

	check(t, b, "gmem-granule", func(t *testing.T) {
		gmemChecks(t, s.sp, s.edu, dmaPolicyGranule)
	})

	check(t, b, "close", func(t *testing.T) {
		if n, err := s.c.UnmapAllDMA(); err != nil || n != 0 {
			t.Errorf("mappings left after the gmem checks: %#x bytes, %v", n, err)
		}
		if err := s.close(); err != nil {
			t.Fatal(err)
		}
	})
}

// deviceChecks checks the device fd answers of a vfio-pci edu device.
func deviceChecks(t *testing.T, d *vfio.Device) {
	t.Helper()
	info, err := d.GetInfo()
	if err != nil {
		t.Fatal(err)
	}
	if info.Flags&vfio.DevicePCI == 0 || info.NumRegions < vfio.PCIVGARegionIndex+1 {
		t.Errorf("device info %+v, want a PCI device with at least 9 regions", info)
	}
	bar0, err := d.GetRegionInfo(vfio.PCIBAR0RegionIndex)
	if err != nil {
		t.Fatal(err)
	}
	if bar0.Size != 0x100000 || bar0.Flags&(vfio.RegionRead|vfio.RegionWrite|vfio.RegionMmap) != vfio.RegionRead|vfio.RegionWrite|vfio.RegionMmap {
		t.Errorf("BAR0 %+v, want 1 MiB, readable, writable, mmap-able", bar0)
	}
	cfg, err := d.GetRegionInfo(vfio.PCIConfigRegionIndex)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Size < 256 {
		t.Errorf("config region %+v, want at least 256 bytes", cfg)
	}
	if bar1, err := d.GetRegionInfo(vfio.PCIBAR1RegionIndex); err != nil || bar1.Size != 0 {
		t.Errorf("BAR1 %+v, %v; want an empty region", bar1, err)
	}
	vendor, err := d.ReadConfig16(vfio.PCIVendorID)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := d.ReadConfig16(vfio.PCIDeviceID)
	if err != nil {
		t.Fatal(err)
	}
	if vendor != EduVendor || dev != EduDevice {
		t.Errorf("config space ids %04x:%04x, want %04x:%04x", vendor, dev, EduVendor, EduDevice)
	}
	if err := d.ReadRegion(bar0, bar0.Size-2, make([]byte, 4)); !errors.Is(err, unix.EINVAL) {
		t.Errorf("read past BAR0 = %v, want EINVAL", err)
	}
}

// eduRegisterChecks checks edu's registers through pread/pwrite and through
// the mmap'ed BAR0, and that bus mastering is on.
func eduRegisterChecks(t *testing.T, e *Edu) {
	t.Helper()
	if id, err := e.ID(); err != nil || id != EduIDValue {
		t.Errorf("ID (pread) = %#x, %v; want %#x", id, err, EduIDValue)
	}
	if id := e.MMIOID(); id != EduIDValue {
		t.Errorf("ID (mmap) = %#x, want %#x", id, EduIDValue)
	}
	for _, v := range []uint32{0, 0x12345678, 0xffffffff} {
		if got, err := e.Liveness(v); err != nil || got != ^v {
			t.Errorf("liveness (pwrite/pread) of %#x = %#x, %v; want %#x", v, got, err, ^v)
		}
		if got := e.MMIOLiveness(v); got != ^v {
			t.Errorf("liveness (mmap) of %#x = %#x, want %#x", v, got, ^v)
		}
	}
	cmd, err := e.dev.ReadConfig16(vfio.PCICommand)
	if err != nil {
		t.Fatal(err)
	}
	if cmd&(vfio.PCICommandBusMaster|vfio.PCICommandMemory) != vfio.PCICommandBusMaster|vfio.PCICommandMemory {
		t.Errorf("PCI_COMMAND %#x, want memory and bus master on", cmd)
	}
}
