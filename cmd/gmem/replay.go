package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/internal/bench"
	"github.com/gmemproject/gmem/replay"
	"github.com/gmemproject/gmem/trace"
)

// replayer is what gmem replay needs of a replay.Replayer; tests substitute
// their own to reach every exit code.
type replayer interface {
	Apply(e trace.Event, line int) error
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
}

// maxShownErrors bounds the malformed lines and violations printed one by
// one; the rest are counted.
const maxShownErrors = 20

// shownRejections is how many refused events the table lists.
const shownRejections = 5

// runReplay implements "gmem replay FILE|-".
func runReplay(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	env := replayEnv{
		stdin:       os.Stdin,
		newReplayer: func(o replay.Options) replayer { return replay.New(o) },
		terminal:    isTerminal,
	}
	return env.run(ctx, args, stdout, stderr)
}

// replayFlags are the command line of gmem replay.
type replayFlags struct {
	json      bool
	svg       string
	keepGoing bool
	ram       string
	devices   int
	iommu     trace.IOMMU
	limit     uint64
	mode      trace.Mode
	format    trace.Format
	maxExtent maxExtentFlag
	file      string
}

// maxExtentFlag is --max-extent: a size, or "none" for dma.Unbounded.
type maxExtentFlag struct{ v uint64 }

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
	if s == "none" {
		f.v = dma.Unbounded
		return nil
	}
	return sizeFlag{&f.v}.Set(s)
}

func (env replayEnv) run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var f replayFlags
	fs := flag.NewFlagSet("gmem replay", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {}
	fs.BoolVar(&f.json, "json", false, "print the result as one JSON object")
	fs.StringVar(&f.svg, "svg", "", "draw the memory map and the entries timeline to `FILE` (SVG)")
	fs.BoolVar(&f.keepGoing, "keep-going", false, "skip malformed lines and impossible machine events, and continue after a violation, reporting each")
	fs.Var(enumFlag[trace.Format]{&f.format, trace.ParseFormat}, "format", "input format, jsonl or qemu (default: detected from the first line that is neither blank nor a comment)")
	fs.StringVar(&f.ram, "ram", "", "QEMU logs: RAM layout `GPA:SIZE[,GPA:SIZE...]` (default: one block from 0 to the highest converted address, rounded up to 1GiB)")
	fs.IntVar(&f.devices, "devices", 1, "QEMU logs: number of devices attached")
	fs.Var(enumFlag[trace.IOMMU]{&f.iommu, trace.ParseIOMMU}, "iommu", "QEMU logs: devices' IOMMU, type1 or iommufd (default type1)")
	fs.Uint64Var(&f.limit, "limit", 0, "QEMU logs: type1 dma_entry_limit (0: the kernel's default, 65535)")
	fs.Var(enumFlag[trace.Mode]{&f.mode, trace.ParseMode}, "mode", "QEMU logs: RAM backing, split or inplace (default split, as QEMU's guest_memfd RAM)")
	fs.Var(&f.maxExtent, "max-extent", fmt.Sprintf("gmem's largest IOMMU entry, a power-of-two `SIZE`, or none (default %s)", trace.FormatSize(dma.DefaultMaxExtent)))

	// Flags may come before or after the file name.
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				replayHelp(stdout, fs)
				return exitOK
			}
			fmt.Fprintln(stderr, "Run 'gmem replay -h' for its flags.")
			return exitUsage
		}
		if fs.NArg() == 0 {
			break
		}
		if f.file != "" {
			fmt.Fprintf(stderr, "gmem replay: unexpected argument %q (one trace at a time)\n", fs.Arg(0))
			return exitUsage
		}
		f.file, rest = fs.Arg(0), fs.Args()[1:]
	}
	if f.file == "" {
		fmt.Fprintln(stderr, "usage: gmem replay [flags] FILE|-\nRun 'gmem replay -h' for its flags.")
		return exitUsage
	}
	opts := trace.Options{KeepGoing: f.keepGoing, Format: f.format, Devices: f.devices, IOMMU: f.iommu, Limit: f.limit, Mode: f.mode}
	qemuOnly := f.ram != "" || f.iommu != 0 || f.limit != 0 || f.mode != 0
	fs.Visit(func(fl *flag.Flag) {
		if fl.Name == "devices" {
			qemuOnly = true
		}
	})
	if f.ram != "" {
		ram, err := trace.ParseRAMLayout(f.ram)
		if err != nil {
			fmt.Fprintf(stderr, "gmem replay: --ram: %v\n", err)
			return exitUsage
		}
		opts.RAM = ram
	}
	if f.devices < 1 || f.devices > trace.MaxDevices {
		fmt.Fprintf(stderr, "gmem replay: --devices %d: want 1 to %d\n", f.devices, trace.MaxDevices)
		return exitUsage
	}
	if f.iommu == trace.IOMMUFD && f.limit != 0 {
		fmt.Fprintln(stderr, "gmem replay: --limit: iommufd has no entry limit")
		return exitUsage
	}

	in := env.stdin
	name := "stdin"
	if f.file != "-" {
		file, err := os.Open(f.file)
		if err != nil {
			fmt.Fprintf(stderr, "gmem replay: %v\n", err)
			return exitUsage
		}
		defer file.Close()
		in, name = file, f.file
	}

	start := time.Now()
	prog := &progress{w: stderr, start: start, on: env.terminal(stderr)}
	rp := env.newReplayer(replay.Options{Progress: prog.report, MaxExtent: f.maxExtent.v})
	s := &replaySession{rp: rp, name: name, stderr: stderr, keepGoing: f.keepGoing, ctx: ctx}
	rd := trace.NewReader(in, opts)
	err := s.read(rd, qemuOnly)
	prog.done()
	if err != nil {
		fmt.Fprintf(stderr, "gmem replay: %s: %v\n", name, err)
		return exitUsage
	}
	if s.stopped == "" || s.stopped == stopViolation {
		if err := rp.Finish(); err != nil {
			s.printViolation(err)
		}
	}
	res := rp.Result()
	st := inputStats{
		Format:       rd.Format().String(),
		FormatReason: rd.FormatReason(),
		Lines:        rd.Lines(),
		Events:       s.events,
		Malformed:    s.malformed,
		Skipped:      rd.Skipped(),
		Unrecognised: rd.Unrecognised(),
		Folded:       rd.Folded(),
	}
	if rd.Format() == trace.QEMULog && res.Conversions == 0 {
		fmt.Fprintf(stderr, "gmem replay: warning: %s: no %s or %s event recognised in %d lines (%d unrecognised); is it a QEMU trace log with those events enabled?\n",
			name, "kvm_convert_memory", "kvm_memory_fault", st.Lines, st.Unrecognised)
	}

	if f.svg != "" {
		if err := writeSVG(rp, f.svg); err != nil {
			fmt.Fprintf(stderr, "gmem replay: --svg: %v\n", err)
			return exitUsage
		}
	}
	if f.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(replayJSON{Result: res, Input: st}); err != nil {
			fmt.Fprintf(stderr, "gmem replay: %v\n", err)
			return exitUsage
		}
	} else {
		printResult(stdout, name, st, res, time.Since(start))
	}
	switch {
	case res.Violations > 0:
		return exitFail
	case s.stopped == stopInterrupted:
		fmt.Fprintf(stderr, "gmem replay: interrupted after %d events\n", res.Events)
		return exitFail
	case s.malformed > 0 || res.InputErrors > 0:
		fmt.Fprintf(stderr, "gmem replay: %s: %d malformed lines and %d impossible machine events skipped\n", name, s.malformed, res.InputErrors)
		return exitUsage
	}
	return exitOK
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

