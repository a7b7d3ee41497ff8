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
//     converted extent, with Options.Policy (default dma.Auto: a discard
//     inside an entry is one cut where the device's space cuts, an unmap
//     and a remap of the bounded extent elsewhere).
//
// Each attached device gets one iommu.Model with the device's rules (type1
// with its entry limit, or iommufd), attached with Memory.AttachIOMMU. An
// iommufd device is modelled as each VMM sets it up by default: in the gmem
// run an IOAS with huge pages off that cuts (iommu.Caps.Cut, what
// iommufd.NewSpace makes where the kernel offers it) unless
// Options.IOMMUFDHugePages, in the baseline QEMU's IOAS, which keeps huge
// pages and never cuts.
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
// per page, as QEMU has), and those only up to Options.BitmapBudget: past it
// the baseline keeps runs too and its state memory is computed.
package replay

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"maps"
	"math"
	"slices"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
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
	// MaxDetails bounds the violations, rejections, input and run errors
	// kept with their description, each (0: DefaultMaxDetails; negative: no
	// bound). All are counted, and Result says how many were left out.
	MaxDetails int
	// Logger receives the library's own logs (default: discarded). A
	// baseline running out of type1 entries logs every refusal.
	Logger *slog.Logger
	// MaxExtent is the gmem run's dma.Options.MaxExtent (0: the default,
	// dma.Unbounded: none).
	MaxExtent uint64
	// Policy is the gmem run's dma.Options.Policy: dma.Auto (the zero
	// value: Cut on the devices whose space cuts, Extent on the others),
	// dma.Extent or dma.Cut. The baseline maps granules whatever it says,
	// and dma.Granule is refused (Validate): it is the baseline's. With
	// dma.Cut a device whose space cannot cut (type1, or iommufd with
	// IOMMUFDHugePages) is not attached in the gmem run: a *RunError
	// wrapping dma.ErrOptions.
	Policy dma.Policy
	// IOMMUFDHugePages models the gmem run's iommufd devices as IOASes that
	// keep large IOMMU pages (iommufd.SpaceOptions.HugePages): the kernel
	// cannot cut their areas, so Auto maps bounded extents there, as on
	// type1. By default they are IOASes with huge pages off that cut, as
	// iommufd.NewSpace sets them up.
	IOMMUFDHugePages bool
	// KernelModel runs in-place traces, in both runs, on the kernel's
	// in-place conversion as guestmem/kernelmodel models it: each block a
	// guest_memfd (without memory) that keeps its own attributes, pinned by
	// every attached device's IOMMU, so every conversion to private reaches
	// a kernel that refuses pinned pages. Replay has no other pinner, so a
	// refusal means gmem's own mappings were still there: an I2
	// violation.
	KernelModel bool
	// BitmapBudget bounds the baseline's bitmaps, in bytes (default
	// DefaultBitmapBudget). A guest whose bitmaps would be larger has the
	// baseline keep its page state as runs, with the same answers and the
	// same IOMMU entries, and its state memory computed (RunStats.StateHow).
	BitmapBudget uint64
	// Limits answers Result.Limits: what dma_entry_limit the trace needs
	// with each policy. It replays each policy a second time, with no type1
	// entry limit (no checks, type1 devices only), which costs as much
	// again as the runs' own mapping, and more where the limit refused
	// much.
	Limits bool
}

// DefaultBitmapBudget is Options.BitmapBudget when 0: 256 MiB of bitmaps,
// one bit per 4 KiB page of 8 TiB of RAM. Past it, allocating and clearing
// the bitmaps takes seconds and gigabytes (2 GiB at 64 TiB, 32 GiB at
// 1 PiB, which no ordinary machine has), for a figure that is arithmetic.
const DefaultBitmapBudget = 256 << 20

// Values of RunStats.StateHow.
const (
	StateMeasured = ""         // the state maps' own size
	StateComputed = "computed" // the bitmaps' size, computed: they were not allocated
)

