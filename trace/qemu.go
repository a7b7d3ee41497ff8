package trace

import (
	"bytes"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/gmemproject/gmem/span"
)

// QEMU's "log" trace backend prints an event as its name followed by the
// event's format string, optionally preceded by "PID@SEC.USEC:" (thread id
// and time of day) when timestamps are on, and by whatever else the log's
// writer adds in front (an ISO timestamp from -msg timestamp=on, a journal
// or syslog header):
//
//	kvm_convert_memory start 0x80000000 size 0x200000 shared_to_private
//	12345@1700000000.123456:kvm_memory_fault start 0x1000 size 0x1000 flags 0x8
//	2026-12-01T19:50:00.123456Z 12345@1700000000.123456:kvm_convert_memory start 0x1000 size 0x1000 private_to_shared
//
// kvm_convert_memory is traced at the start of every conversion, whatever
// asked for it and before any check of the request, so a log of a buggy
// guest holds misaligned and empty requests too; kvm_memory_fault is traced
// when a vCPU exits with KVM_EXIT_MEMORY_FAULT, right before the conversion
// that the fault causes (which then traces kvm_convert_memory itself, with
// the same range).

// Names of the QEMU trace events read.
const (
	qemuConvert = "kvm_convert_memory"
	qemuFault   = "kvm_memory_fault"
)

// memoryExitFlagPrivate is KVM_MEMORY_EXIT_FLAG_PRIVATE (1 << 3): the
// faulting access was a private one, so the page must become private.
const memoryExitFlagPrivate = 1 << 3

// qemuLine is one conversion event read from a QEMU log.
type qemuLine struct {
	tid   int64 // thread id from the prefix, -1 without prefix
	fault bool  // kvm_memory_fault rather than kvm_convert_memory
	conv  Convert
}

// parseQEMULine reads one log line. ok is false (and err nil) for a line that
// is not a conversion event; such lines are skipped. long says the line was
// cut at MaxLineLen.
func parseQEMULine(line []byte, long bool) (q qemuLine, ok bool, err error) {
	q.tid = -1
	at, name := findEvent(line)
	if at < 0 {
		return q, false, nil
	}
	q.fault = name == qemuFault
	if tid, found := threadID(line[:at]); found {
		q.tid = tid
	}
	b := line[at:]
	if long {
		return q, false, fmt.Errorf("%w: %s line longer than %d bytes", ErrSyntax, name, MaxLineLen)
	}
	f := strings.Fields(string(b))
	if q.fault {
		// kvm_memory_fault start 0x%x size 0x%x flags 0x%x
		if len(f) != 7 || f[1] != "start" || f[3] != "size" || f[5] != "flags" {
			return q, false, fmt.Errorf("%w: want \"%s start 0x.. size 0x.. flags 0x..\"", ErrSyntax, qemuFault)
		}
	} else {
		// kvm_convert_memory start 0x%x size 0x%x shared_to_private|private_to_shared
		if len(f) != 6 || f[1] != "start" || f[3] != "size" {
			return q, false, fmt.Errorf("%w: want \"%s start 0x.. size 0x.. shared_to_private|private_to_shared\"", ErrSyntax, qemuConvert)
		}
	}
	start, err := qemuHex("start", f[2])
	if err != nil {
		return q, false, err
	}
	size, err := qemuHex("size", f[4])
	if err != nil {
		return q, false, err
	}
	q.conv = Convert{GPA: start, Size: size}
	if q.fault {
		flags, err := qemuHex("flags", f[6])
		if err != nil {
			return q, false, err
		}
		// QEMU refuses a fault with any other flag and stops the VM, so no
		// conversion follows it; such a line means the log is not one of a
		// working guest.
		if flags&^memoryExitFlagPrivate != 0 {
			return q, false, fmt.Errorf("%w: flags %#x has bits other than KVM_MEMORY_EXIT_FLAG_PRIVATE (0x8)", ErrValue, flags)
		}
		q.conv.To = Shared
		if flags&memoryExitFlagPrivate != 0 {
			q.conv.To = Private
		}
	} else {
		switch f[5] {
		case "shared_to_private":
			q.conv.To = Private
		case "private_to_shared":
			q.conv.To = Shared
		default:
			return q, false, fmt.Errorf("%w: direction %q: want shared_to_private or private_to_shared", ErrValue, f[5])
		}
	}
	// The request is kept as traced, misaligned or empty: QEMU traced it
	// before checking it, and refusing it is the executor's answer.
	return q, true, nil
}

