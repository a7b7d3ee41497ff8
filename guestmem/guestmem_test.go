package guestmem_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
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

const (
	page = guestmem.PageSize
	kib  = 1 << 10
	mib  = 1 << 20
)

// The test layout: two adjacent blocks, an MMIO hole, a third block after
// an unbacked gap.
//
//	[0, 1 MiB)             lo
//	[1 MiB, 2 MiB)         mid
//	[2 MiB, 2 MiB+64 KiB)  MMIO hole "dev"
//	[2 MiB+64 KiB, 3 MiB)  unbacked
//	[3 MiB, 4 MiB)         hi
//	[4 MiB, 64 MiB)        unbacked; MaxGPA = 64 MiB
var testLayout = guestmem.Config{
	Blocks: []guestmem.BlockConfig{
		{Name: "mid", GPA: 1 * mib, Size: 1 * mib},
		{Name: "lo", GPA: 0, Size: 1 * mib},
		{Name: "hi", GPA: 3 * mib, Size: 1 * mib},
	},
	MMIO:   []guestmem.Hole{{Name: "dev", GPA: 2 * mib, Size: 64 * kib}},
	MaxGPA: 64 * mib,
}

// isRAM reports whether gpa is in one of testLayout's blocks.
func isRAM(gpa uint64) bool {
	return gpa < 2*mib || (gpa >= 3*mib && gpa < 4*mib)
}

// rig is guest memory with the model IOMMU attached.
type rig struct {
	t     testing.TB
	mem   *guestmem.Memory
	model *iommu.Model
	att   *guestmem.Attachment
	vm    *kvm.VM
}

type rigOpts struct {
	mode   guestmem.Mode
	vm     *kvm.VM
	inject func(guestmem.Fault) error
	rules  iommu.Rules
}

func newRig(t testing.TB, o rigOpts) *rig {
	t.Helper()
	cfg := testLayout
	cfg.Mode = o.mode
	cfg.VM = o.vm
	cfg.Inject = o.inject
	mem, err := guestmem.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if o.rules == 0 {
		o.rules = iommu.Type1v2
	}
	model, att := attachModel(t, mem, iommu.Caps{Rules: o.rules}, dma.Options{})
	r := &rig{t: t, mem: mem, model: model, att: att, vm: o.vm}
	t.Cleanup(func() {
		if err := att.Detach(); err != nil {
			t.Error(err)
		}
		if err := mem.Close(); err != nil {
			t.Error(err)
		}
	})
	return r
}

// attachModel attaches a model IOMMU with caps to mem, with opts.
func attachModel(t testing.TB, mem *guestmem.Memory, caps iommu.Caps, opts dma.Options) (*iommu.Model, *guestmem.Attachment) {
	t.Helper()
	model := iommu.NewModel(caps)
	att, err := mem.AttachIOMMU(model, opts)
	if err != nil {
		t.Fatal(err)
	}
	return model, att
}

// snapshot is everything a failed conversion must leave as it was.
type snapshot struct {
	State    [][]guestmem.StateRun
	Recorded [][]guestmem.StateRun
	Mappings []iommu.Mapping
}

func (r *rig) snap() snapshot {
	var s snapshot
	for _, b := range r.mem.Blocks() {
		s.State = append(s.State, b.StateRuns())
		s.Recorded = append(s.Recorded, b.RecordedRuns())
	}
	s.Mappings = r.model.Mappings()
	return s
}

// check verifies the invariants and that the recorded attributes follow the
// state.
func (r *rig) check() {
	r.t.Helper()
	if err := r.att.Check(); err != nil {
		r.t.Fatal(err)
	}
	for _, b := range r.mem.Blocks() {
		if d := cmp.Diff(b.StateRuns(), b.RecordedRuns()); d != "" {
			r.t.Fatalf("block %s: recorded attributes differ from the state (-state +recorded):\n%s", b.Name(), d)
		}
	}
}

func (r *rig) convert(gpa, size uint64, to memattr.State) guestmem.Result {
	r.t.Helper()
	res, err := r.mem.Convert(guestmem.Request{GPA: gpa, Size: size, To: to})
	if err != nil {
		r.t.Fatalf("convert [%#x, +%#x) to %v: %v", gpa, size, to, err)
	}
	r.check()
	return res
}

// oracle is the naive per-page model of the state of testLayout.
type oracle map[uint64]bool // page GPA -> shared

func (o oracle) apply(gpa, size uint64, to memattr.State) {
	for p := gpa; p < gpa+size; p += page {
		if isRAM(p) {
			o[p] = to == memattr.Shared
		}
	}
}