// ErrInterrupted is wrapped by the error of ApplyContext when its context
// ends: before the event, or during it (the next IOMMU map call of either
// run fails, and the library undoes the event). The event is not counted,
// and the Replayer takes no more events: after an undo cut short the runs
// need not be consistent, so Finish checks nothing.
var ErrInterrupted = errors.New("replay: interrupted")

// ErrOptions is wrapped by every error of Options.Validate.
var ErrOptions = errors.New("replay: invalid options")

// Validate reports whether the options can be replayed with: a policy for
// the gmem run that some device can have (not dma.Granule, the baseline's;
// not dma.Cut with IOMMUFDHugePages, which leaves no space that cuts), and
// the mapper options of both runs as dma.New accepts them. New does not
// check; with options Validate refuses, attaches of the trace fail as
// *RunError.
func (o Options) Validate() error {
	switch o.Policy {
	case dma.Granule:
		return fmt.Errorf("%w: the gmem run's policy is auto, extent or cut; granule is the baseline's", ErrOptions)
	case dma.Cut:
		if o.IOMMUFDHugePages {
			return fmt.Errorf("%w: the cut policy with iommufd huge pages kept: no device of the gmem run can cut", ErrOptions)
		}
	}
	for _, baseline := range []bool{true, false} {
		if _, err := dma.New(iommu.NewModel(o.iommufdCaps(baseline)), nil, o.dmaOptions(baseline, nil)); err != nil {
			return fmt.Errorf("%w: %w", ErrOptions, err)
		}
	}
	return nil
}

// dmaOptions is the mapper configuration of a run: QEMU's granule policy
// for the baseline, the replay's policy and bound for gmem.
func (o Options) dmaOptions(baseline bool, log *slog.Logger) dma.Options {
	if baseline {
		return dma.Options{Policy: dma.Granule, Logger: log}
	}
	return dma.Options{Policy: o.Policy, MaxExtent: o.MaxExtent, Logger: log}
}

// iommufdCaps is the model of a run's iommufd device: QEMU's IOAS (huge
// pages kept, no cut) for the baseline; for gmem an IOAS with huge pages
// off that cuts, as iommufd.NewSpace makes it, unless IOMMUFDHugePages.
func (o Options) iommufdCaps(baseline bool) iommu.Caps {
	return iommu.Caps{Rules: iommu.IOMMUFD, Cut: !baseline && !o.IOMMUFDHugePages}
}

// RunStats is what one run (baseline or gmem) did.
type RunStats struct {
	EntriesFinal  uint64  `json:"entries_final"`  // IOMMU entries at the end, all devices
	EntriesPeak   uint64  `json:"entries_peak"`   // most entries after any event, all devices
	MapCalls      uint64  `json:"map_calls"`      // map requests sent to the IOMMUs
	UnmapCalls    uint64  `json:"unmap_calls"`    // unmap requests sent to the IOMMUs
	CutCalls      uint64  `json:"cut_calls"`      // cut requests sent to the IOMMUs (the cut policy)
	Splits        uint64  `json:"splits"`         // entries a discard cut, keeping the rest mapped (remapped, or cut)
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
	// StateHow says how StateBytes was obtained: StateMeasured, or
	// StateComputed for a baseline past Options.BitmapBudget (Result.Notes
	// says why).
	StateHow string `json:"state_how,omitempty"`
	// Policy is the policy the run's mappers resolved (dma.Mapper.Policy)
	// for every device it attached: "granule", "extent" or "cut", or
	// PolicyMixed where devices differ; "" if none was attached.
	// DevicePolicies says it per device, in the order of their first
	// attach.
	Policy         string         `json:"policy,omitempty"`
	DevicePolicies []DevicePolicy `json:"device_policies,omitempty"`
}

// PolicyMixed is RunStats.Policy when the run's devices were mapped with
// different policies (type1 and iommufd devices under dma.Auto).
const PolicyMixed = "mixed"

