//go:build linux

package replay

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/guestmem/kernelmodel"
	"github.com/gmemproject/gmem/internal/invariant"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/trace"
)

// run is one of the two replays: a guestmem.Memory configured as the
// baseline or as gmem, and the devices attached to it.
type run struct {
	rp       *Replayer
	name     string
	baseline bool
	// shadow says the run replays requests with no type1 entry limit, for
	// the entries the trace needs: no checks, no timing, type1 devices
	// only.
	shadow bool
	// shadowErr is the first error of a shadow's attach (there should be
	// none: nothing limits it); its peak is then unknown.
	shadowErr error

	mem     *guestmem.Memory
	inPlace bool
	// files are the blocks' kernel-model guest_memfds (Options.KernelModel),
	// by block GPA.
	files   map[uint64]*kernelmodel.GuestMemfd
	devices map[string]*device
	order   []*device // attached devices in attach order

	// Counters of mappers no longer attached (detached devices), so that
	// map and unmap calls are never lost.
	goneMaps, goneUnmaps, goneCuts, goneSplits uint64
	goneCosts                                  RunStats
	// policies is how each device was mapped, in the order of first
	// attach.
	policies []DevicePolicy

	privateRefused uint64
	// computedState is the size of the bitmaps a baseline past the budget
	// did not allocate, or 0.
	computedState uint64

	failures, limitFailures uint64
	elapsed                 time.Duration
	peak                    uint64
	devicePeak              uint64 // most entries of one device after any event
	timeline                series // entries of the busiest device

	// What the entry limit refused: requests and attaches, and the first.
	refusedNoEntries uint64
	firstNoEntries   *Rejection
}

// device is one assigned device of one run: its IOMMU and the attachment
// that keeps it equal to the shared, plugged pages.
type device struct {
	name  string
	model *iommu.Model
	att   *guestmem.Attachment
}

func newRun(rp *Replayer, name string, baseline, shadow bool) *run {
	return &run{rp: rp, name: name, baseline: baseline, shadow: shadow, devices: map[string]*device{}}
}

// noEntries records a refusal for want of IOMMU entries in the current
// event.
func (r *run) noEntries(err error) {
	r.refusedNoEntries++
	if r.firstNoEntries == nil {
		r.firstNoEntries = &Rejection{Event: r.rp.events, Line: r.rp.line, Run: r.name, Reason: ReasonNoEntries, Detail: err.Error()}
	}
}

// start creates the run's memory: one model-backed block per RAM event, the
// MMIO holes, and, for the baseline, QEMU's bitmaps. The executor's backend
// calls go through observe, which checks I2 between the steps.
func (r *run) start(ram []trace.RAM, mmio []trace.MMIO) error {
	mode := guestmem.Split
	if len(ram) > 0 && ram[0].Mode == trace.InPlace {
		mode = guestmem.InPlace
	}
	cfg := guestmem.Config{Mode: mode, Bitmap: r.baseline, Logger: r.rp.log, Inject: r.observe}
	switch {
	case r.shadow:
		// The entries are the policy's: runs do, and nothing is checked.
		cfg.Bitmap, cfg.Inject = false, nil
	case r.baseline && bitmapBytes(ram) > r.rp.opts.BitmapBudget:
		cfg.Bitmap, r.computedState = false, bitmapBytes(ram)
	}
	kernel := mode == guestmem.InPlace && r.rp.opts.KernelModel
	if kernel {
		cfg.VM = kernelmodel.NewVM()
		r.files = map[uint64]*kernelmodel.GuestMemfd{}
	}
	for _, e := range ram {
		var b guestmem.Backing
		var err error
		if kernel {
			var g *kernelmodel.GuestMemfd
			g, err = kernelmodel.NewGuestMemfd(e.Size, false)
			r.files[e.GPA], b = g, g
		} else {
			b, err = guestmem.NewModelBacking(e.Size, mode)
		}
		if err != nil {
			return err
		}
		cfg.Blocks = append(cfg.Blocks, guestmem.BlockConfig{Name: e.Name, GPA: e.GPA, Size: e.Size, Backing: b, Hotplug: e.Block})
	}
	for i, e := range mmio {
		cfg.MMIO = append(cfg.MMIO, guestmem.Hole{Name: fmt.Sprintf("mmio%d", i), GPA: e.GPA, Size: e.Size})
	}
	m, err := guestmem.New(cfg)
	if err != nil {
		return err
	}
	r.mem, r.inPlace = m, mode == guestmem.InPlace
	return nil
}

