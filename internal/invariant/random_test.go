package invariant_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem/kernelmodel"
	"github.com/gmemproject/gmem/internal/invariant"
	"github.com/gmemproject/gmem/internal/randtest"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/virtiomem"
)

const page = 4096

// errInjected is the error the fault injector makes calls fail with.
var errInjected = errors.New("injected fault")

// stopOnFailure is a slog handler that disarms the injector at the first
// failure a component logs, so an operation sees at most one failure: the
// guarantee of I3 is for single faults (a rollback that fails is reported,
// not repaired).
type stopOnFailure struct{ inj *randtest.Injector }

func (h stopOnFailure) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (h stopOnFailure) Handle(context.Context, slog.Record) error {
	h.inj.Stop()
	return nil
}
func (h stopOnFailure) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h stopOnFailure) WithGroup(string) slog.Handler      { return h }

// listener is one DMA mapper with its own model IOMMU.
type listener struct {
	mapper *dma.Mapper
	space  *iommu.Model
	sec    discard.Section
	// maxExtent is the Extent mapper's bound (dma.Unbounded for none).
	maxExtent uint64
}

// world is the system under test plus the naive oracle.
type world struct {
	t     *testing.T
	rng   *rand.Rand
	pages uint64
	gpa   uint64 // GPA of region offset 0
	host  []byte

	m      *discard.Manager
	attrs  *memattr.Attributes
	vmem   *virtiomem.Device
	vmemOn bool // the virtio-mem source is added to the manager
	// vmemChecked says whether map calls must find pages plugged: false
	// from the moment the source starts being removed.
	vmemChecked bool
	block       uint64
	inPlace     bool
	inj         *randtest.Injector
	// file is the kernel's side of an in-place world: a model guest_memfd
	// with its own attributes, pinned by the listeners' IOMMUs and by
	// foreign pins (pins, by page, with their unpin).
	file *kernelmodel.GuestMemfd
	pins map[uint64]func()
	// refusals counts conversions the kernel refused for a foreign pin.
	refusals int

	listeners []*listener

	// oracle
	shared  []bool
	plugged []bool // per page; all true when there is no virtio-mem
	ops     int
	// cutCalls counts the cut requests of unregistered mappers.
	cutCalls uint64
}

// cuts returns the cut requests the world's mappers sent so far.
func (w *world) cuts() uint64 {
	n := w.cutCalls
	for _, l := range w.listeners {
		n += l.mapper.Stats().CutCalls
	}
	return n
}

// backend is the memattr Backend of the test: it injects faults and checks
// I2 between phases: when pages are released, or made private in place, no
// device may reach them.
type backend struct{ w *world }

func (b backend) SetAttributes(runs []span.Range, to memattr.State) error {
	if err := b.w.inj.Call(); err != nil {
		return err
	}
	if !b.w.inPlace {
		return nil
	}
	if to == memattr.Private {
		b.w.assertUnreachable(runs, "in-place conversion to private")
	}
	for i, r := range runs {
		a := kvm.MemoryAttributes2{Offset: r.Start, Size: r.Len()}
		if to == memattr.Private {
			a.Attributes = kvm.MemoryAttributePrivate
		}
		if err := b.w.file.SetMemoryAttributes2(a); err != nil {
			// One failure an operation: the undo must not meet another.
			b.w.inj.Stop()
			for _, done := range runs[:i] {
				undo := kvm.MemoryAttributes2{Offset: done.Start, Size: done.Len()}
				if to == memattr.Shared {
					undo.Attributes = kvm.MemoryAttributePrivate
				}
				if uerr := b.w.file.SetMemoryAttributes2(undo); uerr != nil {
					b.w.t.Fatalf("op %d: undoing the kernel's attributes: %v", b.w.ops, uerr)
				}
			}
			return err
		}
	}
	return nil
}

