package guesttest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/vfio"
)

// requireGuest skips unless the test runs in the guest booted by
// scripts/rig, whose /init sets GMEM_RIG=1.
func requireGuest(t *testing.T) {
	t.Helper()
	if os.Getenv("GMEM_RIG") != "1" {
		t.Skip("runs only inside the QEMU guest with VFIO, iommufd and the edu device: run scripts/rig")
	}
}

// wantBackend reports whether GMEM_RIG_BACKEND selects backend.
func wantBackend(backend string) bool {
	v := os.Getenv("GMEM_RIG_BACKEND")
	return v == "" || v == "all" || v == backend
}

// check runs f as subtest name and prints the verdict line scripts/rig
// reads, in one write so console messages cannot split it. A skipped check
// is reported as skip (which the rig counts as a failure).
func check(t *testing.T, backend, name string, f func(t *testing.T)) bool {
	t.Helper()
	skipped := false
	ok := t.Run(name, func(t *testing.T) {
		defer func() { skipped = t.Skipped() }()
		f(t)
	})
	verdict := "pass"
	switch {
	case !ok:
		verdict = "fail"
	case skipped:
		verdict = "skip"
	}
	fmt.Fprintf(os.Stdout, "GMEM-RIG check %s %s %s\n", backend, name, verdict)
	return ok && !skipped
}

// must stops the backend's sequence when a setup check fails: what follows
// depends on it.
func must(t *testing.T, ok bool) {
	t.Helper()
	if !ok {
		t.FailNow()
	}
}

// findEdu returns the edu device's PCI address, bound to vfio-pci.
func findEdu(t *testing.T) string {
	t.Helper()
	devs, err := vfio.FindPCI(EduVendor, EduDevice)
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 1 {
		t.Fatalf("found %d edu devices (%v), want 1", len(devs), devs)
	}
	if err := vfio.BindVFIOPCI(devs[0]); err != nil {
		t.Fatal(err)
	}
	return devs[0]
}

// mmapShared returns size bytes of zeroed shared anonymous memory, unmapped
// at the end of the test.
func mmapShared(t *testing.T, size int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// memfdShared returns size bytes of a memfd (shmem) mapped shared, as a VMM
// maps guest RAM, unmapped and closed at the end of the test.
func memfdShared(t *testing.T, size int) []byte {
	t.Helper()
	fd, err := unix.MemfdCreate("gmem-rig", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd) // the mapping keeps the file alive
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	b, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// pattern fills b with bytes derived from seed, different for every seed
// and never all zero.
func pattern(b []byte, seed byte) {
	for i := range b {
		b[i] = byte(i*7+i>>8) ^ seed | 1
	}
}

// expectBytes fails the test if got differs from want, naming the first
// difference.
func expectBytes(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	for i := range got {
		if i >= len(want) || got[i] != want[i] {
			t.Errorf("%s: first difference at byte %d: got %#02x, want %#02x", what, i, got[i], want[i])
			return
		}
	}
	t.Errorf("%s: got %d bytes, want %d", what, len(got), len(want))
}

// allZero reports whether b holds only zeros.
func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// errnoOf returns the unix.Errno inside err, 0 for nil, and -1 for an
// error that carries none.
func errnoOf(err error) unix.Errno {
	if err == nil {
		return 0
	}
	var e unix.Errno
	if errors.As(err, &e) {
		return e
	}
	return ^unix.Errno(0)
}

// errnoName names an errno the way the kernel headers do.
func errnoName(e unix.Errno) string {
	switch e {
	case 0:
		return "ok"
	case ^unix.Errno(0):
		return "non-errno error"
	}
	if n := unix.ErrnoName(e); n != "" {
		return n
	}
	return "errno " + strconv.Itoa(int(e))
}

const entryLimitParam = "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit"

// entryLimit reads vfio_iommu_type1's dma_entry_limit.
func entryLimit(t *testing.T) uint64 {
	t.Helper()
	b, err := os.ReadFile(entryLimitParam)
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// setEntryLimit sets dma_entry_limit for containers whose IOMMU is set from
// now on.
func setEntryLimit(t *testing.T, n uint64) {
	t.Helper()
	if err := os.WriteFile(entryLimitParam, []byte(strconv.FormatUint(n, 10)), 0); err != nil {
		t.Fatal(err)
	}
}
