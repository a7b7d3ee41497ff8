package iommufd

import (
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
	"github.com/gmemproject/gmem/iommu"
)

// devNull returns an IOMMUFD over /dev/null: every ioctl is answered
// ENOTTY, so the calls reach a kernel that refuses them all.
func devNull(t *testing.T) *IOMMUFD {
	t.Helper()
	fd, err := unix.Open(os.DevNull, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := &IOMMUFD{fd: fdio.New(fd, os.DevNull, ErrClosed)}
	t.Cleanup(func() { f.Close() })
	return f
}

// A space that does not cut refuses Cut without calling the kernel: on a
// closed IOMMUFD the kernel's answer would be ErrClosed.
func TestCutRefusedWithoutCut(t *testing.T) {
	f := devNull(t)
	f.Close()
	s := &Space{f: f, ioas: 1, caps: iommu.Caps{Rules: iommu.IOMMUFD, PageSize: 4096}, cutReason: "large IOMMU pages kept (SpaceOptions.HugePages)"}
	n, err := s.Cut(0x1000, 0x1000)
	if n != 0 || !errors.Is(err, ErrNoCut) || !errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, ErrClosed) {
		t.Fatalf("Cut on a space that does not cut = %#x, %v; want ErrNoCut and EOPNOTSUPP", n, err)
	}
	if !strings.Contains(err.Error(), s.CutReason()) {
		t.Errorf("Cut's error %q does not say why (%q)", err, s.CutReason())
	}
}

// NewSpace on a closed IOMMUFD fails; it does not hand out a space.
func TestNewSpaceClosed(t *testing.T) {
	f := devNull(t)
	f.Close()
	for _, o := range []SpaceOptions{{}, {HugePages: true}} {
		if s, err := NewSpaceOptions(f, 1, o); s != nil || !errors.Is(err, ErrClosed) {
			t.Errorf("NewSpaceOptions(closed, %+v) = %v, %v; want ErrClosed", o, s, err)
		}
	}
}

// When the kernel refuses the first step the space does not cut and says
// why, naming the ioctl and the errno.
func TestEnableCutRefused(t *testing.T) {
	s := &Space{f: devNull(t), ioas: 1}
	why := s.enableCut()
	if why != "IOMMU_OPTION get HUGE_PAGES: ENOTTY" {
		t.Errorf("enableCut on a kernel that refuses everything = %q", why)
	}
}

// A cut whose compat set is refused returns the kernel's errno and leaves
// the record unknown, so the next cut sets it again; the same for a failed
// public set.
func TestCutCompatRecord(t *testing.T) {
	f := devNull(t)
	s := &Space{f: f, ioas: 7, caps: iommu.Caps{Rules: iommu.IOMMUFD, PageSize: 4096, Cut: true}}
	f.compat.ioas = 3
	if _, err := s.Cut(0x1000, 0x1000); !errors.Is(err, unix.ENOTTY) || !strings.Contains(err.Error(), "IOMMU_VFIO_IOAS set 7") {
		t.Errorf("Cut with a refused compat set = %v, want the set's ENOTTY", err)
	}
	if f.compat.ioas != 0 {
		t.Errorf("after a refused set the record says IOAS %d, want 0 (unknown)", f.compat.ioas)
	}
	f.compat.ioas = 7 // as if the set had worked: the cut goes straight to the unmap
	if _, err := s.Cut(0x1000, 0x1000); !errors.Is(err, unix.ENOTTY) || !strings.Contains(err.Error(), "VFIO_IOMMU_UNMAP_DMA") {
		t.Errorf("Cut with the compat IOAS recorded = %v, want the unmap's ENOTTY", err)
	}
	if err := f.VFIOIOASSet(5); !errors.Is(err, unix.ENOTTY) || f.compat.ioas != 0 {
		t.Errorf("refused VFIOIOASSet = %v, record %d; want ENOTTY, 0", err, f.compat.ioas)
	}
}
