package guestmem_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/guestmem/kernelmodel"
	"github.com/gmemproject/gmem/internal/randtest"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// modelBacking is a kernel-model guest_memfd whose attribute calls tell the
// injector when the kernel refuses.
type modelBacking struct {
	*kernelmodel.GuestMemfd
	inj *randtest.Injector
}

func (b modelBacking) AttributeFile() (guestmem.AttributeFile, uint64) {
	return modelFile(b), 0
}

type modelFile modelBacking

func (f modelFile) SetMemoryAttributes2(a kvm.MemoryAttributes2) error {
	err := f.GuestMemfd.SetMemoryAttributes2(a)
	if err != nil {
		f.inj.Stop()
	}
	return err
}

// modelRig is testLayout in place on the kernel model: per-guest_memfd
// attributes, pins from the attached IOMMUs and from foreign pinners, host
// memory whose private pages fault.
type modelRig struct {
	t      testing.TB
	mem    *guestmem.Memory
	files  map[string]*kernelmodel.GuestMemfd // by block name
	spaces []*iommu.Model
	atts   []*guestmem.Attachment
	inj    *randtest.Injector
	// pins are the foreign pins, by page GPA.
	pins map[uint64]func()
}

func newModelRig(t testing.TB, memory bool, rules ...iommu.Rules) *modelRig {
	t.Helper()
	r := &modelRig{t: t, files: map[string]*kernelmodel.GuestMemfd{}, inj: &randtest.Injector{Err: errInjected}, pins: map[uint64]func(){}}
	cfg := testLayout
	cfg.Mode = guestmem.InPlace
	cfg.VM = kernelmodel.NewVM()
	cfg.Blocks = slices.Clone(cfg.Blocks)
	cfg.Inject = func(guestmem.Fault) error { return r.inj.Call() }
	for i, bc := range cfg.Blocks {
		g, err := kernelmodel.NewGuestMemfd(bc.Size, memory)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { g.Close() })
		r.files[bc.Name] = g
		cfg.Blocks[i].Backing = modelBacking{g, r.inj}
	}
	mem, err := guestmem.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r.mem = mem
	t.Cleanup(func() {
		for _, a := range r.atts {
			if err := a.Detach(); err != nil {
				t.Error(err)
			}
		}
		if err := mem.Close(); err != nil {
			t.Error(err)
		}
	})
	for _, rl := range rules {
		space, att := attachModel(t, mem, iommu.Caps{Rules: rl}, dma.Options{})
		space.SetFault(func(iommu.Call) error { return r.inj.Call() })
		for _, b := range mem.Blocks() {
			r.files[b.Name()].AddPinner(kernelmodel.IOMMUPins(space, b.GPA()))
		}
		r.spaces, r.atts = append(r.spaces, space), append(r.atts, att)
	}
	return r
}

// file returns the file and offset of a RAM GPA.
func (r *modelRig) file(gpa uint64) (*kernelmodel.GuestMemfd, uint64) {
	b := r.mem.Block(gpa)
	return r.files[b.Name()], gpa - b.GPA()
}

// pin pins the page at gpa as a foreign user.
func (r *modelRig) pin(gpa uint64) error {
	g, off := r.file(gpa)
	unpin, err := g.Pin(off, page)
	if err != nil {
		return err
	}
	if old := r.pins[gpa]; old != nil {
		old()
	}
	r.pins[gpa] = unpin
	return nil
}

func (r *modelRig) unpin(gpa uint64) {
	if u := r.pins[gpa]; u != nil {
		u()
		delete(r.pins, gpa)
	}
}

// modelSnap is what a failed conversion must leave as it was, the kernel's
// attributes included.
type modelSnap struct {
	State, Recorded [][]guestmem.StateRun
	Kernel          [][]span.Range
	Mappings        [][]iommu.Mapping
}

func (r *modelRig) snap() modelSnap {
	var s modelSnap
	for _, b := range r.mem.Blocks() {
		s.State = append(s.State, b.StateRuns())
		s.Recorded = append(s.Recorded, b.RecordedRuns())
		s.Kernel = append(s.Kernel, r.files[b.Name()].PrivateRuns())
	}
	for _, sp := range r.spaces {
		s.Mappings = append(s.Mappings, sp.Mappings())
	}
	return s
}

