package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/replay"
	"github.com/gmemproject/gmem/trace"
)

// replayer is what gmem replay needs of a replay.Replayer; tests substitute
// their own to reach every exit code.
type replayer interface {
	ApplyContext(ctx context.Context, e trace.Event, line int) error
	Finish() error
	Result() replay.Result
	WriteSVG(w io.Writer) error
}

// replayEnv is what runReplay takes from the process; tests give their own.
type replayEnv struct {
	stdin       io.Reader
	newReplayer func(replay.Options) replayer
	// terminal reports whether progress lines may be written to w.
	terminal func(w io.Writer) bool
	// grace is how long an interrupted replay may take to stop at an event
	// boundary before the command gives up on its result (default
	// interruptGrace).
	grace time.Duration
	// progressEvery is the interval of progress lines (default
	// progressInterval).
	progressEvery time.Duration
}

// maxShownErrors bounds the malformed lines and violations printed one by
// one on stderr; the rest are counted.
const maxShownErrors = 20

// shownRejections is how many refused events the table lists.
const shownRejections = 5

// interruptGrace is how long an interrupted replay may take to finish the
// undo of the event it was in. The IOMMU models fail every map call once
// the context ends, so this is the undo of what the event had mapped; past
// it the command exits without a result, so that an interrupt is honoured
// within a second whatever the event.
const interruptGrace = 500 * time.Millisecond

// progressInterval is how often a replay on a terminal says how far it is.
const progressInterval = time.Second

// runReplay implements "gmem replay FILE|-".
func runReplay(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	env := replayEnv{
		stdin:       os.Stdin,
		newReplayer: func(o replay.Options) replayer { return replay.New(o) },
		terminal:    func(w io.Writer) bool { return isTerminal(w) },
	}
	return env.run(ctx, args, stdout, stderr)
}

// replayFlags are the command line of gmem replay.
type replayFlags struct {
	json      bool
	svg       string
	keepGoing bool
	details   detailsFlag
	ram       string
	mmio      rangesFlag
	devices   int
	iommu     trace.IOMMU
	limit     uint64
	mode      trace.Mode
	format    trace.Format
	maxExtent maxExtentFlag
	policy    dma.Policy
	hugePages bool
	bitmap    uint64
	file      string

	opts     trace.Options  // the trace options the flags make
	ropts    replay.Options // the replay options the flags make
	qemuOnly []string       // the flags given that describe a QEMU log's machine
}

// maxExtentFlag is --max-extent: a size, or "none" for dma.Unbounded.
type maxExtentFlag struct {
	v    uint64
	text string // as given, for messages
}

func (f *maxExtentFlag) String() string {
	switch f.v {
	case 0:
		return ""
	case dma.Unbounded:
		return "none"
	}
	return trace.FormatSize(f.v)
}

func (f *maxExtentFlag) Set(s string) error {
	f.text = s
	if s == "none" {
		f.v = dma.Unbounded
		return nil
	}
	return sizeFlag{&f.v}.Set(s)
}

// detailsFlag is --details: a count, or "all".
type detailsFlag struct{ n int }

func (f *detailsFlag) String() string {
	if f.n < 0 {
		return "all"
	}
	return strconv.Itoa(f.n)
}

func (f *detailsFlag) Set(s string) error {
	if s == "all" {
		f.n = -1
		return nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return errors.New("want a positive count or all")
	}
	f.n = n
	return nil
}

// rangesFlag is a repeatable GPA:SIZE[,GPA:SIZE...] flag.
type rangesFlag struct{ texts []string }

func (f *rangesFlag) String() string { return strings.Join(f.texts, ",") }

func (f *rangesFlag) Set(s string) error {
	if _, err := trace.ParseMMIOLayout(s); err != nil {
		return err
	}
	f.texts = append(f.texts, s)
	return nil
}

