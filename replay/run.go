package replay

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/internal/invariant"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/trace"
	"github.com/gmemproject/gmem/virtiomem"
)

// run is one of the two replays: the library configured as the baseline or
// as gmem.
type run struct {
	rp       *Replayer
	name     string
	baseline bool

	regions []*region
	devices map[string]*device
	order   []*device // attached devices in attach order

	// Counters of mappers no longer registered (detached devices, refused
	// attaches), so that map and unmap calls are never lost.
	goneMaps, goneUnmaps, goneSplits uint64
	goneCosts                        RunStats

	privateRefused uint64

	failures, limitFailures uint64
	elapsed                 time.Duration
	peak                    uint64
	timeline                series // entries of the busiest device
}

// region is one RAM block of one run.
type region struct {
	ram   trace.RAM
	m     *discard.Manager
	attrs *memattr.Attributes
	vmem  *virtiomem.Device
}

// device is one assigned device of one run: its IOMMU and one mapper per
// region (index = region index).
type device struct {
	name    string
	model   *iommu.Model
	mappers []*dma.Mapper
}

func newRun(rp *Replayer, name string, baseline bool) *run {
	return &run{rp: rp, name: name, baseline: baseline, devices: map[string]*device{}}
}

// section returns the whole region as a section at its GPA.
func (reg *region) section() discard.Section {
	return discard.Section{Offset: 0, Size: reg.ram.Size, GPA: reg.ram.GPA}
}

// offsets converts a guest physical range inside the region to region
// offsets.
func (reg *region) offsets(r span.Range) span.Range {
	return span.Range{Start: r.Start - reg.ram.GPA, End: r.End - reg.ram.GPA}
}

func (r *run) policy() dma.Policy {
	if r.baseline {
		return dma.Granule
	}
	return dma.Extent
}

// addRAM creates a region and registers every attached device's mapper for
// it.
func (r *run) addRAM(e trace.RAM) error {
	// The Validator has checked the block, so the sources accept it: a
	// refusal here is a bug in gmem, not in the trace.
	reg := &region{ram: e, m: discard.New(e.Size, r.rp.log)}
	var err error
	reg.attrs, err = memattr.New(reg.m, memattr.Config{
		Backend: phaseCheck{r, reg},
		InPlace: e.Mode == trace.InPlace,
		Bitmap:  r.baseline,
	})
	if err != nil {
		panic(fmt.Sprintf("replay: memattr refused validated RAM block %q: %v", e.Name, err))
	}
	if e.Block != 0 {
		reg.vmem, err = virtiomem.New(reg.m, virtiomem.Config{
			BlockSize: e.Block,
			Bitmap:    r.baseline,
			Release: func(runs []span.Range) error {
				r.unreachable(reg, runs, "release of unplugged memory")
				return nil
			},
		})
		if err != nil {
			panic(fmt.Sprintf("replay: virtiomem refused validated RAM block %q: %v", e.Name, err))
		}
	}
	r.regions = append(r.regions, reg)
	var errs []error
	for _, d := range r.order {
		// Nothing of a new region is populated, so this maps nothing.
		m, err := r.newMapper(d)
		if err == nil {
			if err = reg.m.Register(m, reg.section()); err != nil {
				r.retire(m)
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("device %q: %w", d.name, err))
			m = nil
		}
		d.mappers = append(d.mappers, m)
	}
	return errors.Join(errs...)
}

func (r *run) newMapper(d *device) (*dma.Mapper, error) {
	opts := dma.Options{Policy: r.policy(), Logger: r.rp.log}
	if !r.baseline {
		opts.MaxExtent = r.rp.opts.MaxExtent
	}
	return dma.New(d.model, nil, opts)
}

// retire keeps the counters of a mapper that is no longer registered.
func (r *run) retire(m *dma.Mapper) {
	s := m.Stats()
	r.goneMaps += s.MapCalls
	r.goneUnmaps += s.UnmapCalls
	r.goneSplits += s.Splits
	r.goneCosts.addCosts(s)
}