// compare checks the memory's state runs against the oracle.
func (o oracle) compare(t testing.TB, mem *guestmem.Memory) {
	t.Helper()
	for _, b := range mem.Blocks() {
		for _, run := range b.StateRuns() {
			for p := run.GPA.Start; p < run.GPA.End; p += page {
				if want := o[p]; want != (run.State == memattr.Shared) {
					t.Fatalf("page %#x: state %v, oracle shared=%v", p, run.State, want)
				}
			}
		}
	}
}

func TestParseMode(t *testing.T) {
	for _, c := range []struct {
		in   string
		want guestmem.Mode
		ok   bool
	}{
		{"inplace", guestmem.InPlace, true},
		{"in-place", guestmem.InPlace, true},
		{"split", guestmem.Split, true},
		{"", 0, false},
		{"Split", 0, false},
	} {
		got, err := guestmem.ParseMode(c.in)
		if (err == nil) != c.ok || (c.ok && got != c.want) {
			t.Errorf("ParseMode(%q) = %v, %v", c.in, got, err)
		}
		if c.ok && got.String() != "inplace" && got.String() != "split" {
			t.Errorf("%v.String() = %q", got, got.String())
		}
	}
}

func TestLayoutErrors(t *testing.T) {
	for _, c := range []struct {
		name string
		cfg  guestmem.Config
	}{
		{"no blocks", guestmem.Config{}},
		{"unnamed", guestmem.Config{Blocks: []guestmem.BlockConfig{{GPA: 0, Size: page}}}},
		{"same name", guestmem.Config{Blocks: []guestmem.BlockConfig{{Name: "a", GPA: 0, Size: page}, {Name: "a", GPA: page, Size: page}}}},
		{"size 0", guestmem.Config{Blocks: []guestmem.BlockConfig{{Name: "a", GPA: 0, Size: 0}}}},
		{"unaligned gpa", guestmem.Config{Blocks: []guestmem.BlockConfig{{Name: "a", GPA: 100, Size: page}}}},
		{"unaligned size", guestmem.Config{Blocks: []guestmem.BlockConfig{{Name: "a", GPA: 0, Size: 100}}}},
		{"overlap", guestmem.Config{Blocks: []guestmem.BlockConfig{{Name: "a", GPA: 0, Size: 2 * page}, {Name: "b", GPA: page, Size: page}}}},
		{"hole overlaps", guestmem.Config{Blocks: []guestmem.BlockConfig{{Name: "a", GPA: 0, Size: 2 * page}},
			MMIO: []guestmem.Hole{{"h", page, page}}}},
		{"beyond max", guestmem.Config{Blocks: []guestmem.BlockConfig{{Name: "a", GPA: 0, Size: 2 * page}}, MaxGPA: page}},
		{"wraps", guestmem.Config{Blocks: []guestmem.BlockConfig{{Name: "a", GPA: 1<<64 - page, Size: 2 * page}}}},
		{"bad mode", guestmem.Config{Mode: 7, Blocks: []guestmem.BlockConfig{{Name: "a", GPA: 0, Size: page}}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			m, err := guestmem.New(c.cfg)
			if err == nil {
				m.Close()
				t.Fatal("New accepted the layout")
			}
		})
	}
}

func TestLayout(t *testing.T) {
	r := newRig(t, rigOpts{})
	var names []string
	for _, b := range r.mem.Blocks() {
		names = append(names, b.Name())
	}
	if d := cmp.Diff([]string{"lo", "mid", "hi"}, names); d != "" {
		t.Errorf("blocks not in GPA order (-want +got):\n%s", d)
	}
	for _, c := range []struct {
		gpa  uint64
		want string
	}{{0, "lo"}, {mib - 1, "lo"}, {mib, "mid"}, {2*mib - 1, "mid"}, {2 * mib, ""}, {3 * mib, "hi"}, {4 * mib, ""}} {
		got := ""
		if b := r.mem.Block(c.gpa); b != nil {
			got = b.Name()
		}
		if got != c.want {
			t.Errorf("Block(%#x) = %q, want %q", c.gpa, got, c.want)
		}
	}
	if h, ok := r.mem.Hole(2*mib + 5); !ok || h.Name != "dev" {
		t.Errorf("Hole(2 MiB + 5) = %v, %v", h, ok)
	}
	if r.mem.Enforcement() != guestmem.EnforceUserSpace {
		t.Errorf("enforcement without a VM = %q", r.mem.Enforcement())
	}
	st := r.mem.StateStats()
	if st.Runs != 3 || st.SharedBytes != 0 || st.PrivateBytes != 3*mib {
		t.Errorf("fresh state stats %+v, want 3 runs, all private", st)
	}
}