// parseReplayFlags parses the command line; it returns flag.ErrHelp for -h
// and a usage error for anything wrong with the flags, before any input is
// read.
func parseReplayFlags(args []string) (*replayFlags, *flag.FlagSet, error) {
	f := &replayFlags{devices: 1, details: detailsFlag{replay.DefaultMaxDetails}}
	fs := newFlagSet("gmem replay")
	fs.BoolVar(&f.json, "json", false, "print the result as one JSON object (with an \"error\" object whenever the exit status is not 0)")
	fs.StringVar(&f.svg, "svg", "", "draw the memory map and the entries timeline to `FILE` (SVG); - for stdout, in place of the table")
	fs.BoolVar(&f.keepGoing, "keep-going", false, "skip malformed lines, impossible machine events and devices a run cannot attach, and continue after a violation, reporting each")
	fs.Var(&f.details, "details", fmt.Sprintf("how many violations, rejections, input and run errors to describe one by one, `N` or all (default %d each; all are counted)", replay.DefaultMaxDetails))
	fs.Var(enumFlag[trace.Format]{&f.format, trace.ParseFormat}, "format", "input format, jsonl or qemu (default: detected from the first line that is neither blank nor a comment)")
	fs.StringVar(&f.ram, "ram", "", "QEMU logs: RAM layout `GPA:SIZE[,GPA:SIZE...]` (default: from 0 to the highest converted address, rounded up to 1GiB, less the --mmio holes)")
	fs.Var(&f.mmio, "mmio", "QEMU logs: MMIO holes such as the PCI hole, `GPA:SIZE[,GPA:SIZE...]`; repeatable")
	fs.IntVar(&f.devices, "devices", 1, "QEMU logs: number of devices attached")
	fs.Var(enumFlag[trace.IOMMU]{&f.iommu, trace.ParseIOMMU}, "iommu", "QEMU logs: devices' IOMMU, type1 or iommufd (default type1)")
	fs.Uint64Var(&f.limit, "limit", 0, "QEMU logs: type1 dma_entry_limit (0: the kernel's default, 65535)")
	fs.Var(enumFlag[trace.Mode]{&f.mode, trace.ParseMode}, "mode", "QEMU logs: RAM backing, split or inplace (default split, as QEMU's guest_memfd RAM)")
	fs.Var(enumFlag[dma.Policy]{&f.policy, parseGmemPolicy}, "policy", "gmem's IOMMU mapping policy: auto (cut where the device's IOMMU can cut, extent elsewhere), extent (one entry per converted extent, a split unmaps and maps the rest of its chunk again) or cut (the same entries, a split is one cut; iommufd only); the baseline maps granules")
	fs.BoolVar(&f.hugePages, "iommufd-huge-pages", false, "model gmem's iommufd devices as IOASes that keep huge pages, which cannot cut (auto then maps bounded extents there); by default they cut, as gmem sets them up")
	fs.Var(&f.maxExtent, "max-extent", fmt.Sprintf("gmem's largest IOMMU entry, a power-of-two `SIZE` of at least 4KiB, or none (default %s)", trace.FormatSize(dma.DefaultMaxExtent)))
	fs.Var(sizeFlag{&f.bitmap}, "bitmap-budget", fmt.Sprintf("largest baseline bitmaps to allocate, a `SIZE` (default %s, 8 TiB of RAM); past it the baseline keeps runs and its state memory is computed", trace.FormatSize(replay.DefaultBitmapBudget)))

	// Flags may come before or after the file name.
	for rest := args; ; {
		if err := parseFlags(fs, rest); err != nil {
			return f, fs, err
		}
		if fs.NArg() == 0 {
			break
		}
		if f.file != "" {
			return f, fs, fmt.Errorf("unexpected argument %q (one trace at a time)", fs.Arg(0))
		}
		f.file, rest = fs.Arg(0), fs.Args()[1:]
	}
	if f.file == "" {
		return f, fs, errors.New("no trace given: gmem replay [flags] FILE|-")
	}
	fs.Visit(func(fl *flag.Flag) {
		switch fl.Name {
		case "ram", "mmio", "devices", "iommu", "limit", "mode":
			f.qemuOnly = append(f.qemuOnly, "--"+fl.Name)
		}
	})
	f.opts = trace.Options{KeepGoing: f.keepGoing, Format: f.format, Devices: f.devices, IOMMU: f.iommu, Limit: f.limit, Mode: f.mode}
	if f.ram != "" {
		ram, err := trace.ParseRAMLayout(f.ram)
		if err != nil {
			return f, fs, fmt.Errorf("--ram: %w", err)
		}
		f.opts.RAM = ram
	}
	for _, t := range f.mmio.texts {
		holes, err := trace.ParseMMIOLayout(t)
		if err != nil {
			return f, fs, fmt.Errorf("--mmio: %w", err)
		}
		f.opts.MMIO = append(f.opts.MMIO, holes...)
	}
	if f.devices < 1 || f.devices > trace.MaxDevices {
		return f, fs, fmt.Errorf("--devices %d: want 1 to %d", f.devices, trace.MaxDevices)
	}
	if err := f.opts.Check(); err != nil {
		return f, fs, machineFlagError(err)
	}
	budget := false
	fs.Visit(func(fl *flag.Flag) { budget = budget || fl.Name == "bitmap-budget" })
	if budget && f.bitmap == 0 {
		return f, fs, errors.New("--bitmap-budget 0: want more than 0 (a budget of 1 allocates no bitmap)")
	}
	if f.policy == dma.Cut && f.hugePages {
		return f, fs, errors.New("--policy cut with --iommufd-huge-pages: an IOAS that keeps huge pages cannot cut, and type1 never does")
	}
	f.ropts = replay.Options{MaxExtent: f.maxExtent.v, Policy: f.policy, IOMMUFDHugePages: f.hugePages, BitmapBudget: f.bitmap, MaxDetails: f.details.n, Limits: true}
	if err := f.ropts.Validate(); err != nil {
		return f, fs, fmt.Errorf("--max-extent %s: %s", f.maxExtent.text, strings.TrimPrefix(err.Error(), replay.ErrOptions.Error()+": "))
	}
	if f.svg == "-" && f.json {
		return f, fs, errors.New("--svg - and --json both write to stdout; give --svg a file")
	}
	return f, fs, nil
}