// findEvent returns where a conversion event's name starts in line, and the
// name; -1 if there is none. The name must start the line or follow a
// blank or a ':' (the end of a prefix), and end the line or be followed by
// a blank.
func findEvent(line []byte) (int, string) {
	best, name := -1, ""
	for _, n := range [...]string{qemuConvert, qemuFault} {
		for off := 0; ; {
			i := bytes.Index(line[off:], []byte(n))
			if i < 0 {
				break
			}
			i += off
			off = i + len(n)
			if i > 0 && !bytes.ContainsAny(line[i-1:i], " \t:") {
				continue
			}
			if rest := line[i+len(n):]; len(rest) > 0 && rest[0] != ' ' && rest[0] != '\t' {
				continue
			}
			if best < 0 || i < best {
				best, name = i, n
			}
			break
		}
	}
	return best, name
}

// threadID reads the thread id of a "PID@SEC.USEC:" prefix that ends
// right before the event name; prefix is everything before the name.
func threadID(prefix []byte) (int64, bool) {
	if i := bytes.LastIndexAny(prefix, " \t"); i >= 0 {
		prefix = prefix[i+1:]
	}
	tid, rest, ok := cutPrefix(prefix)
	if !ok || len(rest) != 0 {
		return 0, false
	}
	return tid, true
}

// cutPrefix strips a "PID@SEC.USEC:" prefix.
func cutPrefix(b []byte) (tid int64, rest []byte, ok bool) {
	digits := func(i int) int {
		j := i
		for j < len(b) && isDigit(b[j]) {
			j++
		}
		return j
	}
	at := digits(0)
	if at == 0 || at >= len(b) || b[at] != '@' {
		return 0, b, false
	}
	dot := digits(at + 1)
	if dot == at+1 || dot >= len(b) || b[dot] != '.' {
		return 0, b, false
	}
	colon := digits(dot + 1)
	if colon == dot+1 || colon >= len(b) || b[colon] != ':' {
		return 0, b, false
	}
	tid, err := strconv.ParseInt(string(b[:at]), 10, 64)
	if err != nil {
		return 0, b, false
	}
	return tid, b[colon+1:], true
}

// qemuHex parses a number printed with "0x%" PRIx64.
func qemuHex(field, s string) (uint64, error) {
	if len(s) < 3 || s[0] != '0' || s[1] != 'x' {
		return 0, fmt.Errorf("%w: %s %q: want 0x followed by hex digits", ErrSyntax, field, s)
	}
	v, err := parseHex(s)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", field, err)
	}
	return v, nil
}

// ParseRAMLayout parses a RAM layout "GPA:SIZE[,GPA:SIZE...]" such as
// "0:2GiB,4GiB:14GiB", each number in a form ParseSize accepts. Every block
// must be non-empty, page aligned and not wrap, and blocks must not overlap.
// The blocks are returned in the order given. Errors wrap ErrValue.
func ParseRAMLayout(s string) ([]span.Range, error) { return parseLayout("RAM block", s) }

// ParseMMIOLayout parses MMIO holes as ParseRAMLayout parses RAM:
// "GPA:SIZE[,GPA:SIZE...]", such as "3GiB:1GiB" for a PCI hole below 4 GiB.
func ParseMMIOLayout(s string) ([]span.Range, error) { return parseLayout("MMIO hole", s) }

// parseLayout parses "GPA:SIZE[,GPA:SIZE...]", what naming each range in
// errors.
func parseLayout(what, s string) ([]span.Range, error) {
	if strings.TrimSpace(s) == "" {
		return nil, fmt.Errorf("%w: empty %s layout", ErrValue, what)
	}
	var out []span.Range
	for i, item := range strings.Split(s, ",") {
		name := what + " " + strconv.Itoa(i+1)
		gpaText, sizeText, found := strings.Cut(item, ":")
		if !found {
			return nil, fmt.Errorf("%w: %s %q: want GPA:SIZE", ErrValue, name, item)
		}
		gpa, err := ParseSize(gpaText)
		if err != nil {
			return nil, fmt.Errorf("%s address: %w", name, err)
		}
		size, err := ParseSize(sizeText)
		if err != nil {
			return nil, fmt.Errorf("%s size: %w", name, err)
		}
		if err := checkPages(name, gpa, size); err != nil {
			return nil, err
		}
		out = append(out, span.Range{Start: gpa, End: gpa + size})
	}
	if err := checkDisjoint(what+"s", out); err != nil {
		return nil, err
	}
	return out, nil
}

// checkDisjoint reports an error if any two ranges overlap; what names them
// ("RAM blocks").
func checkDisjoint(what string, rs []span.Range) error {
	sorted := slices.Clone(rs)
	slices.SortFunc(sorted, func(a, b span.Range) int {
		switch {
		case a.Start < b.Start:
			return -1
		case a.Start > b.Start:
			return 1
		}
		return 0
	})
	for i := 1; i < len(sorted); i++ {
		if sorted[i].Start < sorted[i-1].End {
			return fmt.Errorf("%w: %s %v and %v overlap", ErrValue, what, sorted[i-1], sorted[i])
		}
	}
	return nil
}
