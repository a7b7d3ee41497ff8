package guesttest

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
)

// dupFile returns an *os.File of its own for a duplicate of fd, as a VMM
// holds its descriptors; the test closes it.
func dupFile(t *testing.T, fd int, name string) *os.File {
	t.Helper()
	d, err := unix.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(d), name)
	t.Cleanup(func() { f.Close() })
	return f
}

// embedChecks drives the edu device through guestmem on space, an
// iommu.Space over adopted (duplicated) fds, with guest RAM the "VMM"
// created itself: a shared page is reachable, a page made private is not,
// and Close with the device attached detaches it. base is a free IOVA
// window of 1 MiB below the 28-bit DMA mask.
func embedChecks(t *testing.T, space iommu.Space, edu *Edu, base uint64) {
	const n = EduMaxCount
	ram, err := guestmem.NewMemfdBacking("vmm-ram", 1<<20, guestmem.Split)
	if err != nil {
		t.Fatal(err)
	}
	defer ram.Close() // the VMM's, after mem.Close
	mem, err := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{{Name: "ram", GPA: base, Size: 1 << 20, Backing: ram}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	if _, err := mem.AttachIOMMU(space, dma.Options{}); err != nil {
		t.Fatal(err)
	}
	a, b := base+0x10000, base+0x20000
	for _, gpa := range []uint64{a, b} {
		if _, err := mem.Convert(guestmem.Request{GPA: gpa, Size: 0x1000, To: memattr.Shared}); err != nil {
			t.Fatal(err)
		}
	}
	want := make([]byte, n)
	pattern(want, 0x44)
	if _, err := mem.WriteAt(want, int64(a)); err != nil {
		t.Fatal(err)
	}
	if err := edu.ToDevice(a, n); err != nil {
		t.Fatal(err)
	}
	if err := edu.ToRAM(b, n); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, n)
	if _, err := mem.ReadAt(got, int64(b)); err != nil {
		t.Fatal(err)
	}
	expectBytes(t, "shared page written by the device", got, want)
	// Made private, the page is unmapped and its shared side freed: a
	// device write must not reach it.
	if _, err := mem.Convert(guestmem.Request{GPA: b, Size: 0x1000, To: memattr.Private}); err != nil {
		t.Fatal(err)
	}
	if err := edu.ToRAM(b, n); err != nil {
		t.Fatal(err)
	}
	if h := ram.Host()[b-base : b-base+n]; !allZero(h) {
		t.Errorf("device write reached a private page: % x", h[:16])
	}
	if err := mem.Close(); err != nil {
		t.Fatal(err)
	}
	// Nothing is left mapped: the device cannot reach the shared page
	// either.
	clear(ram.Host()[a-base : a-base+n])
	if err := edu.ToRAM(a, n); err != nil {
		t.Fatal(err)
	}
	if h := ram.Host()[a-base : a-base+n]; !allZero(h) {
		t.Errorf("device write reached memory after Close detached it: % x", h[:16])
	}
}