// check asserts I1/I2 for every device, that the recorded attributes and
// the kernel's equal the state, and I4 against the oracle.
func (r *modelRig) check(o oracle) {
	r.t.Helper()
	for _, a := range r.atts {
		if err := a.Check(); err != nil {
			r.t.Fatal(err)
		}
	}
	for _, b := range r.mem.Blocks() {
		if d := cmp.Diff(b.StateRuns(), b.RecordedRuns()); d != "" {
			r.t.Fatalf("block %s: recorded attributes differ from the state (-state +recorded):\n%s", b.Name(), d)
		}
		var want []span.Range
		for _, run := range b.StateRuns() {
			if run.State == memattr.Private {
				want = append(want, span.Range{Start: run.GPA.Start - b.GPA(), End: run.GPA.End - b.GPA()})
			}
		}
		if d := cmp.Diff(want, r.files[b.Name()].PrivateRuns()); d != "" {
			r.t.Fatalf("block %s: the kernel's attributes differ from the state (-state +kernel):\n%s", b.Name(), d)
		}
	}
	o.compare(r.t, r.mem)
}

func TestInPlaceEnforcement(t *testing.T) {
	r := newModelRig(t, false)
	if e := r.mem.Enforcement(); e != guestmem.EnforceGuestMemfd || !e.Kernel() {
		t.Fatalf("enforcement %q, want %q", e, guestmem.EnforceGuestMemfd)
	}
	for name, g := range r.files {
		if runs := g.PrivateRuns(); len(runs) != 1 || runs[0] != (span.Range{End: g.Size()}) {
			t.Errorf("block %s starts with kernel private runs %v, want all", name, runs)
		}
	}
	// Split memory cannot work with per-guest_memfd attributes, nor can an
	// in-place backing that does not offer its guest_memfd.
	cfg := testLayout
	cfg.VM = kernelmodel.NewVM()
	if _, err := guestmem.New(cfg); !errors.Is(err, guestmem.ErrNoAttributeFile) {
		t.Errorf("split on per-guest_memfd attributes: %v, want ErrNoAttributeFile", err)
	}
	cfg.Mode = guestmem.InPlace
	cfg.Blocks = slices.Clone(cfg.Blocks)
	for i := range cfg.Blocks {
		b, err := guestmem.NewMemfdBacking(cfg.Blocks[i].Name, cfg.Blocks[i].Size, guestmem.InPlace)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		cfg.Blocks[i].Backing = b
	}
	if _, err := guestmem.New(cfg); !errors.Is(err, guestmem.ErrNoAttributeFile) {
		t.Errorf("in place on a backing without its guest_memfd: %v, want ErrNoAttributeFile", err)
	}
}

// TestInPlaceOwnPins proves that gmem's own device mappings never make the
// kernel refuse: the devices map every shared page (pins the kernel model
// counts), and every conversion to private goes through.
func TestInPlaceOwnPins(t *testing.T) {
	r := newModelRig(t, true, iommu.Type1v2, iommu.IOMMUFD)
	o := oracle{}
	rng := rand.New(rand.NewPCG(7, 21))
	for range 400 {
		gpa := rng.Uint64N(4*mib/page) * page
		size := (1 + rng.Uint64N(32)) * page
		to := memattr.State(rng.IntN(2))
		_, err := r.mem.Convert(guestmem.Request{GPA: gpa, Size: size, To: to})
		nonRAM := false
		for p := gpa; p < gpa+size; p += page {
			nonRAM = nonRAM || !isRAM(p)
		}
		if nonRAM && to == memattr.Private {
			continue
		}
		if err != nil {
			t.Fatalf("convert [%#x, +%#x) to %v with no foreign pin: %v", gpa, size, to, err)
		}
		o.apply(gpa, size, to)
		r.check(o)
	}
	var refused, private uint64
	for _, g := range r.files {
		refused += g.Stats().Refused
		private += g.Stats().ToPrivate
	}
	if refused != 0 || private == 0 {
		t.Errorf("the kernel refused %d conversions (%d pages made private)", refused, private)
	}
	if s := r.mem.Stats(); s.Punches != 0 {
		t.Errorf("in-place conversions punched %d times", s.Punches)
	}
}