// replayJSON is the --json output: the replay's result and the input's
// statistics.
type replayJSON struct {
	replay.Result
	Input inputStats `json:"input"`
}

// replaySession feeds events to a replayer and reports what goes wrong.
type replaySession struct {
	ctx       context.Context
	rp        replayer
	name      string
	stderr    io.Writer
	keepGoing bool

	events      uint64
	malformed   int
	inputErrors int
	violations  int
	stopped     string             // why the replay stopped early, or ""
	inputErr    *replay.InputError // the input error it stopped at
}

// Reasons to stop early.
const (
	stopViolation   = "violation"
	stopInterrupted = "interrupted"
	stopInput       = "input"
)

// apply replays one event and reports whether to go on.
func (s *replaySession) apply(e trace.Event, line int) bool {
	s.events++
	if s.events%1024 == 0 && s.ctx.Err() != nil {
		s.stopped = stopInterrupted
		return false
	}
	err := s.rp.Apply(e, line)
	var ie *replay.InputError
	switch {
	case errors.As(err, &ie):
		s.inputErrors++
		if !s.keepGoing {
			s.stopped = stopInput
			s.inputErr = ie
			return false
		}
		s.report(&s.inputErrors, "impossible machine events skipped", fmt.Sprintf("%v (skipped)", ie))
	case err != nil:
		s.printViolation(err)
		if !s.keepGoing {
			s.stopped = stopViolation
			return false
		}
	}
	return true
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
	switch {
	case s.violations <= maxShownErrors:
		fmt.Fprintf(s.stderr, "gmem replay: %s: %v\n", s.name, err)
	case s.violations == maxShownErrors+1:
		fmt.Fprintf(s.stderr, "gmem replay: %s: more violations; see the result\n", s.name)
	}
}

