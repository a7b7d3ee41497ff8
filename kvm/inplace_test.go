//go:build linux

package kvm

import (
	"errors"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/span"
)

func TestGuestMemfdAttributesAnswer(t *testing.T) {
	for _, c := range []struct {
		answer int
		want   uint64
	}{
		{0, 0},
		{-1, 0},
		{MemoryAttributePrivate, MemoryAttributePrivate},
		// Another capability under the provisional number: not ours.
		{1, 0},
		{MemoryAttributePrivate | 1, 0},
		{1 << 40, 0},
	} {
		if got := GuestMemfdAttributes(c.answer); got != c.want {
			t.Errorf("GuestMemfdAttributes(%#x) = %#x, want %#x", c.answer, got, c.want)
		}
	}
}

func TestPinnedError(t *testing.T) {
	var err error = &PinnedError{Offset: 3 * PageSize, Request: MemoryAttributes2{Offset: PageSize, Size: 8 * PageSize, Attributes: MemoryAttributePrivate}}
	if !errors.Is(err, unix.EAGAIN) {
		t.Errorf("%v does not match EAGAIN", err)
	}
	if errors.Is(err, unix.EINVAL) {
		t.Errorf("%v matches EINVAL", err)
	}
	for _, want := range []string{"KVM_SET_MEMORY_ATTRIBUTES2", "0x3000", "offset 0x1000", "size 0x8000"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not say %q", err, want)
		}
	}
}

// TestSetMemoryAttributes2Refused checks what a VM without per-guest_memfd
// attributes answers: the probe refuses without the ioctl, and the kernel
// agrees (ENOTTY where guest_memfd has no ioctls, up to 7.3; EINVAL on 7.4
// for a VM without private memory).
func TestSetMemoryAttributes2Refused(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	needCap(t, vm, CapGuestMemfd, 1)
	g, err := vm.CreateGuestMemfd(4*PageSize, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	attrs, known := g.Attributes()
	if !known {
		t.Fatal("a created guest_memfd does not know its VM's attributes")
	}
	if attrs&MemoryAttributePrivate != 0 {
		t.Skipf("this default VM answers KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES %#x: nothing refused", attrs)
	}
	a := MemoryAttributes2{Offset: 0, Size: PageSize, Attributes: MemoryAttributePrivate}
	err = g.SetMemoryAttributes2(a)
	var ue *UnsupportedError
	if !errors.As(err, &ue) || !errors.Is(err, errors.ErrUnsupported) || !errors.Is(err, unix.ENOTTY) {
		t.Errorf("SetMemoryAttributes2 without the capability: %v, want an UnsupportedError matching ENOTTY", err)
	}
	raw := g.setMemoryAttributes2(a)
	if !errors.Is(raw, unix.ENOTTY) && !errors.Is(raw, unix.EINVAL) {
		t.Errorf("raw KVM_SET_MEMORY_ATTRIBUTES2: %v, want ENOTTY or EINVAL", raw)
	}
	t.Logf("KVM_SET_MEMORY_ATTRIBUTES2 on a default VM's guest_memfd: %v; the ioctl itself: %v", err, raw)
	// Ranges are checked before anything else.
	for _, c := range []struct {
		off, n uint64
		want   error
	}{
		{1, PageSize, span.ErrAlign},
		{0, 0, span.ErrEmpty},
		{0, 5 * PageSize, span.ErrBounds},
		{^uint64(0) &^ (PageSize - 1), 2 * PageSize, span.ErrOverflow},
	} {
		if err := g.SetMemoryAttributes2(MemoryAttributes2{Offset: c.off, Size: c.n}); !errors.Is(err, c.want) {
			t.Errorf("SetMemoryAttributes2(%#x, %#x) = %v, want %v", c.off, c.n, err, c.want)
		}
	}
	g.Close()
	if err := g.SetMemoryAttributes2(a); !errors.Is(err, ErrClosed) {
		t.Errorf("after Close: %v", err)
	}
}

func TestInPlaceSupport(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	sup, err := vm.InPlaceSupport()
	if err != nil {
		t.Fatal(err)
	}
	if sup.OK() || !strings.Contains(sup.Reason, "default type") {
		t.Errorf("default VM: %+v, want a reason naming the default type", sup)
	}
	host, err := s.ProbeInPlace()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("this host: %+v", host)
	if !host.OK() && host.Reason == "" {
		t.Error("not OK without a reason")
	}
	if host.OK() && (host.Attributes&MemoryAttributePrivate == 0 || host.GuestMemfdFlags&InPlaceFlags != InPlaceFlags) {
		t.Errorf("OK with %+v", host)
	}
}

// TestLongtermPin checks the test's pin helper where it can: an
// INIT_SHARED guest_memfd mapping can be pinned long-term, as a VFIO or
// iommufd mapping of it pins it.
func TestLongtermPin(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	_, mem := newShared(t, vm, 4*PageSize)
	unpin, err := pinLongterm(t, mem[PageSize:2*PageSize])
	if err != nil {
		t.Fatalf("long-term pin of a shared guest_memfd page: %v", err)
	}
	unpin()
}

// newInPlace creates a VM that converts in place with private memory and a
// guest_memfd of pages pages mapped whole, or skips the test naming the
// kernel it needs.
func newInPlace(t *testing.T, pages uint64) (*GuestMemfd, []byte) {
	t.Helper()
	s := openKVM(t)
	sup, err := s.ProbeInPlace()
	if err != nil {
		t.Fatal(err)
	}
	if !sup.OK() {
		t.Skipf("needs in-place conversion with private memory (Linux 7.4, kvm.gmem_in_place_conversion=1 or CONFIG_KVM_VM_MEMORY_ATTRIBUTES=n, a TDP MMU): %s", sup.Reason)
	}
	vm, err := s.CreateVM(VMTypeSWProtected)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	g, err := vm.CreateGuestMemfd(pages*PageSize, InPlaceFlags)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := g.Mmap(0, pages*PageSize)
	if err != nil {
		g.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		g.Munmap(mem)
		g.Close()
	})
	return g, mem
}

