package trace

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/gmemproject/gmem/span"
)

// Format is the format of a trace input.
type Format uint8

// Input formats.
const (
	// JSONLines is gmem's own format: one event per line (see ParseEvent).
	JSONLines Format = iota + 1
	// QEMULog is QEMU's trace log: kvm_convert_memory and kvm_memory_fault
	// lines among others.
	QEMULog
)

// ParseFormat parses "jsonl" or "qemu".
func ParseFormat(s string) (Format, error) {
	switch s {
	case "jsonl":
		return JSONLines, nil
	case "qemu":
		return QEMULog, nil
	}
	return 0, fmt.Errorf("%w: format %q: want jsonl or qemu", ErrValue, s)
}

// String returns "jsonl" or "qemu".
func (f Format) String() string {
	switch f {
	case JSONLines:
		return "jsonl"
	case QEMULog:
		return "qemu"
	}
	return fmt.Sprintf("Format(%d)", uint8(f))
}

// MaxDevices bounds the number of devices a QEMU log's machine or a
// generator attaches; more is no real machine and would only make a replay
// multiply its work.
const MaxDevices = 1024

// ramAlign is what the highest address of a QEMU log is rounded up to when no
// RAM layout is given: guests are sized in GiB.
const ramAlign = 1 << 30

// Options controls Parse. The zero Options is valid.
type Options struct {
	// Format is the input's format; 0 detects it from the first line that
	// is neither blank nor a comment (see Reader).
	Format Format

	// KeepGoing makes Parse record malformed lines and continue; it then
	// returns every error found as ParseErrors, along with the events of the
	// good lines. Without it Parse stops at the first malformed line.
	KeepGoing bool

	// The rest describes the machine of a QEMU log, which the log itself does
	// not say; JSON Lines traces declare their own and ignore these.

	// RAM lists the guest's RAM blocks (see ParseRAMLayout). If empty, RAM
	// from 0 up to the highest converted address rounded up to 1 GiB is
	// assumed, less the MMIO holes.
	RAM []span.Range
	// MMIO lists the guest's MMIO holes (see ParseMMIOLayout), such as the
	// PCI hole: a conversion there is of MMIO, not of unbacked memory.
	MMIO []span.Range
	// Devices is the number of devices to attach; 0 means 1.
	Devices int
	// IOMMU is the devices' IOMMU; 0 means Type1.
	IOMMU IOMMU
	// Limit is the type1 entry limit to record on each attach; 0 leaves the
	// kernel's default.
	Limit uint64
	// Mode is the backing of the RAM blocks; 0 means Split.
	Mode Mode
}

// MaxGPA bounds the guest physical addresses a QEMU log's conversions may
// size the default RAM with: 2^52, the largest physical address of x86-64
// (and guestmem's default end of the address space).
const MaxGPA = 1 << 52

// Trace is a whole parsed input.
type Trace struct {
	// Format is the detected input format.
	Format Format
	// Events are the events in order. For a QEMU log the RAM blocks and
	// device attachments described by Options come first.
	Events []Event
	// FormatReason says why Format was chosen: given by Options, or what
	// the detection saw.
	FormatReason string
	// Lines holds, for each event, the input line it came from; 0 for events
	// made from Options.
	Lines []int
	// Skipped counts the comment lines (first non-blank character '#').
	Skipped int
	// Unrecognised counts the non-blank QEMU log lines, comments aside,
	// that hold no conversion event: other trace events and QEMU's own
	// messages.
	Unrecognised int
	// Folded counts kvm_convert_memory lines that repeat the kvm_memory_fault
	// just before them on the same thread: QEMU traces both for one implicit
	// conversion, and the conversion is kept once.
	Folded int
}

// Reader reads a trace in either format one event at a time. Unless
// Options.Format says which, the format is detected from the first line that
// is neither blank nor a comment: one starting with '{' means JSON Lines,
// anything else a QEMU trace log. In both formats a line whose first
// non-blank character is '#' is a comment, skipped and counted.
//
// Input that is not text (a NUL byte in that first line, as binaries have)
// is refused with ErrNotText, and input without any
// line but blanks and comments with ErrEmpty.
//
// JSON Lines are read one line at a time, in constant memory whatever the
// length of the input. A QEMU log is read whole at the first call to Next,
// because the RAM layout may depend on its highest address; its events (the
// machine made from Options first) and malformed lines are then returned in
// order.
type Reader struct {
	lr     *lineReader
	opts   Options
	format Format
	reason string
	items  []item // a QEMU log's events and errors, in order
	next   int
	line   int
	err    error // returned by every later call: io.EOF, I/O or option errors

	skipped, unrecognised, folded int
}