// attach creates the device's IOMMU and registers a mapper for every region,
// which maps what is populated. If one refuses (out of entries), the ones
// registered are unregistered and the device is not attached in this run.
func (r *run) attach(e trace.Attach) error {
	caps := iommu.Caps{Rules: iommu.Type1v2, EntryLimit: e.Limit}
	if e.IOMMU == trace.IOMMUFD {
		caps = iommu.Caps{Rules: iommu.IOMMUFD}
	}
	model := iommu.NewModel(caps)
	d := &device{name: e.Dev, model: model}
	for i, reg := range r.regions {
		m, err := r.newMapper(d)
		if err == nil {
			err = reg.m.Register(m, reg.section())
		}
		if err != nil {
			if m != nil {
				r.retire(m)
			}
			var errs []error
			for j := i - 1; j >= 0; j-- {
				if uerr := r.regions[j].m.Unregister(d.mappers[j]); uerr != nil {
					errs = append(errs, uerr)
				}
				r.retire(d.mappers[j])
			}
			if len(errs) > 0 {
				r.rp.violate(r.name, "I3", "undoing the refused attach of %q: %v", e.Dev, errors.Join(errs...))
			}
			if n := model.Len(); n != 0 {
				r.rp.violate(r.name, "I3", "refused attach of %q left %d IOMMU entries", e.Dev, n)
			}
			return fmt.Errorf("attach %q: %w", e.Dev, err)
		}
		d.mappers = append(d.mappers, m)
	}
	r.devices[e.Dev] = d
	r.order = append(r.order, d)
	return nil
}

// detach unregisters the device's mappers. A device whose attach this run
// refused is not there, which is not an error.
func (r *run) detach(name string) error {
	d := r.devices[name]
	if d == nil {
		return nil
	}
	var errs []error
	for i, m := range d.mappers {
		if m == nil {
			continue
		}
		if err := r.regions[i].m.Unregister(m); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		r.rp.violate(r.name, "I1", "detaching %q: %v", name, err)
	}
	for _, m := range d.mappers {
		if m != nil {
			r.retire(m)
		}
	}
	if n := d.model.Len(); n != 0 {
		r.rp.violate(r.name, "I1", "detached device %q still has %d IOMMU entries", name, n)
	}
	delete(r.devices, name)
	r.order = slices.DeleteFunc(r.order, func(x *device) bool { return x == d })
	return nil
}

// convert converts the RAM parts, all or nothing: if a part is refused, the
// parts already converted are converted back, run by run.
func (r *run) convert(parts []part, to trace.State) error {
	st, back := memattr.Shared, memattr.Private
	if to == trace.Private {
		st, back = back, st
	}
	type done struct {
		reg     *region
		changed []span.Range
	}
	var ok []done
	for _, p := range parts {
		if p.ram < 0 {
			continue // an MMIO hole converted to shared: accepted, ignored
		}
		reg := r.regions[p.ram]
		off := reg.offsets(p.r)
		changed, err := reg.attrs.ConvertRuns(off.Start, off.Len(), st)
		if err != nil {
			for i := len(ok) - 1; i >= 0; i-- {
				for _, c := range ok[i].changed {
					if uerr := ok[i].reg.attrs.Convert(c.Start, c.Len(), back); uerr != nil {
						r.rp.violate(r.name, "I3", "undoing the conversion of %v in RAM block %q: %v", c, ok[i].reg.ram.Name, uerr)
					}
				}
			}
			return fmt.Errorf("convert %v to %v: %w", p.r, to, err)
		}
		ok = append(ok, done{reg, changed})
	}
	return nil
}

// plug plugs or unplugs a range of one hot-pluggable region (the Validator
// has made sure there is one part). Unplugged memory is discarded whatever
// its state, and plugged memory starts private, so an unplug also makes the
// range private; with the range unplugged that notifies no listener.
func (r *run) plug(parts []part, plug bool) error {
	p := parts[0]
	reg := r.regions[p.ram]
	off := reg.offsets(p.r)
	if plug {
		return reg.vmem.Plug(off.Start, off.Len())
	}
	if err := reg.vmem.Unplug(off.Start, off.Len()); err != nil {
		return err
	}
	if err := reg.attrs.Convert(off.Start, off.Len(), memattr.Private); err != nil {
		r.rp.violate(r.name, "I4", "making unplugged %v private: %v", p.r, err)
	}
	return nil
}

