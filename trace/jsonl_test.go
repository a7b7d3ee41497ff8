package trace

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gmemproject/gmem/span"
)

// goldenJSONL exercises every op, every number form and the optional fields.
const goldenJSONL = `{"op":"ram","name":"ram-below-4g","gpa":0,"size":"2GiB","mode":"split"}

{"op":"mmio","gpa":"0x80000000","size":"2 GiB"}
  {"size": 17179869184, "gpa": "4GiB", "op": "ram", "name": "ram-above-4g"}
{"op":"ram","name":"vmem","gpa":"0x500000000","size":"1GiB","mode":"split","block":"2MiB"}
{"op":"attach","dev":"gpu0","iommu":"type1","limit":65535}
{"op":"attach","dev":"nic\u00e9","iommu":"iommufd"}
{"op":"convert","gpa":"0x7fe00000","size":"0x200000","to":"shared"}
{"op":"convert","gpa":2145386496,"size":4.096e3,"to":"private"}
{"op":"plug","gpa":"0x500000000","size":"128MiB"}
{"op":"convert","gpa":"0x500001000","size":"4KiB","to":"shared"}
{"op":"unplug","gpa":"0x507e00000","size":"2MiB"}
{"op":"attach","dev":"t","iommu":"type1","limit":"0x10000"}
{"op":"detach","dev":"gpu0"}
`

var goldenEvents = []Event{
	RAM{Name: "ram-below-4g", GPA: 0, Size: 2 << 30, Mode: Split},
	MMIO{GPA: 0x80000000, Size: 2 << 30},
	RAM{Name: "ram-above-4g", GPA: 4 << 30, Size: 16 << 30, Mode: Split}, // the default mode
	RAM{Name: "vmem", GPA: 0x500000000, Size: 1 << 30, Mode: Split, Block: 2 << 20},
	Attach{Dev: "gpu0", IOMMU: Type1, Limit: 65535},
	Attach{Dev: "nic\u00e9", IOMMU: IOMMUFD},
	Convert{GPA: 0x7fe00000, Size: 0x200000, To: Shared},
	Convert{GPA: 0x7fe00000, Size: 4096, To: Private},
	Plug{GPA: 0x500000000, Size: 128 << 20},
	Convert{GPA: 0x500001000, Size: 4096, To: Shared},
	Unplug{GPA: 0x507e00000, Size: 2 << 20},
	Attach{Dev: "t", IOMMU: Type1, Limit: 0x10000},
	Detach{Dev: "gpu0"},
}

func TestParseJSONLGolden(t *testing.T) {
	tr, err := Parse(strings.NewReader(goldenJSONL), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Format != JSONLines {
		t.Errorf("format %v, want jsonl", tr.Format)
	}
	if diff := cmp.Diff(goldenEvents, tr.Events); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
	wantLines := []int{1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14}
	if diff := cmp.Diff(wantLines, tr.Lines); diff != "" {
		t.Errorf("lines (-want +got):\n%s", diff)
	}
	// The trace is valid as a whole, too.
	v := NewValidator()
	for i, e := range tr.Events {
		if err := v.Check(e); err != nil {
			t.Errorf("event %d %+v: %v", i, e, err)
		}
	}
}

// TestLimitZero: "limit":0 means the kernel's default, as an absent limit
// and --limit 0 do, for type1 and (which has none) iommufd.
func TestLimitZero(t *testing.T) {
	for _, c := range []struct {
		line string
		want Event
	}{
		{`{"op":"attach","dev":"d","iommu":"type1","limit":0}`, Attach{Dev: "d", IOMMU: Type1}},
		{`{"op":"attach","dev":"d","iommu":"type1","limit":"0"}`, Attach{Dev: "d", IOMMU: Type1}},
		{`{"op":"attach","dev":"d","iommu":"type1"}`, Attach{Dev: "d", IOMMU: Type1}},
		{`{"op":"attach","dev":"d","iommu":"iommufd","limit":0}`, Attach{Dev: "d", IOMMU: IOMMUFD}},
	} {
		e, err := ParseEvent([]byte(c.line))
		if err != nil || e != c.want {
			t.Errorf("%s: %#v, %v; want %#v", c.line, e, err, c.want)
		}
	}
}

func TestReaderGolden(t *testing.T) {
	r := NewReader(strings.NewReader(goldenJSONL), Options{})
	var got []Event
	for {
		e, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, e)
	}
	if diff := cmp.Diff(goldenEvents, got); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
}