// DevicePolicy is how a run mapped one device: its IOMMU, whether the
// model of its space could cut, and the policy the mapper resolved. A
// device attached more than once has its last attach's.
type DevicePolicy struct {
	Dev    string `json:"dev"`
	IOMMU  string `json:"iommu"`  // "type1" or "iommufd"
	Cut    bool   `json:"cut"`    // the space could cut (iommu.Caps.Cut)
	Policy string `json:"policy"` // "granule", "extent" or "cut"
}

// Space says what the device's space was: "type1", "iommufd, huge pages
// off" (an IOAS that cuts) or "iommufd, huge pages kept".
func (d DevicePolicy) Space() string {
	switch {
	case d.IOMMU != trace.IOMMUFD.String():
		return d.IOMMU
	case d.Cut:
		return d.IOMMU + ", huge pages off"
	}
	return d.IOMMU + ", huge pages kept"
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
	// refused; from then on the two may differ where such events applied,
	// and their counts compare different traces. DivergedAt is the first
	// such event (0 for none).
	Diverged   uint64 `json:"diverged"`
	DivergedAt uint64 `json:"diverged_at,omitempty"`
	Violations uint64 `json:"violations"` // broken invariants
	// Interrupted says the replay was stopped by its context (ApplyContext)
	// before the end of the trace; Events counts the events it finished.
	Interrupted bool `json:"interrupted,omitempty"`
	// RunErrors counts the steps of the machine a run could not take (an
	// attach the library refused): neither guest requests nor input errors.
	RunErrors uint64 `json:"run_errors"`

	// Page state at the end, from the gmem run.
	RAMBytes       uint64 `json:"ram_bytes"`
	SharedBytes    uint64 `json:"shared_bytes"`
	PrivateBytes   uint64 `json:"private_bytes"`
	UnpluggedBytes uint64 `json:"unplugged_bytes"`
	Devices        int    `json:"devices"` // devices attached at the end

	Baseline RunStats `json:"baseline"`
	Gmem     RunStats `json:"gmem"`

	// Limits answers, with Options.Limits and when type1 devices were
	// attached, what dma_entry_limit the trace needs with each policy.
	Limits *Limits `json:"dma_entry_limit,omitempty"`

	// Notes say, in a sentence each, where a figure is not what it seems:
	// a baseline whose bitmaps were computed rather than allocated.
	Notes []string `json:"notes,omitempty"`

	// The first Options.MaxDetails of each, described, and how many of
	// each were counted but left out.
	ViolationDetails   []Violation  `json:"violation_details,omitempty"`
	Rejections         []Rejection  `json:"rejection_details,omitempty"`
	InputErrorDetails  []InputError `json:"input_error_details,omitempty"`
	RunErrorDetails    []RunError   `json:"run_error_details,omitempty"`
	ViolationsOmitted  uint64       `json:"violations_omitted"`
	RejectionsOmitted  uint64       `json:"rejections_omitted"`
	InputErrorsOmitted uint64       `json:"input_errors_omitted"`
	RunErrorsOmitted   uint64       `json:"run_errors_omitted"`
}

// RunError is a step of the machine that a run could not take: the library
// refused to attach a device's IOMMU (out of type1 entries for what is
// already shared, or mapper options it does not accept). It is not a guest
// request, and not refused to the guest: a VMM would fail to start or to
// hot-plug the device. From then on the run lacks the device.
type RunError struct {
	Event   uint64 `json:"event"`
	Line    int    `json:"line,omitempty"`
	Run     string `json:"run"`   // "baseline" or "gmem"
	Message string `json:"error"` // Err's text
	Err     error  `json:"-"`
}

// Error returns "line N: the RUN run could not ...".
func (e *RunError) Error() string {
	where := fmt.Sprintf("event %d", e.Event)
	if e.Line > 0 {
		where = fmt.Sprintf("line %d", e.Line)
	}
	return fmt.Sprintf("%s: the %s run %s", where, e.Run, e.Message)
}

