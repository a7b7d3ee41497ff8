//go:build linux

package kernelmodel_test

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/guestmem/kernelmodel"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

const page = kvm.PageSize

func newFile(t *testing.T, pages uint64, memory bool) *kernelmodel.GuestMemfd {
	t.Helper()
	g, err := kernelmodel.NewGuestMemfd(pages*page, memory)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

func toPrivate(off, n uint64) kvm.MemoryAttributes2 {
	return kvm.MemoryAttributes2{Offset: off, Size: n, Attributes: kvm.MemoryAttributePrivate}
}

func toShared(off, n uint64) kvm.MemoryAttributes2 {
	return kvm.MemoryAttributes2{Offset: off, Size: n}
}

func TestVMCapabilities(t *testing.T) {
	vm := kernelmodel.NewVM()
	for c, want := range map[kvm.Cap]int{
		kvm.CapGuestMemfd:                 1,
		kvm.CapGuestMemfdFlags:            kvm.InPlaceFlags,
		kvm.CapGuestMemfdMemoryAttributes: kvm.MemoryAttributePrivate,
		kvm.CapMemoryAttributes:           0,
	} {
		if got, err := vm.CheckExtension(c); err != nil || got != want {
			t.Errorf("%v = %#x, %v; want %#x", c, got, err, want)
		}
	}
	if err := vm.SetMemoryAttributes(kvm.MemoryAttributes{Size: page}); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("VM-wide attributes: %v, want ENOTTY", err)
	}
}

func TestInvalid(t *testing.T) {
	g := newFile(t, 4, false)
	for name, a := range map[string]kvm.MemoryAttributes2{
		"flags":        {Offset: 0, Size: page, Flags: 1},
		"other bit":    {Offset: 0, Size: page, Attributes: 1 << 62},
		"size 0":       {Offset: 0, Size: 0},
		"unaligned":    {Offset: 1, Size: page},
		"odd size":     {Offset: 0, Size: 100},
		"past the end": {Offset: 3 * page, Size: 2 * page},
		"overflow":     {Offset: 2 * page, Size: ^uint64(0) - page + 1},
	} {
		if err := g.SetMemoryAttributes2(a); !errors.Is(err, unix.EINVAL) {
			t.Errorf("%s: %v, want EINVAL", name, err)
		}
	}
	if s := g.Stats(); s.Invalid != 7 || s.Converted != 0 || len(g.PrivateRuns()) != 0 {
		t.Errorf("stats %+v, private %v", s, g.PrivateRuns())
	}
}

// TestPinnedRefusal checks EAGAIN with the first pinned page, all or
// nothing, no check to shared, and that pins of private pages are refused.
func TestPinnedRefusal(t *testing.T) {
	g := newFile(t, 8, false)
	unpin5, err := g.Pin(5*page, page)
	if err != nil {
		t.Fatal(err)
	}
	unpin3, err := g.Pin(3*page, 2*page)
	if err != nil {
		t.Fatal(err)
	}
	err = g.SetMemoryAttributes2(toPrivate(page, 6*page))
	var pe *kvm.PinnedError
	if !errors.As(err, &pe) || pe.Offset != 3*page || !errors.Is(err, unix.EAGAIN) {
		t.Fatalf("to private over pins at 3, 4, 5: %v, want a PinnedError at %#x", err, 3*page)
	}
	if runs := g.PrivateRuns(); len(runs) != 0 {
		t.Fatalf("a refused conversion changed attributes: %v", runs)
	}
	// Around the pins it converts; back to shared is never refused.
	if err := g.SetMemoryAttributes2(toPrivate(page, 2*page)); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Pin(2*page, page); !errors.Is(err, unix.EFAULT) {
		t.Errorf("pin of a private page: %v, want EFAULT", err)
	}
	unpin3()
	unpin3() // once only
	err = g.SetMemoryAttributes2(toPrivate(0, 8*page))
	if !errors.As(err, &pe) || pe.Offset != 5*page {
		t.Fatalf("with page 5 pinned: %v, want a PinnedError at %#x", err, 5*page)
	}
	unpin5()
	if err := g.SetMemoryAttributes2(toPrivate(0, 8*page)); err != nil {
		t.Fatal(err)
	}
	if err := g.SetMemoryAttributes2(toShared(0, 8*page)); err != nil {
		t.Fatal(err)
	}
	if s := g.Stats(); s.Refused != 2 || s.ToPrivate != 2+6 || s.ToShared != 8 {
		t.Errorf("stats %+v", s)
	}
}

