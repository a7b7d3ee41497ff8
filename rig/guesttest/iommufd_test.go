package guesttest

import (
	"errors"
	"math"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/iommufd"
	"github.com/gmemproject/gmem/vfio"
)

func runIOMMUFD(t *testing.T, bdf string) {
	const b = "iommufd"
	var (
		f    *iommufd.IOMMUFD
		ioas uint32
		d    *vfio.Device
		edu  *Edu
		sp   *iommufd.Space
	)
	t.Cleanup(func() {
		if edu != nil {
			edu.Close()
		}
		if d != nil {
			d.Close()
		}
		if f != nil {
			f.Close()
		}
	})

	must(t, check(t, b, "ioas", func(t *testing.T) {
		var err error
		if f, err = iommufd.Open(); err != nil {
			t.Fatal(err)
		}
		if ioas, err = f.IOASAlloc(); err != nil {
			t.Fatal(err)
		}
		r, err := f.IOASIOVARanges(ioas)
		if err != nil {
			t.Fatal(err)
		}
		want := iommufd.IOVARanges{Ranges: []iommufd.IOVARange{{Start: 0, Last: math.MaxUint64}}, Alignment: 1}
		if d := cmp.Diff(want, r); d != "" {
			t.Errorf("fresh IOAS ranges (-want +got):\n%s", d)
		}
		if v, err := f.GetOption(iommufd.OptionHugePages, ioas); err != nil || v != 1 {
			t.Errorf("IOMMU_OPTION_HUGE_PAGES = %d, %v; want 1", v, err)
		}
		if id, err := f.VFIOIOASGet(); !errors.Is(err, unix.ENODEV) {
			t.Errorf("compat IOAS of a new iommufd = %d, %v; want ENODEV (none)", id, err)
		}
		// Without a device an IOAS is bookkeeping only, and its unmap rules
		// already hold.
		if _, err := f.IOASUnmap(ioas, 0x100000, 0x1000); !errors.Is(err, unix.ENOENT) {
			t.Errorf("unmap of nothing = %v, want ENOENT", err)
		}
		if n, err := f.IOASUnmap(ioas, 0, math.MaxUint64); err != nil || n != 0 {
			t.Errorf("unmap-all of an empty IOAS = %#x, %v; want 0, nil", n, err)
		}
		if err := f.Destroy(ioas + 1000); !errors.Is(err, unix.ENOENT) {
			t.Errorf("IOMMU_DESTROY of no object = %v, want ENOENT", err)
		}
	}))

	must(t, check(t, b, "bind-attach", func(t *testing.T) {
		path, err := vfio.CdevPath(bdf)
		if err != nil {
			t.Fatal(err)
		}
		if d, err = vfio.OpenCdev(path); err != nil {
			t.Fatal(err)
		}
		// An unbound cdev answers no device ioctl.
		if _, err := d.GetInfo(); err == nil {
			t.Errorf("VFIO_DEVICE_GET_INFO before VFIO_DEVICE_BIND_IOMMUFD succeeded")
		}
		devid, err := d.BindIOMMUFD(f.Fd())
		if err != nil {
			t.Fatal(err)
		}
		if devid == 0 || devid == ioas {
			t.Errorf("device id %d", devid)
		}
		hwpt, err := d.AttachIOMMUFDPT(ioas)
		if err != nil {
			t.Fatal(err)
		}
		if hwpt == ioas || hwpt == devid {
			t.Errorf("attach returned page table id %d (ioas %d, device %d), want a new domain", hwpt, ioas, devid)
		}
		r, err := f.IOASIOVARanges(ioas)
		if err != nil {
			t.Fatal(err)
		}
		want := iommufd.IOVARanges{
			Ranges:    []iommufd.IOVARange{{Start: 0, Last: 0xfedfffff}, {Start: 0xfef00000, Last: 0x7fffffffff}},
			Alignment: 4096,
		}
		if d := cmp.Diff(want, r); d != "" {
			t.Errorf("IOAS ranges after attach (-want +got):\n%s", d)
		}
		// An allowed window is a promise, not a fence: it cannot cover an
		// IOVA a device already reserved (the MSI window), and the kernel
		// picks IOVAs inside it; an empty list lifts it.
		page := mmapShared(t, 4096)
		if err := f.IOASAllowIOVAs(ioas, []iommufd.IOVARange{{Start: 0xfee00000, Last: 0xfeefffff}}); !errors.Is(err, unix.EADDRINUSE) {
			t.Errorf("allowing the reserved MSI window = %v, want EADDRINUSE", err)
		}
		window := iommufd.IOVARange{Start: 0x1000000, Last: 0x7fffffff}
		if err := f.IOASAllowIOVAs(ioas, []iommufd.IOVARange{window}); err != nil {
			t.Fatal(err)
		}
		iova, err := f.IOASMap(ioas, 0, page, iommufd.MapReadable)
		if err != nil || iova < window.Start || iova+4096-1 > window.Last {
			t.Errorf("kernel-chosen IOVA with an allowed window = %#x, %v; want inside %+v", iova, err, window)
		}
		if err := f.IOASAllowIOVAs(ioas, nil); err != nil {
			t.Fatal(err)
		}
		if n, err := f.IOASUnmap(ioas, 0, math.MaxUint64); err != nil || n != 4096 {
			t.Errorf("unmap-all = %#x, %v; want %#x", n, err, 4096)
		}
		if sp, err = iommufd.NewSpace(f, ioas); err != nil {
			t.Fatal(err)
		}
	}))

	check(t, b, "space-caps", func(t *testing.T) {
		want := iommu.Caps{Rules: iommu.IOMMUFD, PageSize: 4096, Ranges: measuredRanges, Cut: true}
		if d := cmp.Diff(want, sp.Caps()); d != "" {
			t.Errorf("Caps (-want +got):\n%s (cut: %q)", d, sp.CutReason())
		}
		// Set up before anything was mapped: large pages off, and the IOAS
		// is the file's compat IOAS.
		if on, err := f.HugePages(ioas); err != nil || on {
			t.Errorf("IOMMU_OPTION_HUGE_PAGES of the space's IOAS = %v, %v; want false", on, err)
		}
		if got, err := f.VFIOIOASGet(); err != nil || got != ioas {
			t.Errorf("compat IOAS = %d, %v; want %d", got, err, ioas)
		}
		if _, limited, err := sp.Avail(); err != nil || limited {
			t.Errorf("Avail limited = %v, %v; want unlimited", limited, err)
		}
	})

	must(t, check(t, b, "device", func(t *testing.T) {
		deviceChecks(t, d)
		var err error
		if edu, err = NewEdu(d); err != nil {
			t.Fatal(err)
		}
	}))

	check(t, b, "edu-registers", func(t *testing.T) { eduRegisterChecks(t, edu) })

	check(t, b, "map-unmap", func(t *testing.T) {
		mem := mmapShared(t, 16*4096)
		const base = 0x100000
		rw := iommufd.MapFixedIOVA | iommufd.MapReadable | iommufd.MapWriteable
		if got, err := f.IOASMap(ioas, base, mem[:4*4096], rw); err != nil || got != base {
			t.Fatalf("IOASMap = %#x, %v", got, err)
		}
		if _, err := f.IOASMap(ioas, base+4096, mem[:4096], rw); !errors.Is(err, unix.EEXIST) {
			t.Errorf("overlapping fixed map = %v, want EEXIST", err)
		}
		if _, err := f.IOASMap(ioas, 0xfee00000, mem[:4096], rw); !errors.Is(err, unix.EINVAL) {
			t.Errorf("map in the MSI window = %v, want EINVAL", err)
		}
		if _, err := f.IOASMap(ioas, base+0x10000, mem[:4096], iommufd.MapFixedIOVA); !errors.Is(err, unix.EINVAL) {
			t.Errorf("map neither readable nor writeable = %v, want EINVAL", err)
		}
		// Without FIXED_IOVA the kernel picks a free, aligned IOVA.
		auto, err := f.IOASMap(ioas, 0, mem[:4096], iommufd.MapReadable)
		if err != nil {
			t.Fatal(err)
		}
		if auto%4096 != 0 || (auto >= base && auto < base+4*4096) {
			t.Errorf("kernel-chosen IOVA %#x overlaps or is unaligned", auto)
		}
		if n, err := f.IOASUnmap(ioas, auto, 4096); err != nil || n != 4096 {
			t.Errorf("unmap of the kernel-chosen IOVA = %#x, %v", n, err)
		}
		for _, r := range []struct{ iova, size uint64 }{{base, 4096}, {base + 4096, 4096}, {base + 3*4096, 2 * 4096}, {base + 0x20000, 0x4000}} {
			if n, err := f.IOASUnmap(ioas, r.iova, r.size); !errors.Is(err, unix.ENOENT) {
				t.Errorf("unmap [%#x,+%#x) cutting the area or covering none = %#x, %v; want ENOENT", r.iova, r.size, n, err)
			}
		}
		if n, err := f.IOASUnmap(ioas, base-0x1000, 6*4096); err != nil || n != 4*4096 {
			t.Errorf("unmap of a superset = %#x, %v; want %#x", n, err, 4*4096)
		}
		for i := uint64(0); i < 2; i++ {
			if _, err := f.IOASMap(ioas, base+i*4096, mem[i*4096:(i+1)*4096], rw); err != nil {
				t.Fatal(err)
			}
		}
		if n, err := f.IOASUnmap(ioas, base, 2*4096); err != nil || n != 2*4096 {
			t.Errorf("unmap covering two adjacent areas = %#x, %v; want %#x", n, err, 2*4096)
		}
		for i := uint64(0); i < 3; i++ {
			if _, err := f.IOASMap(ioas, base+i*0x10000, mem[:4096], rw); err != nil {
				t.Fatal(err)
			}
		}
		if n, err := f.IOASUnmap(ioas, 0, math.MaxUint64); err != nil || n != 3*4096 {
			t.Errorf("unmap-all = %#x, %v; want %#x", n, err, 3*4096)
		}
		// An IOAS with a device attached cannot be destroyed.
		if err := f.Destroy(ioas); !errors.Is(err, unix.EBUSY) {
			t.Errorf("IOMMU_DESTROY of an attached IOAS = %v, want EBUSY", err)
		}
	})

	// A VMM's own iommufd, adopted by a duplicate, drives guestmem.
	check(t, b, "adopt-embed", func(t *testing.T) {
		var fe *iommufd.FdError
		if _, err := iommufd.NewIOMMUFD(d.Fd()); !errors.As(err, &fe) {
			t.Errorf("NewIOMMUFD(device fd) = %v, want an *FdError", err)
		}
		f2, err := iommufd.FromFile(dupFile(t, f.Fd(), "iommufd"))
		if err != nil {
			t.Fatal(err)
		}
		sp2, err := iommufd.NewSpace(f2, ioas)
		if err != nil {
			t.Fatal(err)
		}
		embedChecks(t, sp2, edu, 0x800000)
		if err := f2.Close(); err != nil {
			t.Error(err)
		}
		if _, err := f.IOASIOVARanges(ioas); err != nil {
			t.Errorf("the original iommufd after closing its dup: %v", err)
		}
	})

	dmaChecks(t, b, sp, edu, 0x400000)

	check(t, b, "model-fidelity", func(t *testing.T) {
		fidelity(t, sp, func() error { _, err := sp.Unmap(0, math.MaxUint64); return err })
	})

	check(t, b, "gmem-extent", func(t *testing.T) { gmemChecks(t, sp, edu, dmaPolicyExtent) })
	check(t, b, "gmem-granule", func(t *testing.T) { gmemChecks(t, sp, edu, dmaPolicyGranule) })
	splitChecks(t, b, sp, edu)
	cutChecks(t, b, f, sp, edu)
	check(t, b, "ioas-copy-replace", func(t *testing.T) { replaceChecks(t, f, d, ioas, edu) })

	check(t, b, "detach-destroy", func(t *testing.T) {
		if err := edu.Close(); err != nil {
			t.Error(err)
		}
		edu = nil
		if err := d.DetachIOMMUFDPT(); err != nil {
			t.Error(err)
		}
		if err := d.Close(); err != nil {
			t.Error(err)
		}
		d = nil
		if err := f.Destroy(ioas); err != nil {
			t.Errorf("IOMMU_DESTROY after the device left = %v", err)
		}
	})
}