// Unwrap returns the cause.
func (e *RunError) Unwrap() error { return e.Err }

// Limits answers the question of a type1 user: what
// vfio_iommu_type1.dma_entry_limit does this guest need, with QEMU's policy
// and with gmem's? The limit is per container: each device of a trace has
// its own.
type Limits struct {
	// Devices counts the type1 devices attached; Given is the smallest
	// dma_entry_limit they were given (65,535, the kernel's default, for
	// those given none).
	Devices int    `json:"type1_devices"`
	Given   uint64 `json:"given"`
	// Baseline and Gmem answer for each policy.
	Baseline EntryNeed `json:"baseline"`
	Gmem     EntryNeed `json:"gmem"`
}

// EntryNeed is what one policy needs of a type1 container for the whole
// trace.
type EntryNeed struct {
	// Peak is the most IOMMU entries one type1 device held after any event
	// of the trace replayed with no entry limit: every request the limit
	// refused granted, as the guest asked.
	Peak uint64 `json:"peak"`
	// Limit is the smallest dma_entry_limit under which the policy refuses
	// nothing for want of entries: Peak, and for gmem the entries its
	// mapper keeps free for splits (dma.DefaultSplitReserve of the limit).
	Limit uint64 `json:"limit"`
	// Refusals counts what the trace's own limits refused for want of
	// entries (requests, and attaches), and FirstRefusal is the first:
	// where QEMU, for the baseline, stops the VM; gmem answers the guest
	// EAGAIN and runs on.
	Refusals     uint64     `json:"refusals"`
	FirstRefusal *Rejection `json:"first_refusal,omitempty"`
	// Advice says in one line what to set.
	Advice string `json:"advice"`
	// Unknown, if not empty, says why Peak could not be measured.
	Unknown string `json:"unknown,omitempty"`
}

// InputError is an event that breaks the trace's own structure
// (trace.Validator): RAM or MMIO overlapping, a device attached twice, a
// plug where there is no hot-pluggable RAM. It is not replayed.
// Err wraps trace.ErrMachine or trace.ErrValue.
type InputError struct {
	Event   uint64 `json:"event"`
	Line    int    `json:"line,omitempty"`
	Kind    string `json:"kind"`  // InputMachine; a caller reading the trace adds its own (gmem replay: "malformed")
	Message string `json:"error"` // Err's text
	Err     error  `json:"-"`
}