func (b backend) Release(runs []span.Range, to memattr.State) error {
	if err := b.w.inj.Call(); err != nil {
		return err
	}
	if to == memattr.Private {
		b.w.assertUnreachable(runs, "release of the shared backing")
	}
	return nil
}

// assertUnreachable fails the test if any listener's IOMMU maps part of runs.
func (w *world) assertUnreachable(runs []span.Range, when string) {
	for _, l := range w.listeners {
		for _, r := range runs {
			sec, ok := l.sec.Intersect(r)
			if !ok {
				continue
			}
			if got := invariant.Within(l.space.Mappings(), sec.GPARange()); len(got) > 0 {
				w.t.Fatalf("op %d: I2: %s of %v while IOVA %v is still mapped", w.ops, when, r, got)
			}
		}
	}
}

func newWorld(t *testing.T, seed uint64) *world {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	w := &world{t: t, rng: rng, inj: &randtest.Injector{Err: errInjected}}
	w.block = page << rng.IntN(4) // 4 KiB .. 32 KiB blocks
	w.pages = (w.block / page) * uint64(4+rng.IntN(60))
	w.gpa = uint64(rng.IntN(16)) << 20
	w.host = make([]byte, w.pages*page)
	w.inPlace = rng.IntN(2) == 0
	w.m = discard.New(w.pages*page, nil)
	var err error
	w.attrs, err = memattr.New(w.m, memattr.Config{Backend: backend{w}, InPlace: w.inPlace, Bitmap: rng.IntN(4) == 0})
	if err != nil {
		t.Fatal(err)
	}
	w.shared = make([]bool, w.pages)
	w.plugged = make([]bool, w.pages)
	if w.inPlace {
		if w.file, err = kernelmodel.NewGuestMemfd(w.pages*page, false); err != nil {
			t.Fatal(err)
		}
		// An INIT_SHARED file starts shared; the region starts private.
		if err := w.file.SetMemoryAttributes2(kvm.MemoryAttributes2{Size: w.pages * page, Attributes: kvm.MemoryAttributePrivate}); err != nil {
			t.Fatal(err)
		}
		w.pins = map[uint64]func(){}
	}
	if rng.IntN(2) == 0 {
		w.vmem, err = virtiomem.New(w.m, virtiomem.Config{BlockSize: w.block, Release: func([]span.Range) error { return w.inj.Call() }})
		if err != nil {
			t.Fatal(err)
		}
		w.vmemOn, w.vmemChecked = true, true
	} else {
		for i := range w.plugged {
			w.plugged[i] = true
		}
	}
	return w
}

// populated is the oracle's answer for one page.
func (w *world) populated(p uint64) bool {
	return w.shared[p] && (w.plugged[p] || !w.vmemOn)
}

// randomRange returns a page-aligned byte range of the region, sometimes
// invalid (unaligned, empty, out of bounds) when bad is true.
func (w *world) randomRange(unit uint64, bad bool) (off, size uint64) {
	units := w.pages * page / unit
	a := uint64(w.rng.IntN(int(units)))
	n := 1 + uint64(w.rng.IntN(int(min(units-a, 1+units/4))))
	if w.rng.IntN(8) == 0 {
		a, n = 0, units
	}
	off, size = a*unit, n*unit
	if bad {
		switch w.rng.IntN(4) {
		case 0:
			off++
		case 1:
			size = 0
		case 2:
			size += unit
			off = w.pages*page - size + unit
		case 3:
			size = ^uint64(0) - off + 2
		}
	}
	return off, size
}

// snapshot is what I3 compares before and after a failed operation.
type snapshot struct {
	shared, plugged []bool
	mapped          [][]iommu.Mapping
	entries         []uint64
	cut             []bool // the listener's policy is Cut
}

