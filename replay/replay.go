// Package replay drives a conversion trace through the real gmem library
// twice, side by side, and reports what each run cost and whether gmem's
// invariants held after every event.
//
// The two runs differ only in representation and mapping policy:
//
//   - baseline is QEMU's algorithm: page state in dense bitmaps (memattr and
//     virtiomem with Bitmap set) and one IOMMU entry per 4 KiB granule
//     (dma.Granule);
//   - gmem is the library's own: state stored as runs and one IOMMU entry per
//     converted extent (dma.Extent).
//
// Each RAM event becomes a region: a discard.Manager with memattr as its
// source (InPlace for "inplace" RAM) and, for hot-pluggable RAM, virtiomem as
// a second source. Each attached device gets one iommu.Model with the
// device's rules (type1 with its entry limit, or iommufd) and, for every RAM
// region, a dma.Mapper registered for the whole region at its guest physical
// address. Conversions are split across regions; the parts in MMIO holes are
// ignored (a conversion of a hole to private is refused as invalid). An
// unplug also makes its range private, since plugged memory starts private.
//
// After every event the replay checks, for every mapper, I1 and I2 (the
// entries of its IOMMU are exactly the populated pages; invariant.Mapped) in
// the window the event could have changed; I2 also between the phases of a
// conversion (nothing mapped when a page is made private in place or its
// shared backing is released); for a refused event I3 (state and entries as
// before); for an accepted one I4 (the range holds the requested state), and
// that the baseline and gmem hold the same shared, private and plugged runs
// wherever they accepted the same events. Finish repeats the checks over
// everything.
//
// Events that break the trace's rules (trace.Validator) are refused in both
// runs; a valid event may still be refused by one run, typically the baseline
// running out of type1 entries (ENOSPC). Both are counted. Memory stays
// proportional to the runs and IOMMU entries of the two runs, never to the
// size of the guest, except for the baseline's bitmaps (one bit per page, as
// QEMU has).
package replay

import (
	"cmp"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/trace"
)

// DefaultProgressEvery is how many events pass between progress calls when
// Options.ProgressEvery is 0.
const DefaultProgressEvery = 8192

// DefaultMaxDetails is how many violations and rejections a Result describes
// in detail when Options.MaxDetails is 0; all are counted.
const DefaultMaxDetails = 20

// defaultType1Limit is the kernel's default dma_entry_limit, which the model
// applies when an attach gives none.
const defaultType1Limit = 65535

// Options configure a replay. The zero Options is valid.
type Options struct {
	// Progress, if not nil, is called with the number of events replayed so
	// far every ProgressEvery events.
	Progress func(events uint64)
	// ProgressEvery is the interval of Progress calls (default
	// DefaultProgressEvery).
	ProgressEvery uint64
	// MaxDetails bounds the violations and rejections kept with their
	// description (default DefaultMaxDetails).
	MaxDetails int
	// Logger receives the library's own logs (default: discarded). A
	// baseline running out of type1 entries logs every refusal.
	Logger *slog.Logger
	// MaxExtent is the gmem run's dma.Options.MaxExtent (0: the default,
	// dma.Unbounded: none).
	MaxExtent uint64
}

// RunStats is what one run (baseline or gmem) did.
type RunStats struct {
	EntriesFinal  uint64  `json:"entries_final"`  // IOMMU entries at the end, all devices
	EntriesPeak   uint64  `json:"entries_peak"`   // most entries after any event, all devices
	MapCalls      uint64  `json:"map_calls"`      // map requests sent to the IOMMUs
	UnmapCalls    uint64  `json:"unmap_calls"`    // unmap requests sent to the IOMMUs
	Splits        uint64  `json:"splits"`         // entries cut by a discard and remapped
	StateBytes    uint64  `json:"state_bytes"`    // memory of the page-state maps at the end
	LimitFailures uint64  `json:"limit_failures"` // valid events refused with ENOSPC
	Failures      uint64  `json:"failures"`       // valid events refused, for any reason
	NsPerEvent    float64 `json:"ns_per_event"`   // time in the library per event
	// What the mappers cost the kernel and the devices (dma.Stats).
	PinnedBytes    uint64 `json:"pinned_bytes"`    // bytes pinned by map requests
	RepinnedBytes  uint64 `json:"repinned_bytes"`  // bytes unmapped and pinned again within one notification
	WindowBytes    uint64 `json:"window_bytes"`    // bytes a notification left mapped but hid from the device meanwhile
	MaxWindow      uint64 `json:"max_window"`      // the largest window of one notification
	PrivateRefused uint64 `json:"private_refused"` // valid conversions to private refused
}