// phaseCheck is the memattr.Backend of a region: it does nothing in the
// kernel (there is none) and checks I2 between the phases of a conversion.
type phaseCheck struct {
	r   *run
	reg *region
}

// SetAttributes checks that no device reaches memory being made private in
// place (the kernel refuses to convert pinned pages).
func (p phaseCheck) SetAttributes(runs []span.Range, to memattr.State) error {
	if to == memattr.Private && p.reg.ram.Mode == trace.InPlace {
		p.r.unreachable(p.reg, runs, "in-place conversion to private")
	}
	return nil
}

// Release checks that no device reaches memory whose shared backing is freed.
func (p phaseCheck) Release(runs []span.Range, to memattr.State) error {
	if to == memattr.Private {
		p.r.unreachable(p.reg, runs, "release of the shared backing")
	}
	return nil
}

// unreachable records an I2 violation if any device maps part of runs
// (region offsets).
func (r *run) unreachable(reg *region, runs []span.Range, when string) {
	for _, d := range r.order {
		for _, x := range runs {
			g := span.Range{Start: reg.ram.GPA + x.Start, End: reg.ram.GPA + x.End}
			if got := d.model.MappingsIn(g); len(got) > 0 {
				r.rp.violate(r.name, "I2", "%s of %v while device %q maps IOVA %#x+%#x", when, g, d.name, got[0].IOVA, got[0].Size)
				return
			}
		}
	}
}

// window returns r grown to cover the entries of every device that meet it:
// what an event on r can change.
func (r *run) window(g span.Range) span.Range {
	w := g
	for _, d := range r.order {
		h := hull(d.model, g)
		w.Start, w.End = min(w.Start, h.Start), max(w.End, h.End)
	}
	return w
}

// checkMapped checks I1 and I2 for every mapper within the guest physical
// window w.
func (r *run) checkMapped(w span.Range) {
	for _, d := range r.order {
		r.checkDevice(d, w)
	}
}