// bitmapBytes is the size of QEMU's bitmaps for the RAM blocks: one bit
// per 4 KiB page, and one per plug block of a hot-pluggable block, in whole
// 64-bit words (guestmem.Config.Bitmap allocates exactly these;
// TestBitmapBytes compares).
func bitmapBytes(ram []trace.RAM) uint64 {
	words := func(bits uint64) uint64 { return (bits + 63) / 64 * 8 }
	var n uint64
	for _, e := range ram {
		n += words(e.Size / trace.PageSize)
		if e.Block != 0 {
			n += words(e.Size / e.Block)
		}
	}
	return n
}

// attach attaches the device's IOMMU, which maps what is shared. If the
// executor refuses (out of entries for what is shared already, or options
// the mapper does not take), the device is not attached in this run.
func (r *run) attach(e trace.Attach) error {
	caps := iommu.Caps{Rules: iommu.Type1v2, EntryLimit: e.Limit}
	opts := r.rp.opts.dmaOptions(r.baseline, r.rp.log)
	switch {
	case e.IOMMU == trace.IOMMUFD:
		caps = r.rp.opts.iommufdCaps(r.baseline)
	case r.shadow:
		// type1 with no limit to speak of, and no entries kept back.
		caps.EntryLimit, opts.SplitReserve = math.MaxUint64, dma.NoReserve
	}
	model := iommu.NewModel(caps)
	model.SetFault(r.rp.fault)
	att, err := r.mem.AttachIOMMU(model, opts)
	if err != nil {
		if n := model.Len(); n != 0 {
			r.rp.violate(r.name, "I3", "refused attach of %q left %d IOMMU entries", e.Dev, n)
		}
		return fmt.Errorf("could not attach %q: %w", e.Dev, err)
	}
	for gpa, g := range r.files {
		g.AddPinner(kernelmodel.IOMMUPins(model, gpa))
	}
	d := &device{name: e.Dev, model: model, att: att}
	r.devices[e.Dev] = d
	r.order = append(r.order, d)
	p := DevicePolicy{Dev: e.Dev, IOMMU: e.IOMMU.String(), Cut: caps.Cut, Policy: att.Policy().String()}
	if i := slices.IndexFunc(r.policies, func(x DevicePolicy) bool { return x.Dev == e.Dev }); i >= 0 {
		r.policies[i] = p
	} else {
		r.policies = append(r.policies, p)
	}
	return nil
}

// detach detaches the device. A device whose attach this run refused is not
// there, which is not an error.
func (r *run) detach(name string) error {
	d := r.devices[name]
	if d == nil {
		return nil
	}
	mappers := d.att.Mappers()
	if err := d.att.Detach(); err != nil {
		r.rp.violate(r.name, "I1", "detaching %q: %v", name, err)
	}
	for _, m := range mappers {
		s := m.Stats()
		r.goneMaps += s.MapCalls
		r.goneUnmaps += s.UnmapCalls
		r.goneCuts += s.CutCalls
		r.goneSplits += s.Splits
		r.goneCosts.addCosts(s)
	}
	if n := d.model.Len(); n != 0 {
		r.rp.violate(r.name, "I1", "detached device %q still has %d IOMMU entries", name, n)
	}
	delete(r.devices, name)
	r.order = slices.DeleteFunc(r.order, func(x *device) bool { return x == d })
	return nil
}

// convert hands the request to the executor.
func (r *run) convert(e trace.Convert) error {
	to := memattr.Shared
	if e.To == trace.Private {
		to = memattr.Private
	}
	_, err := r.mem.Convert(guestmem.Request{GPA: e.GPA, Size: e.Size, To: to})
	var pe *guestmem.PinnedError
	if errors.As(err, &pe) {
		r.rp.violate(r.name, "I2", "the kernel refused to make GPA %#x private: a device still mapped it (%v)", pe.GPA, err)
	}
	return err
}