// InputMachine is the Kind of the input errors a Replayer finds: events
// that describe an impossible machine.
const InputMachine = "machine"

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
	// shadows replay the requests again with no type1 entry limit, each
	// with a run's policy, to find the entries the trace needs
	// (Options.Limits); none without.
	shadows  []*run
	diverged span.Set // GPAs where the runs may differ

	events, conversions, rejected, inputErrors, divergedEvents uint64
	divergedAt                                                 uint64
	violations, runErrors                                      uint64
	rejectedBy                                                 map[string]uint64
	vlist                                                      []Violation
	rlist                                                      []Rejection
	ilist                                                      []InputError
	elist                                                      []RunError

	// done is the context of the event being applied; interrupted says it
	// ended and the replay stopped.
	done        <-chan struct{}
	interrupted bool

	limit    uint64     // largest type1 entry limit attached, for the drawing
	minLimit uint64     // smallest type1 entry limit attached (the default for none), 0 before any
	type1    int        // type1 devices attached
	line     int        // input line of the current event
	first    *Violation // first violation of the current step
	runErr   *RunError  // first run error of the current step
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
	switch {
	case opts.MaxDetails == 0:
		opts.MaxDetails = DefaultMaxDetails
	case opts.MaxDetails < 0:
		opts.MaxDetails = math.MaxInt
	}
	if opts.BitmapBudget == 0 {
		opts.BitmapBudget = DefaultBitmapBudget
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rp := &Replayer{opts: opts, log: log, val: trace.NewValidator(), rejectedBy: map[string]uint64{}}
	rp.runs[0] = newRun(rp, "baseline", true, false)
	rp.runs[1] = newRun(rp, "gmem", false, false)
	if opts.Limits {
		rp.shadows = []*run{newRun(rp, "baseline", true, true), newRun(rp, "gmem", false, true)}
	}
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

// runError records a step of the machine run could not take.
func (rp *Replayer) runError(run string, err error) {
	rp.runErrors++
	e := RunError{Event: rp.events, Line: rp.line, Run: run, Message: err.Error(), Err: err}
	if rp.runErr == nil {
		rp.runErr = &e
	}
	if len(rp.elist) < rp.opts.MaxDetails {
		rp.elist = append(rp.elist, e)
	}
}

// Apply replays one event; line is its input line (0 if unknown). An event
// that breaks the trace's structure is not replayed and returned as an
// *InputError. An attach a run could not do is returned as a *RunError; the
// replay may go on without that device in that run. Otherwise Apply returns
// the first invariant the event broke, as a *Violation, or nil. A guest
// request either run refuses is not an error: it is counted in the Result by
// reason.
func (rp *Replayer) Apply(e trace.Event, line int) error {
	return rp.ApplyContext(context.Background(), e, line)
}

// ApplyContext is Apply, stopped when ctx ends, even in the middle of a long
// event (a conversion of gigabytes is millions of map calls for the
// baseline): it then returns an error wrapping ErrInterrupted and takes no
// more events.
func (rp *Replayer) ApplyContext(ctx context.Context, e trace.Event, line int) error {
	switch {
	case rp.finished:
		return errors.New("replay: Apply after Finish")
	case rp.interrupted:
		return fmt.Errorf("%w: no more events", ErrInterrupted)
	}
	if err := ctx.Err(); err != nil {
		rp.interrupted = true
		return fmt.Errorf("%w after %d events: %w", ErrInterrupted, rp.events, context.Cause(ctx))
	}
	rp.done = ctx.Done()
	defer func() { rp.done = nil }()
	rp.events++
	rp.line = line
	rp.first, rp.runErr = nil, nil
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
		inputErr = &InputError{Event: rp.events, Line: line, Kind: InputMachine, Message: err.Error(), Err: err}
		if len(rp.ilist) < rp.opts.MaxDetails {
			rp.ilist = append(rp.ilist, *inputErr)
		}
	} else {
		rp.apply(e)
	}
	if rp.interrupted {
		rp.events--
		if _, ok := e.(trace.Convert); ok {
			rp.conversions--
		}
		where := fmt.Sprintf("event %d", rp.events+1)
		if line > 0 {
			where += fmt.Sprintf(" (line %d)", line)
		}
		return fmt.Errorf("%w during %s, undone: %w", ErrInterrupted, where, context.Cause(ctx))
	}
	for _, r := range rp.runs {
		r.afterEvent()
	}
	for _, r := range rp.shadows {
		r.afterEvent()
	}
	if rp.opts.Progress != nil && rp.events%rp.opts.ProgressEvery == 0 {
		rp.opts.Progress(rp.events)
	}
	if inputErr != nil {
		return inputErr
	}
	if rp.runErr != nil {
		return rp.runErr
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
		for _, r := range append(rp.runs[:], rp.shadows...) {
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
			limit := cmp.Or(e.Limit, defaultType1Limit)
			rp.limit = max(rp.limit, limit)
			if rp.type1 == 0 || limit < rp.minLimit {
				rp.minLimit = limit
			}
			rp.type1++
		}
		for _, r := range rp.runs {
			t0 := time.Now()
			err := r.attach(e)
			r.elapsed += time.Since(t0)
			if rp.interrupt(err) {
				return
			}
			if err != nil {
				if errors.Is(err, unix.ENOSPC) {
					r.noEntries(err)
				}
				rp.runError(r.name, err)
				continue
			}
			r.checkDevice(r.devices[e.Dev], span.Range{Start: 0, End: ^uint64(0)})
		}
		if e.IOMMU == trace.Type1 {
			for _, r := range rp.shadows {
				if err := r.attach(e); rp.interrupt(err) {
					return
				} else if err != nil && r.shadowErr == nil {
					r.shadowErr = err
				}
			}
		}
	case trace.Detach:
		rp.both(func(r *run) error { return r.detach(e.Dev) })
		for _, r := range rp.shadows {
			_ = r.detach(e.Dev)
		}
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
		if rp.interrupt(errs[i]) {
			return errs
		}
		if errs[i] != nil {
			r.failures++
			if errors.Is(errs[i], unix.ENOSPC) {
				r.limitFailures++
				r.noEntries(errs[i])
			}
		}
	}
	switch {
	case errs[0] != nil && errs[1] != nil:
		rp.reject("both", errs[1])
	case errs[0] != nil:
		rp.diverge()
		rp.reject("baseline", errs[0])
	case errs[1] != nil:
		rp.diverge()
		rp.reject("gmem", errs[1])
	}
	return errs
}