// checkDevice checks I1 and I2 for the device's mappers within w, and that
// its mappers hold as many entries as its IOMMU.
func (r *run) checkDevice(d *device, w span.Range) {
	for i, reg := range r.regions {
		m := d.mappers[i]
		if m == nil {
			continue
		}
		x := reg.ram.Range().Intersect(w)
		if x.Empty() {
			continue
		}
		sec, _ := reg.section().Intersect(reg.offsets(x))
		if err := invariant.Mapped(reg.m, sec, d.model.MappingsIn(x)); err != nil {
			inv := "I1"
			var v *invariant.Violation
			if errors.As(err, &v) {
				inv = v.Invariant
			}
			r.rp.violate(r.name, inv, "device %q, RAM block %q: %v", d.name, reg.ram.Name, err)
		}
	}
	var entries uint64
	for _, m := range d.mappers {
		if m != nil {
			entries += m.Stats().Entries
		}
	}
	if n := uint64(d.model.Len()); n != entries {
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
	r.timeline.add(busiest)
}

// finish checks every mapper over its whole section, and that the mappers'
// tables together hold exactly the IOMMU's entries.
func (r *run) finish() {
	for _, d := range r.order {
		r.checkDevice(d, span.Range{Start: 0, End: ^uint64(0)})
		var have []iommu.Mapping
		for _, m := range d.mappers {
			if m != nil {
				have = append(have, m.Entries()...)
			}
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

// stateRun is a run of one region's state: shared/private (plug false) or
// plugged/unplugged (plug true).
type stateRun struct {
	r    span.Range
	on   bool
	plug bool
}

// state returns the state runs of the RAM parts, for comparison.
func (r *run) state(parts []part) []stateRun {
	var out []stateRun
	for _, p := range parts {
		if p.ram < 0 {
			continue
		}
		reg := r.regions[p.ram]
		off := reg.offsets(p.r)
		reg.attrs.Runs(off, func(x span.Range, s memattr.State) {
			out = append(out, stateRun{r: x, on: s == memattr.Shared})
		})
		if reg.vmem != nil {
			reg.vmem.Runs(off, func(x span.Range, plugged bool) {
				out = append(out, stateRun{r: x, on: plugged, plug: true})
			})
		}
	}
	return out
}

func equalRuns(a, b []stateRun) bool { return slices.Equal(a, b) }

// fmtRuns formats the first few runs for a message.
func fmtRuns(rs []stateRun) string {
	var b strings.Builder
	for i, x := range rs {
		if i == 4 {
			fmt.Fprintf(&b, " ... (%d runs)", len(rs))
			break
		}
		kind := "private"
		switch {
		case x.plug && x.on:
			kind = "plugged"
		case x.plug:
			kind = "unplugged"
		case x.on:
			kind = "shared"
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%v:%s", x.r, kind)
	}
	return b.String()
}

// devStats is what I3 compares of a device before and after a refused event.
type devStats struct {
	name           string
	entries, bytes uint64
}

func (r *run) devStats() []devStats {
	out := make([]devStats, 0, len(r.order))
	for _, d := range r.order {
		s := devStats{name: d.name}
		for _, m := range d.mappers {
			if m != nil {
				st := m.Stats()
				s.entries += st.Entries
				s.bytes += st.MappedBytes
			}
		}
		out = append(out, s)
	}
	return out
}

// diffStats describes how a device's entries changed, or returns "". The
// number of entries is compared only when exact: undoing a conversion that
// spanned RAM blocks maps the pages again but may shape the entries
// differently.
func diffStats(before, after []devStats, exact bool) string {
	if len(before) != len(after) {
		return fmt.Sprintf("%d devices before, %d after", len(before), len(after))
	}
	for i := range before {
		b, a := before[i], after[i]
		if b.bytes != a.bytes || (exact && b.entries != a.entries) {
			return fmt.Sprintf("device %q had %d entries mapping %#x bytes, now %d mapping %#x", b.name, b.entries, b.bytes, a.entries, a.bytes)
		}
	}
	return ""
}

// The classes of guest memory in a Result and a drawing.
const (
	classShared = iota
	classPrivate
	classUnplugged
	numClasses
)

// extents calls fn for each extent of the region with its class, ascending.
func (reg *region) extents(fn func(g span.Range, class int)) {
	var srcs []discard.Source
	for e := range reg.m.Walk(span.Range{End: reg.ram.Size}, &srcs) {
		c := classShared
		if !e.Populated() {
			c = classPrivate
			for i, s := range srcs {
				if reg.vmem != nil && s == reg.vmem.Source() && e.DiscardedBy&(1<<i) != 0 {
					c = classUnplugged
				}
			}
		}
		fn(span.Range{Start: reg.ram.GPA + e.Start, End: reg.ram.GPA + e.End}, c)
	}
}

// classify returns the bytes of the region in each class.
func (reg *region) classify() [numClasses]uint64 {
	var c [numClasses]uint64
	reg.extents(func(g span.Range, class int) { c[class] += g.Len() })
	return c
}

// stats returns the run's counters after events events.
func (r *run) stats(events uint64) RunStats {
	s := RunStats{
		EntriesPeak:   r.peak,
		MapCalls:      r.goneMaps,
		UnmapCalls:    r.goneUnmaps,
		Splits:        r.goneSplits,
		LimitFailures: r.limitFailures,
		Failures:      r.failures,
	}
	s.addCosts(dma.Stats{PinnedBytes: r.goneCosts.PinnedBytes, RepinnedBytes: r.goneCosts.RepinnedBytes,
		WindowBytes: r.goneCosts.WindowBytes, MaxWindow: r.goneCosts.MaxWindow})
	s.PrivateRefused = r.privateRefused
	for _, d := range r.order {
		s.EntriesFinal += uint64(d.model.Len())
		for _, m := range d.mappers {
			if m != nil {
				st := m.Stats()
				s.MapCalls += st.MapCalls
				s.UnmapCalls += st.UnmapCalls
				s.Splits += st.Splits
				s.addCosts(st)
			}
		}
	}
	for _, reg := range r.regions {
		s.StateBytes += reg.attrs.StateBytes()
		if reg.vmem != nil {
			s.StateBytes += reg.vmem.StateBytes()
		}
	}
	if events > 0 {
		s.NsPerEvent = float64(r.elapsed.Nanoseconds()) / float64(events)
	}
	return s
}