func (w *world) snap() snapshot {
	s := snapshot{shared: slices.Clone(w.shared), plugged: slices.Clone(w.plugged)}
	for _, l := range w.listeners {
		s.mapped = append(s.mapped, l.space.Mappings())
		s.entries = append(s.entries, l.mapper.Stats().Entries)
		s.cut = append(s.cut, l.mapper.Policy() == dma.Cut)
	}
	return s
}

// sameI3 reports whether the listeners' IOMMUs hold what they held in s, as
// I3 requires: the very entries, or for the Cut policy the same pages (an
// undone cut maps the pages it removed as areas of their own: the kernel
// cannot join areas).
func (s snapshot) sameI3(after snapshot) bool {
	if len(s.mapped) != len(after.mapped) {
		return false
	}
	for i := range s.mapped {
		if s.cut[i] {
			if !slices.Equal(randtest.Pages(s.mapped[i]), randtest.Pages(after.mapped[i])) {
				return false
			}
			continue
		}
		if !slices.Equal(s.mapped[i], after.mapped[i]) || s.entries[i] != after.entries[i] {
			return false
		}
	}
	return true
}

// check asserts I1, I2 and I4 against the oracle, and that each mapper's
// table equals its IOMMU's.
func (w *world) check() {
	t := w.t
	t.Helper()
	for p := uint64(0); p < w.pages; p++ {
		if got := w.attrs.Get(p * page); (got == memattr.Shared) != w.shared[p] {
			t.Fatalf("op %d: I4: page %d is %v, oracle shared=%v", w.ops, p, got, w.shared[p])
		}
		if w.vmem != nil {
			r := span.Range{Start: p * page, End: (p + 1) * page}
			if w.vmem.IsPlugged(r) != w.plugged[p] {
				t.Fatalf("op %d: I4: page %d plugged=%v, oracle %v", w.ops, p, !w.plugged[p], w.plugged[p])
			}
		}
	}
	if w.inPlace {
		for p := uint64(0); p < w.pages; p++ {
			if priv := w.file.Private(span.Range{Start: p * page, End: (p + 1) * page}); priv == w.shared[p] {
				t.Fatalf("op %d: the kernel has page %d private=%v, oracle shared=%v", w.ops, p, priv, w.shared[p])
			}
		}
	}
	for i, l := range w.listeners {
		got := l.space.Mappings()
		if diff := slices.Compare(mappingKeys(got), mappingKeys(l.mapper.Entries())); diff != 0 {
			t.Fatalf("op %d: listener %d: mapper table %v != IOMMU %v", w.ops, i, l.mapper.Entries(), got)
		}
		var want []iommu.Mapping
		for p := l.sec.Offset / page; p < (l.sec.Offset+l.sec.Size)/page; p++ {
			if w.populated(p) {
				want = append(want, iommu.Mapping{IOVA: l.sec.GPA + (p*page - l.sec.Offset), Size: page})
			}
		}
		if have := randtest.Pages(got); !slices.Equal(have, want) {
			t.Fatalf("op %d: I1/I2: listener %d (%v, %v) maps %v, oracle wants %v", w.ops, i, l.sec, l.mapper.Policy(), have, want)
		}
		if err := invariant.Mapped(w.m, l.sec, got); err != nil {
			t.Fatalf("op %d: listener %d: %v", w.ops, i, err)
		}
		if l.mapper.Policy() == dma.Granule {
			for _, x := range got {
				if x.Size > page {
					t.Fatalf("op %d: granule mapper holds a %#x-byte entry", w.ops, x.Size)
				}
			}
		}
	}
}

func mappingKeys(ms []iommu.Mapping) []uint64 {
	out := make([]uint64, 0, 2*len(ms))
	for _, m := range ms {
		out = append(out, m.IOVA, m.Size)
	}
	return out
}