func TestConvertRejects(t *testing.T) {
	for _, mode := range []guestmem.Mode{guestmem.InPlace, guestmem.Split} {
		t.Run(mode.String(), func(t *testing.T) {
			r := newRig(t, rigOpts{mode: mode})
			r.convert(0x10000, 4*page, memattr.Shared)
			before := r.snap()
			for _, c := range []struct {
				name string
				req  guestmem.Request
				want error
			}{
				{"size 0", guestmem.Request{GPA: 0x10000, Size: 0, To: memattr.Shared}, span.ErrEmpty},
				{"unaligned gpa", guestmem.Request{GPA: 0x10001, Size: page, To: memattr.Shared}, span.ErrAlign},
				{"unaligned size", guestmem.Request{GPA: 0x10000, Size: page + 1, To: memattr.Private}, span.ErrAlign},
				{"overflow", guestmem.Request{GPA: 1<<64 - page, Size: 2 * page, To: memattr.Shared}, span.ErrOverflow},
				{"beyond max gpa", guestmem.Request{GPA: 64*mib - page, Size: 2 * page, To: memattr.Shared}, span.ErrBounds},
				{"bad state", guestmem.Request{GPA: 0x10000, Size: page, To: 2}, guestmem.ErrInvalid},
				{"mmio to private", guestmem.Request{GPA: 2 * mib, Size: page, To: memattr.Private}, guestmem.ErrNotRAM},
				{"unbacked to private", guestmem.Request{GPA: 8 * mib, Size: page, To: memattr.Private}, guestmem.ErrNotRAM},
				// RAM and then a hole: refused before the RAM part is touched.
				{"ram+mmio to private", guestmem.Request{GPA: 0x10000, Size: 2 * mib, To: memattr.Private}, guestmem.ErrNotRAM},
			} {
				_, err := r.mem.Convert(c.req)
				if !errors.Is(err, c.want) {
					t.Errorf("%s: err %v, want %v", c.name, err, c.want)
				}
				var ce *guestmem.ConvertError
				if !errors.As(err, &ce) || ce.Block != "" {
					t.Errorf("%s: err %#v is not a *ConvertError without a block", c.name, err)
				}
				if got := guestmem.HypercallRet(err); got != kvm.HypercallRetEINVAL {
					t.Errorf("%s: hypercall ret %d, want EINVAL", c.name, got)
				}
				if d := cmp.Diff(before, r.snap()); d != "" {
					t.Fatalf("%s changed something (-before +after):\n%s", c.name, d)
				}
			}
			if s := r.mem.Stats(); s.Rejected != 9 || s.Failed != 0 {
				t.Errorf("stats %+v, want 9 rejected, 0 failed", s)
			}
		})
	}
}

func TestConvertNonRAMToShared(t *testing.T) {
	r := newRig(t, rigOpts{})
	res := r.convert(2*mib, 64*kib, memattr.Shared)
	if res.Changed != 0 || res.Ignored != 64*kib || res.Blocks != 0 {
		t.Errorf("MMIO to shared: %+v", res)
	}
	// From the end of mid through the hole and the gap into hi.
	res = r.convert(2*mib-2*page, mib+4*page, memattr.Shared)
	want := guestmem.Result{
		Request: guestmem.Request{GPA: 2*mib - 2*page, Size: mib + 4*page, To: memattr.Shared},
		Changed: 4 * page, Runs: 2, Blocks: 2, Ignored: mib,
	}
	if d := cmp.Diff(want, res); d != "" {
		t.Errorf("result (-want +got):\n%s", d)
	}
	if len(r.model.Mappings()) != 2 {
		t.Errorf("mappings %v, want one per block", r.model.Mappings())
	}
}

func TestConvertAcrossBlocks(t *testing.T) {
	for _, mode := range []guestmem.Mode{guestmem.InPlace, guestmem.Split} {
		t.Run(mode.String(), func(t *testing.T) {
			r := newRig(t, rigOpts{mode: mode})
			res := r.convert(mib-4*page, 8*page, memattr.Shared)
			if res.Blocks != 2 || res.Changed != 8*page || res.Runs != 2 {
				t.Errorf("spanning to shared: %+v", res)
			}
			// The device reaches across the boundary through two entries.
			data := bytes.Repeat([]byte{0xab}, 8*page)
			if err := r.model.DMAWrite(mib-4*page, data); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 8*page)
			if _, err := r.mem.ReadAt(got, mib-4*page); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Error("host does not see the device's write across blocks")
			}
			// Mixed: half shared already.
			res = r.convert(mib, 8*page, memattr.Shared)
			if res.Changed != 4*page || res.Runs != 1 {
				t.Errorf("mixed to shared: %+v", res)
			}
			// Partial back to private, cutting both blocks' entries.
			res = r.convert(mib-page, 2*page, memattr.Private)
			if res.Changed != 2*page || res.Blocks != 2 {
				t.Errorf("partial to private: %+v", res)
			}
			if err := r.model.DMAWrite(mib-page, []byte{1}); !errors.Is(err, iommu.ErrFault) {
				t.Errorf("DMA to a page made private: %v, want a fault", err)
			}
			// Same state again: a no-op.
			res = r.convert(mib-page, 2*page, memattr.Private)
			if res.Changed != 0 {
				t.Errorf("same-state conversion changed %#x bytes", res.Changed)
			}
			if s := r.mem.Stats(); s.NoOps != 1 || s.PagesToShared != 12 || s.PagesToPrivate != 2 {
				t.Errorf("stats %+v", s)
			}
		})
	}
}

