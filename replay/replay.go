// Package replay drives a conversion trace through the gmem library twice,
// side by side, and reports what each run cost and whether gmem's
// invariants held after every event.
//
// Each run is a guestmem.Memory, the executor a VMM uses, on model backings
// (no memory behind them): the RAM and MMIO events of the trace are its
// blocks and holes, created at the first other event. The two runs differ
// only in representation and mapping policy:
//
//   - baseline is QEMU's algorithm: page state in dense bitmaps
//     (guestmem.Config.Bitmap) and one IOMMU entry per 4 KiB granule
//     (dma.Granule);
//   - gmem is the library's own: state stored as runs and one IOMMU entry per
//     converted extent (dma.Extent).
//
// Each attached device gets one iommu.Model with the device's rules (type1
// with its entry limit, or iommufd), attached with Memory.AttachIOMMU.
// Conversions go to Memory.Convert, plugs and unplugs to Memory.Plug and
// Memory.Unplug: what a request does, and which requests are refused, is
// guestmem's to say, and replay counts the refusals by reason (Reason).
//
// After every event the replay checks, for every device, I1 and I2 (the
// entries of its IOMMU are exactly the shared, plugged pages;
// invariant.Mapped) in the window the event could have changed; I2 also
// between the steps of a change, from the executor's backend hook (nothing
// mapped when a page is made private in place or its shared memory is
// discarded); for a refused event I3 (state and entries as before); for an
// accepted one I4 (the range holds the requested state), and that the
// baseline and gmem hold the same shared, private and unplugged runs
// wherever they accepted the same events. Finish repeats the checks over
// everything, with Attachment.Check.
//
// Events that describe an impossible machine (trace.Validator, or a layout
// guestmem refuses) are not replayed: Apply returns them as *InputError. A
// guest request may be refused by one run only, typically the baseline
// running out of type1 entries (ENOSPC); both kinds of refusal are counted.
// Memory stays proportional to the runs and IOMMU entries of the two runs,
// never to the size of the guest, except for the baseline's bitmaps (one bit
// per page, as QEMU has).
package replay

import (
	"cmp"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
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
	// KernelModel runs in-place traces, in both runs, on the kernel's
	// in-place conversion as guestmem/kernelmodel models it: each block a
	// guest_memfd (without memory) that keeps its own attributes, pinned by
	// every attached device's IOMMU, so every conversion to private reaches
	// a kernel that refuses pinned pages. Replay has no other pinner, so a
	// refusal means gmem's own mappings were still there: an I2
	// violation.
	KernelModel bool
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
	Events      uint64 `json:"events"`      // events replayed, input errors included
	Conversions uint64 `json:"conversions"` // convert events among them
	// InputErrors counts the events that describe an impossible machine
	// (trace.ErrMachine): not replayed, the trace is wrong.
	InputErrors uint64 `json:"input_errors"`
	// Rejected counts the guest requests refused by at least one run: what
	// the VMM answers with an error.
	Rejected uint64 `json:"rejected"`
	// RejectedBy counts the refused requests by reason (see Reason), the
	// gmem run's reason where both refused.
	RejectedBy map[string]uint64 `json:"rejected_by"`
	// Diverged counts the requests that one run accepted and the other
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

	ViolationDetails  []Violation  `json:"violation_details,omitempty"`
	Rejections        []Rejection  `json:"rejection_details,omitempty"`
	InputErrorDetails []InputError `json:"input_error_details,omitempty"`
}

// InputError is an event that breaks the trace's own structure
// (trace.Validator): RAM or MMIO overlapping, a device attached twice, a
// plug where there is no hot-pluggable RAM. It is not replayed.
// Err wraps trace.ErrMachine or trace.ErrValue.
type InputError struct {
	Event   uint64 `json:"event"`
	Line    int    `json:"line,omitempty"`
	Message string `json:"error"` // Err's text
	Err     error  `json:"-"`
}

// Error returns "line N: what is wrong" (or "event N: ..." without a line).
func (e *InputError) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("line %d: %s", e.Line, e.Message)
	}
	return fmt.Sprintf("event %d: %s", e.Event, e.Message)
}

// Unwrap returns the cause.
func (e *InputError) Unwrap() error { return e.Err }

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

// Rejection describes a refused guest request.
type Rejection struct {
	Event  uint64 `json:"event"`
	Line   int    `json:"line,omitempty"`
	Run    string `json:"run"`    // "both", "baseline" or "gmem"
	Reason string `json:"reason"` // the class, a key of Result.RejectedBy
	Detail string `json:"detail"` // the error
}