// malformedLine reports a malformed line; it returns an error when the
// replay must stop because of it.
func (s *replaySession) malformedLine(pe *trace.ParseError) error {
	if !s.keepGoing {
		return pe
	}
	s.malformed++
	s.report(&s.malformed, "malformed lines skipped", fmt.Sprintf("%v (skipped)", pe))
	return nil
}

// read replays the events of rd as they are read: a JSON Lines trace in
// constant memory, a QEMU log (which the Reader reads whole first) event by
// event.
func (s *replaySession) read(rd *trace.Reader, qemuOnly bool) error {
	for {
		e, err := rd.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if s.events == 0 && rd.Format() == trace.JSONLines && qemuOnly {
			qemuOnly = false
			fmt.Fprintln(s.stderr, "gmem replay: the trace declares its own machine; --ram, --devices, --iommu, --limit and --mode apply to QEMU logs only and are ignored")
		}
		var pe *trace.ParseError
		if errors.As(err, &pe) {
			if err := s.malformedLine(pe); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		if !s.apply(e, rd.Line()) {
			if s.inputErr != nil {
				return s.inputErr
			}
			return nil
		}
	}
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

// progress writes a progress line to a terminal once a replay has run for a
// second, at most five times a second.
type progress struct {
	w       io.Writer
	start   time.Time
	last    time.Time
	on      bool
	printed bool
}

func (p *progress) report(events uint64) {
	if !p.on {
		return
	}
	now := time.Now()
	if now.Sub(p.start) < time.Second || now.Sub(p.last) < 200*time.Millisecond {
		return
	}
	p.last = now
	p.printed = true
	rate := float64(events) / now.Sub(p.start).Seconds()
	fmt.Fprintf(p.w, "\rreplay: %s events (%s events/s)\x1b[K", commas(events), commas(uint64(rate)))
}

// done clears the progress line.
func (p *progress) done() {
	if p.printed {
		fmt.Fprint(p.w, "\r\x1b[K")
	}
}

// isTerminal reports whether w is a terminal (a TCGETS ioctl succeeds).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func printResult(w io.Writer, name string, in inputStats, res replay.Result, took time.Duration) {
	fmt.Fprintf(w, "trace      %s (%s, %s): %s events, %s conversions, replayed in %s\n",
		name, in.Format, in.FormatReason, commas(res.Events), commas(res.Conversions), took.Round(time.Millisecond))
	fmt.Fprintf(w, "input      %s lines: %d malformed, %d comments skipped, %d unrecognised, %d folded; %s impossible machine events\n",
		commas(uint64(in.Lines)), in.Malformed, in.Skipped, in.Unrecognised, in.Folded, commas(res.InputErrors))
	fmt.Fprintf(w, "rejected   %s guest requests%s, %s refused by one run only\n",
		commas(res.Rejected), byReason(res.RejectedBy), commas(res.Diverged))
	fmt.Fprintf(w, "memory     %s of RAM: %s shared, %s private, %s unplugged; %d devices attached\n",
		human(res.RAMBytes), human(res.SharedBytes), human(res.PrivateBytes), human(res.UnpluggedBytes), res.Devices)
	fmt.Fprintf(w, "checks     I1-I4 after every event: %s violations\n\n", commas(res.Violations))

	fmt.Fprintf(w, "%-26s %12s %12s %10s\n", "", "baseline", "gmem", "ratio")
	b, g := res.Baseline, res.Gmem
	rows := []struct {
		name string
		b, g float64
		fmt  func(float64) string
	}{
		{"IOMMU entries at the end", float64(b.EntriesFinal), float64(g.EntriesFinal), count},
		{"IOMMU entries, peak", float64(b.EntriesPeak), float64(g.EntriesPeak), count},
		{"map calls", float64(b.MapCalls), float64(g.MapCalls), count},
		{"unmap calls", float64(b.UnmapCalls), float64(g.UnmapCalls), count},
		{"entry splits", float64(b.Splits), float64(g.Splits), count},
		{"state memory", float64(b.StateBytes), float64(g.StateBytes), bytesCell},
		{"pinned", float64(b.PinnedBytes), float64(g.PinnedBytes), bytesCell},
		{"re-pinned", float64(b.RepinnedBytes), float64(g.RepinnedBytes), bytesCell},
		{"window", float64(b.WindowBytes), float64(g.WindowBytes), bytesCell},
		{"largest window", float64(b.MaxWindow), float64(g.MaxWindow), bytesCell},
		{"refused: out of entries", float64(b.LimitFailures), float64(g.LimitFailures), count},
		{"refused: to private", float64(b.PrivateRefused), float64(g.PrivateRefused), count},
		{"refused: any reason", float64(b.Failures), float64(g.Failures), count},
		{"time per event", b.NsPerEvent, g.NsPerEvent, func(v float64) string { return duration(v) }},
	}
	for _, r := range rows {
		fmt.Fprintf(w, "%-26s %12s %12s %10s\n", r.name, r.fmt(r.b), r.fmt(r.g), ratio(r.b, r.g))
	}
	fmt.Fprintln(w, "\nratio: baseline / gmem (above 1: gmem needs less)")
	if len(res.ViolationDetails) > 0 {
		fmt.Fprintln(w, "\nviolations:")
		for _, v := range res.ViolationDetails {
			fmt.Fprintf(w, "  %v\n", &v)
		}
	}
	if len(res.Rejections) > 0 {
		fmt.Fprintln(w, "\nfirst rejections (--json lists more):")
		for _, r := range res.Rejections[:min(len(res.Rejections), shownRejections)] {
			where := "event " + strconv.FormatUint(r.Event, 10)
			if r.Line > 0 {
				where += ", line " + strconv.Itoa(r.Line)
			}
			fmt.Fprintf(w, "  %s, refused by %s (%s): %s\n", where, r.Run, r.Reason, r.Detail)
		}
	}
}

// byReason formats the rejection counts, most frequent first: " (3 size
// 0, 1 misaligned)"; "" for none.
func byReason(m map[string]uint64) string {
	if len(m) == 0 {
		return ""
	}
	keys := slices.Collect(maps.Keys(m))
	slices.SortFunc(keys, func(a, b string) int {
		if c := cmp.Compare(m[b], m[a]); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = commas(m[k]) + " " + k
	}
	return " (" + strings.Join(parts, ", ") + ")"
}

// ratio formats baseline/gmem.
func ratio(b, g float64) string {
	switch {
	case b == g:
		return "1.00x"
	case g == 0:
		return "-"
	}
	return fmt.Sprintf("%.2fx", b/g)
}

func count(v float64) string { return commas(uint64(v)) }

func bytesCell(v float64) string { return human(uint64(v)) }

// commas formats n with thousands separators.
func commas(n uint64) string { return bench.Commas(n) }

// human formats a byte count with a binary unit and three significant
// digits.
func human(n uint64) string { return bench.Human(n) }

// duration formats nanoseconds with a unit.
func duration(ns float64) string { return bench.Duration(ns) }

func replayHelp(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprint(w, `usage: gmem replay [flags] FILE|-

Replays a conversion trace (gmem's JSON Lines, e.g. from 'gmem gen', or a
QEMU trace log with kvm_convert_memory / kvm_memory_fault lines) through
the gmem library twice, side by side:

  baseline  QEMU's algorithm: one bit per 4 KiB page, one IOMMU entry per
            4 KiB granule
  gmem      page state stored as runs, one IOMMU entry per converted extent

and prints what each needed: IOMMU entries (final and peak), map and unmap
calls, entry splits, state memory, conversions refused for want of type1
entries, and time per event. After every event it checks the invariants:
the IOMMU maps exactly the shared, plugged pages (I1) and never a private
or unplugged one (I2), a refused event changes nothing (I3), and the page
state is what the events asked for, the same in both runs (I4).

A JSON Lines trace is replayed as it is read; a QEMU log is read whole
first, and describes no machine, so --ram, --devices, --iommu, --limit and
--mode describe it. The format is detected from the first line that is
neither blank nor a '#' comment ('{' starts JSON Lines), unless --format
says which; the output says which and why. A QEMU log's lines may carry any
prefix before the event name (timestamps, journal headers).

Two kinds of bad input: a malformed line, or an event describing an
impossible machine (RAM or MMIO overlapping, a RAM name or a device
attached twice, a plug where there is no hot-pluggable RAM), is an input
error. A well-formed guest request the VMM refuses (misaligned, size 0,
an MMIO hole or unbacked memory made private, ...) is replayed as the
refusal it is: counted by reason, listed with --json.

flags:
`)
	fs.VisitAll(func(f *flag.Flag) {
		kind, usage := flag.UnquoteUsage(f)
		if kind == "value" {
			kind = "NAME"
		}
		head := "  --" + f.Name
		if kind != "" {
			head += " " + kind
		}
		fmt.Fprintf(w, "%-26s %s\n", head, usage)
	})
	fmt.Fprint(w, `
Exit status: 0 all checks passed (refused guest requests included), 1 an
invariant was violated (or the replay was interrupted), 2 usage, input or
output errors: empty or binary input, a malformed line or an impossible
machine event (reported with its line number; with --keep-going every one is
reported and skipped, and the exit status is 2 at the end unless a violation
makes it 1), an output file that cannot be written.
`)
}