// addListener registers a new mapper on a random section: on type1 (with
// or without a small entry limit), on iommufd, or on iommufd that cuts,
// with the default policy (Cut where the space cuts, else Extent) or an
// explicit one.
func (w *world) addListener() error {
	rules := iommu.Type1v2
	var limit uint64
	cut := false
	if w.rng.IntN(2) == 0 {
		rules = iommu.IOMMUFD
		cut = w.rng.IntN(3) != 0
	} else if w.rng.IntN(2) == 0 {
		limit = uint64(2 + w.rng.IntN(24))
	}
	space := iommu.NewModel(iommu.Caps{Rules: rules, EntryLimit: limit, Cut: cut})
	w.hookMaps(space)
	if w.inPlace {
		// IOVA = GPA = w.gpa + region offset = w.gpa + file offset.
		w.file.AddPinner(kernelmodel.IOMMUPins(space, w.gpa))
	}
	policy := dma.Auto
	switch w.rng.IntN(6) {
	case 0, 1:
		policy = dma.Granule
	case 2:
		policy = dma.Extent
	case 3:
		if cut {
			policy = dma.Cut
		}
	}
	maxExtent := uint64(dma.Unbounded)
	if w.rng.IntN(2) == 0 {
		maxExtent = page << w.rng.IntN(5)
	}
	mapper, err := dma.New(space, w.host, dma.Options{Policy: policy, MaxExtent: maxExtent, Logger: slog.New(stopOnFailure{w.inj})})
	if err != nil {
		w.t.Fatal(err)
	}
	off, size := w.randomRange(page, false)
	if w.rng.IntN(10) == 0 {
		size = 0
	}
	sec := discard.Section{Offset: off, Size: size, GPA: w.gpa + off}
	if err := w.m.Register(mapper, sec); err != nil {
		return err
	}
	w.listeners = append(w.listeners, &listener{mapper: mapper, space: space, sec: sec, maxExtent: maxExtent})
	return nil
}

// hookMaps makes every map call of space check I2 at that moment (the pages
// must already count as shared and plugged) and pass through the injector.
func (w *world) hookMaps(space *iommu.Model) {
	space.SetFault(func(c iommu.Call) error {
		if err := w.inj.Call(); err != nil {
			return err
		}
		if c.Op == iommu.OpMap {
			r := span.Range{Start: c.IOVA - w.gpa, End: c.IOVA - w.gpa + c.Size}
			if !w.attrs.IsShared(r) || (w.vmemChecked && !w.vmem.IsPlugged(r)) {
				w.t.Errorf("op %d: I2: mapping IOVA %#x size %#x of a page not shared and plugged", w.ops, c.IOVA, c.Size)
			}
		}
		return nil
	})
}

// pinStep pins or unpins a random page of an in-place world as a foreign
// user would: the pin must succeed exactly on shared pages.
func (w *world) pinStep() {
	p := uint64(w.rng.IntN(int(w.pages)))
	if unpin := w.pins[p]; unpin != nil && w.rng.IntN(2) == 0 {
		unpin()
		delete(w.pins, p)
		return
	}
	unpin, err := w.file.Pin(p*page, page)
	if (err == nil) != w.shared[p] {
		w.t.Fatalf("op %d: foreign pin of page %d (shared %v): %v", w.ops, p, w.shared[p], err)
	}
	if err == nil {
		if old := w.pins[p]; old != nil {
			old()
		}
		w.pins[p] = unpin
	}
}

// firstPin returns the first foreign-pinned page in [off, off+size).
func (w *world) firstPin(off, size uint64) (uint64, bool) {
	first, ok := ^uint64(0), false
	for p := range w.pins {
		if p*page >= off && p*page < off+size && p < first {
			first, ok = p, true
		}
	}
	return first, ok
}