// addCosts adds a mapper's pin and window counters to s.
func (s *RunStats) addCosts(st dma.Stats) {
	s.PinnedBytes += st.PinnedBytes
	s.RepinnedBytes += st.RepinnedBytes
	s.WindowBytes += st.WindowBytes
	s.MaxWindow = max(s.MaxWindow, st.MaxWindow)
}

// Result summarises a replay.
type Result struct {
	Events      uint64 `json:"events"`      // events replayed
	Conversions uint64 `json:"conversions"` // convert events among them
	// Rejected counts the events refused by at least one run, the invalid
	// ones included.
	Rejected uint64 `json:"rejected"`
	// Invalid counts the events that break the trace's rules
	// (trace.Validator); both runs refuse them.
	Invalid uint64 `json:"invalid"`
	// Diverged counts the valid events that one run accepted and the other
	// refused; from then on the two may differ where such events applied.
	Diverged   uint64 `json:"diverged"`
	Violations uint64 `json:"violations"` // broken invariants

	// Page state at the end, from the gmem run.
	RAMBytes       uint64 `json:"ram_bytes"`
	SharedBytes    uint64 `json:"shared_bytes"`
	PrivateBytes   uint64 `json:"private_bytes"`
	UnpluggedBytes uint64 `json:"unplugged_bytes"`
	Devices        int    `json:"devices"` // devices attached at the end

	Baseline RunStats `json:"baseline"`
	Gmem     RunStats `json:"gmem"`

	ViolationDetails []Violation `json:"violation_details,omitempty"`
	Rejections       []Rejection `json:"rejection_details,omitempty"`
}

// Violation describes a broken invariant.
type Violation struct {
	Event     uint64 `json:"event"`          // 1-based index of the event; 0 for Finish
	Line      int    `json:"line,omitempty"` // input line of the event, if known
	Run       string `json:"run"`            // "baseline", "gmem", or "both" for a disagreement
	Invariant string `json:"invariant"`      // "I1" to "I4"
	Detail    string `json:"detail"`
}

// Error implements error.
func (v *Violation) Error() string {
	where := fmt.Sprintf("event %d", v.Event)
	if v.Event == 0 {
		where = "end of trace"
	}
	if v.Line > 0 {
		where += fmt.Sprintf(" (line %d)", v.Line)
	}
	return fmt.Sprintf("%s: %s violated in %s: %s", where, v.Invariant, v.Run, v.Detail)
}

// Rejection describes a refused event.
type Rejection struct {
	Event  uint64 `json:"event"`
	Line   int    `json:"line,omitempty"`
	Run    string `json:"run"` // "both", "baseline" or "gmem"
	Reason string `json:"reason"`
}

// Replayer replays one trace. Feed it events in order with Apply, then call
// Finish. It is not safe for concurrent use.
type Replayer struct {
	opts Options
	log  *slog.Logger
	val  *trace.Validator

	layout   []area // RAM and MMIO, sorted by GPA
	runs     [2]*run
	diverged span.Set // GPAs where the runs may differ

	events, conversions, rejected, invalid, divergedEvents uint64
	violations                                             uint64
	vlist                                                  []Violation
	rlist                                                  []Rejection

	limit    uint64     // largest type1 entry limit attached, for the drawing
	line     int        // input line of the current event
	first    *Violation // first violation of the current step
	finished bool
}