// TestSetMemoryAttributes2 runs the in-place rules on a kernel that has
// them: a private page faults on host access and keeps its contents, the
// kernel refuses bad requests with EINVAL, and a pinned page makes a
// conversion to private fail whole with EAGAIN naming it.
func TestSetMemoryAttributes2(t *testing.T) {
	g, mem := newInPlace(t, 4)
	for i := range mem {
		mem[i] = byte(i/PageSize + 1)
	}
	priv := func(off, n uint64) MemoryAttributes2 {
		return MemoryAttributes2{Offset: off, Size: n, Attributes: MemoryAttributePrivate}
	}
	if err := g.SetMemoryAttributes2(priv(PageSize, PageSize)); err != nil {
		t.Fatal(err)
	}
	if _, faulted := touch(mem, PageSize); !faulted {
		t.Error("host read of a private page did not fault")
	}
	if v, faulted := touch(mem, 0); faulted || v != 1 {
		t.Errorf("host read of the shared page before it: %#x, faulted %v", v, faulted)
	}
	if err := g.SetMemoryAttributes2(MemoryAttributes2{Offset: PageSize, Size: PageSize}); err != nil {
		t.Fatal(err)
	}
	if v, faulted := touch(mem, PageSize+5); faulted || v != 2 {
		t.Errorf("after a round trip the page reads %#x (faulted %v), want its contents 2", v, faulted)
	}
	for name, a := range map[string]MemoryAttributes2{
		"flags":        {Offset: 0, Size: PageSize, Flags: 1},
		"size 0":       {Offset: 0, Size: 0},
		"unaligned":    {Offset: 1, Size: PageSize},
		"past the end": {Offset: 3 * PageSize, Size: 2 * PageSize},
		"other bit":    {Offset: 0, Size: PageSize, Attributes: 1 << 62},
	} {
		if err := g.setMemoryAttributes2(a); !errors.Is(err, unix.EINVAL) {
			t.Errorf("%s: %v, want EINVAL", name, err)
		}
	}
	unpin, err := pinLongterm(t, mem[2*PageSize:3*PageSize])
	if err != nil {
		t.Fatal(err)
	}
	err = g.SetMemoryAttributes2(priv(0, 4*PageSize))
	var pe *PinnedError
	if !errors.As(err, &pe) || pe.Offset != 2*PageSize || !errors.Is(err, unix.EAGAIN) {
		t.Fatalf("to private over a pinned page: %v, want a PinnedError at %#x", err, 2*PageSize)
	}
	// All or nothing: the pages before the pinned one are still shared.
	if v, faulted := touch(mem, 0); faulted || v != 1 {
		t.Errorf("after the refusal page 0 reads %#x, faulted %v", v, faulted)
	}
	unpin()
	if err := g.SetMemoryAttributes2(priv(0, 4*PageSize)); err != nil {
		t.Fatalf("after the pin is dropped: %v", err)
	}
}
