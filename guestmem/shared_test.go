package guestmem_test

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/memattr"
)

// viewBacking is a VMM's backing that is a window of a memfd it shares
// with other windows: [off, off+size) of fd, mapped on its own.
type viewBacking struct {
	fd   int
	off  uint64
	host []byte
	gmem bool // report the window as a GuestMemfdBacking
}

func (v *viewBacking) Size() uint64  { return uint64(len(v.host)) }
func (v *viewBacking) InPlace() bool { return false }
func (v *viewBacking) Host() []byte {
	if v.gmem {
		return nil
	}
	return v.host
}
func (v *viewBacking) Discard(s guestmem.Side, off, n uint64) error {
	return unix.Fallocate(v.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(v.off+off), int64(n))
}

// gmemView is a viewBacking whose window is the private side, named by
// GuestMemfd.
type gmemView struct{ viewBacking }

func (g *gmemView) GuestMemfd() (int, uint64) { return g.fd, g.off }

// memfdOf returns a memfd of size bytes, closed by the test's end.
func memfdOf(t *testing.T, size uint64) int {
	t.Helper()
	fd, err := unix.MemfdCreate("view", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	return fd
}

func newView(t *testing.T, fd int, off, size uint64) *viewBacking {
	t.Helper()
	host, err := unix.Mmap(fd, int64(off), int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(host) })
	return &viewBacking{fd: fd, off: off, host: host}
}

// TestSharedBacking: blocks whose backings share memory are refused
// (ErrLayout), since punching a page of one destroys the other's; disjoint
// windows of one file are fine.
func TestSharedBacking(t *testing.T) {
	twoBlocks := func(a, b guestmem.Backing) guestmem.Config {
		return guestmem.Config{Blocks: []guestmem.BlockConfig{
			{Name: "a", GPA: 0, Size: 2 * mib, Backing: a},
			{Name: "b", GPA: 4 * mib, Size: 2 * mib, Backing: b},
		}}
	}
	one, err := guestmem.NewMemfdBacking("one", 2*mib, guestmem.Split)
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	other, err := guestmem.NewMemfdBacking("other", 2*mib, guestmem.Split)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	fd := memfdOf(t, 8*mib)
	// One anonymous shared mapping, two overlapping windows of it.
	anon, err := unix.Mmap(-1, 0, int(3*mib), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(anon)
	gfd := memfdOf(t, 8*mib)
	for _, c := range []struct {
		name string
		cfg  guestmem.Config
		ok   bool
	}{
		{"one backing twice", twoBlocks(one, one), false},
		{"two backings", twoBlocks(one, other), true},
		{"overlapping windows of one memfd", twoBlocks(newView(t, fd, 0, 2*mib), newView(t, fd, 1*mib, 2*mib)), false},
		{"disjoint windows of one memfd", twoBlocks(newView(t, fd, 0, 2*mib), newView(t, fd, 2*mib, 2*mib)), true},
		{"overlapping slices of one mapping", twoBlocks(&viewBacking{fd: -1, host: anon[:2*mib]}, &viewBacking{fd: -1, host: anon[1*mib : 3*mib]}), false},
		{"overlapping guest_memfd ranges", twoBlocks(&gmemView{viewBacking{fd: gfd, off: 0, host: make([]byte, 2*mib), gmem: true}}, &gmemView{viewBacking{fd: gfd, off: 1 * mib, host: make([]byte, 2*mib), gmem: true}}), false},
		{"disjoint guest_memfd ranges", twoBlocks(&gmemView{viewBacking{fd: gfd, off: 0, host: make([]byte, 2*mib), gmem: true}}, &gmemView{viewBacking{fd: gfd, off: 2 * mib, host: make([]byte, 2*mib), gmem: true}}), true},
		{"a guest_memfd range another block maps", twoBlocks(newView(t, gfd, 4*mib, 2*mib), &gmemView{viewBacking{fd: gfd, off: 5 * mib, host: make([]byte, 2*mib), gmem: true}}), false},
	} {
		err := c.cfg.Validate()
		if c.ok != (err == nil) || (err != nil && !errors.Is(err, guestmem.ErrLayout)) {
			t.Errorf("%s: Validate() = %v, want ok %v or ErrLayout", c.name, err, c.ok)
		}
		if _, nerr := guestmem.New(c.cfg); (nerr == nil) != (err == nil) {
			t.Errorf("%s: New() = %v, Validate() = %v", c.name, nerr, err)
		}
	}
}

// TestDisjointWindows: blocks on disjoint windows of one memfd are
// accepted and keep their own bytes when the other's page is made private
// (and its shared side punched), which one backing given to both would not.
func TestDisjointWindows(t *testing.T) {
	fd := memfdOf(t, 4*mib)
	a, b := newView(t, fd, 0, 2*mib), newView(t, fd, 2*mib, 2*mib)
	mem, err := guestmem.New(guestmem.Config{Blocks: []guestmem.BlockConfig{
		{Name: "a", GPA: 0, Size: 2 * mib, Backing: a},
		{Name: "b", GPA: 4 * mib, Size: 2 * mib, Backing: b},
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	for _, gpa := range []uint64{0, 4 * mib} {
		if _, err := mem.Convert(guestmem.Request{GPA: gpa, Size: page, To: memattr.Shared}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := mem.WriteAt([]byte("b's data"), 4*mib); err != nil {
		t.Fatal(err)
	}
	if _, err := mem.Convert(guestmem.Request{GPA: 0, Size: page, To: memattr.Private}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	if _, err := mem.ReadAt(buf, 4*mib); err != nil || string(buf) != "b's data" {
		t.Errorf("block b reads %q, %v after block a's page was punched", buf, err)
	}
}