// TestInPlacePinned checks a conversion to private that the kernel refuses
// because a foreign user pins a page: undone like any failed step, EAGAIN
// for the guest, the error naming the pinned GPA.
func TestInPlacePinned(t *testing.T) {
	r := newModelRig(t, true, iommu.Type1v2)
	o := oracle{}
	for _, c := range []struct{ gpa, size uint64 }{{0x20000, 16 * page}, {mib - 4*page, 8 * page}, {3 * mib, 4 * page}} {
		if _, err := r.mem.Convert(guestmem.Request{GPA: c.gpa, Size: c.size, To: memattr.Shared}); err != nil {
			t.Fatal(err)
		}
		o.apply(c.gpa, c.size, memattr.Shared)
	}
	r.check(o)
	for _, c := range []struct {
		name       string
		pins       []uint64
		gpa, size  uint64
		wantPinned uint64
	}{
		{"one block", []uint64{0x25000}, 0x20000, 16 * page, 0x25000},
		{"first of two", []uint64{0x2a000, 0x23000}, 0x20000, 16 * page, 0x23000},
		// The first block converts, the second refuses: the first is undone.
		{"second block", []uint64{mib + 2*page}, mib - 4*page, 8 * page, mib + 2*page},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, p := range c.pins {
				if err := r.pin(p); err != nil {
					t.Fatal(err)
				}
			}
			before := r.snap()
			_, err := r.mem.Convert(guestmem.Request{GPA: c.gpa, Size: c.size, To: memattr.Private})
			var pe *guestmem.PinnedError
			if !errors.As(err, &pe) || pe.GPA != c.wantPinned {
				t.Fatalf("convert with pins %#x: %v, want a PinnedError at GPA %#x", c.pins, err, c.wantPinned)
			}
			if !errors.Is(err, unix.EAGAIN) || guestmem.HypercallRet(err) != kvm.HypercallRetEAGAIN {
				t.Errorf("error %v: not EAGAIN, or hypercall ret %d", err, guestmem.HypercallRet(err))
			}
			if d := cmp.Diff(before, r.snap()); d != "" {
				t.Fatalf("a refused conversion changed something (-before +after):\n%s", d)
			}
			r.check(o)
			for _, p := range c.pins {
				r.unpin(p)
			}
			if _, err := r.mem.Convert(guestmem.Request{GPA: c.gpa, Size: c.size, To: memattr.Private}); err != nil {
				t.Fatalf("after the pins are dropped: %v", err)
			}
			o.apply(c.gpa, c.size, memattr.Private)
			r.check(o)
			if _, err := r.mem.Convert(guestmem.Request{GPA: c.gpa, Size: c.size, To: memattr.Shared}); err != nil {
				t.Fatal(err)
			}
			o.apply(c.gpa, c.size, memattr.Shared)
		})
	}
	if s := r.mem.Stats(); s.Punches != 0 {
		t.Errorf("in-place conversions punched %d times", s.Punches)
	}
}