// observe is the executor's hook before every backend call: it checks I2
// between the steps of a change (no device maps a page being made private
// in place, nor one whose shared memory is being discarded) and lets the
// call go ahead.
func (r *run) observe(f guestmem.Fault) error {
	switch {
	case f.Op == guestmem.OpSetAttributes && f.To == memattr.Private && r.inPlace:
		r.unreachable(f.GPA, "in-place conversion to private")
	case f.Op == guestmem.OpPunch && f.File == guestmem.SharedSide.String():
		r.unreachable(f.GPA, "discard of the shared memory")
	}
	return nil
}

// unreachable records an I2 violation if any device maps part of g.
func (r *run) unreachable(g span.Range, when string) {
	for _, d := range r.order {
		if got := d.model.MappingsIn(g); len(got) > 0 {
			r.rp.violate(r.name, "I2", "%s of %v while device %q maps IOVA %#x+%#x", when, g, d.name, got[0].IOVA, got[0].Size)
			return
		}
	}
}

// window returns g grown to cover the entries of every device that meet it:
// what an event on g can change.
func (r *run) window(g span.Range) span.Range {
	w := g
	for _, d := range r.order {
		h := hull(d.model, g)
		w.Start, w.End = min(w.Start, h.Start), max(w.End, h.End)
	}
	return w
}

// checkMapped checks I1 and I2 for every device within the guest physical
// window w.
func (r *run) checkMapped(w span.Range) {
	for _, d := range r.order {
		r.checkDevice(d, w)
	}
}

// checkDevice checks I1 and I2 for the device within w, block by block, and
// that its mappers hold as many entries as its IOMMU.
func (r *run) checkDevice(d *device, w span.Range) {
	for _, b := range r.mem.Blocks() {
		x := b.Range().Intersect(w)
		if x.Empty() {
			continue
		}
		sec, _ := b.Section().Intersect(span.Range{Start: x.Start - b.GPA(), End: x.End - b.GPA()})
		if err := invariant.Mapped(b.Manager(), sec, d.model.MappingsIn(x)); err != nil {
			inv := "I1"
			var v *invariant.Violation
			if errors.As(err, &v) {
				inv = v.Invariant
			}
			r.rp.violate(r.name, inv, "device %q, RAM block %q: %v", d.name, b.Name(), err)
		}
	}
	if n, entries := uint64(d.model.Len()), d.att.Stats().Entries; n != entries {
		r.rp.violate(r.name, "I1", "device %q: mappers hold %d entries, its IOMMU %d", d.name, entries, n)
	}
}

// afterEvent records the entries after an event: the total for the peak,
// the busiest device's for the timeline (the type1 limit is per device).
func (r *run) afterEvent() {
	var total, busiest uint64
	for _, d := range r.order {
		n := uint64(d.model.Len())
		total += n
		busiest = max(busiest, n)
	}
	r.peak = max(r.peak, total)
	r.devicePeak = max(r.devicePeak, busiest)
	if !r.shadow {
		r.timeline.add(busiest)
	}
}

// finish checks every device over the whole guest with the library's own
// check, and that the mappers' tables together hold exactly the IOMMU's
// entries.
func (r *run) finish() {
	for _, b := range r.mem.Blocks() {
		g := r.files[b.GPA()]
		if g == nil {
			continue
		}
		var want []span.Range
		for _, run := range b.StateRuns() {
			if run.State == memattr.Private {
				want = append(want, span.Range{Start: run.GPA.Start - b.GPA(), End: run.GPA.End - b.GPA()})
			}
		}
		if got := g.PrivateRuns(); !slices.Equal(got, want) {
			r.rp.violate(r.name, "I4", "block %s: the kernel holds %d private runs, the state %d different ones", b.Name(), len(got), len(want))
		}
	}
	for _, d := range r.order {
		r.checkDevice(d, span.Range{Start: 0, End: ^uint64(0)})
		if err := d.att.Check(); err != nil {
			inv := "I1"
			var v *guestmem.Violation
			if errors.As(err, &v) {
				inv = v.Invariant
			}
			r.rp.violate(r.name, inv, "device %q: %v", d.name, err)
		}
		var have []iommu.Mapping
		for _, m := range d.att.Mappers() {
			have = append(have, m.Entries()...)
		}
		slices.SortFunc(have, func(a, b iommu.Mapping) int { return cmp.Compare(a.IOVA, b.IOVA) })
		if want := d.model.Mappings(); !slices.Equal(have, want) {
			r.rp.violate(r.name, "I1", "device %q: the mappers hold %d IOMMU entries, the IOMMU %d different ones", d.name, len(have), len(want))
		}
	}
}