// step runs one random operation and checks the invariants after it.
func (w *world) step() {
	w.ops++
	if w.inPlace && w.rng.IntN(8) == 0 {
		w.pinStep()
		w.check()
		return
	}
	before := w.snap()
	inject := w.rng.IntN(6) == 0
	if inject {
		w.inj.Arm(1 + w.rng.IntN(6))
	}
	var err error
	var apply func() // updates the oracle when the operation succeeds
	what := ""
	expectErr := false
	// changes is the range of region offsets the operation is asked to
	// change, for I5; nil when the operation changes pages all over.
	var changes *span.Range
	// refusable says the kernel may refuse the operation for a foreign pin
	// at page pinned.
	refusable, pinned := false, uint64(0)
	measured := slices.Clone(w.listeners)
	counted := make([]dma.Stats, len(measured))
	for i, l := range measured {
		l.space.BeginOp()
		counted[i] = l.mapper.Stats()
	}
	switch k := w.rng.IntN(20); {
	case k < 10: // convert
		bad := w.rng.IntN(12) == 0
		off, size := w.randomRange(page, bad)
		changes = &span.Range{Start: off, End: off + size}
		to := memattr.State(w.rng.IntN(2))
		expectErr = bad
		if w.inPlace && to == memattr.Private && !bad {
			pinned, refusable = w.firstPin(off, size)
		}
		err = w.attrs.Convert(off, size, to)
		what = fmt.Sprintf("convert %#x+%#x to %v", off, size, to)
		apply = func() {
			for p := off / page; p < (off+size)/page; p++ {
				w.shared[p] = to == memattr.Shared
			}
		}
		if bad && err != nil && !errors.Is(err, span.ErrAlign) && !errors.Is(err, span.ErrEmpty) &&
			!errors.Is(err, span.ErrBounds) && !errors.Is(err, span.ErrOverflow) {
			w.t.Fatalf("op %d: invalid convert [%#x+%#x) gave an untyped error: %v", w.ops, off, size, err)
		}
	case k < 14 && w.vmem != nil: // plug / unplug
		bad := w.rng.IntN(12) == 0
		off, size := w.randomRange(w.block, bad)
		changes = &span.Range{Start: off, End: off + size}
		plug := w.rng.IntN(2) == 0
		expectErr = bad
		what = fmt.Sprintf("plug=%v %#x+%#x", plug, off, size)
		if plug {
			err = w.vmem.Plug(off, size)
		} else {
			err = w.vmem.Unplug(off, size)
		}
		apply = func() {
			for p := off / page; p < (off+size)/page; p++ {
				w.plugged[p] = plug
			}
		}
	case k < 16 && w.vmem != nil: // remove or re-add the virtio-mem source
		what = "add/remove source"
		if w.vmemOn {
			w.vmemChecked = false
			err = w.m.RemoveSource(w.vmem.Source())
			if err != nil {
				w.vmemChecked = true
			}
		} else {
			err = w.m.AddSource(w.vmem.Source())
		}
		apply = func() { w.vmemOn = !w.vmemOn; w.vmemChecked = w.vmemOn }
	case k < 18: // register
		if len(w.listeners) >= 3 {
			break
		}
		what = "register"
		err = w.addListener()
		apply = func() {}
	default: // unregister
		if len(w.listeners) == 0 {
			break
		}
		i := w.rng.IntN(len(w.listeners))
		what = "unregister"
		err = w.m.Unregister(w.listeners[i].mapper)
		apply = func() {
			if got := w.listeners[i].space.Len(); got != 0 {
				w.t.Fatalf("op %d: unregistered listener still has %d entries", w.ops, got)
			}
			w.cutCalls += w.listeners[i].mapper.Stats().CutCalls
			w.listeners = slices.Delete(w.listeners, i, i+1)
		}
	}
	fired := w.inj.Disarm()
	for i, l := range measured {
		w.checkWindow(l, changes, err == nil, counted[i])
	}
	switch {
	case err == nil && expectErr:
		w.t.Fatalf("op %d: an invalid request succeeded", w.ops)
	case err == nil && fired:
		w.t.Fatalf("op %d: an injected fault fired but the operation (%s) succeeded", w.ops, what)
	case err == nil && refusable:
		w.t.Fatalf("op %d: %s went through although page %d is pinned", w.ops, what, pinned)
	case err == nil:
		if apply != nil {
			apply()
		}
	default:
		// I3: nothing changed.
		var pe *kvm.PinnedError
		switch {
		case errors.As(err, &pe):
			if !refusable || pe.Offset != pinned*page || fired {
				w.t.Fatalf("op %d: %s refused at offset %#x (first foreign pin: page %d, %v; injected %v): %v", w.ops, what, pe.Offset, pinned, refusable, fired, err)
			}
			w.refusals++
		case !errors.Is(err, errInjected) && !errors.Is(err, unix.ENOSPC) && !expectErr:
			w.t.Fatalf("op %d: unexpected error: %v", w.ops, err)
		}
		after := w.snap()
		if !slices.Equal(before.shared, after.shared) || !slices.Equal(before.plugged, after.plugged) {
			w.t.Fatalf("op %d: I3: a failed operation changed the oracle", w.ops)
		}
		if !before.sameI3(after) {
			w.t.Fatalf("op %d: I3: failed operation (%v) changed the IOMMU entries:\nbefore %v\nafter  %v", w.ops, err, before.mapped, after.mapped)
		}
	}
	w.check()
	w.dmaProbe()
}