// TestIOMMUPins checks that an IOMMU mapping of the shared view pins
// exactly the pages it covers.
func TestIOMMUPins(t *testing.T) {
	const gpa = 1 << 30
	g := newFile(t, 16, false)
	m := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
	g.AddPinner(kernelmodel.IOMMUPins(m, gpa))
	if err := m.Map(gpa+4*page, 4*page, nil); err != nil {
		t.Fatal(err)
	}
	var pe *kvm.PinnedError
	if err := g.SetMemoryAttributes2(toPrivate(6*page, 4*page)); !errors.As(err, &pe) || pe.Offset != 6*page {
		t.Errorf("inside a mapping: %v, want a PinnedError at %#x", err, 6*page)
	}
	if err := g.SetMemoryAttributes2(toPrivate(0, 16*page)); !errors.As(err, &pe) || pe.Offset != 4*page {
		t.Errorf("over a mapping: %v, want a PinnedError at %#x", err, 4*page)
	}
	if err := g.SetMemoryAttributes2(toPrivate(8*page, 8*page)); err != nil {
		t.Errorf("after the mapping: %v", err)
	}
	if _, err := m.Unmap(gpa+4*page, 4*page); err != nil {
		t.Fatal(err)
	}
	if err := g.SetMemoryAttributes2(toPrivate(0, 16*page)); err != nil {
		t.Errorf("unmapped: %v", err)
	}
}

// TestHostAccess checks that a private page of a file with memory faults
// on host access (Catch reports it), keeps its contents through a round
// trip, and that a punch zeroes without changing attributes.
func TestHostAccess(t *testing.T) {
	g := newFile(t, 4, true)
	mem := g.Host()
	for i := range mem {
		mem[i] = byte(i/page + 1)
	}
	if err := g.SetMemoryAttributes2(toPrivate(page, page)); err != nil {
		t.Fatal(err)
	}
	var v byte
	var hf *kernelmodel.HostFault
	if err := kernelmodel.Catch(func() { v = mem[page+7] }); !errors.As(err, &hf) {
		t.Errorf("host read of a private page: %v (read %#x), want a HostFault", err, v)
	}
	if err := kernelmodel.Catch(func() { mem[2*page] = 9 }); err != nil {
		t.Errorf("host write of a shared page: %v", err)
	}
	if err := g.SetMemoryAttributes2(toShared(page, page)); err != nil {
		t.Fatal(err)
	}
	if mem[page+7] != 2 {
		t.Errorf("after a round trip the page reads %#x, want its contents 2", mem[page+7])
	}
	if err := g.SetMemoryAttributes2(toPrivate(3*page, page)); err != nil {
		t.Fatal(err)
	}
	if err := g.Discard(guestmem.SharedSide, 2*page, 2*page); err != nil {
		t.Fatal(err)
	}
	if mem[2*page] != 0 || !g.Private(span.Range{Start: 3 * page, End: 4 * page}) || g.Private(span.Range{Start: 2 * page, End: 3 * page}) {
		t.Errorf("punch: page 2 reads %#x, attributes %v", mem[2*page], g.PrivateRuns())
	}
}

// fileBackend converts a memattr region in a model file, region offset =
// file offset.
type fileBackend struct{ g *kernelmodel.GuestMemfd }

func (b fileBackend) SetAttributes(runs []span.Range, to memattr.State) error {
	for _, r := range runs {
		a := toShared(r.Start, r.Len())
		if to == memattr.Private {
			a.Attributes = kvm.MemoryAttributePrivate
		}
		if err := b.g.SetMemoryAttributes2(a); err != nil {
			return err
		}
	}
	return nil
}

func (fileBackend) Release([]span.Range, memattr.State) error { return nil }

// TestOrder shows that the model catches the wrong order: with the kernel
// converting before the listeners unmap (the order of separate backings),
// the device's own mapping pins the page and the kernel refuses; with the
// in-place order the same conversion succeeds.
func TestOrder(t *testing.T) {
	const gpa = 1 << 20
	for _, inPlace := range []bool{true, false} {
		g := newFile(t, 16, true)
		mgr := discard.New(16*page, nil)
		attrs, err := memattr.New(mgr, memattr.Config{Backend: fileBackend{g}, InPlace: inPlace})
		if err != nil {
			t.Fatal(err)
		}
		if err := g.SetMemoryAttributes2(toPrivate(0, 16*page)); err != nil {
			t.Fatal(err)
		}
		space := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
		g.AddPinner(kernelmodel.IOMMUPins(space, gpa))
		mapper, err := dma.New(space, g.Host(), dma.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := mgr.Register(mapper, discard.Section{Size: 16 * page, GPA: gpa}); err != nil {
			t.Fatal(err)
		}
		if err := attrs.Convert(4*page, 4*page, memattr.Shared); err != nil {
			t.Fatal(err)
		}
		if space.Len() == 0 {
			t.Fatal("the shared pages are not mapped")
		}
		err = attrs.Convert(5*page, page, memattr.Private)
		var pe *kvm.PinnedError
		switch {
		case inPlace && err != nil:
			t.Errorf("in-place order: the kernel refused: %v", err)
		case !inPlace && (!errors.As(err, &pe) || pe.Offset != 5*page):
			t.Errorf("kernel first: %v, want the kernel to refuse the pinned page %#x", err, 5*page)
		}
		if !inPlace && (attrs.Get(5*page) != memattr.Shared || !space.Reaches(gpa+5*page)) {
			t.Error("the refused conversion was not undone")
		}
	}
}