func TestAccessor(t *testing.T) {
	r := newRig(t, rigOpts{})
	buf := make([]byte, 16)
	for _, c := range []struct {
		name string
		off  int64
		n    int
		want error
	}{
		{"private", 0x1000, 16, guestmem.ErrPrivate},
		{"mmio", 2 * mib, 16, guestmem.ErrNoRAM},
		{"unbacked", 8 * mib, 16, guestmem.ErrNoRAM},
		{"negative", -16, 16, guestmem.ErrAddress},
		{"end of lo into mid (private)", mib - 8, 16, guestmem.ErrPrivate},
		{"end of mid into the hole", 2*mib - 8, 16, guestmem.ErrNoRAM},
	} {
		for _, write := range []bool{false, true} {
			var n int
			var err error
			if write {
				n, err = r.mem.WriteAt(buf[:c.n], c.off)
			} else {
				n, err = r.mem.ReadAt(buf[:c.n], c.off)
			}
			var ae *guestmem.AccessError
			if n != 0 || !errors.Is(err, c.want) || !errors.As(err, &ae) || ae.Write != write {
				t.Errorf("%s (write %v): n %d err %v, want %v", c.name, write, n, err, c.want)
			}
		}
	}
	r.convert(mib-page, 2*page, memattr.Shared)
	msg := []byte("across the block boundary")
	if n, err := r.mem.WriteAt(msg, mib-10); err != nil || n != len(msg) {
		t.Fatalf("write shared: %d, %v", n, err)
	}
	got := make([]byte, len(msg))
	if n, err := r.mem.ReadAt(got, mib-10); err != nil || n != len(msg) || !bytes.Equal(got, msg) {
		t.Fatalf("read shared: %d, %v, %q", n, err, got)
	}
	// The guest's view reads the same bytes, private or not.
	if _, err := r.mem.Guest().ReadAt(got, mib-10); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("guest view: %v, %q", err, got)
	}
	if _, err := r.mem.Guest().WriteAt([]byte{1}, 0x1000); err != nil {
		t.Errorf("guest view refused a private page: %v", err)
	}
	if _, err := r.mem.Guest().WriteAt([]byte{1}, 2*mib); !errors.Is(err, guestmem.ErrNoRAM) {
		t.Errorf("guest view of MMIO: %v", err)
	}
	// One page private again: the whole access is refused, naming it.
	r.convert(mib, page, memattr.Private)
	_, err := r.mem.ReadAt(got, mib-10)
	var ae *guestmem.AccessError
	if !errors.As(err, &ae) || ae.GPA != mib || !errors.Is(err, guestmem.ErrPrivate) {
		t.Errorf("read over a page made private: %v", err)
	}
	if n, err := r.mem.ReadAt(nil, 0x1000); n != 0 || err != nil {
		t.Errorf("empty read: %d, %v", n, err)
	}
}

