package guestmem_test

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// fakeVM is a VM with private memory that records the attributes it is
// given, one entry per page, and can be made to fail.
type fakeVM struct {
	mu      sync.Mutex
	private map[uint64]bool // page GPA -> private
	calls   int
	fail    error
}

func newFakeVM() *fakeVM { return &fakeVM{private: map[uint64]bool{}} }

func (v *fakeVM) CheckExtension(c kvm.Cap) (int, error) {
	if c == kvm.CapMemoryAttributes {
		return int(kvm.MemoryAttributePrivate), nil
	}
	return 0, nil
}

func (v *fakeVM) SetMemoryAttributes(a kvm.MemoryAttributes) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.fail != nil {
		return v.fail
	}
	v.calls++
	for g := a.Address; g < a.Address+a.Size; g += page {
		v.private[g] = a.Attributes&kvm.MemoryAttributePrivate != 0
	}
	return nil
}

func (v *fakeVM) isPrivate(gpa uint64) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.private[gpa]
}

// vmmBacking is a VMM's own split memory: two memfds and a mapping of the
// shared one, all owned by the VMM.
type vmmBacking struct {
	shared, private int
	host            []byte

	mu       sync.Mutex // Discard is called concurrently
	discards []string
}

func newVMMBacking(t *testing.T, size uint64) *vmmBacking {
	t.Helper()
	b := &vmmBacking{shared: -1, private: -1}
	var err error
	if b.shared, err = unix.MemfdCreate("vmm-shared", unix.MFD_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	if b.private, err = unix.MemfdCreate("vmm-private", unix.MFD_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	for _, fd := range []int{b.shared, b.private} {
		if err := unix.Ftruncate(fd, int64(size)); err != nil {
			t.Fatal(err)
		}
	}
	if b.host, err = unix.Mmap(b.shared, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unix.Munmap(b.host)
		unix.Close(b.shared)
		unix.Close(b.private)
	})
	return b
}

func (b *vmmBacking) Size() uint64  { return uint64(len(b.host)) }
func (b *vmmBacking) InPlace() bool { return false }
func (b *vmmBacking) Host() []byte  { return b.host }
func (b *vmmBacking) Discard(s guestmem.Side, off, n uint64) error {
	b.mu.Lock()
	b.discards = append(b.discards, fmt.Sprintf("%v %#x+%#x", s, off, n))
	b.mu.Unlock()
	fd := b.shared
	if s == guestmem.PrivateSide {
		fd = b.private
	}
	return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
}

// TestVMMOwnedFds: the VM and the backing are the VMM's; guestmem sets the
// attributes through the VM interface, punches through the Backing, and
// closes neither.
func TestVMMOwnedFds(t *testing.T) {
	vm := newFakeVM()
	bk := newVMMBacking(t, 1*mib)
	mem, err := guestmem.New(guestmem.Config{
		VM:     vm,
		Blocks: []guestmem.BlockConfig{{Name: "ram", GPA: 4 * mib, Size: 1 * mib, Backing: bk}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if mem.Enforcement() != guestmem.EnforceKVM || mem.Mode() != guestmem.Split {
		t.Errorf("enforcement %v mode %v, want KVM attributes and split (the zero Mode)", mem.Enforcement(), mem.Mode())
	}
	if !vm.isPrivate(4*mib) || !vm.isPrivate(5*mib-page) {
		t.Error("the block does not start private in the VM")
	}
	if _, ok := mem.Blocks()[0].Slot(); ok {
		t.Error("a memslot was bound on a VM that is no MemslotBinder")
	}
	model := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
	att, err := mem.AttachIOMMU(model, dma.Options{})
	if err != nil {
		t.Fatal(err)
	}
	gpa := uint64(4*mib + 8*page)
	if _, err := mem.Convert(guestmem.Request{GPA: gpa, Size: 2 * page, To: memattr.Shared}); err != nil {
		t.Fatal(err)
	}
	if vm.isPrivate(gpa) || !vm.isPrivate(gpa+2*page) {
		t.Error("KVM attributes do not follow the conversion")
	}
	if err := model.DMAWrite(gpa, []byte("dma")); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(bk.host[8*page:8*page+3], []byte("dma")) {
		t.Error("DMA did not reach the VMM's mapping")
	}
	got := make([]byte, 3)
	if _, err := mem.ReadAt(got, int64(gpa)); err != nil || string(got) != "dma" {
		t.Errorf("ReadAt = %q, %v", got, err)
	}
	if _, err := mem.Convert(guestmem.Request{GPA: gpa, Size: 2 * page, To: memattr.Private}); err != nil {
		t.Fatal(err)
	}
	want := []string{"private 0x8000+0x2000", "shared 0x8000+0x2000"}
	if diff := cmp.Diff(want, bk.discards); diff != "" {
		t.Errorf("discards (-want +got):\n%s", diff)
	}
	var f *iommu.DMAFault
	if err := model.DMAWrite(gpa, []byte("x")); !errors.As(err, &f) {
		t.Errorf("DMA to a private page: %v, want a DMAFault", err)
	}
	vm.fail = unix.EIO
	_, err = mem.Convert(guestmem.Request{GPA: gpa, Size: page, To: memattr.Shared})
	if !errors.Is(err, unix.EIO) || guestmem.HypercallRet(err) != kvm.HypercallRetEINVAL {
		t.Errorf("failing VM: %v", err)
	}
	vm.fail = nil
	if err := att.Check(); err != nil {
		t.Error(err)
	}
	if err := mem.Close(); err != nil {
		t.Fatal(err)
	}
	// The backing is still the VMM's: its mapping and files work.
	bk.host[0] = 1
	if err := bk.Discard(guestmem.SharedSide, 0, page); err != nil {
		t.Errorf("the VMM's memfd was closed by guestmem: %v", err)
	}
	if model.Len() != 0 {
		t.Errorf("Close left %d IOMMU entries", model.Len())
	}
}

func TestBackingMismatch(t *testing.T) {
	mb, err := guestmem.NewModelBacking(2*mib, guestmem.Split)
	if err != nil {
		t.Fatal(err)
	}
	ip, err := guestmem.NewModelBacking(1*mib, guestmem.InPlace)
	if err != nil {
		t.Fatal(err)
	}
	for name, cfg := range map[string]guestmem.Config{
		"size":           {Blocks: []guestmem.BlockConfig{{Name: "a", Size: 1 * mib, Backing: mb}}},
		"mode":           {Blocks: []guestmem.BlockConfig{{Name: "a", Size: 1 * mib, Backing: ip}}},
		"hotplug 3 page": {Blocks: []guestmem.BlockConfig{{Name: "a", Size: 1 * mib, Hotplug: 3 * page}}},
		"hotplug big":    {Blocks: []guestmem.BlockConfig{{Name: "a", Size: 1 * mib, Hotplug: 2 * mib}}},
	} {
		if err := cfg.Validate(); !errors.Is(err, guestmem.ErrLayout) {
			t.Errorf("%s: Validate = %v, want ErrLayout", name, err)
		}
		if m, err := guestmem.New(cfg); !errors.Is(err, guestmem.ErrLayout) {
			if m != nil {
				m.Close()
			}
			t.Errorf("%s: New = %v, want ErrLayout", name, err)
		}
	}
}

// TestModelBacking: a 64 TiB guest without memory; state, attributes and
// IOMMU mappings only.
func TestModelBacking(t *testing.T) {
	const tib = uint64(1) << 40
	for _, mode := range []guestmem.Mode{guestmem.Split, guestmem.InPlace} {
		t.Run(mode.String(), func(t *testing.T) {
			bk, err := guestmem.NewModelBacking(64*tib, mode)
			if err != nil {
				t.Fatal(err)
			}
			mem, err := guestmem.New(guestmem.Config{
				Mode:   mode,
				Blocks: []guestmem.BlockConfig{{Name: "huge", GPA: 4 * tib, Size: 64 * tib, Backing: bk}},
			})
			if err != nil {
				t.Fatal(err)
			}
			defer mem.Close()
			model := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
			att, err := mem.AttachIOMMU(model, dma.Options{MaxExtent: dma.Unbounded})
			if err != nil {
				t.Fatal(err)
			}
			// A few conversions spread over the whole block, one of 1 TiB.
			for _, c := range []guestmem.Request{
				{GPA: 4 * tib, Size: 1 * tib, To: memattr.Shared},
				{GPA: 40 * tib, Size: 16 * page, To: memattr.Shared},
				{GPA: 68*tib - 2*page, Size: 2 * page, To: memattr.Shared},
				{GPA: 4*tib + 5*page, Size: page, To: memattr.Private},
			} {
				if _, err := mem.Convert(c); err != nil {
					t.Fatal(err)
				}
			}
			if err := att.Check(); err != nil {
				t.Fatal(err)
			}
			if n := model.Len(); n != 4 {
				t.Errorf("%d IOMMU entries, want 4 (split of the 1 TiB extent, the two others)", n)
			}
			ss := mem.StateStats()
			if want := 1*tib - page + 18*page; ss.SharedBytes != want || ss.PrivateBytes != 64*tib-want {
				t.Errorf("state stats %+v", ss)
			}
			if ss.MapBytes > 1<<20 {
				t.Errorf("state maps hold %d bytes for a handful of runs", ss.MapBytes)
			}
			buf := make([]byte, 8)
			if _, err := mem.ReadAt(buf, int64(4*tib)); !errors.Is(err, guestmem.ErrNoHostMemory) {
				t.Errorf("ReadAt on a model backing: %v, want ErrNoHostMemory", err)
			}
			if _, err := mem.Guest().WriteAt(buf, int64(4*tib)); !errors.Is(err, guestmem.ErrNoHostMemory) {
				t.Errorf("GuestView.WriteAt on a model backing: %v, want ErrNoHostMemory", err)
			}
			var f *iommu.DMAFault
			if err := model.DMAWrite(4*tib, buf); !errors.As(err, &f) {
				t.Errorf("DMA without host memory: %v, want a DMAFault", err)
			}
			calls, bytes := bk.Discards()
			if mode == guestmem.InPlace && calls != 0 {
				t.Errorf("in place: %d discards", calls)
			}
			if mode == guestmem.Split && (calls != 4 || bytes != 1*tib+18*page+page) {
				t.Errorf("split: %d discards of %#x bytes", calls, bytes)
			}
		})
	}
}

// TestHotplug: a hot-pluggable block with a device attached; accessors,
// conversions, stats and Walk follow the plug state.
func TestHotplug(t *testing.T) {
	const blk = 2 * mib
	var failPunch atomic.Bool
	mem, err := guestmem.New(guestmem.Config{
		Mode: guestmem.Split,
		Inject: func(f guestmem.Fault) error {
			if f.Op == guestmem.OpPunch && failPunch.Load() {
				return unix.EIO
			}
			return nil
		},
		Blocks: []guestmem.BlockConfig{
			{Name: "boot", GPA: 0, Size: 2 * mib},
			{Name: "vmem", GPA: 4 * mib, Size: 4 * blk, Hotplug: blk},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	model := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
	att, err := mem.AttachIOMMU(model, dma.Options{})
	if err != nil {
		t.Fatal(err)
	}
	check := func() {
		t.Helper()
		if err := att.Check(); err != nil {
			t.Fatal(err)
		}
	}
	vb := mem.Block(4 * mib)
	if vb.Hotplug() != blk || vb.PluggedBytes() != 0 {
		t.Fatalf("hotplug %#x plugged %#x", vb.Hotplug(), vb.PluggedBytes())
	}
	// Unplugged: no access, no conversion.
	buf := make([]byte, 16)
	if _, err := mem.ReadAt(buf, 4*mib); !errors.Is(err, guestmem.ErrUnplugged) {
		t.Errorf("ReadAt of unplugged memory: %v", err)
	}
	_, err = mem.Convert(guestmem.Request{GPA: 4 * mib, Size: page, To: memattr.Shared})
	if !errors.Is(err, guestmem.ErrUnplugged) || guestmem.HypercallRet(err) != kvm.HypercallRetEINVAL {
		t.Errorf("converting unplugged memory: %v", err)
	}
	// Plug requests that are not for one hot-pluggable block.
	for _, r := range []span.Range{{Start: 0, End: blk}, {Start: 4*mib + page, End: 4*mib + blk + page}, {Start: 2 * mib, End: 6 * mib}} {
		if err := mem.Plug(r.Start, r.Len()); err == nil {
			t.Errorf("Plug %v accepted", r)
		}
	}
	if err := mem.Plug(4*mib+blk, 2*blk); err != nil {
		t.Fatal(err)
	}
	// Plugged memory starts private.
	if _, err := mem.ReadAt(buf, int64(4*mib+blk)); !errors.Is(err, guestmem.ErrPrivate) {
		t.Errorf("ReadAt of freshly plugged memory: %v, want ErrPrivate", err)
	}
	shared := guestmem.Request{GPA: 4*mib + blk, Size: blk + 16*page, To: memattr.Shared}
	if _, err := mem.Convert(shared); err != nil {
		t.Fatal(err)
	}
	check()
	if _, err := mem.WriteAt([]byte("hot"), int64(shared.GPA)); err != nil {
		t.Fatal(err)
	}
	if err := model.DMARead(shared.GPA, buf[:3]); err != nil || string(buf[:3]) != "hot" {
		t.Errorf("DMA read %q, %v", buf[:3], err)
	}
	ss := mem.StateStats()
	if ss.UnpluggedBytes != 2*blk || ss.SharedBytes != blk+16*page || ss.PrivateBytes != 2*mib+2*blk-ss.SharedBytes {
		t.Errorf("state stats %+v", ss)
	}
	walk := func() []string {
		seq, err := mem.Walk(0, 16*mib)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for e := range seq {
			out = append(out, fmt.Sprintf("%s %v %v", e.Block.Name(), e.GPA, e.Kind))
		}
		return out
	}
	want := []string{
		"boot [0x0, 0x200000) private",
		"vmem [0x400000, 0x600000) unplugged",
		"vmem [0x600000, 0x810000) shared",
		"vmem [0x810000, 0xa00000) private",
		"vmem [0xa00000, 0xc00000) unplugged",
	}
	if diff := cmp.Diff(want, walk()); diff != "" {
		t.Errorf("Walk (-want +got):\n%s", diff)
	}
	// Unplugging the shared part unmaps it and makes it private.
	if err := mem.Unplug(4*mib+blk, blk); err != nil {
		t.Fatal(err)
	}
	check()
	var f *iommu.DMAFault
	if err := model.DMARead(shared.GPA, buf[:3]); !errors.As(err, &f) {
		t.Errorf("DMA to unplugged memory: %v", err)
	}
	if err := mem.Plug(4*mib+blk, blk); err != nil {
		t.Fatal(err)
	}
	if _, err := mem.ReadAt(buf, int64(shared.GPA)); !errors.Is(err, guestmem.ErrPrivate) {
		t.Errorf("re-plugged memory: %v, want ErrPrivate", err)
	}
	if got := mem.Stats(); got.Plugs != 2 || got.Unplugs != 1 {
		t.Errorf("stats: %d plugs %d unplugs", got.Plugs, got.Unplugs)
	}
	// An unplug whose discard fails changes nothing.
	if _, err := mem.Convert(shared); err != nil {
		t.Fatal(err)
	}
	before := walk()
	failPunch.Store(true)
	var pe *guestmem.PlugError
	if err := mem.Unplug(4*mib+blk, 2*blk); !errors.As(err, &pe) || !errors.Is(err, unix.EIO) || pe.Plug {
		t.Errorf("failing unplug: %v", err)
	}
	failPunch.Store(false)
	check()
	if diff := cmp.Diff(before, walk()); diff != "" {
		t.Errorf("a failed unplug changed the state (-before +after):\n%s", diff)
	}
}

// TestCheckViolation: Check answers a public *Violation naming the GPA and
// the table that breaks the invariant: the space's own listing (a Lister)
// or a mapper's bookkeeping.
func TestCheckViolation(t *testing.T) {
	r := newRig(t, rigOpts{})
	if _, err := r.mem.Convert(guestmem.Request{GPA: 0, Size: 4 * page, To: memattr.Shared}); err != nil {
		t.Fatal(err)
	}
	lo := r.mem.Blocks()[0]
	mp := r.att.Mappers()[0]
	for _, c := range []struct {
		name         string
		break_, mend func() error
		want         guestmem.Violation
	}{
		{
			"space lost an entry",
			func() error { _, err := r.model.Unmap(0, 4*page); return err },
			func() error { return r.model.Map(0, 4*page, nil) },
			guestmem.Violation{Invariant: "I1", Table: "space", Block: "lo", GPA: span.Range{End: 4 * page}, Detail: "populated but not mapped"},
		},
		{
			"space maps a private page",
			func() error { return r.model.Map(4*page, page, nil) },
			func() error { _, err := r.model.Unmap(4*page, page); return err },
			guestmem.Violation{Invariant: "I2", Table: "space", Block: "lo", GPA: span.Range{Start: 4 * page, End: 5 * page}, Detail: "mapped but not populated"},
		},
		{
			"space maps the MMIO hole",
			func() error { return r.model.Map(2*mib, page, nil) },
			func() error { _, err := r.model.Unmap(2*mib, page); return err },
			guestmem.Violation{Invariant: "I2", Table: "space", GPA: span.Range{Start: 2 * mib, End: 2*mib + page}, Detail: "mapped outside the attached guest RAM"},
		},
		{
			// Unregistered behind the executor's back, the mapper unmaps
			// everything it mapped.
			"mapper unregistered",
			func() error { return lo.Manager().Unregister(mp) },
			func() error { return lo.Manager().Register(mp, lo.Section()) },
			guestmem.Violation{Invariant: "I1", Table: "mapper", Block: "lo", GPA: span.Range{End: 4 * page}, Detail: "populated but not mapped"},
		},
	} {
		if err := c.break_(); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		err := r.att.Check()
		var v *guestmem.Violation
		if !errors.As(err, &v) {
			t.Errorf("%s: Check() = %v, want a *Violation", c.name, err)
		} else if diff := cmp.Diff(c.want, *v); diff != "" {
			t.Errorf("%s: Check() (-want +got):\n%s", c.name, diff)
		}
		if err := c.mend(); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if err := r.att.Check(); err != nil {
			t.Errorf("%s: mended, Check() = %v", c.name, err)
		}
	}
}

// TestErrorMessages: every message says whether its numbers are GPAs or
// offsets, and IOMMU entry counts name what they count.
func TestErrorMessages(t *testing.T) {
	mem, err := guestmem.New(guestmem.Config{Blocks: []guestmem.BlockConfig{{Name: "ram", GPA: 1 * mib, Size: 1 * mib}}})
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	model := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 1})
	if _, err := mem.AttachIOMMU(model, dma.Options{}); err != nil {
		t.Fatal(err)
	}
	if _, err := mem.Convert(guestmem.Request{GPA: 1 * mib, Size: page, To: memattr.Shared}); err != nil {
		t.Fatal(err)
	}
	_, convErr := mem.Convert(guestmem.Request{GPA: 1*mib + 4*page, Size: page, To: memattr.Shared})
	_, readErr := mem.ReadAt(make([]byte, 8), 1*mib+4*page)
	_, holeErr := mem.Convert(guestmem.Request{GPA: 0, Size: page, To: memattr.Private})
	layoutErr := guestmem.Config{Blocks: []guestmem.BlockConfig{{Name: "a", GPA: 0, Size: 2 * page}, {Name: "b", GPA: page, Size: page}}}.Validate()
	for _, c := range []struct {
		err  error
		want string
	}{
		{readErr, "guestmem: read of 0x8 bytes at GPA 0x104000: page is private"},
		{holeErr, "guestmem: convert GPA [0x0, +0x1000) to private: not guest RAM: GPA [0x0, 0x1000) is unbacked"},
		{layoutErr, "guestmem: bad memory layout: block a at GPA [0x0, 0x2000) overlaps block b at GPA [0x1000, 0x2000)"},
	} {
		if c.err == nil || c.err.Error() != c.want {
			t.Errorf("error\n%v\nwant\n%s", c.err, c.want)
		}
	}
	// The IOMMU's part of the message is dma's; the context before it says
	// which numbers are GPAs and which offsets.
	const convPrefix = "guestmem: convert GPA [0x104000, +0x1000) to shared: block ram: memattr: convert offset [0x4000, 0x5000) to shared: discard: populate offset 0x4000 size 0x1000 gpa 0x104000: dma: "
	if convErr == nil || !strings.HasPrefix(convErr.Error(), convPrefix) {
		t.Errorf("error\n%v\nwant prefix\n%s", convErr, convPrefix)
	}
	if !errors.Is(convErr, unix.ENOSPC) || guestmem.HypercallRet(convErr) != kvm.HypercallRetEAGAIN {
		t.Errorf("ENOSPC conversion: %v", convErr)
	}
}