// hull returns r grown to cover every entry of m that meets it.
func hull(m *iommu.Model, r span.Range) span.Range {
	for _, x := range m.MappingsIn(r) {
		r.Start = min(r.Start, x.IOVA)
		r.End = max(r.End, x.IOVA+x.Size)
	}
	return r
}

// stateRun is a maximal run of one kind of guest RAM: shared, private or
// unplugged.
type stateRun struct {
	r    span.Range
	kind guestmem.Kind
}

// state returns the kinds of RAM in g (page aligned, below MaxGPA), for
// comparison.
func (r *run) state(g span.Range) []stateRun {
	if r.mem == nil || g.Empty() {
		return nil
	}
	seq, err := r.mem.Walk(g.Start, g.Len())
	if err != nil {
		r.rp.violate(r.name, "I4", "walking %v: %v", g, err)
		return nil
	}
	var out []stateRun
	for e := range seq {
		out = append(out, stateRun{r: e.GPA, kind: e.Kind})
	}
	return out
}

// fmtRuns formats the first few runs for a message.
func fmtRuns(rs []stateRun) string {
	var b strings.Builder
	for i, x := range rs {
		if i == 4 {
			fmt.Fprintf(&b, " ... (%d runs)", len(rs))
			break
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%v:%v", x.r, x.kind)
	}
	return b.String()
}

// devStats is what I3 compares of a device before and after a refused event.
type devStats struct {
	name           string
	entries, bytes uint64
	cut            bool // mapped with the cut policy
}

func (r *run) devStats() []devStats {
	out := make([]devStats, 0, len(r.order))
	for _, d := range r.order {
		st := d.att.Stats()
		out = append(out, devStats{name: d.name, entries: st.Entries, bytes: st.MappedBytes, cut: d.att.Policy() == dma.Cut})
	}
	return out
}

// diffStats describes how a device's entries changed, or returns "". The
// number of entries is compared only when exact, and not for a device
// mapped with the cut policy: undoing a conversion that spanned RAM blocks
// maps the pages again but may shape the entries differently, and the
// kernel cannot join areas, so an undone cut maps the pieces it removed as
// entries of their own.
func diffStats(before, after []devStats, exact bool) string {
	if len(before) != len(after) {
		return fmt.Sprintf("%d devices before, %d after", len(before), len(after))
	}
	for i := range before {
		b, a := before[i], after[i]
		if b.bytes != a.bytes || (exact && !b.cut && b.entries != a.entries) {
			return fmt.Sprintf("device %q had %d entries mapping %#x bytes, now %d mapping %#x", b.name, b.entries, b.bytes, a.entries, a.bytes)
		}
	}
	return ""
}

// The classes of guest memory in a drawing, by guestmem.Kind.
const (
	classShared = iota
	classPrivate
	classUnplugged
	numClasses
)

func class(k guestmem.Kind) int {
	switch k {
	case guestmem.KindShared:
		return classShared
	case guestmem.KindUnplugged:
		return classUnplugged
	}
	return classPrivate
}

// stats returns the run's counters after events events.
func (r *run) stats(events uint64) RunStats {
	s := RunStats{
		EntriesPeak:   r.peak,
		MapCalls:      r.goneMaps,
		UnmapCalls:    r.goneUnmaps,
		CutCalls:      r.goneCuts,
		Splits:        r.goneSplits,
		LimitFailures: r.limitFailures,
		Failures:      r.failures,
	}
	s.addCosts(dma.Stats{PinnedBytes: r.goneCosts.PinnedBytes, RepinnedBytes: r.goneCosts.RepinnedBytes,
		WindowBytes: r.goneCosts.WindowBytes, MaxWindow: r.goneCosts.MaxWindow})
	s.PrivateRefused = r.privateRefused
	for _, d := range r.order {
		s.EntriesFinal += uint64(d.model.Len())
		st := d.att.Stats()
		s.MapCalls += st.MapCalls
		s.UnmapCalls += st.UnmapCalls
		s.CutCalls += st.CutCalls
		s.Splits += st.Splits
		s.addCosts(st)
	}
	switch {
	case r.computedState != 0:
		s.StateBytes, s.StateHow = r.computedState, StateComputed
	case r.mem != nil:
		s.StateBytes = r.mem.StateStats().MapBytes
	}
	if events > 0 {
		s.NsPerEvent = float64(r.elapsed.Nanoseconds()) / float64(events)
	}
	s.DevicePolicies = slices.Clone(r.policies)
	for _, p := range r.policies {
		switch s.Policy {
		case "":
			s.Policy = p.Policy
		case p.Policy:
		default:
			s.Policy = PolicyMixed
		}
	}
	return s
}

// need answers for run i (0 baseline, 1 gmem) what dma_entry_limit the
// trace needs: the busiest device of its shadow, and the first refusal of
// the run itself.
func (rp *Replayer) need(i int) EntryNeed {
	r, sh := rp.runs[i], rp.shadows[i]
	n := EntryNeed{Peak: sh.devicePeak, Refusals: r.refusedNoEntries, FirstRefusal: r.firstNoEntries}
	reserve := func(uint64) uint64 { return 0 }
	if !r.baseline {
		reserve = dma.DefaultSplitReserve
	}
	n.Limit = limitFor(n.Peak, reserve)
	if sh.shadowErr != nil {
		n.Unknown = fmt.Sprintf("replayed with no limit, the %s run could not attach a device: %v", r.name, sh.shadowErr)
	}
	n.Advice = advice(i == 0, n, rp.minLimit)
	return n
}

// limitFor returns the smallest limit L with L - reserve(L) >= peak: room
// for peak entries and the reserve of a mapper under L (L - reserve(L)
// never decreases as L grows).
func limitFor(peak uint64, reserve func(uint64) uint64) uint64 {
	if peak == 0 {
		return 0
	}
	room := func(l uint64) bool { return l-min(reserve(l), l) >= peak }
	hi := peak
	for !room(hi) {
		hi += max(hi/8, 1)
	}
	lo := peak // room(lo-1) is false below peak
	for lo < hi {
		mid := lo + (hi-lo)/2
		if room(mid) {
			hi = mid
		} else {
			lo = mid + 1
		}
	}
	return lo
}

// advice says in one line what dma_entry_limit to set for a policy.
func advice(qemu bool, n EntryNeed, given uint64) string {
	who, stop := "gmem", "the guest gets EAGAIN there and the VM runs on"
	if qemu {
		who, stop = "QEMU (one entry per 4 KiB)", "QEMU stops the VM there"
	}
	limit := "the limit of " + thousands(given)
	if given == defaultType1Limit {
		limit = "the default limit of " + thousands(given)
	}
	if n.Unknown != "" {
		return fmt.Sprintf("%s: unknown (%s)", who, n.Unknown)
	}
	switch {
	case n.FirstRefusal == nil && n.Limit == 0:
		return fmt.Sprintf("%s: %s is enough; the trace maps nothing while a type1 device is attached", who, limit)
	case n.FirstRefusal == nil && n.Limit <= given:
		return fmt.Sprintf("%s: %s is enough; the trace needs %s at most", who, limit, entries(n.Limit))
	}
	where := ""
	if f := n.FirstRefusal; f != nil {
		where = fmt.Sprintf("%s first refuses at event %s", limit, thousands(f.Event))
		if f.Line > 0 {
			where += fmt.Sprintf(" (line %s)", thousands(uint64(f.Line)))
		}
		where += ": " + stop + "; "
	}
	return fmt.Sprintf("%s: %sset vfio_iommu_type1.dma_entry_limit=%d or more", who, where, n.Limit)
}

// entries formats a count of IOMMU entries.
func entries(n uint64) string {
	if n == 1 {
		return "1 entry"
	}
	return thousands(n) + " entries"
}