// TestInPlaceHostAccess checks that the host accessor refuses a private
// page before touching it (the kernel would SIGBUS), that the model would
// catch an access that slipped through, and that contents survive a round
// trip (KVM neither zeroes nor copies).
func TestInPlaceHostAccess(t *testing.T) {
	r := newModelRig(t, true)
	const gpa = 0x40000
	if _, err := r.mem.Convert(guestmem.Request{GPA: gpa, Size: 2 * page, To: memattr.Shared}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.mem.WriteAt([]byte("kept"), gpa+page); err != nil {
		t.Fatal(err)
	}
	if _, err := r.mem.Convert(guestmem.Request{GPA: gpa + page, Size: page, To: memattr.Private}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2*page)
	var readErr error
	if err := kernelmodel.Catch(func() { _, readErr = r.mem.ReadAt(buf, gpa) }); err != nil {
		t.Fatalf("ReadAt touched a private page: %v", err)
	}
	if !errors.Is(readErr, guestmem.ErrPrivate) {
		t.Errorf("ReadAt over a private page: %v, want ErrPrivate", readErr)
	}
	var writeErr error
	if err := kernelmodel.Catch(func() { _, writeErr = r.mem.Guest().WriteAt([]byte("x"), gpa+page) }); err != nil {
		t.Fatalf("GuestView touched a private page: %v", err)
	}
	if !errors.Is(writeErr, guestmem.ErrPrivate) {
		t.Errorf("GuestView write to a private page under %s: %v, want ErrPrivate", r.mem.Enforcement(), writeErr)
	}
	raw := r.mem.Block(gpa).SharedBacking()
	var hf *kernelmodel.HostFault
	var v byte
	if err := kernelmodel.Catch(func() { v = raw[gpa+page] }); !errors.As(err, &hf) {
		t.Errorf("a raw host read of the private page: %v (read %#x), want a HostFault", err, v)
	}
	if _, err := r.mem.Convert(guestmem.Request{GPA: gpa + page, Size: page, To: memattr.Shared}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := r.mem.ReadAt(got, gpa+page); err != nil || string(got) != "kept" {
		t.Errorf("after a round trip: %q, %v; want the contents kept", got, err)
	}
}

// modelOps is how many random operations the in-place model test runs: a
// tenth of GMEM_RANDOM_OPS if set (each operation changes page protections
// with system calls, so 100,000 when CI sets 1,000,000), else a quick
// default.
func modelOps(t *testing.T) int {
	return randtest.Ops{Short: 2000, Full: 10000, Div: 10, Min: 500}.Count(t)
}

// TestRandomizedInPlace runs random conversions, foreign pins and unpins,
// host accesses and DMA on the kernel model, with a failure injected at a
// random backend call of one operation in four, and checks I1-I4 (the
// kernel's attributes included) against a per-page oracle after every
// step. A refusal must come from a foreign pin and name the first one; no
// refusal may come from gmem's own mappings.
func TestRandomizedInPlace(t *testing.T) {
	ops := modelOps(t)
	const perWorld = 500
	var refusals, injected, conversions int
	for w := 0; w*perWorld < ops; w++ {
		rules := []iommu.Rules{iommu.Type1v2}
		if w%2 == 1 {
			rules = []iommu.Rules{iommu.IOMMUFD, iommu.Type1v2}
		}
		r := newModelRig(t, true, rules...)
		rng := rand.New(rand.NewPCG(uint64(w), 0x1e))
		o := oracle{}
		for i := range min(perWorld, ops-w*perWorld) {
			step := fmt.Sprintf("world %d step %d", w, i)
			switch k := rng.IntN(20); {
			case k < 11:
				c, inj, ref := r.randomConvert(t, rng, o, step)
				conversions += c
				injected += inj
				refusals += ref
			case k < 14:
				// Mostly a shared page (where a pin holds), sometimes any.
				gpa := rng.Uint64N(4*mib/page) * page
				var shared []uint64
				for p, sh := range o {
					if sh {
						shared = append(shared, p)
					}
				}
				if len(shared) > 0 && rng.IntN(4) != 0 {
					slices.Sort(shared)
					gpa = shared[rng.IntN(len(shared))]
				}
				if !isRAM(gpa) {
					continue
				}
				err := r.pin(gpa)
				if shared := o[gpa]; shared != (err == nil) {
					t.Fatalf("%s: pin of page %#x (shared %v): %v", step, gpa, shared, err)
				}
				if err != nil && !errors.Is(err, unix.EFAULT) {
					t.Fatalf("%s: pin of a private page: %v, want EFAULT", step, err)
				}
			case k < 16:
				for gpa := range r.pins {
					r.unpin(gpa)
					break
				}
			case k < 18:
				r.randomAccess(t, rng, o, step)
			default:
				r.randomDMA(t, rng, o, step)
			}
			r.check(o)
		}
		for gpa := range r.pins {
			r.unpin(gpa)
		}
		if s := r.mem.Stats(); s.Punches != 0 || s.UndoFailures != 0 {
			t.Fatalf("world %d: %d punches, %d undo failures", w, s.Punches, s.UndoFailures)
		}
	}
	t.Logf("%d operations: %d conversions, %d refused for a foreign pin, %d with an injected failure", ops, conversions, refusals, injected)
	if refusals == 0 || injected == 0 {
		t.Errorf("the test never met a refusal (%d) or an injected failure (%d)", refusals, injected)
	}
}

// randomConvert converts a random range and checks the outcome against the
// oracle and the foreign pins. It returns whether it converted, met an
// injected failure, was refused for a pin.
func (r *modelRig) randomConvert(t *testing.T, rng *rand.Rand, o oracle, step string) (converted, injected, refused int) {
	t.Helper()
	gpa := rng.Uint64N(5*mib/page) * page
	size := (1 + rng.Uint64N(48)) * page
	to := memattr.State(rng.IntN(2))
	nonRAM, firstPin, pinned := r.scan(gpa, size)
	arm := rng.IntN(4) == 0
	if arm {
		r.inj.Arm(1 + rng.IntN(8))
	}
	before := r.snap()
	_, err := r.mem.Convert(guestmem.Request{GPA: gpa, Size: size, To: to})
	fired := r.inj.Disarm()
	var pe *guestmem.PinnedError
	switch {
	case nonRAM && to == memattr.Private:
		if !errors.Is(err, guestmem.ErrNotRAM) || fired {
			t.Fatalf("%s: private non-RAM: %v (injected %v)", step, err, fired)
		}
		return 0, 0, 0
	case err == nil:
		if fired {
			t.Fatalf("%s: an injected failure fired but the conversion succeeded", step)
		}
		if to == memattr.Private && pinned {
			t.Fatalf("%s: converted to private over the foreign pin at %#x", step, firstPin)
		}
		o.apply(gpa, size, to)
		return 1, 0, 0
	case errors.As(err, &pe):
		if fired || to != memattr.Private || !pinned || pe.GPA != firstPin {
			t.Fatalf("%s: refused at %#x (injected %v, to %v), first foreign pin %#x (%v): %v", step, pe.GPA, fired, to, firstPin, pinned, err)
		}
		if guestmem.HypercallRet(err) != kvm.HypercallRetEAGAIN {
			t.Fatalf("%s: a refusal answers the guest %d", step, guestmem.HypercallRet(err))
		}
		refused = 1
	case fired && errors.Is(err, errInjected):
		injected = 1
	default:
		t.Fatalf("%s: convert [%#x, +%#x) to %v: unexpected %v (injected %v)", step, gpa, size, to, err, fired)
	}
	after := r.snap()
	if spansBlocks(r.mem, gpa, size) {
		// A request spanning blocks is undone block by block, by converting
		// the finished blocks back: the same pages come back mapped, but an
		// entry the first block's part cut stays cut.
		for i := range r.spaces {
			before.Mappings[i], after.Mappings[i] = randtest.Pages(before.Mappings[i]), randtest.Pages(after.Mappings[i])
		}
	}
	if d := cmp.Diff(before, after); d != "" {
		t.Fatalf("%s: I3: failed conversion [%#x, +%#x) to %v (%v) changed something (-before +after):\n%s", step, gpa, size, to, err, d)
	}
	return 0, injected, refused
}

// scan says what a conversion of [gpa, gpa+size) meets: a page that is
// not RAM, and the first foreign pin (pinned false where there is none).
func (r *modelRig) scan(gpa, size uint64) (nonRAM bool, firstPin uint64, pinned bool) {
	firstPin = ^uint64(0)
	for p := gpa; p < gpa+size; p += page {
		nonRAM = nonRAM || !isRAM(p)
		if r.pins[p] != nil && p < firstPin {
			firstPin, pinned = p, true
		}
	}
	return nonRAM, firstPin, pinned
}

// spansBlocks reports whether [gpa, gpa+size) meets more than one block.
func spansBlocks(m *guestmem.Memory, gpa, size uint64) bool {
	n := 0
	for _, b := range m.Blocks() {
		if b.Range().Overlaps(span.Range{Start: gpa, End: gpa + size}) {
			n++
		}
	}
	return n > 1
}

// randomAccess reads or writes a random range through the host accessor,
// which must refuse a private page before touching it.
func (r *modelRig) randomAccess(t *testing.T, rng *rand.Rand, o oracle, step string) {
	t.Helper()
	gpa := rng.Uint64N(4*mib/page)*page + rng.Uint64N(page)
	buf := make([]byte, 1+rng.IntN(3*page))
	write := rng.IntN(2) == 0
	var err error
	if ferr := kernelmodel.Catch(func() {
		if write {
			_, err = r.mem.WriteAt(buf, int64(gpa))
		} else {
			_, err = r.mem.ReadAt(buf, int64(gpa))
		}
	}); ferr != nil {
		t.Fatalf("%s: the host accessor touched a private page: %v", step, ferr)
	}
	private, nonRAM := false, false
	for p := gpa &^ (page - 1); p < gpa+uint64(len(buf)); p += page {
		private = private || (isRAM(p) && !o[p])
		nonRAM = nonRAM || !isRAM(p)
	}
	if (err == nil) != (!private && !nonRAM) {
		t.Fatalf("%s: access [%#x, +%#x) (private %v, non-RAM %v): %v", step, gpa, len(buf), private, nonRAM, err)
	}
}

// randomDMA has a random device write a random page: it must land exactly
// on shared pages.
func (r *modelRig) randomDMA(t *testing.T, rng *rand.Rand, o oracle, step string) {
	t.Helper()
	if len(r.spaces) == 0 {
		return
	}
	sp := r.spaces[rng.IntN(len(r.spaces))]
	gpa := rng.Uint64N(4*mib/page) * page
	var err error
	if ferr := kernelmodel.Catch(func() { err = sp.DMAWrite(gpa+16, []byte("dma")) }); ferr != nil {
		t.Fatalf("%s: a device reached a private page: %v", step, ferr)
	}
	if want := isRAM(gpa) && o[gpa]; want != (err == nil) {
		t.Fatalf("%s: DMA to %#x (shared %v): %v", step, gpa, want, err)
	}
}

// FuzzInPlace drives conversions, foreign pins and unpins on the kernel
// model from arbitrary bytes (four a step) and checks the invariants after
// each: a refusal only for a foreign pin, naming the first; nothing changed
// by a refusal.
func FuzzInPlace(f *testing.F) {
	f.Add([]byte{0, 4, 4, 1, 1, 5, 0, 0, 2, 4, 4, 1})
	f.Add([]byte{0, 0, 60, 1, 1, 0, 3, 0, 2, 0, 60, 3, 3, 0, 0, 0, 2, 0, 60, 3})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := newModelRig(t, false, iommu.Type1v2)
		o := oracle{}
		for i := 0; i+4 <= len(data) && i < 4*64; i += 4 {
			op, a, b, c := data[i], data[i+1], data[i+2], data[i+3]
			gpa := uint64(a)<<14 + uint64(c&3)<<12 // 16 KiB steps over 4 MiB, any page
			step := fmt.Sprintf("step %d", i/4)
			switch op % 4 {
			case 0, 1:
				size := (1 + uint64(b%64)) * page
				to := memattr.State(op % 2)
				nonRAM, first, pinned := r.scan(gpa, size)
				before := r.snap()
				_, err := r.mem.Convert(guestmem.Request{GPA: gpa, Size: size, To: to})
				var pe *guestmem.PinnedError
				switch {
				case nonRAM && to == memattr.Private:
					if !errors.Is(err, guestmem.ErrNotRAM) {
						t.Fatalf("%s: %v", step, err)
					}
				case err == nil:
					if to == memattr.Private && pinned {
						t.Fatalf("%s: converted over the pin at %#x", step, first)
					}
					o.apply(gpa, size, to)
				case errors.As(err, &pe) && to == memattr.Private && pinned && pe.GPA == first:
					if d := cmp.Diff(before, r.snap()); d != "" {
						t.Fatalf("%s: a refusal changed something:\n%s", step, d)
					}
				default:
					t.Fatalf("%s: convert [%#x, +%#x) to %v: %v (first pin %#x, %v)", step, gpa, size, to, err, first, pinned)
				}
			case 2:
				if !isRAM(gpa) {
					continue
				}
				if err := r.pin(gpa); (err == nil) != o[gpa] {
					t.Fatalf("%s: pin %#x (shared %v): %v", step, gpa, o[gpa], err)
				}
			case 3:
				r.unpin(gpa)
			}
			r.check(o)
		}
		for gpa := range r.pins {
			r.unpin(gpa)
		}
	})
}