// TestReleaseSplit checks what each mode frees: split memory punches the
// shared side when pages become private, so they read back zero when shared
// again; in-place memory keeps the bytes.
func TestReleaseSplit(t *testing.T) {
	for _, mode := range []guestmem.Mode{guestmem.InPlace, guestmem.Split} {
		t.Run(mode.String(), func(t *testing.T) {
			r := newRig(t, rigOpts{mode: mode})
			r.convert(3*mib, 2*page, memattr.Shared)
			if _, err := r.mem.WriteAt(bytes.Repeat([]byte{0x5a}, 2*page), 3*mib); err != nil {
				t.Fatal(err)
			}
			r.convert(3*mib, 2*page, memattr.Private)
			r.convert(3*mib, 2*page, memattr.Shared)
			got := make([]byte, 2*page)
			if _, err := r.mem.ReadAt(got, 3*mib); err != nil {
				t.Fatal(err)
			}
			s := r.mem.Stats()
			if r.mem.Enforcement() == guestmem.EnforceUserSpace && s.AttributeTime != 0 {
				t.Errorf("%v in KVM_SET_MEMORY_ATTRIBUTES without KVM attributes", s.AttributeTime)
			}
			if mode == guestmem.Split {
				if !bytes.Equal(got, make([]byte, 2*page)) {
					t.Error("split: page made private and shared again still holds the old bytes")
				}
				// to shared (punch private side), to private (punch shared), to shared.
				if s.Punches != 3 || s.PunchedBytes != 6*page || s.PunchTime <= 0 {
					t.Errorf("split punches %d (%#x bytes) in %v, want 3 (%#x)", s.Punches, s.PunchedBytes, s.PunchTime, 6*page)
				}
			} else {
				if !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 2*page)) {
					t.Error("in place: conversion lost the bytes")
				}
				if s.Punches != 0 || s.PunchTime != 0 {
					t.Errorf("in place punched %d times in %v", s.Punches, s.PunchTime)
				}
			}
		})
	}
}

// errInjected stands for a kernel failure that is not transient.
var errInjected = fmt.Errorf("injected: %w", unix.EIO)

// TestFaultInjection makes each backend step fail, in a one-block and a
// three-block conversion, in both directions and modes: the state, the
// recorded attributes and the IOMMU mappings must be as before, the error
// must reach the caller with the right hypercall answer, and the memory must
// keep working.
func TestFaultInjection(t *testing.T) {
	type point struct {
		name  string
		fault func(f guestmem.Fault) bool // which backend call fails
		iommu func(c iommu.Call) bool     // which IOMMU call fails
		err   error
		ret   uint64
	}
	points := []point{
		{name: "set attributes", fault: func(f guestmem.Fault) bool { return f.Op == guestmem.OpSetAttributes }, err: errInjected, ret: kvm.HypercallRetEINVAL},
		{name: "set attributes busy", fault: func(f guestmem.Fault) bool { return f.Op == guestmem.OpSetAttributes }, err: unix.EBUSY, ret: kvm.HypercallRetEAGAIN},
		{name: "punch", fault: func(f guestmem.Fault) bool { return f.Op == guestmem.OpPunch }, err: errInjected, ret: kvm.HypercallRetEINVAL},
		{name: "iommu map", iommu: func(c iommu.Call) bool { return c.Op == iommu.OpMap }, err: unix.ENOSPC, ret: kvm.HypercallRetEAGAIN},
		{name: "iommu unmap", iommu: func(c iommu.Call) bool { return c.Op == iommu.OpUnmap }, err: unix.EINVAL, ret: kvm.HypercallRetEINVAL},
	}
	type req struct {
		name      string
		gpa, size uint64
		to        memattr.State
		inBlock   string // the failure is injected only in this block
		cuts      bool   // cuts an IOMMU entry, which maps the remainder again
	}
	reqs := []req{
		{"one block to shared", 0x40000, 8 * page, memattr.Shared, "lo", false},
		{"one block to private", 0x20000, 4 * page, memattr.Private, "lo", false},
		// Fails in the last block, after lo and mid have converted.
		{"three blocks to shared", mib - 4*page, 2*mib + 8*page, memattr.Shared, "hi", false},
		// Fails in the second block, after lo has converted.
		{"two blocks to private", mib - 8*page, 16 * page, memattr.Private, "mid", false},
		{"one block to private, cutting an entry", 0x21000, page, memattr.Private, "lo", true},
	}
	for _, mode := range []guestmem.Mode{guestmem.InPlace, guestmem.Split} {
		for _, p := range points {
			for _, q := range reqs {
				t.Run(fmt.Sprintf("%v/%s/%s", mode, p.name, q.name), func(t *testing.T) {
					var mu sync.Mutex
					armed := false
					fired := false
					shot := func() bool { // the first matching call after arming fails
						mu.Lock()
						defer mu.Unlock()
						if armed {
							armed, fired = false, true
							return true
						}
						return false
					}
					r := newRig(t, rigOpts{mode: mode, inject: func(f guestmem.Fault) error {
						if p.fault != nil && p.fault(f) && f.Block == q.inBlock && shot() {
							return p.err
						}
						return nil
					}})
					r.model.SetFault(func(c iommu.Call) error {
						blk := r.mem.Block(c.IOVA)
						if p.iommu != nil && p.iommu(c) && blk != nil && blk.Name() == q.inBlock && shot() {
							return p.err
						}
						return nil
					})
					// Some shared pages to start from, cut by the requests.
					r.convert(0x20000, 4*page, memattr.Shared)
					r.convert(mib-8*page, 16*page, memattr.Shared)
					r.convert(3*mib, 2*page, memattr.Shared)
					before := r.snap()
					mu.Lock()
					armed = true
					mu.Unlock()
					_, err := r.mem.Convert(guestmem.Request{GPA: q.gpa, Size: q.size, To: q.to})
					mu.Lock()
					armed = false
					mu.Unlock()
					// Steps with nothing to do for the request: in-place
					// memory punches nothing, going private maps nothing
					// unless it cuts an entry, and going shared unmaps
					// nothing.
					idle := (p.name == "punch" && mode == guestmem.InPlace) ||
						(p.name == "iommu map" && q.to == memattr.Private && !q.cuts) ||
						(p.name == "iommu unmap" && q.to == memattr.Shared)
					if fired == idle {
						t.Fatalf("fault fired: %v, expected %v", fired, !idle)
					}
					if idle {
						if err != nil {
							t.Fatalf("conversion failed with no fault fired: %v", err)
						}
						return
					}
					if err == nil {
						t.Fatal("conversion succeeded although a step failed")
					}
					if !errors.Is(err, p.err) {
						t.Errorf("error %v does not wrap %v", err, p.err)
					}
					var ce *guestmem.ConvertError
					if !errors.As(err, &ce) || ce.Block != q.inBlock {
						t.Errorf("error %v does not name block %s", err, q.inBlock)
					}
					if got := guestmem.HypercallRet(err); got != p.ret {
						t.Errorf("hypercall ret %d, want %d", got, p.ret)
					}
					if d := cmp.Diff(before, r.snap()); d != "" {
						t.Fatalf("failed conversion changed something (-before +after):\n%s", d)
					}
					r.check()
					if s := r.mem.Stats(); s.Failed != 1 || s.UndoFailures != 0 {
						t.Errorf("stats %+v, want 1 failed, 0 undo failures", s)
					}
					// Still working: the same request goes through now.
					r.convert(q.gpa, q.size, q.to)
				})
			}
		}
	}
}