// item is an event or a malformed line of a QEMU log.
type item struct {
	line int
	ev   Event
	err  error
}

// NewReader returns a Reader of r. opts.KeepGoing is ignored: the Reader
// reports each malformed line and lets its caller decide.
func NewReader(r io.Reader, opts Options) *Reader {
	rd := &Reader{lr: newLineReader(r), opts: opts}
	rd.err = opts.Check()
	return rd
}

// Next returns the next event. At the end of the input it returns io.EOF. A
// malformed line yields a *ParseError; the Reader stays usable and the next
// call continues after that line, so a caller can collect errors and keep
// going. Any other error (from the underlying reader, invalid Options, a
// QEMU log that says nothing of the machine) is returned by every later call.
func (rd *Reader) Next() (Event, error) {
	if rd.err != nil {
		return nil, rd.err
	}
	if rd.format == 0 {
		line, long, err := rd.first()
		if err != nil {
			return nil, rd.fail(err)
		}
		if rd.format == JSONLines {
			return rd.jsonLine(line, long)
		}
		if err := rd.readQEMU(line, long); err != nil {
			return nil, rd.fail(err)
		}
	}
	if rd.format == QEMULog {
		if rd.next == len(rd.items) {
			return nil, rd.fail(io.EOF)
		}
		it := rd.items[rd.next]
		rd.items[rd.next] = item{} // let the event go once returned
		rd.next++
		rd.line = it.line
		if it.err != nil {
			return nil, &ParseError{Line: it.line, Err: it.err}
		}
		return it.ev, nil
	}
	for {
		line, long, err := rd.lr.next()
		if err != nil {
			return nil, rd.fail(err)
		}
		switch {
		case blank(line):
		case comment(line):
			rd.skipped++
		default:
			return rd.jsonLine(line, long)
		}
	}
}

// first reads up to the first line that is neither blank nor a comment,
// checks that it is text, and settles the format.
func (rd *Reader) first() (line []byte, long bool, err error) {
	for {
		line, long, err = rd.lr.next()
		if errors.Is(err, io.EOF) {
			rd.format, rd.reason = cmp.Or(rd.opts.Format, JSONLines), "empty input"
			return nil, false, fmt.Errorf("%w: no line but blanks and comments", ErrEmpty)
		}
		if err != nil {
			return nil, false, err
		}
		switch {
		case blank(line):
			continue
		case comment(line):
			rd.skipped++
			continue
		}
		break
	}
	if i := bytes.IndexByte(line, 0); i >= 0 {
		return nil, false, fmt.Errorf("%w: line %d has a NUL byte at column %d", ErrNotText, rd.lr.line, i+1)
	}
	jsonLike := bytes.HasPrefix(bytes.TrimLeft(line, " \t"), []byte("{"))
	switch {
	case rd.opts.Format != 0:
		rd.format, rd.reason = rd.opts.Format, "given"
	case jsonLike:
		rd.format = JSONLines
		rd.reason = fmt.Sprintf("detected from line %d: starts with '{'", rd.lr.line)
	default:
		rd.format = QEMULog
		rd.reason = fmt.Sprintf("detected from line %d: does not start with '{'", rd.lr.line)
	}
	return line, long, nil
}

func (rd *Reader) fail(err error) error {
	rd.err = err
	return err
}

func (rd *Reader) jsonLine(line []byte, long bool) (Event, error) {
	rd.line = rd.lr.line
	if long {
		return nil, &ParseError{Line: rd.line, Err: fmt.Errorf("%w: line longer than %d bytes", ErrSyntax, MaxLineLen)}
	}
	ev, err := ParseEvent(line)
	if err != nil {
		return nil, &ParseError{Line: rd.line, Err: err}
	}
	return ev, nil
}