// area is a RAM block or an MMIO hole of the guest physical address space.
type area struct {
	r   span.Range
	ram int // index of the region in each run, or -1 for MMIO
}

// New returns a Replayer for a trace with no events yet.
func New(opts Options) *Replayer {
	if opts.ProgressEvery == 0 {
		opts.ProgressEvery = DefaultProgressEvery
	}
	if opts.MaxDetails <= 0 {
		opts.MaxDetails = DefaultMaxDetails
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rp := &Replayer{opts: opts, log: log, val: trace.NewValidator()}
	rp.runs[0] = newRun(rp, "baseline", true)
	rp.runs[1] = newRun(rp, "gmem", false)
	return rp
}

// Events replays every event of seq, finishes, and returns the result.
func Events(seq iter.Seq[trace.Event], opts Options) Result {
	rp := New(opts)
	for e := range seq {
		_ = rp.Apply(e, 0)
	}
	_ = rp.Finish()
	return rp.Result()
}

// violate records a broken invariant of the current event.
func (rp *Replayer) violate(run, inv, format string, args ...any) {
	rp.violations++
	v := Violation{Event: rp.events, Line: rp.line, Run: run, Invariant: inv, Detail: fmt.Sprintf(format, args...)}
	if rp.finished {
		v.Event, v.Line = 0, 0
	}
	if rp.first == nil {
		rp.first = &v
	}
	if len(rp.vlist) < rp.opts.MaxDetails {
		rp.vlist = append(rp.vlist, v)
	}
}

// reject records a refused event.
func (rp *Replayer) reject(run string, err error) {
	if len(rp.rlist) < rp.opts.MaxDetails {
		rp.rlist = append(rp.rlist, Rejection{Event: rp.events, Line: rp.line, Run: run, Reason: err.Error()})
	}
}

// Apply replays one event; line is its input line (0 if unknown). It returns
// the first invariant the event broke, as a *Violation, or nil. An event
// either run refuses is not an error: it is counted in the Result.
func (rp *Replayer) Apply(e trace.Event, line int) error {
	if rp.finished {
		return errors.New("replay: Apply after Finish")
	}
	rp.events++
	rp.line = line
	rp.first = nil
	if _, ok := e.(trace.Convert); ok {
		rp.conversions++
	}
	if err := rp.val.Check(e); err != nil {
		rp.invalid++
		rp.rejected++
		rp.reject("both", err)
	} else {
		rp.apply(e)
	}
	for _, r := range rp.runs {
		r.afterEvent()
	}
	if rp.opts.Progress != nil && rp.events%rp.opts.ProgressEvery == 0 {
		rp.opts.Progress(rp.events)
	}
	if rp.first != nil {
		return rp.first
	}
	return nil
}

// apply replays a valid event in both runs and checks the invariants.
func (rp *Replayer) apply(e trace.Event) {
	switch e := e.(type) {
	case trace.RAM:
		idx := len(rp.runs[0].regions)
		rp.insertArea(area{r: e.Range(), ram: idx})
		rp.both(func(r *run) error { return r.addRAM(e) })
		for _, r := range rp.runs {
			r.checkMapped(e.Range())
		}
	case trace.MMIO:
		rp.insertArea(area{r: e.Range(), ram: -1})
	case trace.Attach:
		if e.IOMMU == trace.Type1 {
			rp.limit = max(rp.limit, cmp.Or(e.Limit, defaultType1Limit))
		}
		rp.both(func(r *run) error { return r.attach(e) })
		for _, r := range rp.runs {
			if d := r.devices[e.Dev]; d != nil {
				r.checkDevice(d, span.Range{Start: 0, End: ^uint64(0)})
			}
		}
	case trace.Detach:
		rp.both(func(r *run) error { return r.detach(e.Dev) })
	case trace.Convert:
		parts := rp.split(e.Range())
		rp.stateEvent(e.Range(), parts, func(r *run) error {
			err := r.convert(parts, e.To)
			if err != nil && e.To == trace.Private {
				r.privateRefused++
			}
			return err
		},
			func(r *run, reg *region, off span.Range) string {
				if e.To == trace.Shared {
					if !reg.attrs.IsShared(off) {
						return "not all shared"
					}
				} else if !reg.attrs.IsPrivate(off) {
					return "not all private"
				}
				return ""
			}, true)
	case trace.Plug:
		parts := rp.split(e.Range())
		rp.stateEvent(e.Range(), parts, func(r *run) error { return r.plug(parts, true) },
			func(r *run, reg *region, off span.Range) string {
				if reg.vmem == nil || !reg.vmem.IsPlugged(off) {
					return "not all plugged"
				}
				return ""
			}, false)
	case trace.Unplug:
		parts := rp.split(e.Range())
		rp.stateEvent(e.Range(), parts, func(r *run) error { return r.plug(parts, false) },
			func(r *run, reg *region, off span.Range) string {
				if reg.vmem == nil || !reg.vmem.IsUnplugged(off) {
					return "not all unplugged"
				}
				if !reg.attrs.IsPrivate(off) {
					return "unplugged but not all private"
				}
				return ""
			}, true)
	}
}

// both runs fn in each run, timing it, and records the outcomes. It returns
// the errors of the baseline and gmem runs.
func (rp *Replayer) both(fn func(*run) error) (errs [2]error) {
	for i, r := range rp.runs {
		t0 := time.Now()
		errs[i] = fn(r)
		r.elapsed += time.Since(t0)
		if errs[i] != nil {
			r.failures++
			if errors.Is(errs[i], unix.ENOSPC) {
				r.limitFailures++
			}
		}
	}
	switch {
	case errs[0] != nil && errs[1] != nil:
		rp.rejected++
		rp.reject("both", errs[1])
	case errs[0] != nil:
		rp.rejected++
		rp.divergedEvents++
		rp.reject("baseline", errs[0])
	case errs[1] != nil:
		rp.rejected++
		rp.divergedEvents++
		rp.reject("gmem", errs[1])
	}
	return errs
}

// part is the piece of a guest physical range inside one area.
type part struct {
	r   span.Range // guest physical
	ram int        // region index, or -1 for MMIO
}

// split cuts r along the areas; the Validator has made sure r lies in them.
func (rp *Replayer) split(r span.Range) []part {
	var out []part
	i := sort.Search(len(rp.layout), func(i int) bool { return rp.layout[i].r.End > r.Start })
	for ; i < len(rp.layout) && rp.layout[i].r.Start < r.End; i++ {
		a := rp.layout[i]
		out = append(out, part{r: a.r.Intersect(r), ram: a.ram})
	}
	return out
}

func (rp *Replayer) insertArea(a area) {
	i := sort.Search(len(rp.layout), func(i int) bool { return rp.layout[i].r.Start > a.r.Start })
	rp.layout = append(rp.layout, area{})
	copy(rp.layout[i+1:], rp.layout[i:])
	rp.layout[i] = a
}

// stateEvent replays an event that changes page state over r (split into
// parts) and checks it: I1/I2 in the window it could change, I3 if a run
// refused it, I4 (holds reports what is wrong with a part of a region after
// success, "" if nothing) if it accepted, and the runs against each other.
// equalizes says whether success in both runs leaves r in the same state in
// both whatever came before.
func (rp *Replayer) stateEvent(r span.Range, parts []part, fn func(*run) error,
	holds func(*run, *region, span.Range) string, equalizes bool) {
	type before struct {
		window span.Range
		state  []stateRun
		stats  []devStats
	}
	var bs [2]before
	for i, rn := range rp.runs {
		bs[i] = before{window: rn.window(r), state: rn.state(parts), stats: rn.devStats()}
	}
	errs := rp.both(fn)
	for i, rn := range rp.runs {
		w := bs[i].window
		w2 := rn.window(r)
		w.Start, w.End = min(w.Start, w2.Start), max(w.End, w2.End)
		rn.checkMapped(w)
		if errs[i] != nil {
			if after := rn.state(parts); !equalRuns(bs[i].state, after) {
				rp.violate(rn.name, "I3", "refused event (%v) changed the page state of %v", errs[i], r)
			}
			ramParts := 0
			for _, p := range parts {
				if p.ram >= 0 {
					ramParts++
				}
			}
			if d := diffStats(bs[i].stats, rn.devStats(), ramParts <= 1); d != "" {
				rp.violate(rn.name, "I3", "refused event (%v) changed the IOMMU: %s", errs[i], d)
			}
			continue
		}
		for _, p := range parts {
			if p.ram < 0 {
				continue
			}
			reg := rn.regions[p.ram]
			if msg := holds(rn, reg, reg.offsets(p.r)); msg != "" {
				rp.violate(rn.name, "I4", "after the event %v is %s", p.r, msg)
			}
		}
	}
	switch {
	case errs[0] == nil && errs[1] == nil && equalizes:
		rp.compare(parts, false)
		rp.diverged.Remove(r)
	case (errs[0] == nil) == (errs[1] == nil):
		rp.compare(parts, true)
	default:
		rp.diverged.Add(r)
	}
}

// compare checks that the baseline and gmem hold the same state over the RAM
// parts, leaving out where they may differ if skipDiverged.
func (rp *Replayer) compare(parts []part, skipDiverged bool) {
	for _, p := range parts {
		if p.ram < 0 {
			continue
		}
		pieces := []span.Range{p.r}
		if skipDiverged {
			pieces = rp.diverged.Minus(p.r)
		}
		for _, x := range pieces {
			one := []part{{r: x, ram: p.ram}}
			b, g := rp.runs[0].state(one), rp.runs[1].state(one)
			if !equalRuns(b, g) {
				rp.violate("both", "I4", "baseline and gmem disagree on %v: baseline %v, gmem %v", x, fmtRuns(b), fmtRuns(g))
			}
		}
	}
}

// Finish checks the invariants over the whole guest: the two runs' state
// everywhere they should agree, every mapper's entries against the
// populated pages, and the replay's record of each IOMMU against the model.
// It returns the first violation it finds, and may be called once.
func (rp *Replayer) Finish() error {
	if rp.finished {
		return errors.New("replay: Finish called twice")
	}
	rp.finished = true
	rp.first = nil
	var parts []part
	for _, a := range rp.layout {
		if a.ram >= 0 {
			parts = append(parts, part(a))
		}
	}
	rp.compare(parts, true)
	for _, rn := range rp.runs {
		rn.finish()
	}
	if rp.first != nil {
		return rp.first
	}
	return nil
}

// Result returns the counters and the final state; it may be called at any
// time.
func (rp *Replayer) Result() Result {
	res := Result{
		Events:           rp.events,
		Conversions:      rp.conversions,
		Rejected:         rp.rejected,
		Invalid:          rp.invalid,
		Diverged:         rp.divergedEvents,
		Violations:       rp.violations,
		ViolationDetails: append([]Violation(nil), rp.vlist...),
		Rejections:       append([]Rejection(nil), rp.rlist...),
	}
	g := rp.runs[1]
	for _, reg := range g.regions {
		c := reg.classify()
		res.RAMBytes += reg.ram.Size
		res.SharedBytes += c[classShared]
		res.PrivateBytes += c[classPrivate]
		res.UnpluggedBytes += c[classUnplugged]
	}
	res.Devices = len(g.order)
	res.Baseline = rp.runs[0].stats(rp.events)
	res.Gmem = g.stats(rp.events)
	return res
}