// Replayer replays one trace. Feed it events in order with Apply, then call
// Finish. It is not safe for concurrent use.
type Replayer struct {
	opts Options
	log  *slog.Logger
	val  *trace.Validator

	layout   []area // RAM and MMIO, sorted by GPA
	ram      []trace.RAM
	mmio     []trace.MMIO
	started  bool  // the runs' memory exists
	startErr error // why it could not be created
	runs     [2]*run
	diverged span.Set // GPAs where the runs may differ

	events, conversions, rejected, inputErrors, divergedEvents uint64
	violations                                                 uint64
	rejectedBy                                                 map[string]uint64
	vlist                                                      []Violation
	rlist                                                      []Rejection
	ilist                                                      []InputError

	limit    uint64     // largest type1 entry limit attached, for the drawing
	line     int        // input line of the current event
	first    *Violation // first violation of the current step
	finished bool
}

// area is a RAM block or an MMIO hole of the guest physical address space.
type area struct {
	r   span.Range
	ram bool
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
	rp := &Replayer{opts: opts, log: log, val: trace.NewValidator(), rejectedBy: map[string]uint64{}}
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

// reject records a refused request.
func (rp *Replayer) reject(run string, err error) {
	why := Reason(err)
	rp.rejected++
	rp.rejectedBy[why]++
	if len(rp.rlist) < rp.opts.MaxDetails {
		rp.rlist = append(rp.rlist, Rejection{Event: rp.events, Line: rp.line, Run: run, Reason: why, Detail: err.Error()})
	}
}

// Apply replays one event; line is its input line (0 if unknown). An event
// that breaks the trace's structure is not replayed and returned as an
// *InputError. Otherwise Apply returns the first invariant the event broke,
// as a *Violation, or nil. A guest request either run refuses is not an
// error: it is counted in the Result by reason.
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
	var inputErr *InputError
	err := rp.val.Check(e)
	if err == nil {
		err = rp.machine(e)
	}
	if err != nil {
		rp.inputErrors++
		inputErr = &InputError{Event: rp.events, Line: line, Message: err.Error(), Err: err}
		if len(rp.ilist) < rp.opts.MaxDetails {
			rp.ilist = append(rp.ilist, *inputErr)
		}
	} else {
		rp.apply(e)
	}
	for _, r := range rp.runs {
		r.afterEvent()
	}
	if rp.opts.Progress != nil && rp.events%rp.opts.ProgressEvery == 0 {
		rp.opts.Progress(rp.events)
	}
	if inputErr != nil {
		return inputErr
	}
	if rp.first != nil {
		return rp.first
	}
	return nil
}

// machine records a RAM or MMIO event, and creates the runs' memory at the
// first event that is neither (the Validator has made sure the machine
// comes first). An error is the library refusing the machine
// (guestmem.ErrLayout): an input error.
func (rp *Replayer) machine(e trace.Event) error {
	switch e := e.(type) {
	case trace.RAM:
		rp.ram = append(rp.ram, e)
		rp.insertArea(area{r: e.Range(), ram: true})
		return nil
	case trace.MMIO:
		rp.mmio = append(rp.mmio, e)
		rp.insertArea(area{r: e.Range()})
		return nil
	}
	return rp.start()
}

// start creates the memory of both runs once.
func (rp *Replayer) start() error {
	if !rp.started {
		rp.started = true
		for _, r := range rp.runs {
			if err := r.start(rp.ram, rp.mmio); err != nil {
				rp.startErr = fmt.Errorf("%w: the library refuses the machine: %w", trace.ErrMachine, err)
				break
			}
		}
	}
	return rp.startErr
}

// apply replays a valid event in both runs and checks the invariants.
func (rp *Replayer) apply(e trace.Event) {
	switch e := e.(type) {
	case trace.RAM, trace.MMIO:
		// Part of the machine, created at the first request.
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
		want := guestmem.KindShared
		if e.To == trace.Private {
			want = guestmem.KindPrivate
		}
		rp.stateEvent(rp.eventWindow(e.GPA, e.Size), func(rn *run) error {
			err := rn.convert(e)
			// A guest giving memory back must never be refused for want
			// of IOMMU entries (or anything else the VMM runs out of).
			if err != nil && e.To == trace.Private && Reason(err) == ReasonNoEntries {
				rn.privateRefused++
			}
			return err
		}, want)
	case trace.Plug:
		rp.stateEvent(rp.eventWindow(e.GPA, e.Size), func(rn *run) error { return rn.mem.Plug(e.GPA, e.Size) },
			guestmem.KindPrivate)
	case trace.Unplug:
		rp.stateEvent(rp.eventWindow(e.GPA, e.Size), func(rn *run) error { return rn.mem.Unplug(e.GPA, e.Size) },
			guestmem.KindUnplugged)
	}
}