// readQEMU reads a whole QEMU log, first being its first non-blank line.
func (rd *Reader) readQEMU(first []byte, firstLong bool) error {
	// pending holds, per thread, the conversion of the last memory fault,
	// to fold the kvm_convert_memory line that follows it.
	pending := map[int64]Convert{}
	var highest uint64
	seen := false
	line, long := first, firstLong
	for {
		q, ok, err := parseQEMULine(line, long)
		if comment(line) {
			q, ok, err = qemuLine{}, false, nil
		}
		switch {
		case err != nil:
			rd.items = append(rd.items, item{line: rd.lr.line, err: err})
		case !ok:
			switch {
			case blank(line):
			case comment(line):
				rd.skipped++
			default:
				rd.unrecognised++
			}
		default:
			fold := false
			if q.fault {
				pending[q.tid] = q.conv
			} else {
				p, had := pending[q.tid]
				delete(pending, q.tid)
				fold = had && p == q.conv
			}
			if fold {
				rd.folded++
				break
			}
			rd.items = append(rd.items, item{line: rd.lr.line, ev: q.conv})
			if r, err := span.FromSize(q.conv.GPA, q.conv.Size); err == nil && r.End <= MaxGPA {
				// A request that wraps, or lies past any physical
				// address, says nothing of the guest's size: it is
				// replayed as the refusal it is.
				highest = max(highest, r.End)
			}
			seen = true
		}
		var err2 error
		line, long, err2 = rd.lr.next()
		if errors.Is(err2, io.EOF) {
			break
		}
		if err2 != nil {
			return err2
		}
	}
	head, err := rd.opts.machine(highest, seen)
	if err != nil {
		if !seen {
			// Say what was wrong with the lines that were meant to be
			// conversions, if any (not wrapped: this error ends the
			// input, a *ParseError would not).
			for _, it := range rd.items {
				if it.err != nil {
					return fmt.Errorf("%w; the first line that tried, line %d: %v", err, it.line, it.err)
				}
			}
		}
		return err
	}
	items := make([]item, 0, len(head)+len(rd.items))
	for _, e := range head {
		items = append(items, item{ev: e})
	}
	rd.items = append(items, rd.items...)
	return nil
}

// Line returns the line number (1-based) of the event or malformed line Next
// returned last; 0 for events made from Options.
func (rd *Reader) Line() int { return rd.line }

// Lines returns the number of lines read so far.
func (rd *Reader) Lines() int { return rd.lr.line }

// Format returns the format read, given or detected; 0 before the first
// call to Next.
func (rd *Reader) Format() Format { return rd.format }

// FormatReason says why Format was chosen (see Trace.FormatReason).
func (rd *Reader) FormatReason() string { return rd.reason }

// Skipped returns the number of comment lines read so far. A QEMU log is
// read whole at the first call to Next, so its count is final then.
func (rd *Reader) Skipped() int { return rd.skipped }

// Unrecognised returns the number of QEMU log lines that hold no
// conversion event (see Trace.Unrecognised), final once Next has been
// called.
func (rd *Reader) Unrecognised() int { return rd.unrecognised }

// Folded returns the number of kvm_convert_memory lines folded into the
// kvm_memory_fault before them (see Trace.Folded).
func (rd *Reader) Folded() int { return rd.folded }

// Parse reads a whole trace with a Reader and returns its events. For a
// long JSON Lines input, a Reader uses less memory.
//
// A malformed line is a *ParseError carrying its line number; with
// opts.KeepGoing, every malformed line is skipped and the errors are returned
// together as ParseErrors along with the trace. Other errors (from r, invalid
// options, a QEMU log without conversions and without opts.RAM) are returned
// alone.
func Parse(r io.Reader, opts Options) (*Trace, error) {
	rd := NewReader(r, opts)
	t := &Trace{}
	var errs ParseErrors
	for {
		ev, err := rd.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		var pe *ParseError
		if errors.As(err, &pe) {
			if !opts.KeepGoing {
				return nil, pe
			}
			errs = append(errs, pe)
			continue
		}
		if err != nil {
			return nil, err
		}
		t.Events = append(t.Events, ev)
		t.Lines = append(t.Lines, rd.Line())
	}
	t.Format, t.FormatReason = rd.Format(), rd.FormatReason()
	t.Skipped, t.Unrecognised, t.Folded = rd.Skipped(), rd.Unrecognised(), rd.Folded()
	if len(errs) > 0 {
		return t, errs
	}
	return t, nil
}