// diverge records a request one run refused and the other accepted.
func (rp *Replayer) diverge() {
	rp.divergedEvents++
	if rp.divergedAt == 0 {
		rp.divergedAt = rp.events
	}
}

// interrupt reports whether err is an interruption, and if so marks the
// replay as stopped.
func (rp *Replayer) interrupt(err error) bool {
	if err != nil && errors.Is(err, ErrInterrupted) {
		rp.interrupted = true
	}
	return rp.interrupted
}

// fault is the IOMMU models' hook: once the event's context has ended, every
// map call fails, so that the library stops and undoes the event. Unmap
// calls go through: the undo needs them.
func (rp *Replayer) fault(c iommu.Call) error {
	if c.Op != iommu.OpMap || rp.done == nil {
		return nil
	}
	select {
	case <-rp.done:
		return ErrInterrupted
	default:
		return nil
	}
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
	if rp.interrupted {
		return
	}
	for _, sh := range rp.shadows {
		if rp.interrupt(fn(sh)) {
			return
		}
	}
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
	if rp.interrupted {
		return nil // the runs were left mid-undo; there is nothing to check
	}
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
		DivergedAt:        rp.divergedAt,
		Violations:        rp.violations,
		Interrupted:       rp.interrupted,
		RunErrors:         rp.runErrors,
		RunErrorDetails:   append([]RunError(nil), rp.elist...),
		ViolationDetails:  append([]Violation(nil), rp.vlist...),
		Rejections:        append([]Rejection(nil), rp.rlist...),
		InputErrorDetails: append([]InputError(nil), rp.ilist...),
	}
	res.ViolationsOmitted = res.Violations - uint64(len(res.ViolationDetails))
	res.RejectionsOmitted = res.Rejected - uint64(len(res.Rejections))
	res.InputErrorsOmitted = res.InputErrors - uint64(len(res.InputErrorDetails))
	res.RunErrorsOmitted = res.RunErrors - uint64(len(res.RunErrorDetails))
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
	if rp.type1 > 0 && rp.opts.Limits {
		res.Limits = &Limits{
			Devices:  rp.type1,
			Given:    rp.minLimit,
			Baseline: rp.need(0),
			Gmem:     rp.need(1),
		}
	}
	if b := rp.runs[0]; b.computedState != 0 {
		res.Notes = append(res.Notes, fmt.Sprintf("the baseline's bitmaps would take %s, past the replay's budget of %s: "+
			"they were not allocated; the baseline kept its page state as runs (same answers, same IOMMU entries), "+
			"its state memory is computed, and its time per event is not a bitmap's",
			trace.FormatSize(b.computedState), trace.FormatSize(rp.opts.BitmapBudget)))
	}
	return res
}
