package trace

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
)

// fieldSet records which fields of an event were present, by bit.
type fieldSet uint16

const (
	fName fieldSet = 1 << iota
	fGPA
	fSize
	fMode
	fBlock
	fDev
	fIOMMU
	fLimit
	fTo
)

// fieldBit maps a JSON field name to its bit.
func fieldBit(key string) fieldSet {
	switch key {
	case "name":
		return fName
	case "gpa":
		return fGPA
	case "size":
		return fSize
	case "mode":
		return fMode
	case "block":
		return fBlock
	case "dev":
		return fDev
	case "iommu":
		return fIOMMU
	case "limit":
		return fLimit
	case "to":
		return fTo
	}
	return 0
}

// opFields returns the required and optional fields of op; ok is false for an
// unknown op.
func opFields(op Op) (required, optional fieldSet, ok bool) {
	switch op {
	case OpRAM:
		return fName | fGPA | fSize, fMode | fBlock, true
	case OpMMIO, OpPlug, OpUnplug:
		return fGPA | fSize, 0, true
	case OpAttach:
		return fDev | fIOMMU, fLimit, true
	case OpDetach:
		return fDev, 0, true
	case OpConvert:
		return fGPA | fSize | fTo, 0, true
	}
	return 0, 0, false
}

// ParseEvent parses one line of JSON Lines into an event. A line is a flat
// JSON object with an "op" field naming the event and the fields below (in a
// file, blank lines are skipped, and so are comment lines, whose first
// non-blank character is '#'):
//
//	{"op":"ram","name":"ram-below-4g","gpa":"0x0","size":"2GiB","mode":"split"}
//	{"op":"ram","name":"virtio-mem0","gpa":"0x400000000","size":"16GiB","mode":"split","block":"2MiB"}
//	{"op":"mmio","gpa":"0x80000000","size":"2GiB"}
//	{"op":"attach","dev":"dev0","iommu":"type1","limit":65535}
//	{"op":"convert","gpa":"0x7fe00000","size":"2MiB","to":"shared"}
//	{"op":"plug","gpa":"0x400000000","size":"128MiB"}
//	{"op":"unplug","gpa":"0x407e00000","size":"2MiB"}
//	{"op":"detach","dev":"dev0"}
//
// Addresses and sizes (gpa, size, block) are JSON numbers or strings in the
// forms ParseSize accepts ("0x80000000", "16GiB", "2 MiB", "4096"); a JSON
// number must be a whole non-negative value (4096, 4.096e3). limit is a count:
// a JSON number, or a decimal or 0x string without unit; 0, as an absent limit
// and as --limit 0, means the kernel's default (65,535). A RAM block's mode
// defaults to split (QEMU's guest_memfd RAM since 9.2). Unknown ops, unknown
// or repeated fields and missing required fields are errors.
//
// A guest's request (convert, plug, unplug) is parsed as written, even
// misaligned, empty or wrapping: a real guest can ask that, and refusing it
// is the VMM's answer, not the trace's fault. The machine (ram, mmio,
// attach, detach) must be well formed (Event.Check).
//
// Errors wrap ErrSyntax (not JSON), ErrSchema (unknown op or field, missing
// or repeated field, a value of the wrong JSON type) or ErrValue (a value
// out of range, or an event failing Check); they carry no line number, which
// Parse and Reader add.
func ParseEvent(line []byte) (Event, error) {
	fields, err := parseObject(line)
	if err != nil {
		return nil, err
	}
	var (
		op     Op
		hasOp  bool
		seen   fieldSet
		vals   [16]value
		opText string
	)
	for _, f := range fields {
		if f.key == "op" {
			if hasOp {
				return nil, fmt.Errorf("%w: field \"op\" repeated", ErrSchema)
			}
			if f.val.kind != kindString {
				return nil, fmt.Errorf("%w: field \"op\" must be a string", ErrSchema)
			}
			hasOp, opText = true, f.val.text
			op = Op(f.val.text)
			continue
		}
		bit := fieldBit(f.key)
		if bit == 0 {
			return nil, fmt.Errorf("%w: unknown field %q", ErrSchema, f.key)
		}
		if seen&bit != 0 {
			return nil, fmt.Errorf("%w: field %q repeated", ErrSchema, f.key)
		}
		seen |= bit
		vals[bitIndex(bit)] = f.val
	}
	if !hasOp {
		return nil, fmt.Errorf("%w: field \"op\" missing", ErrSchema)
	}
	required, optional, ok := opFields(op)
	if !ok {
		return nil, fmt.Errorf("%w: unknown op %q (want ram, mmio, attach, detach, convert, plug or unplug)", ErrSchema, opText)
	}
	if extra := seen &^ (required | optional); extra != 0 {
		return nil, fmt.Errorf("%w: op %q has no field %q", ErrSchema, op, fieldName(lowestBit(extra)))
	}
	if missing := required &^ seen; missing != 0 {
		return nil, fmt.Errorf("%w: op %q needs field %q", ErrSchema, op, fieldName(lowestBit(missing)))
	}
	get := func(bit fieldSet) value { return vals[bitIndex(bit)] }
	size := func(bit fieldSet) (uint64, error) {
		if seen&bit == 0 {
			return 0, nil
		}
		v := get(bit)
		var n uint64
		var err error
		if v.kind == kindNumber {
			n, err = parseJSONNumber(v.text)
		} else {
			n, err = ParseSize(v.text)
		}
		if err != nil {
			return 0, fmt.Errorf("field %q: %w", fieldName(bit), err)
		}
		return n, nil
	}
	str := func(bit fieldSet) (string, error) {
		v := get(bit)
		if v.kind != kindString {
			return "", fmt.Errorf("%w: field %q must be a string", ErrSchema, fieldName(bit))
		}
		return v.text, nil
	}

	var ev Event
	switch op {
	case OpRAM:
		var e RAM
		if e.Name, err = str(fName); err != nil {
			return nil, err
		}
		if e.GPA, err = size(fGPA); err != nil {
			return nil, err
		}
		if e.Size, err = size(fSize); err != nil {
			return nil, err
		}
		e.Mode = Split
		if seen&fMode != 0 {
			var m string
			if m, err = str(fMode); err != nil {
				return nil, err
			}
			if e.Mode, err = ParseMode(m); err != nil {
				return nil, err
			}
		}
		if e.Block, err = size(fBlock); err != nil {
			return nil, err
		}
		if seen&fBlock != 0 && e.Block == 0 {
			return nil, fmt.Errorf("%w: field \"block\" must be positive (omit it for ordinary RAM)", ErrValue)
		}
		ev = e
	case OpMMIO, OpPlug, OpUnplug:
		gpa, err := size(fGPA)
		if err != nil {
			return nil, err
		}
		sz, err := size(fSize)
		if err != nil {
			return nil, err
		}
		switch op {
		case OpMMIO:
			ev = MMIO{GPA: gpa, Size: sz}
		case OpPlug:
			ev = Plug{GPA: gpa, Size: sz}
		default:
			ev = Unplug{GPA: gpa, Size: sz}
		}
	case OpAttach:
		var e Attach
		if e.Dev, err = str(fDev); err != nil {
			return nil, err
		}
		var k string
		if k, err = str(fIOMMU); err != nil {
			return nil, err
		}
		if e.IOMMU, err = ParseIOMMU(k); err != nil {
			return nil, err
		}
		if seen&fLimit != 0 {
			if e.Limit, err = parseCount(get(fLimit)); err != nil {
				return nil, fmt.Errorf("field \"limit\": %w", err)
			}
		}
		ev = e
	case OpDetach:
		var e Detach
		if e.Dev, err = str(fDev); err != nil {
			return nil, err
		}
		ev = e
	case OpConvert:
		var e Convert
		if e.GPA, err = size(fGPA); err != nil {
			return nil, err
		}
		if e.Size, err = size(fSize); err != nil {
			return nil, err
		}
		var t string
		if t, err = str(fTo); err != nil {
			return nil, err
		}
		if e.To, err = ParseState(t); err != nil {
			return nil, err
		}
		ev = e
	}
	if err := checkParsed(ev); err != nil {
		return nil, err
	}
	return ev, nil
}