// TestRandomized runs random conversions (aligned, unaligned, spanning,
// non-RAM) against a per-page oracle, checking the invariants after each.
func TestRandomized(t *testing.T) {
	steps := 3000
	if testing.Short() {
		steps = 500
	}
	for _, mode := range []guestmem.Mode{guestmem.InPlace, guestmem.Split} {
		t.Run(mode.String(), func(t *testing.T) {
			r := newRig(t, rigOpts{mode: mode, rules: iommu.IOMMUFD})
			rng := rand.New(rand.NewPCG(1, uint64(mode)))
			o := oracle{}
			for i := range steps {
				gpa := rng.Uint64N(5*mib/page) * page
				size := (1 + rng.Uint64N(64)) * page
				if rng.IntN(20) == 0 {
					size = rng.Uint64N(1 << 20) // often unaligned
				}
				to := memattr.State(rng.IntN(2))
				_, err := r.mem.Convert(guestmem.Request{GPA: gpa, Size: size, To: to})
				valid := size != 0 && size%page == 0
				nonRAM := false
				for p := gpa; p < gpa+size; p += page {
					nonRAM = nonRAM || !isRAM(p)
				}
				switch {
				case !valid:
					if !errors.Is(err, guestmem.ErrInvalid) {
						t.Fatalf("step %d: invalid request accepted: %v", i, err)
					}
				case nonRAM && to == memattr.Private:
					if !errors.Is(err, guestmem.ErrNotRAM) {
						t.Fatalf("step %d: private non-RAM: %v", i, err)
					}
				default:
					if err != nil {
						t.Fatalf("step %d: %v", i, err)
					}
					o.apply(gpa, size, to)
				}
				r.check()
				o.compare(t, r.mem)
			}
			t.Logf("%d steps, %d IOMMU entries, state %+v", steps, r.model.Len(), r.mem.StateStats())
		})
	}
}