func TestWriterGolden(t *testing.T) {
	var b bytes.Buffer
	w := NewWriter(&b)
	for _, e := range goldenEvents {
		if err := w.Write(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	want := `{"op":"ram","name":"ram-below-4g","gpa":"0x0","size":"2GiB","mode":"split"}
{"op":"mmio","gpa":"0x80000000","size":"2GiB"}
{"op":"ram","name":"ram-above-4g","gpa":"0x100000000","size":"16GiB","mode":"split"}
{"op":"ram","name":"vmem","gpa":"0x500000000","size":"1GiB","mode":"split","block":"2MiB"}
{"op":"attach","dev":"gpu0","iommu":"type1","limit":65535}
{"op":"attach","dev":"nic` + "\u00e9" + `","iommu":"iommufd"}
{"op":"convert","gpa":"0x7fe00000","size":"2MiB","to":"shared"}
{"op":"convert","gpa":"0x7fe00000","size":"4KiB","to":"private"}
{"op":"plug","gpa":"0x500000000","size":"128MiB"}
{"op":"convert","gpa":"0x500001000","size":"4KiB","to":"shared"}
{"op":"unplug","gpa":"0x507e00000","size":"2MiB"}
{"op":"attach","dev":"t","iommu":"type1","limit":65536}
{"op":"detach","dev":"gpu0"}
`
	if diff := cmp.Diff(want, b.String()); diff != "" {
		t.Errorf("output (-want +got):\n%s", diff)
	}
	back, err := Parse(&b, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(goldenEvents, back.Events); diff != "" {
		t.Errorf("round trip (-want +got):\n%s", diff)
	}
}

func TestWriterRefusesInvalid(t *testing.T) {
	for _, e := range []Event{
		nil,
		Convert{GPA: 0, Size: 4096},             // no target
		Convert{GPA: 1, Size: 4096, To: Shared}, // misaligned
		Convert{GPA: 0, Size: 0, To: Shared},    // empty
		Convert{GPA: 1<<64 - 4096, Size: 8192, To: Shared},                 // wraps
		RAM{Name: "", GPA: 0, Size: 4096, Mode: Split},                     // no name
		RAM{Name: "r", GPA: 0, Size: 4096},                                 // no mode
		RAM{Name: "r", GPA: 0, Size: 4096, Mode: 9},                        // bad mode
		RAM{Name: "r", GPA: 0, Size: 3 << 20, Mode: Split, Block: 2 << 20}, // size not a multiple of block
		RAM{Name: "r", GPA: 0, Size: 4 << 20, Mode: Split, Block: 3 << 20}, // block not a power of two
		RAM{Name: "a\nb", GPA: 0, Size: 4096, Mode: Split},                 // control character
		RAM{Name: "\xff", GPA: 0, Size: 4096, Mode: Split},                 // invalid UTF-8
		RAM{Name: strings.Repeat("x", 257), GPA: 0, Size: 4096, Mode: Split},
		Attach{Dev: "d"}, // no IOMMU
		Attach{Dev: "d", IOMMU: IOMMUFD, Limit: 5}, // limit on iommufd
		Detach{},
		Plug{GPA: 0, Size: 100},
		Unplug{GPA: 0, Size: 0},
		MMIO{GPA: 0x800, Size: 4096},
	} {
		if _, err := AppendEvent(nil, e); !errors.Is(err, ErrValue) {
			t.Errorf("AppendEvent(%#v) error %v, want ErrValue", e, err)
		}
	}
}

func TestParseJSONLErrors(t *testing.T) {
	for _, c := range []struct {
		line string
		kind error
		why  string
	}{
		{`{"op":"convert","gpa":0,"size":4096,"to":"shared"`, ErrSyntax, "want ',' or '}'"},
		{`{"op":"convert","gpa":0,"size":4096,"to":"shared"} x`, ErrSyntax, "text after"},
		{`{"op":"convert" "gpa":0}`, ErrSyntax, "want ',' or '}'"},
		{`{"op":"convert",}`, ErrSyntax, "field name"},
		{`{op:"convert"}`, ErrSyntax, "field name"},
		{`{"op":"convert","gpa":01,"size":4096,"to":"shared"}`, ErrSyntax, "want ',' or '}'"},
		{`{"op":"convert","gpa":1.,"size":4096,"to":"shared"}`, ErrSyntax, "digits after"},
		{`{"op":"convert","gpa":"\x","size":4096,"to":"shared"}`, ErrSyntax, "unknown escape"},
		{"{\"op\":\"convert\",\"gpa\":\"\x01\"}", ErrSyntax, "control character"},
		{"{\"op\":\"ram\",\"name\":\"\xff\"}", ErrSyntax, "UTF-8"},
		{`{"op":"convert","gpa":"0`, ErrSyntax, "unterminated"},
		{`{"op":"detach","dev":"d"}}`, ErrSyntax, "text after"},
		{`{}`, ErrSchema, `"op" missing`},
		{`{"op":"resize","gpa":0}`, ErrSchema, "unknown op"},
		{`{"op":1}`, ErrSchema, "must be a string"},
		{`{"op":"convert","op":"convert"}`, ErrSchema, "repeated"},
		{`{"op":"convert","gpa":0,"gpa":0,"size":4096,"to":"shared"}`, ErrSchema, "repeated"},
		{`{"op":"convert","GPA":0,"size":4096,"to":"shared"}`, ErrSchema, `unknown field "GPA"`},
		{`{"op":"convert","gpa":0,"size":4096,"to":"shared","extra":1}`, ErrSchema, "unknown field"},
		{`{"op":"convert","gpa":0,"size":4096,"to":"shared","dev":"x"}`, ErrSchema, `has no field "dev"`},
		{`{"op":"convert","gpa":0,"size":4096}`, ErrSchema, `needs field "to"`},
		{`{"op":"convert","gpa":true,"size":4096,"to":"shared"}`, ErrSchema, "string or a number"},
		{`{"op":"convert","gpa":null,"size":4096,"to":"shared"}`, ErrSchema, "string or a number"},
		{`{"op":"convert","gpa":{},"size":4096,"to":"shared"}`, ErrSchema, "string or a number"},
		{`{"op":"convert","gpa":0,"size":4096,"to":1}`, ErrSchema, "must be a string"},
		{`{"op":"convert","gpa":0,"size":4096,"to":"Shared"}`, ErrValue, "want shared or private"},
		{`{"op":"convert","gpa":-4096,"size":4096,"to":"shared"}`, ErrValue, "negative"},
		{`{"op":"convert","gpa":0,"size":1.5,"to":"shared"}`, ErrValue, "whole number"},
		{`{"op":"convert","gpa":0,"size":"1.5","to":"shared"}`, ErrValue, "whole number"},
		{`{"op":"convert","gpa":0,"size":"16GB","to":"shared"}`, ErrValue, "ambiguous"},
		{`{"op":"convert","gpa":0,"size":18446744073709551616,"to":"shared"}`, ErrValue, "overflows"},
		{`{"op":"ram","name":"r","gpa":0,"size":4096,"mode":"fast"}`, ErrValue, "mode"},
		{`{"op":"ram","name":"r","gpa":2048,"size":4096}`, ErrValue, "multiples of 4 KiB"},
		{`{"op":"mmio","gpa":0,"size":0}`, ErrValue, "size 0"},
		{`{"op":"mmio","gpa":"0xfffffffffffff000","size":8192}`, ErrValue, "overflows"},
		{`{"op":"ram","name":"","gpa":0,"size":4096,"mode":"split"}`, ErrValue, "name missing or empty"},
		{`{"op":"ram","name":"r","gpa":0,"size":4096,"mode":"split","block":0}`, ErrValue, "block"},
		{`{"op":"ram","name":"r","gpa":0,"size":"4MiB","mode":"split","block":"3MiB"}`, ErrValue, "power of two"},
		{`{"op":"attach","dev":"d","iommu":"vfio"}`, ErrValue, "type1 or iommufd"},
		{`{"op":"attach","dev":"d","iommu":"iommufd","limit":10}`, ErrValue, "no entry limit"},
		{`{"op":"attach","dev":"d","iommu":"type1","limit":"64KiB"}`, ErrValue, "count"},
		{`{"op":"attach","dev":"d","iommu":"type1","limit":4294967296}`, ErrValue, "largest dma_entry_limit"},
		{`{"op":"attach","dev":"d","iommu":"type1","limit":1.5}`, ErrValue, "whole number"},
	} {
		_, err := Parse(strings.NewReader("\n\n"+c.line+"\n"), Options{})
		var pe *ParseError
		if !errors.As(err, &pe) {
			t.Errorf("%s: error %v, want a *ParseError", c.line, err)
			continue
		}
		if pe.Line != 3 || !errors.Is(err, c.kind) || !strings.Contains(err.Error(), c.why) {
			t.Errorf("%s: error %q (line %d): want line 3, %v, mentioning %q", c.line, err, pe.Line, c.kind, c.why)
		}
	}
}

func TestParseKeepGoing(t *testing.T) {
	in := `{"op":"ram","name":"r","gpa":0,"size":"1GiB","mode":"split"}
{"op":"convert","gpa":0,"size":4096,"to":"sideways"}
{"op":"convert","gpa":0,"size":4096,"to":"shared"}
not json
{"op":"convert","gpa":0,"size":4096,"to":"private"}
`
	// Without KeepGoing the first bad line stops the parse.
	if _, err := Parse(strings.NewReader(in), Options{}); err == nil || !strings.HasPrefix(err.Error(), "line 2:") {
		t.Errorf("without KeepGoing: error %v, want line 2", err)
	}
	tr, err := Parse(strings.NewReader(in), Options{KeepGoing: true})
	var errs ParseErrors
	if !errors.As(err, &errs) {
		t.Fatalf("error %v, want ParseErrors", err)
	}
	var lines []int
	for _, e := range errs {
		lines = append(lines, e.Line)
	}
	if diff := cmp.Diff([]int{2, 4}, lines); diff != "" {
		t.Errorf("error lines (-want +got):\n%s", diff)
	}
	if !errors.Is(err, ErrValue) || !errors.Is(err, ErrSyntax) {
		t.Errorf("ParseErrors %v should unwrap to ErrValue and ErrSyntax", err)
	}
	want := []Event{
		RAM{Name: "r", GPA: 0, Size: 1 << 30, Mode: Split},
		Convert{GPA: 0, Size: 4096, To: Shared},
		Convert{GPA: 0, Size: 4096, To: Private},
	}
	if diff := cmp.Diff(want, tr.Events); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]int{1, 3, 5}, tr.Lines); diff != "" {
		t.Errorf("lines (-want +got):\n%s", diff)
	}

	// The streaming Reader keeps going after a ParseError by itself.
	r := NewReader(strings.NewReader(in), Options{})
	var got []Event
	var errLines []int
	for {
		e, err := r.Next()
		if err == io.EOF {
			break
		}
		var pe *ParseError
		if errors.As(err, &pe) {
			errLines = append(errLines, pe.Line)
			if r.Line() != pe.Line {
				t.Errorf("Line() = %d after error on line %d", r.Line(), pe.Line)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, e)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("reader events (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]int{2, 4}, errLines); diff != "" {
		t.Errorf("reader error lines (-want +got):\n%s", diff)
	}
}

func TestParseLongLine(t *testing.T) {
	long := `{"op":"ram","name":"` + strings.Repeat("x", MaxLineLen) + `","gpa":0,"size":4096,"mode":"split"}`
	in := long + "\n" + `{"op":"mmio","gpa":0,"size":4096}` + "\n"
	tr, err := Parse(strings.NewReader(in), Options{KeepGoing: true})
	var errs ParseErrors
	if !errors.As(err, &errs) || len(errs) != 1 || errs[0].Line != 1 || !errors.Is(errs[0], ErrSyntax) {
		t.Fatalf("error %v, want one syntax error on line 1", err)
	}
	if diff := cmp.Diff([]Event{MMIO{GPA: 0, Size: 4096}}, tr.Events); diff != "" {
		t.Errorf("events after a long line (-want +got):\n%s", diff)
	}
}

// A guest's request is read as written, however wrong: refusing it is the
// executor's answer.
func TestParseKeepsBadRequests(t *testing.T) {
	in := `{"op":"convert","gpa":"0xfffffffffffff000","size":8192,"to":"shared"}
{"op":"convert","gpa":0,"size":0,"to":"private"}
{"op":"convert","gpa":2048,"size":4096,"to":"shared"}
{"op":"plug","gpa":"0x1000","size":100}
{"op":"unplug","gpa":0,"size":0}
`
	tr, err := Parse(strings.NewReader(in), Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := []Event{
		Convert{GPA: 1<<64 - 4096, Size: 8192, To: Shared},
		Convert{GPA: 0, Size: 0, To: Private},
		Convert{GPA: 2048, Size: 4096, To: Shared},
		Plug{GPA: 0x1000, Size: 100},
		Unplug{GPA: 0, Size: 0},
	}
	if diff := cmp.Diff(want, tr.Events); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestParseCommentsAndMode(t *testing.T) {
	in := `# a trace written by hand
  # indented comment
{"op":"ram","name":"r","gpa":0,"size":"1GiB"}
# {"op":"mmio","gpa":0,"size":4096}
{"op":"convert","gpa":0,"size":4096,"to":"shared"}
`
	tr, err := Parse(strings.NewReader(in), Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := []Event{RAM{Name: "r", GPA: 0, Size: 1 << 30, Mode: Split}, Convert{GPA: 0, Size: 4096, To: Shared}}
	if diff := cmp.Diff(want, tr.Events); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if tr.Format != JSONLines || tr.Skipped != 3 || tr.Unrecognised != 0 || !strings.Contains(tr.FormatReason, "line 3") {
		t.Errorf("format %v (%s), skipped %d, unrecognised %d; want jsonl from line 3, 3, 0", tr.Format, tr.FormatReason, tr.Skipped, tr.Unrecognised)
	}
}

func TestParseEmptyAndBinary(t *testing.T) {
	for _, in := range []string{"", "\n  \n\t\n", "# only\n# comments\n"} {
		if _, err := Parse(strings.NewReader(in), Options{}); !errors.Is(err, ErrEmpty) {
			t.Errorf("%q: error %v, want ErrEmpty", in, err)
		}
		if _, err := Parse(strings.NewReader(in), Options{Format: QEMULog, RAM: []span.Range{{End: 1 << 30}}}); !errors.Is(err, ErrEmpty) {
			t.Errorf("%q as a QEMU log: error %v, want ErrEmpty", in, err)
		}
	}
	for _, in := range []string{"\x7fELF\x02\x01\x01\x00\x00\n", "kvm_convert_memory start\x00\n"} {
		for _, f := range []Format{0, JSONLines, QEMULog} {
			if _, err := Parse(strings.NewReader(in), Options{Format: f, RAM: []span.Range{{End: 1 << 30}}}); !errors.Is(err, ErrNotText) {
				t.Errorf("%q as %v: error %v, want ErrNotText", in, f, err)
			}
		}
	}
}

func TestParseFormatGiven(t *testing.T) {
	// A JSON Lines trace read as a QEMU log has nothing QEMU would trace.
	in := "{\"op\":\"ram\",\"name\":\"r\",\"gpa\":0,\"size\":\"1GiB\"}\n"
	tr, err := Parse(strings.NewReader(in), Options{Format: QEMULog, RAM: []span.Range{{End: 1 << 30}}})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Format != QEMULog || tr.FormatReason != "given" || tr.Unrecognised != 1 {
		t.Errorf("format %v (%s), unrecognised %d; want qemu, given, 1", tr.Format, tr.FormatReason, tr.Unrecognised)
	}
	// A QEMU log read as JSON Lines is malformed.
	_, err = Parse(strings.NewReader("kvm_convert_memory start 0x0 size 0x1000 private_to_shared\n"), Options{Format: JSONLines})
	if !errors.Is(err, ErrSyntax) {
		t.Errorf("QEMU log as JSON Lines: %v, want ErrSyntax", err)
	}
	for _, s := range []string{"jsonl", "qemu"} {
		f, err := ParseFormat(s)
		if err != nil || f.String() != s {
			t.Errorf("ParseFormat(%q) = %v, %v", s, f, err)
		}
	}
	if _, err := ParseFormat("json"); !errors.Is(err, ErrValue) {
		t.Errorf("ParseFormat(json): %v", err)
	}
}

func TestParseCRLF(t *testing.T) {
	in := "\xef\xbb\xbf{\"op\":\"mmio\",\"gpa\":0,\"size\":4096}\r\n{\"op\":\"detach\",\"dev\":\"d\"}"
	tr, err := Parse(strings.NewReader(in), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]Event{MMIO{GPA: 0, Size: 4096}, Detach{Dev: "d"}}, tr.Events); diff != "" {
		t.Errorf("BOM, CRLF and no final newline (-want +got):\n%s", diff)
	}
}

func TestJSONStringEscapes(t *testing.T) {
	line := `{"op":"detach","dev":"a\"b\\c\/d\u0041\ud83d\ude00\ud800x"}`
	e, err := ParseEvent([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	want := Detach{Dev: "a\"b\\c/dA\U0001F600\uFFFDx"}
	if diff := cmp.Diff(Event(want), e); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	// The standard decoder agrees on the decoded text.
	var std struct{ Dev string }
	if err := json.Unmarshal([]byte(line), &std); err != nil || std.Dev != want.Dev {
		t.Errorf("encoding/json decodes %q, %v", std.Dev, err)
	}
	b, err := AppendEvent(nil, want)
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParseEvent(bytes.TrimSuffix(b, []byte("\n")))
	if err != nil || back != Event(want) {
		t.Errorf("round trip of %q: %v, %v", b, back, err)
	}
}

// FuzzParseJSONL checks that parsing never panics, that every line accepted
// is valid JSON, that errors carry a line number, and that writing the
// events and parsing them again gives the same events.
func FuzzParseJSONL(f *testing.F) {
	f.Add(goldenJSONL)
	for _, c := range []string{
		`{"op":"convert","gpa":"0x1000","size":"4KiB","to":"shared"}`,
		`{"op":"convert","gpa":4096,"size":4.096e3,"to":"private"}`,
		`{"op":"ram","name":"r\u00e9","gpa":0,"size":"1 GiB","mode":"inplace","block":"2MiB"}`,
		`{"op":"attach","dev":"d","iommu":"type1","limit":"0x10"}`,
		`{"op":"attach","dev":"d","iommu":"iommufd"}`,
		`{"op":"detach","dev":"\ud83d\ude00"}`,
		`{"op":"plug","gpa":0,"size":"2MiB"}` + "\n" + `{"op":"unplug","gpa":0,"size":"2MiB"}`,
		`{"op":"convert","gpa":0,"gpa":0}`,
		`{"op":"convert","gpa":1e999999999,"size":4096,"to":"shared"}`,
		`{"op":"x"`,
		"{\"op\":\"mmio\",\"gpa\":0,\"size\":4096}\r\n\n",
		"{}",
		"{\"op\":\"ram\",\"name\":\"\\u0000\",\"gpa\":0,\"size\":4096,\"mode\":\"split\"}",
	} {
		f.Add(c)
	}
	f.Fuzz(func(t *testing.T, in string) {
		// Make the input JSON Lines by detection (the first line is an error
		// of its own); the QEMU fuzz target covers the other format.
		in = "{}\n" + in
		tr, err := Parse(strings.NewReader(in), Options{KeepGoing: true})
		var errs ParseErrors
		if err != nil && !errors.As(err, &errs) {
			t.Fatalf("error %v is not ParseErrors", err)
		}
		for _, e := range errs {
			if e.Line < 1 || !(errors.Is(e, ErrSyntax) || errors.Is(e, ErrSchema) || errors.Is(e, ErrValue)) {
				t.Fatalf("bad error %v", e)
			}
		}
		if tr.Format != JSONLines {
			t.Fatalf("format %v", tr.Format)
		}
		lines := strings.Split(in, "\n")
		for i, e := range tr.Events {
			l := tr.Lines[i]
			if l < 1 || l > len(lines) {
				t.Fatalf("event %d has line %d of %d", i, l, len(lines))
			}
			if src := strings.TrimPrefix(lines[l-1], "\ufeff"); !json.Valid([]byte(src)) {
				t.Fatalf("accepted invalid JSON %q as %#v", src, e)
			}
			if err := checkParsed(e); err != nil {
				t.Fatalf("accepted %#v failing checkParsed: %v", e, err)
			}
		}
		// The Writer writes only events that pass Check: what gmem itself
		// produces. Bad guest requests are read, never written.
		var good []Event
		var b bytes.Buffer
		w := NewWriter(&b)
		for _, e := range tr.Events {
			err := w.Write(e)
			if (err != nil) != (e.Check() != nil) {
				t.Fatalf("writing %#v: %v", e, err)
			}
			if err == nil {
				good = append(good, e)
			}
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		back, err := Parse(bytes.NewReader(b.Bytes()), Options{})
		if len(good) == 0 {
			if !errors.Is(err, ErrEmpty) {
				t.Fatalf("nothing written, read back as %v, %v", back, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("parsing written events: %v\n%s", err, b.String())
		}
		if diff := cmp.Diff(good, back.Events); diff != "" {
			t.Fatalf("round trip (-first +second):\n%s", diff)
		}
	})
}