// checkWindow asserts I5 for one listener after an operation asked to change
// the region offsets in changes (nil: anywhere): the window its model
// measured, the memory hidden from the device for a moment although the
// operation leaves it mapped, lies inside what the operation changes
// (Granule), or inside the MaxExtent chunks that meet it (bounded Extent).
// An unbounded Extent mapper promises no bound. For every mapper that
// succeeded, the window it counted itself is at least the model's.
//
// The Cut policy has no window at all: every operation of its mapper counts
// window and re-pinned bytes of 0, and the model measures none for a step
// that succeeded. (A step that failed may map again pages its cut removed,
// when the manager reverts the listener: that is inside what the step was
// asked to change, as for Granule.)
func (w *world) checkWindow(l *listener, changes *span.Range, ok bool, before dma.Stats) {
	hidden, repinned := l.space.EndOp()
	var window uint64
	for _, r := range hidden {
		window += r.Len()
	}
	st := l.mapper.Stats()
	if counted := st.WindowBytes - before.WindowBytes; ok && counted < window {
		w.t.Fatalf("op %d: the model measured a window of %#x bytes, the mapper counted %#x", w.ops, window, counted)
	}
	if l.mapper.Policy() == dma.Cut {
		if st.WindowBytes != before.WindowBytes || st.RepinnedBytes != before.RepinnedBytes || st.MaxWindow != 0 {
			w.t.Fatalf("op %d: I5: the cut mapper counted a window of %#x bytes, %#x re-pinned", w.ops, st.WindowBytes-before.WindowBytes, st.RepinnedBytes-before.RepinnedBytes)
		}
		if ok && (window != 0 || repinned != 0) {
			w.t.Fatalf("op %d: I5: the model measured a window %v (%#x re-pinned) for a cut mapper's successful operation", w.ops, hidden, repinned)
		}
	}
	if changes == nil || len(hidden) == 0 {
		return
	}
	allowed := span.Range{Start: w.gpa + changes.Start, End: w.gpa + changes.End}
	bound := "the range it changes"
	if l.mapper.Policy() == dma.Extent {
		if l.maxExtent == dma.Unbounded {
			return
		}
		// Chunks are aligned in region offsets; IOVA = GPA = w.gpa + offset.
		c := l.maxExtent
		start := changes.Start &^ (c - 1)
		end := changes.End
		if end%c != 0 {
			end = end&^(c-1) + c
		}
		allowed = span.Range{Start: w.gpa + start, End: w.gpa + end}
		bound = fmt.Sprintf("its %#x-byte chunks", c)
	}
	for _, r := range hidden {
		if !allowed.ContainsRange(r) {
			w.t.Fatalf("op %d: I5: %v mapper hid %v from the device during an operation on %v, outside %s (%v)", w.ops, l.mapper.Policy(), r, *changes, bound, allowed)
		}
	}
}