// parseGmemPolicy parses --policy: a policy of dma.ParsePolicy, but not
// granule, which is the baseline's.
func parseGmemPolicy(s string) (dma.Policy, error) {
	p, err := dma.ParsePolicy(s)
	switch {
	case err != nil:
		return 0, fmt.Errorf("want auto, extent or cut, not %q", s)
	case p == dma.Granule:
		return 0, errors.New("granule is the baseline's policy; gmem's is auto, extent or cut")
	}
	return p, nil
}

// machineFlagError names the flag behind an error of trace.Options.Check.
func machineFlagError(err error) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "entry limit") || strings.Contains(msg, "dma_entry_limit"):
		return fmt.Errorf("--limit: %w", err)
	case strings.Contains(msg, "MMIO"):
		return fmt.Errorf("--ram, --mmio: %w", err)
	}
	return err
}

// replayOutput is where gmem replay reports: the result on stdout (a table,
// or JSON), diagnostics on stderr.
type replayOutput struct {
	stdout io.Writer
	stderr io.Writer
	json   bool
}

// replayError is the "error" object of --json: why the exit status is not
// 0.
type replayError struct {
	// Kind is usage, input, output, run (a device a run could not attach),
	// violation or interrupted.
	Kind    string `json:"kind"`
	Message string `json:"message"`
	Line    int    `json:"line,omitempty"` // the input line, when one is at fault
}

// fail reports an error that leaves no result to print: on stderr, and as
// {"error": ...} on stdout for --json. It returns code.
func (o *replayOutput) fail(code int, e replayError) int {
	fmt.Fprintf(o.stderr, "gmem replay: %s\n", e.Message)
	if e.Kind == "usage" {
		fmt.Fprintln(o.stderr, "Run 'gmem replay -h' for its flags.")
	}
	if o.json {
		o.writeJSON(replayJSON{Error: &e})
	}
	return code
}