// checkParsed is what a parser requires of an event: a machine event must
// pass Check; a guest request needs only what it was parsed with (a valid
// target state), since the executor answers every request it can represent.
func checkParsed(e Event) error {
	switch e.(type) {
	case Convert, Plug, Unplug:
		return nil
	}
	return e.Check()
}

func bitIndex(b fieldSet) int {
	i := 0
	for b > 1 {
		b >>= 1
		i++
	}
	return i
}

func lowestBit(s fieldSet) fieldSet { return s & -s }

func fieldName(b fieldSet) string {
	switch b {
	case fName:
		return "name"
	case fGPA:
		return "gpa"
	case fSize:
		return "size"
	case fMode:
		return "mode"
	case fBlock:
		return "block"
	case fDev:
		return "dev"
	case fIOMMU:
		return "iommu"
	case fLimit:
		return "limit"
	case fTo:
		return "to"
	}
	return "?"
}

// AppendEvent appends e as one JSON Lines line, newline included, after
// checking it (an event that fails Check is refused so that what is written
// always parses back to the same event). Addresses are written in hex
// ("0x80000000"), sizes with the largest exact binary unit ("2MiB").
func AppendEvent(dst []byte, e Event) ([]byte, error) {
	if e == nil {
		return dst, fmt.Errorf("%w: nil event", ErrValue)
	}
	if err := e.Check(); err != nil {
		return dst, err
	}
	dst = append(dst, `{"op":`...)
	dst = appendString(dst, string(e.Op()))
	addr := func(key string, v uint64) {
		dst = append(dst, `,"`...)
		dst = append(dst, key...)
		dst = append(dst, `":"0x`...)
		dst = strconv.AppendUint(dst, v, 16)
		dst = append(dst, '"')
	}
	size := func(key string, v uint64) {
		dst = append(dst, `,"`...)
		dst = append(dst, key...)
		dst = append(dst, `":"`...)
		dst = append(dst, FormatSize(v)...)
		dst = append(dst, '"')
	}
	str := func(key, v string) {
		dst = append(dst, `,"`...)
		dst = append(dst, key...)
		dst = append(dst, `":`...)
		dst = appendString(dst, v)
	}
	switch e := e.(type) {
	case RAM:
		str("name", e.Name)
		addr("gpa", e.GPA)
		size("size", e.Size)
		str("mode", e.Mode.String())
		if e.Block != 0 {
			size("block", e.Block)
		}
	case MMIO:
		addr("gpa", e.GPA)
		size("size", e.Size)
	case Attach:
		str("dev", e.Dev)
		str("iommu", e.IOMMU.String())
		if e.Limit != 0 {
			dst = append(dst, `,"limit":`...)
			dst = strconv.AppendUint(dst, e.Limit, 10)
		}
	case Detach:
		str("dev", e.Dev)
	case Convert:
		addr("gpa", e.GPA)
		size("size", e.Size)
		str("to", e.To.String())
	case Plug:
		addr("gpa", e.GPA)
		size("size", e.Size)
	case Unplug:
		addr("gpa", e.GPA)
		size("size", e.Size)
	}
	return append(dst, "}\n"...), nil
}

// Writer writes events as JSON Lines. It buffers; call Flush at the end.
type Writer struct {
	w   *bufio.Writer
	buf []byte
}

// NewWriter returns a Writer to w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: bufio.NewWriter(w)} }

// Write writes one event. An event that fails Check is refused with its
// error and nothing is written.
func (w *Writer) Write(e Event) error {
	var err error
	w.buf, err = AppendEvent(w.buf[:0], e)
	if err != nil {
		return err
	}
	_, err = w.w.Write(w.buf)
	return err
}

// Flush writes any buffered data to the underlying writer.
func (w *Writer) Flush() error { return w.w.Flush() }