// dmaProbe has a device of a random listener write and read a random page:
// it must succeed exactly on populated pages of its section, and a blocked
// write must leave memory untouched.
func (w *world) dmaProbe() {
	if len(w.listeners) == 0 || w.rng.IntN(4) != 0 {
		return
	}
	l := w.listeners[w.rng.IntN(len(w.listeners))]
	p := uint64(w.rng.IntN(int(w.pages)))
	iova := w.gpa + p*page
	inSection := l.sec.Range().Contains(p * page)
	want := inSection && w.populated(p)
	old := slices.Clone(w.host[p*page : p*page+64])
	msg := []byte(fmt.Sprintf("dma %d", w.ops))
	err := l.space.DMAWrite(iova+8, msg)
	switch {
	case want && err != nil:
		w.t.Fatalf("op %d: device cannot reach populated page %d: %v", w.ops, p, err)
	case !want && err == nil:
		w.t.Fatalf("op %d: device reached page %d (shared=%v plugged=%v in section=%v)", w.ops, p, w.shared[p], w.plugged[p], inSection)
	case !want:
		if !errors.Is(err, iommu.ErrFault) {
			w.t.Fatalf("op %d: blocked DMA returned %v, want a DMA fault", w.ops, err)
		}
		if !slices.Equal(old, w.host[p*page:p*page+64]) {
			w.t.Fatalf("op %d: a blocked DMA write changed memory", w.ops)
		}
	default:
		buf := make([]byte, len(msg))
		if err := l.space.DMARead(iova+8, buf); err != nil || string(buf) != string(msg) {
			w.t.Fatalf("op %d: DMA read back %q, %v; want %q", w.ops, buf, err, msg)
		}
	}
}

// opsBudget returns how many operations the randomized test runs in total:
// GMEM_RANDOM_OPS if set (CI sets 1,000,000), else a quick default.
func opsBudget(t *testing.T) int {
	return randtest.Ops{Short: 20_000, Full: 100_000}.Count(t)
}

// TestRandomized drives random regions, sections, listeners (every policy,
// both IOMMU rule sets, small type1 entry limits, iommufd spaces that cut),
// conversions, plug/unplug, source removal, register/unregister and
// injected faults at every backend call (IOMMU map, unmap and cut included),
// and checks I1-I5 against the oracle after every step. Half the worlds
// convert in place on the kernel model (guestmem/kernelmodel): the
// listeners' IOMMUs and random foreign pins pin pages, the kernel refuses a
// conversion to private over a pin, and its attributes are checked too.
// Worlds are short-lived so many shapes are covered.
func TestRandomized(t *testing.T) {
	total := opsBudget(t)
	const perWorld = 400
	worlds := (total + perWorld - 1) / perWorld
	const workers = 2
	for g := range workers {
		t.Run(fmt.Sprintf("worker%d", g), func(t *testing.T) {
			t.Parallel()
			n, inPlace, refusals := 0, 0, 0
			var cuts uint64
			for i := g; i < worlds; i += workers {
				seed := uint64(i) + 1
				w := newWorld(t, seed)
				for range perWorld {
					w.step()
					if t.Failed() {
						t.Fatalf("world seed %d failed", seed)
					}
				}
				n += perWorld
				if w.inPlace {
					inPlace += perWorld
					refusals += w.refusals
				}
				cuts += w.cuts()
			}
			t.Logf("%d operations, %d in place on the kernel model, %d conversions refused for a foreign pin, %d cut requests", n, inPlace, refusals, cuts)
			if n >= 10*perWorld && cuts == 0 {
				t.Fatal("no mapper of the cut policy cut anything")
			}
		})
	}
}