func (o *replayOutput) writeJSON(v replayJSON) error {
	enc := json.NewEncoder(o.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (env replayEnv) run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	f, fs, err := parseReplayFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		replayHelp(stdout, fs)
		return exitOK
	}
	out := &replayOutput{stdout: stdout, stderr: stderr, json: f.json}
	if err != nil {
		return out.fail(exitUsage, replayError{Kind: "usage", Message: err.Error()})
	}

	in := env.stdin
	name := "stdin"
	if f.file != "-" {
		file, err := os.Open(f.file)
		if err != nil {
			return out.fail(exitUsage, replayError{Kind: "input", Message: err.Error()})
		}
		defer file.Close()
		if st, err := file.Stat(); err == nil && st.IsDir() {
			return out.fail(exitUsage, replayError{Kind: "input", Message: f.file + " is a directory"})
		}
		in, name = file, f.file
	}
	if f.file == "-" && isTerminal(in) {
		fmt.Fprintln(stderr, "gmem replay: reading the trace from the terminal; end it with Ctrl-D")
	}
	counted := &countingReader{r: in}
	if st, ok := in.(interface{ Stat() (os.FileInfo, error) }); ok {
		if fi, err := st.Stat(); err == nil && fi.Mode().IsRegular() {
			counted.size = fi.Size()
		}
	}

	start := time.Now()
	diag := &diagWriter{w: stderr}
	s := &replaySession{
		rp:        env.newReplayer(f.ropts),
		name:      name,
		stderr:    diag,
		keepGoing: f.keepGoing,
		details:   f.ropts.MaxDetails,
		qemuOnly:  f.qemuOnly,
		policy:    f.policy,
	}
	if s.details == 0 {
		s.details = replay.DefaultMaxDetails
	}
	rd := trace.NewReader(counted, f.opts)
	done := make(chan error, 1)
	go func() { done <- s.run(ctx, rd) }()

	prog := &progress{diag: diag, start: start, input: counted, s: s}
	var tick <-chan time.Time
	if env.terminal(stderr) {
		t := time.NewTicker(cmpDuration(env.progressEvery, progressInterval))
		defer t.Stop()
		tick = t.C
	}
	var grace <-chan time.Time
	interrupted := ctx.Done()
	for waiting := true; waiting; {
		select {
		case err = <-done:
			waiting = false
		case <-tick:
			prog.show()
		case <-interrupted:
			interrupted = nil
			grace = time.After(cmpDuration(env.grace, interruptGrace))
		case <-grace:
			// Still undoing the event it was in: give up on the result.
			diag.close()
			line, event, since := s.current()
			msg := fmt.Sprintf("interrupted during event %s (line %s), %s into it, after %s of replay; no result",
				commas(event), commas(uint64(line)), time.Since(since).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
			return out.fail(exitFail, replayError{Kind: "interrupted", Message: msg, Line: line})
		}
	}
	diag.clear()

	res := s.rp.Result()
	st := inputStats{
		Format:       rd.Format().String(),
		FormatReason: rd.FormatReason(),
		Lines:        rd.Lines(),
		Events:       s.events.Load(),
		Malformed:    s.malformed,
		Skipped:      rd.Skipped(),
		Unrecognised: rd.Unrecognised(),
		Folded:       rd.Folded(),
	}
	report := replayJSON{Result: &res, Input: &st}
	s.merge(&report)
	if err != nil {
		// The input stopped the replay: no table, but --json gets what was
		// replayed until then.
		e := replayError{Kind: "input", Message: fmt.Sprintf("%s: %v", name, err)}
		var pe *trace.ParseError
		var ie *replay.InputError
		switch {
		case errors.As(err, &pe):
			e.Line = pe.Line
		case errors.As(err, &ie):
			e.Line = ie.Line
		}
		fmt.Fprintf(stderr, "gmem replay: %s\n", e.Message)
		if f.json {
			report.Error = &e
			out.writeJSON(report)
		}
		return exitUsage
	}
	if rd.Format() == trace.QEMULog && res.Conversions == 0 {
		fmt.Fprintf(stderr, "gmem replay: warning: %s: no %s or %s event recognised in %d lines (%d unrecognised); is it a QEMU trace log with those events enabled?\n",
			name, "kvm_convert_memory", "kvm_memory_fault", st.Lines, st.Unrecognised)
	}

	code, why := s.verdict(res)
	if why != nil {
		report.Error = why
	}
	if s.stopped == stopPolicy {
		// Stopped at the first device it could not attach: the flags do
		// not suit the trace, and a table of the events before says
		// nothing. --json gets them.
		fmt.Fprintf(stderr, "gmem replay: %s: %s\n", name, why.Message)
		if f.json {
			out.writeJSON(report)
		}
		return code
	}
	w := &errWriter{w: stdout}
	switch {
	case f.svg == "-":
		if err := s.rp.WriteSVG(w); err != nil {
			w.err = cmpError(w.err, err)
		}
	case f.svg != "":
		if err := writeSVG(s.rp, f.svg); err != nil {
			return out.fail(exitUsage, replayError{Kind: "output", Message: "--svg: " + err.Error()})
		}
	}
	switch {
	case f.json:
		if err := out.writeJSON(report); err != nil {
			w.err = cmpError(w.err, err)
		}
	case f.svg != "-":
		printResult(w, name, st, res, time.Since(start))
	}
	if w.err != nil {
		fmt.Fprintf(stderr, "gmem replay: writing the result: %v\n", w.err)
		return exitUsage
	}
	if why != nil {
		fmt.Fprintf(stderr, "gmem replay: %s: %s\n", name, why.Message)
	}
	return code
}

// cmpDuration returns d, or def if d is 0.
func cmpDuration(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// cmpError returns the first error that is not nil.
func cmpError(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// verdict returns the exit status of a finished replay and, unless it is
// 0, why.
func (s *replaySession) verdict(res replay.Result) (int, *replayError) {
	switch {
	case res.Violations > 0:
		return exitFail, &replayError{Kind: "violation", Message: fmt.Sprintf("%s: see the result", plural(res.Violations, "invariant violated", "invariants violated"))}
	case s.stopped == stopInterrupted:
		return exitFail, &replayError{Kind: "interrupted", Message: fmt.Sprintf("interrupted after %s; the result is of those", plural(res.Events, "event", "events"))}
	case s.policyErr != nil:
		return exitUsage, s.policyErr
	case res.RunErrors > 0:
		return exitFail, &replayError{Kind: "run", Message: runErrorSummary(res, s.stopped == stopRun)}
	case s.malformed > 0 || res.InputErrors > 0:
		return exitUsage, &replayError{Kind: "input", Message: fmt.Sprintf("%s and %s skipped",
			plural(uint64(s.malformed), "malformed line", "malformed lines"), plural(res.InputErrors, "impossible machine event", "impossible machine events"))}
	}
	return exitOK, nil
}

// runErrorSummary says what the run errors mean for the result.
func runErrorSummary(res replay.Result, stopped bool) string {
	what := plural(res.RunErrors, "device", "devices") + " could not be attached"
	if stopped {
		return what + "; the replay stopped there (--keep-going replays the rest without it)"
	}
	return what + "; the run that could not attach went on without it"
}

// inputStats is what gmem replay read: the format and why, and what became
// of the lines.
type inputStats struct {
	Format       string `json:"format"`
	FormatReason string `json:"format_reason"`
	Lines        int    `json:"lines"`        // lines read
	Events       uint64 `json:"events"`       // events replayed, the machine of a QEMU log included
	Malformed    int    `json:"malformed"`    // lines skipped as malformed (--keep-going)
	Skipped      int    `json:"skipped"`      // comment lines
	Unrecognised int    `json:"unrecognised"` // QEMU log lines with no conversion event
	Folded       int    `json:"folded"`       // kvm_convert_memory lines repeating a kvm_memory_fault
}

// replayJSON is the --json output: the replay's result, the input's
// statistics, and why the exit status is not 0. input_errors and
// input_error_details count and list malformed lines (kind "malformed") and
// impossible machine events (kind "machine") together.
type replayJSON struct {
	Error *replayError `json:"error,omitempty"`
	*replay.Result
	Input *inputStats `json:"input,omitempty"`
}

// merge adds the malformed lines the session skipped to the input errors of
// the report, in line order.
func (s *replaySession) merge(r *replayJSON) {
	if s.malformed == 0 {
		return
	}
	res := *r.Result
	res.InputErrors += uint64(s.malformed)
	all := append(append([]replay.InputError(nil), s.malformedList...), res.InputErrorDetails...)
	sortInputErrors(all)
	limit := s.details
	if limit < 0 {
		limit = math.MaxInt
	}
	res.InputErrorDetails = all[:min(len(all), limit)]
	res.InputErrorsOmitted = res.InputErrors - uint64(len(res.InputErrorDetails))
	r.Result = &res
}

// replaySession feeds events to a replayer and reports what goes wrong. Its
// run goroutine owns everything but the atomics, which the progress line
// reads.
type replaySession struct {
	rp        replayer
	name      string
	stderr    io.Writer
	keepGoing bool
	details   int      // Options.MaxDetails: negative for all
	qemuOnly  []string // machine flags given, ignored for JSON Lines
	policy    dma.Policy
	// policyErr says why the gmem run could not attach a device with the
	// policy asked for (cut, on a space that cannot cut), the first time:
	// a usage error.
	policyErr *replayError

	malformed     int
	malformedList []replay.InputError
	inputErrors   int
	runErrors     int
	violations    int
	stopped       string // why the replay stopped early, or ""

	events   atomic.Uint64 // events applied
	line     atomic.Int64  // input line of the event being applied
	total    atomic.Int64  // lines of a QEMU log (read whole), or 0
	since    atomic.Int64  // when the event being applied started (UnixNano), 0 between events
	finished atomic.Bool   // the final checks are running
}

// Reasons to stop early.
const (
	stopViolation   = "violation"
	stopInterrupted = "interrupted"
	stopInput       = "input"
	stopRun         = "run"
	stopPolicy      = "policy"
)

// current returns the line and number of the event being applied, and when
// it started.
func (s *replaySession) current() (line int, event uint64, since time.Time) {
	return int(s.line.Load()), s.events.Load() + 1, time.Unix(0, s.since.Load())
}

// run replays the events of rd as they are read (a JSON Lines trace in
// constant memory; a QEMU log, which the Reader reads whole first, event by
// event), then finishes. It returns the error that stopped the replay if
// the input is at fault.
func (s *replaySession) run(ctx context.Context, rd *trace.Reader) error {
	if err := s.read(ctx, rd); err != nil {
		return err
	}
	switch s.stopped {
	case "", stopViolation, stopRun, stopPolicy:
		s.finished.Store(true)
		if err := s.rp.Finish(); err != nil {
			s.printViolation(err)
		}
	}
	return nil
}

func (s *replaySession) read(ctx context.Context, rd *trace.Reader) error {
	for first := true; ; first = false {
		e, err := rd.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if rd.Format() == trace.QEMULog {
			s.total.Store(int64(rd.Lines()))
		}
		if first && rd.Format() == trace.JSONLines && len(s.qemuOnly) > 0 {
			verb := "are"
			if len(s.qemuOnly) == 1 {
				verb = "is"
			}
			fmt.Fprintf(s.stderr, "gmem replay: the trace declares its own machine; %s %s for QEMU logs only, and ignored\n",
				strings.Join(s.qemuOnly, ", "), verb)
		}
		var pe *trace.ParseError
		if errors.As(err, &pe) {
			if !s.keepGoing {
				return pe
			}
			s.malformed++
			if s.details < 0 || len(s.malformedList) < s.details {
				s.malformedList = append(s.malformedList, replay.InputError{Line: pe.Line, Kind: "malformed", Message: pe.Err.Error(), Err: pe.Err})
			}
			s.report(&s.malformed, "malformed lines skipped", fmt.Sprintf("%v (skipped)", pe))
			continue
		}
		if err != nil {
			return err
		}
		stop, err := s.apply(ctx, e, rd.Line())
		if stop {
			return err
		}
	}
}

// apply replays one event and reports whether to stop, and the input error
// to stop at, if that is why.
func (s *replaySession) apply(ctx context.Context, e trace.Event, line int) (stop bool, _ error) {
	s.line.Store(int64(line))
	s.since.Store(time.Now().UnixNano())
	err := s.rp.ApplyContext(ctx, e, line)
	s.since.Store(0)
	var ie *replay.InputError
	var re *replay.RunError
	switch {
	case errors.Is(err, replay.ErrInterrupted):
		s.stopped = stopInterrupted
		return true, nil
	case errors.As(err, &re) && errors.Is(re, dma.ErrOptions):
		// Validate took every other option: the policy does not suit the
		// device.
		if s.policyErr == nil {
			s.policyErr = s.policyError(e, re)
		}
		s.runErrors++
		if !s.keepGoing {
			s.stopped = stopPolicy
		}
	case errors.As(err, &re):
		s.runErrors++
		s.report(&s.runErrors, "devices a run could not attach", re.Error())
		if !s.keepGoing {
			s.stopped = stopRun
		}
	case errors.As(err, &ie):
		s.inputErrors++
		if !s.keepGoing {
			s.stopped = stopInput
			s.events.Add(1)
			return true, ie
		}
		s.report(&s.inputErrors, "impossible machine events skipped", fmt.Sprintf("%v (skipped)", ie))
	case err != nil:
		s.printViolation(err)
		if !s.keepGoing {
			s.stopped = stopViolation
		}
	}
	s.events.Add(1)
	return s.stopped != "", nil
}

// policyError says which device the policy asked for does not suit, and
// what would.
func (s *replaySession) policyError(e trace.Event, re *replay.RunError) *replayError {
	msg := fmt.Sprintf("--policy %s: %v", s.policy, re)
	if a, ok := e.(trace.Attach); ok && s.policy == dma.Cut {
		why := "type1 never cuts"
		if a.IOMMU == trace.IOMMUFD {
			why = "an IOAS that keeps huge pages (--iommufd-huge-pages) cannot cut"
		}
		msg = fmt.Sprintf("--policy cut: device %q is %s: %s; --policy auto cuts only where a device can", a.Dev, a.IOMMU, why)
	}
	where := "event " + commas(re.Event)
	if re.Line > 0 {
		where = "line " + commas(uint64(re.Line))
	}
	return &replayError{Kind: "usage", Message: where + ": " + msg, Line: re.Line}
}

// report prints msg for one of the first maxShownErrors of a kind of error
// (*n of them so far), then once that there are more.
func (s *replaySession) report(n *int, more, msg string) {
	switch {
	case *n <= maxShownErrors:
		fmt.Fprintf(s.stderr, "gmem replay: %s: %s\n", s.name, msg)
	case *n == maxShownErrors+1:
		fmt.Fprintf(s.stderr, "gmem replay: %s: more %s\n", s.name, more)
	}
}

func (s *replaySession) printViolation(err error) {
	s.violations++
	s.report(&s.violations, "violations; see the result", err.Error())
}

func writeSVG(rp replayer, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := rp.WriteSVG(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// countingReader counts the bytes read, for the progress line.
type countingReader struct {
	r    io.Reader
	n    atomic.Int64
	size int64 // of a regular file, or 0
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// errWriter keeps the first write error, so that a result that could not be
// written is reported once.
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) Write(p []byte) (int, error) {
	if e.err != nil {
		return len(p), nil
	}
	n, err := e.w.Write(p)
	e.err = err
	return n, err
}

// diagWriter carries the diagnostics of the replay's goroutine and the
// progress line of the command's, one at a time: a diagnostic first clears
// the progress line. Once closed it drops what the replay still writes.
type diagWriter struct {
	mu     sync.Mutex
	w      io.Writer
	status bool // a progress line is on the screen
	closed bool
}

func (d *diagWriter) Write(p []byte) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return len(p), nil
	}
	d.clearLocked()
	return d.w.Write(p)
}

// show replaces the progress line with line.
func (d *diagWriter) show(line string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.closed {
		fmt.Fprintf(d.w, "\r%s\x1b[K", line)
		d.status = true
	}
}

func (d *diagWriter) clear() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.clearLocked()
}

func (d *diagWriter) clearLocked() {
	if d.status {
		fmt.Fprint(d.w, "\r\x1b[K")
		d.status = false
	}
}

// close clears the progress line and drops later writes.
func (d *diagWriter) close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.clearLocked()
	d.closed = true
}

// progress writes how far a replay is, to a terminal: events done, how much
// of the input was read, the time so far, and the event being applied if it
// has run for more than a second.
type progress struct {
	diag  *diagWriter
	start time.Time
	input *countingReader
	s     *replaySession
}

func (p *progress) show() {
	p.diag.show(p.line(time.Now()))
}

func (p *progress) line(now time.Time) string {
	var b strings.Builder
	line, event, since := p.s.current()
	fmt.Fprintf(&b, "replay: %s done", plural(p.s.events.Load(), "event", "events"))
	switch total := p.s.total.Load(); {
	case total > 0:
		fmt.Fprintf(&b, ", line %s of %s", commas(uint64(line)), commas(uint64(total)))
	case p.input.size > 0:
		fmt.Fprintf(&b, ", %s of %s read (%d%%)", human(uint64(p.input.n.Load())), human(uint64(p.input.size)), 100*p.input.n.Load()/p.input.size)
	}
	fmt.Fprintf(&b, ", %s", now.Sub(p.start).Round(time.Second))
	switch {
	case p.s.finished.Load():
		b.WriteString("; final checks")
	case p.s.since.Load() != 0 && now.Sub(since) >= time.Second:
		fmt.Fprintf(&b, "; event %s (line %s) running for %s", commas(event), commas(uint64(line)), now.Sub(since).Round(time.Second))
	}
	return b.String()
}

// isTerminal reports whether f, a reader or a writer, is a terminal (a
// TCGETS ioctl succeeds).
func isTerminal(f any) bool {
	file, ok := f.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(file.Fd()), unix.TCGETS)
	return err == nil
}