// Check reports whether the options are valid: known enums, a device count
// in range, no limit for iommufd, and RAM blocks and MMIO holes that are
// page aligned and overlap nothing. Errors wrap ErrValue. A Reader with
// invalid options returns this error from Next.
func (o Options) Check() error {
	switch o.Format {
	case 0, JSONLines, QEMULog:
	default:
		return fmt.Errorf("%w: invalid %v", ErrValue, o.Format)
	}
	if o.Devices < 0 || o.Devices > MaxDevices {
		return fmt.Errorf("%w: devices %d not in [0, %d]", ErrValue, o.Devices, MaxDevices)
	}
	switch o.IOMMU {
	case 0, Type1:
		if o.Limit > MaxEntryLimit {
			return fmt.Errorf("%w: entry limit %d is past type1's largest dma_entry_limit, %d", ErrValue, o.Limit, uint64(MaxEntryLimit))
		}
	case IOMMUFD:
		if o.Limit != 0 {
			return fmt.Errorf("%w: iommufd has no entry limit", ErrValue)
		}
	default:
		return fmt.Errorf("%w: invalid %v", ErrValue, o.IOMMU)
	}
	if o.Mode != 0 && o.Mode != Split && o.Mode != InPlace {
		return fmt.Errorf("%w: invalid %v", ErrValue, o.Mode)
	}
	for i, r := range o.RAM {
		if err := checkPages("RAM block "+strconv.Itoa(i+1), r.Start, r.End-r.Start); err != nil || r.End <= r.Start {
			return fmt.Errorf("%w: RAM block %v is empty, misaligned or wraps", ErrValue, r)
		}
	}
	for i, r := range o.MMIO {
		if err := checkPages("MMIO hole "+strconv.Itoa(i+1), r.Start, r.End-r.Start); err != nil || r.End <= r.Start {
			return fmt.Errorf("%w: MMIO hole %v is empty, misaligned or wraps", ErrValue, r)
		}
	}
	if err := checkDisjoint("RAM blocks", o.RAM); err != nil {
		return err
	}
	if err := checkDisjoint("MMIO holes", o.MMIO); err != nil {
		return err
	}
	for _, r := range o.RAM {
		for _, h := range o.MMIO {
			if r.Overlaps(h) {
				return fmt.Errorf("%w: RAM block %v and MMIO hole %v overlap", ErrValue, r, h)
			}
		}
	}
	return nil
}

// machine returns the RAM and attach events that describe the machine of a
// QEMU log. highest is the end of the highest converted range; seen says
// whether there was any conversion at all.
func (o Options) machine(highest uint64, seen bool) ([]Event, error) {
	ram := o.RAM
	if len(ram) == 0 {
		switch {
		case !seen:
			return nil, fmt.Errorf("%w: no %s or %s line, and no RAM layout given", ErrSyntax, qemuConvert, qemuFault)
		case highest == 0:
			return nil, fmt.Errorf("%w: no conversion says how much RAM the guest has (they are empty, wrap, or lie past 2^52), and no RAM layout given", ErrValue)
		}
		r, ok := span.Range{Start: 0, End: highest}.Outward(ramAlign)
		if !ok || r.End == 0 {
			return nil, fmt.Errorf("%w: highest address %#x cannot be rounded up to 1 GiB", ErrValue, highest)
		}
		var holes span.Set
		for _, h := range o.MMIO {
			holes.Add(h)
		}
		ram = holes.Minus(r)
		if len(ram) == 0 {
			return nil, fmt.Errorf("%w: the MMIO holes cover all of %v, up to the highest converted address: no RAM left; give it with a RAM layout", ErrValue, r)
		}
	}
	mode := o.Mode
	if mode == 0 {
		mode = Split
	}
	kind := o.IOMMU
	if kind == 0 {
		kind = Type1
	}
	devices := max(o.Devices, 1)
	out := make([]Event, 0, len(ram)+len(o.MMIO)+devices)
	for i, r := range ram {
		out = append(out, RAM{Name: "ram" + strconv.Itoa(i), GPA: r.Start, Size: r.Len(), Mode: mode})
	}
	for _, h := range o.MMIO {
		out = append(out, MMIO{GPA: h.Start, Size: h.Len()})
	}
	for i := range devices {
		out = append(out, Attach{Dev: "dev" + strconv.Itoa(i), IOMMU: kind, Limit: o.Limit})
	}
	return out, nil
}