// TestConcurrent converts from several goroutines at once: disjoint ranges
// in each block plus spanning requests. Run with -race.
func TestConcurrent(t *testing.T) {
	r := newRig(t, rigOpts{mode: guestmem.Split})
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			for range 300 {
				var gpa uint64
				switch g {
				case 3: // spans lo and mid
					gpa = mib - (1+rng.Uint64N(8))*page
				default: // a window of its own in lo, mid or hi
					gpa = []uint64{0, mib, 3 * mib}[g] + 0x80000 + rng.Uint64N(32)*page
				}
				to := memattr.State(rng.IntN(2))
				if _, err := r.mem.Convert(guestmem.Request{GPA: gpa, Size: 8 * page, To: to}); err != nil {
					t.Error(err)
					return
				}
				buf := make([]byte, 64)
				_, err := r.mem.ReadAt(buf, int64(gpa))
				if err != nil && !errors.Is(err, guestmem.ErrPrivate) {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	r.check()
}

func TestHypercallRet(t *testing.T) {
	for _, c := range []struct {
		err  error
		want uint64
	}{
		{nil, 0},
		{guestmem.ErrInvalid, 22},
		{fmt.Errorf("x: %w", unix.ENOSPC), 11},
		{fmt.Errorf("x: %w", unix.EBUSY), 11},
		{fmt.Errorf("x: %w", unix.ENOMEM), 11},
		{fmt.Errorf("x: %w", unix.EAGAIN), 11},
		{fmt.Errorf("x: %w", unix.EIO), 22},
		{errors.New("anything"), 22},
		{errors.Join(guestmem.ErrNotRAM, unix.EBUSY), 22},
		{&kvm.MapGPARangeError{Err: kvm.ErrMapGPAZeroPages}, 22},
	} {
		if got := guestmem.HypercallRet(c.err); got != c.want {
			t.Errorf("HypercallRet(%v) = %d, want %d", c.err, got, c.want)
		}
	}
}

// FuzzConvert feeds arbitrary requests to the executor and checks them
// against the oracle and the invariants.
func FuzzConvert(f *testing.F) {
	f.Add(uint64(0x10000), uint64(page), uint8(1), uint64(0), uint64(page), uint8(0))
	f.Add(uint64(mib-page), uint64(2*page), uint8(1), uint64(mib), uint64(page), uint8(0))
	f.Add(uint64(2*mib), uint64(64*kib), uint8(0), uint64(2*mib), uint64(page), uint8(1))
	f.Add(uint64(1<<64-page), uint64(2*page), uint8(1), uint64(3), uint64(0), uint8(7))
	f.Add(uint64(0), uint64(4*mib), uint8(1), uint64(0x1234), uint64(page), uint8(0))
	r := newRig(f, rigOpts{mode: guestmem.Split})
	f.Fuzz(func(t *testing.T, g1, s1 uint64, t1 uint8, g2, s2 uint64, t2 uint8) {
		r.t = t
		o := oracle{}
		// Start from the current state.
		for _, b := range r.mem.Blocks() {
			for _, run := range b.StateRuns() {
				o.apply(run.GPA.Start, run.GPA.Len(), run.State)
			}
		}
		for _, q := range []struct {
			gpa, size uint64
			to        uint8
		}{{g1, s1, t1}, {g2, s2, t2}} {
			before := r.snap()
			_, err := r.mem.Convert(guestmem.Request{GPA: q.gpa, Size: q.size, To: memattr.State(q.to)})
			if err == nil {
				if q.to > 1 || q.size == 0 || (q.gpa|q.size)%page != 0 {
					t.Fatalf("accepted %#x +%#x to %d", q.gpa, q.size, q.to)
				}
				o.apply(q.gpa, q.size, memattr.State(q.to))
			} else if d := cmp.Diff(before, r.snap()); d != "" {
				t.Fatalf("refused request changed state: %v\n%s", err, d)
			}
			r.check()
			o.compare(t, r.mem)
		}
	})
}

// FuzzAccess checks the accessor against the state: an access succeeds
// exactly when every byte is RAM in a shared page.
func FuzzAccess(f *testing.F) {
	f.Add(int64(0x10000), uint16(16), true)
	f.Add(int64(mib-8), uint16(16), false)
	f.Add(int64(2*mib-8), uint16(100), true)
	f.Add(int64(-1), uint16(1), false)
	f.Add(int64(3*mib+page-1), uint16(2), false)
	r := newRig(f, rigOpts{})
	r.convert(0x10000, 4*page, memattr.Shared)
	r.convert(mib-2*page, 4*page, memattr.Shared)
	r.convert(2*mib-page, page, memattr.Shared)
	r.convert(3*mib, page, memattr.Shared)
	shared := func(gpa uint64) bool {
		b := r.mem.Block(gpa)
		return b != nil && b.Attributes().Get(gpa-b.GPA()) == memattr.Shared
	}
	f.Fuzz(func(t *testing.T, off int64, n uint16, write bool) {
		buf := make([]byte, n)
		var err error
		if write {
			_, err = r.mem.WriteAt(buf, off)
		} else {
			_, err = r.mem.ReadAt(buf, off)
		}
		ok := off >= 0 && uint64(off)+uint64(n) >= uint64(off)
		for i := uint64(0); ok && i < uint64(n); i++ {
			ok = shared(uint64(off) + i)
		}
		if n == 0 {
			ok = true
		}
		if ok != (err == nil) {
			t.Fatalf("access %#x +%d write %v: err %v, want ok=%v", off, n, write, err, ok)
		}
		// The guest's view needs RAM only.
		if write {
			_, err = r.mem.Guest().WriteAt(buf, off)
		} else {
			_, err = r.mem.Guest().ReadAt(buf, off)
		}
		ok = off >= 0 && uint64(off)+uint64(n) >= uint64(off)
		for i := uint64(0); ok && i < uint64(n); i++ {
			ok = isRAM(uint64(off) + i)
		}
		if n == 0 {
			ok = true
		}
		if ok != (err == nil) {
			t.Fatalf("guest access %#x +%d write %v: err %v, want ok=%v", off, n, write, err, ok)
		}
	})
}

// FuzzLayout feeds arbitrary layouts to New: it must accept exactly the
// page-aligned, non-empty, non-overlapping ones below MaxGPA.
func FuzzLayout(f *testing.F) {
	f.Add(uint64(0), uint64(page), uint64(page), uint64(page), uint64(2*page), uint64(page))
	f.Add(uint64(0), uint64(2*page), uint64(page), uint64(page), uint64(8*page), uint64(page))
	f.Add(uint64(1<<64-page), uint64(2*page), uint64(0), uint64(page), uint64(page), uint64(0))
	f.Add(uint64(100), uint64(page), uint64(page), uint64(100), uint64(3*page), uint64(page))
	const maxGPA = 64 * mib
	f.Fuzz(func(t *testing.T, g1, s1, g2, s2, hg, hs uint64) {
		type r struct{ gpa, size uint64 }
		rs := []r{{g1, s1}, {g2, s2}, {hg, hs}}
		valid := true
		for i, x := range rs {
			end := x.gpa + x.size
			valid = valid && x.size > 0 && (x.gpa|x.size)%page == 0 && end > x.gpa && end <= maxGPA
			for _, y := range rs[:i] {
				valid = valid && (end <= y.gpa || y.gpa+y.size <= x.gpa)
			}
		}
		m, err := guestmem.New(guestmem.Config{
			Blocks: []guestmem.BlockConfig{{Name: "a", GPA: g1, Size: s1}, {Name: "b", GPA: g2, Size: s2}},
			MMIO:   []guestmem.Hole{{Name: "h", GPA: hg, Size: hs}},
			MaxGPA: maxGPA,
		})
		if err == nil {
			defer m.Close()
		}
		if valid != (err == nil) {
			t.Fatalf("layout %#x: err %v, want valid=%v", rs, err, valid)
		}
	})
}

func TestAttachRollback(t *testing.T) {
	cfg := testLayout
	mem, err := guestmem.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	for _, b := range mem.Blocks() {
		if _, err := mem.Convert(guestmem.Request{GPA: b.GPA(), Size: page, To: memattr.Shared}); err != nil {
			t.Fatal(err)
		}
	}
	model := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
	// Refuse the third block's replay.
	model.SetFault(func(c iommu.Call) error {
		if c.Op == iommu.OpMap && c.IOVA >= 3*mib {
			return unix.ENOSPC
		}
		return nil
	})
	if _, err := mem.AttachIOMMU(model, dma.Options{}); !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("attach: %v, want ENOSPC", err)
	}
	if ms := model.Mappings(); len(ms) != 0 {
		t.Errorf("failed attach left mappings %v", ms)
	}
	for _, b := range mem.Blocks() {
		if ls, _ := b.Manager().Listeners(); len(ls) != 0 {
			t.Errorf("block %s keeps %d listeners", b.Name(), len(ls))
		}
	}
	model.SetFault(nil)
	att, err := mem.AttachIOMMU(model, dma.Options{Policy: dma.Granule})
	if err != nil {
		t.Fatal(err)
	}
	if err := att.Check(); err != nil {
		t.Error(err)
	}
	if got := att.Stats().Entries; got != 3 {
		t.Errorf("entries %d, want 3", got)
	}
	// A stray entry in the MMIO hole is reported.
	if err := model.Map(2*mib, page, nil); err != nil {
		t.Fatal(err)
	}
	if err := att.Check(); err == nil {
		t.Error("Check missed a mapping in the MMIO hole")
	}
	if _, err := model.Unmap(2*mib, page); err != nil {
		t.Fatal(err)
	}
	if err := att.Detach(); err != nil {
		t.Fatal(err)
	}
	if ms := model.Mappings(); len(ms) != 0 {
		t.Errorf("detach left mappings %v", ms)
	}
}
