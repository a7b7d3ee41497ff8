package trace

import (
	"bytes"
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
	// KeepGoing makes Parse record malformed lines and continue; it then
	// returns every error found as ParseErrors, along with the events of the
	// good lines. Without it Parse stops at the first malformed line.
	KeepGoing bool

	// The rest describes the machine of a QEMU log, which the log itself does
	// not say; JSON Lines traces declare their own and ignore these.

	// RAM lists the guest's RAM blocks (see ParseRAMLayout). If empty, one
	// block from 0 up to the highest converted address rounded up to 1 GiB is
	// assumed.
	RAM []span.Range
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

// Trace is a whole parsed input.
type Trace struct {
	// Format is the detected input format.
	Format Format
	// Events are the events in order. For a QEMU log the RAM blocks and
	// device attachments described by Options come first.
	Events []Event
	// Lines holds, for each event, the input line it came from; 0 for events
	// made from Options.
	Lines []int
	// Skipped counts the non-blank QEMU log lines that are not conversion
	// events.
	Skipped int
	// Folded counts kvm_convert_memory lines that repeat the kvm_memory_fault
	// just before them on the same thread: QEMU traces both for one implicit
	// conversion, and the conversion is kept once.
	Folded int
}

// Reader reads a trace in either format one event at a time. The format is
// detected from the first non-blank line: one starting with '{' means JSON
// Lines, anything else a QEMU trace log; an input with no non-blank line is
// an empty JSON Lines trace.
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
	items  []item // a QEMU log's events and errors, in order
	next   int
	line   int
	err    error // returned by every later call: io.EOF, I/O or option errors

	skipped, folded int
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
	rd.err = opts.check()
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
		for {
			line, long, err := rd.lr.next()
			if err != nil {
				rd.format = JSONLines
				return nil, rd.fail(err)
			}
			if blank(line) {
				continue
			}
			if bytes.HasPrefix(bytes.TrimLeft(line, " \t"), []byte("{")) {
				rd.format = JSONLines
				return rd.jsonLine(line, long)
			}
			rd.format = QEMULog
			if err := rd.readQEMU(line, long); err != nil {
				return nil, rd.fail(err)
			}
			break
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
		if !blank(line) {
			return rd.jsonLine(line, long)
		}
	}
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
		switch {
		case err != nil:
			rd.items = append(rd.items, item{line: rd.lr.line, err: err})
		case !ok:
			if !blank(line) {
				rd.skipped++
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
			highest = max(highest, q.conv.GPA+q.conv.Size)
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

// Format returns the detected format; 0 before the first call to Next.
func (rd *Reader) Format() Format { return rd.format }

// Skipped returns the number of non-blank QEMU log lines that are not
// conversion events (known once Next has been called).
func (rd *Reader) Skipped() int { return rd.skipped }

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
	t.Format, t.Skipped, t.Folded = rd.Format(), rd.Skipped(), rd.Folded()
	if len(errs) > 0 {
		return t, errs
	}
	return t, nil
}

// check validates the options.
func (o Options) check() error {
	if o.Devices < 0 || o.Devices > MaxDevices {
		return fmt.Errorf("%w: devices %d not in [0, %d]", ErrValue, o.Devices, MaxDevices)
	}
	switch o.IOMMU {
	case 0, Type1:
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
	return checkDisjoint(o.RAM)
}

// machine returns the RAM and attach events that describe the machine of a
// QEMU log. highest is the end of the highest converted range; seen says
// whether there was any conversion at all.
func (o Options) machine(highest uint64, seen bool) ([]Event, error) {
	ram := o.RAM
	if len(ram) == 0 {
		if !seen {
			return nil, fmt.Errorf("%w: no %s or %s line, and no RAM layout given", ErrSyntax, qemuConvert, qemuFault)
		}
		r, ok := span.Range{Start: 0, End: highest}.Outward(ramAlign)
		if !ok || r.End == 0 {
			return nil, fmt.Errorf("%w: highest address %#x cannot be rounded up to 1 GiB", ErrValue, highest)
		}
		ram = []span.Range{r}
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
	out := make([]Event, 0, len(ram)+devices)
	for i, r := range ram {
		out = append(out, RAM{Name: "ram" + strconv.Itoa(i), GPA: r.Start, Size: r.Len(), Mode: mode})
	}
	for i := range devices {
		out = append(out, Attach{Dev: "dev" + strconv.Itoa(i), IOMMU: kind, Limit: o.Limit})
	}
	return out, nil
}