// eventWindow returns the page-aligned part of [gpa, gpa+size) below the
// end of the address space: what a request can change, whatever the
// executor thinks of it (a request that wraps is taken to run to the end).
func (rp *Replayer) eventWindow(gpa, size uint64) span.Range {
	limit := rp.runs[1].mem.MaxGPA()
	end := gpa + size
	if end < gpa || end > limit {
		end = limit
	}
	r, ok := span.Range{Start: min(gpa, limit), End: end}.Outward(trace.PageSize)
	if !ok {
		return span.Range{}
	}
	return r.Intersect(span.Range{End: limit})
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
		rp.reject("both", errs[1])
	case errs[0] != nil:
		rp.divergedEvents++
		rp.reject("baseline", errs[0])
	case errs[1] != nil:
		rp.divergedEvents++
		rp.reject("gmem", errs[1])
	}
	return errs
}

func (rp *Replayer) insertArea(a area) {
	i := sort.Search(len(rp.layout), func(i int) bool { return rp.layout[i].r.Start > a.r.Start })
	rp.layout = append(rp.layout, area{})
	copy(rp.layout[i+1:], rp.layout[i:])
	rp.layout[i] = a
}

// stateEvent replays a request that changes page state over r and checks
// it: I1/I2 in the window it could change, I3 if a run refused it, I4 if it
// accepted (every RAM page of r is of kind want afterwards), and the runs
// against each other.
func (rp *Replayer) stateEvent(r span.Range, fn func(*run) error, want guestmem.Kind) {
	type before struct {
		window span.Range
		state  []stateRun
		stats  []devStats
	}
	var bs [2]before
	for i, rn := range rp.runs {
		bs[i] = before{window: rn.window(r), state: rn.state(r), stats: rn.devStats()}
	}
	errs := rp.both(fn)
	for i, rn := range rp.runs {
		w := bs[i].window
		w2 := rn.window(r)
		w.Start, w.End = min(w.Start, w2.Start), max(w.End, w2.End)
		rn.checkMapped(w)
		after := rn.state(r)
		if errs[i] != nil {
			if !slices.Equal(bs[i].state, after) {
				rp.violate(rn.name, "I3", "refused event (%v) changed the page state of %v", errs[i], r)
			}
			blocks := 0
			for _, a := range rp.layout {
				if a.ram && a.r.Overlaps(r) {
					blocks++
				}
			}
			if d := diffStats(bs[i].stats, rn.devStats(), blocks <= 1); d != "" {
				rp.violate(rn.name, "I3", "refused event (%v) changed the IOMMU: %s", errs[i], d)
			}
			continue
		}
		for _, x := range after {
			if x.kind != want {
				rp.violate(rn.name, "I4", "after the event %v is %v, want %v", x.r, x.kind, want)
				break
			}
		}
	}
	switch {
	case errs[0] == nil && errs[1] == nil:
		rp.compare(r, false)
		rp.diverged.Remove(r)
	case (errs[0] == nil) == (errs[1] == nil):
		rp.compare(r, true)
	default:
		rp.diverged.Add(r)
	}
}

// compare checks that the baseline and gmem hold the same state over r,
// leaving out where they may differ if skipDiverged.
func (rp *Replayer) compare(r span.Range, skipDiverged bool) {
	pieces := []span.Range{r}
	if skipDiverged {
		pieces = rp.diverged.Minus(r)
	}
	for _, x := range pieces {
		b, g := rp.runs[0].state(x), rp.runs[1].state(x)
		if !slices.Equal(b, g) {
			rp.violate("both", "I4", "baseline and gmem disagree on %v: baseline %v, gmem %v", x, fmtRuns(b), fmtRuns(g))
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
	if err := rp.start(); err != nil {
		return nil // the input error was reported with its event
	}
	for _, a := range rp.layout {
		if a.ram {
			rp.compare(a.r, true)
		}
	}
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
		Events:            rp.events,
		Conversions:       rp.conversions,
		InputErrors:       rp.inputErrors,
		Rejected:          rp.rejected,
		RejectedBy:        maps.Clone(rp.rejectedBy),
		Diverged:          rp.divergedEvents,
		Violations:        rp.violations,
		ViolationDetails:  append([]Violation(nil), rp.vlist...),
		Rejections:        append([]Rejection(nil), rp.rlist...),
		InputErrorDetails: append([]InputError(nil), rp.ilist...),
	}
	g := rp.runs[1]
	for _, e := range rp.ram {
		res.RAMBytes += e.Size
	}
	if g.mem != nil {
		st := g.mem.StateStats()
		res.SharedBytes, res.PrivateBytes, res.UnpluggedBytes = st.SharedBytes, st.PrivateBytes, st.UnpluggedBytes
	} else {
		// Not started: every page as created, hot-pluggable RAM unplugged.
		for _, e := range rp.ram {
			if e.Block != 0 {
				res.UnpluggedBytes += e.Size
			} else {
				res.PrivateBytes += e.Size
			}
		}
	}
	res.Devices = len(g.order)
	res.Baseline = rp.runs[0].stats(rp.events)
	res.Gmem = g.stats(rp.events)
	return res
}
