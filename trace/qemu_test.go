package trace

import (
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gmemproject/gmem/span"
)

// goldenQEMU mixes both line forms, other trace events and other output,
// and one implicit conversion traced twice (fault, then the conversion).
const goldenQEMU = `qemu-system-x86_64: warning: host doesn't support requested feature
12345@1700000000.123456:kvm_convert_memory start 0x80000000 size 0x200000 shared_to_private
kvm_convert_memory start 0x7fe00000 size 0x200000 private_to_shared
12345@1700000000.123500:kvm_run_exit cpu_index 0, reason 2
12346@1700000000.200000:kvm_memory_fault start 0x1000 size 0x1000 flags 0x0
12346@1700000000.200001:kvm_convert_memory start 0x1000 size 0x1000 private_to_shared

kvm_memory_fault start 0x2000 size 0x1000 flags 0x8
   kvm_convert_memory start 0x3000 size 0x1000 shared_to_private
12347@1700000000.300000:kvm_memory_fault start 0x13ffff000 size 0x1000 flags 0x8
12348@1700000000.300001:kvm_convert_memory start 0x13ffff000 size 0x1000 shared_to_private
`

func TestParseQEMUGolden(t *testing.T) {
	tr, err := Parse(strings.NewReader(goldenQEMU), Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := []Event{
		// Highest address 0x140000000 (5 GiB) is already a GiB multiple.
		RAM{Name: "ram0", GPA: 0, Size: 5 << 30, Mode: Split},
		Attach{Dev: "dev0", IOMMU: Type1},
		Convert{GPA: 0x80000000, Size: 0x200000, To: Private},
		Convert{GPA: 0x7fe00000, Size: 0x200000, To: Shared},
		Convert{GPA: 0x1000, Size: 0x1000, To: Shared}, // fault; its conversion line is folded
		Convert{GPA: 0x2000, Size: 0x1000, To: Private},
		Convert{GPA: 0x3000, Size: 0x1000, To: Private}, // different range: not folded
		Convert{GPA: 0x13ffff000, Size: 0x1000, To: Private},
		Convert{GPA: 0x13ffff000, Size: 0x1000, To: Private}, // other thread: not folded
	}
	if diff := cmp.Diff(want, tr.Events); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]int{0, 0, 2, 3, 5, 8, 9, 10, 11}, tr.Lines); diff != "" {
		t.Errorf("lines (-want +got):\n%s", diff)
	}
	if tr.Format != QEMULog || tr.Unrecognised != 2 || tr.Skipped != 0 || tr.Folded != 1 {
		t.Errorf("format %v unrecognised %d skipped %d folded %d; want qemu, 2, 0, 1", tr.Format, tr.Unrecognised, tr.Skipped, tr.Folded)
	}
}

func TestParseQEMULineForms(t *testing.T) {
	for _, c := range []struct {
		line string
		want Convert
	}{
		{"12345@1700000000.123456:kvm_convert_memory start 0x80000000 size 0x200000 shared_to_private",
			Convert{GPA: 0x80000000, Size: 0x200000, To: Private}},
		{"kvm_convert_memory start 0x80000000 size 0x200000 shared_to_private",
			Convert{GPA: 0x80000000, Size: 0x200000, To: Private}},
		{"1@2.3:kvm_convert_memory start 0x0 size 0x1000 private_to_shared",
			Convert{GPA: 0, Size: 0x1000, To: Shared}},
		{"kvm_convert_memory start 0x0 size 0x1000 private_to_shared\r",
			Convert{GPA: 0, Size: 0x1000, To: Shared}},
		{"99@1700000000.000001:kvm_memory_fault start 0x7000 size 0x1000 flags 0x8",
			Convert{GPA: 0x7000, Size: 0x1000, To: Private}},
		{"kvm_memory_fault start 0x7000 size 0x1000 flags 0x0",
			Convert{GPA: 0x7000, Size: 0x1000, To: Shared}},
		{"kvm_memory_fault  start 0x7000  size 0x200000 flags 0x8",
			Convert{GPA: 0x7000, Size: 0x200000, To: Private}},
	} {
		tr, err := Parse(strings.NewReader(c.line+"\n"), Options{})
		if err != nil {
			t.Errorf("%q: %v", c.line, err)
			continue
		}
		if diff := cmp.Diff([]Event{c.want}, tr.Events[2:]); diff != "" {
			t.Errorf("%q (-want +got):\n%s", c.line, diff)
		}
	}
}

func TestParseQEMUErrors(t *testing.T) {
	for _, c := range []struct {
		line string
		kind error
		why  string
	}{
		{"kvm_convert_memory start 0x1000 size 0x1000", ErrSyntax, "want"},
		{"kvm_convert_memory start 0x1000 size 0x1000 private_to_shared extra", ErrSyntax, "want"},
		{"kvm_convert_memory begin 0x1000 size 0x1000 private_to_shared", ErrSyntax, "want"},
		{"kvm_convert_memory start 4096 size 0x1000 private_to_shared", ErrSyntax, "0x followed by"},
		{"kvm_convert_memory start 0x size 0x1000 private_to_shared", ErrSyntax, "0x followed by"},
		{"kvm_convert_memory start 0x1g size 0x1000 private_to_shared", ErrValue, "no fraction or unit"},
		{"kvm_convert_memory start 0x10000000000000000 size 0x1000 private_to_shared", ErrValue, "overflows"},
		{"kvm_convert_memory start 0x1000 size 0x1000 to_shared", ErrValue, "direction"},
		{"kvm_memory_fault start 0x1000 size 0x1000", ErrSyntax, "want"},
		{"kvm_memory_fault start 0x1000 size 0x1000 flags 0x9", ErrValue, "KVM_MEMORY_EXIT_FLAG_PRIVATE"},
		{"kvm_memory_fault start 0x1000 size 0x1000 flags 8", ErrSyntax, "0x followed by"},
		{"kvm_convert_memory " + strings.Repeat("x", MaxLineLen), ErrSyntax, "longer than"},
	} {
		in := "first line\n" + c.line + "\nkvm_convert_memory start 0x0 size 0x1000 private_to_shared\n"
		_, err := Parse(strings.NewReader(in), Options{})
		var pe *ParseError
		if !errors.As(err, &pe) {
			t.Errorf("%.80q: error %v, want a *ParseError", c.line, err)
			continue
		}
		if pe.Line != 2 || !errors.Is(err, c.kind) || !strings.Contains(err.Error(), c.why) {
			t.Errorf("%.80q: error %.200q: want line 2, %v, mentioning %q", c.line, err, c.kind, c.why)
		}
	}
}

func TestParseQEMUSkipsOtherLines(t *testing.T) {
	in := strings.Join([]string{
		"kvm_convert_memory_other start 0x1000 size 0x1000 private_to_shared", // another event
		"12@3.4:kvm_set_user_memory Slot#0 flags=0x4 gpa=0x0 size=0x80000000",
		"xkvm_convert_memory start 0x1000 size 0x1000 private_to_shared",  // part of another word
		"# kvm_convert_memory start 0x1000 size 0x1000 private_to_shared", // a comment
		strings.Repeat("y", MaxLineLen+10),                                // long, but not a conversion
		"kvm_convert_memory start 0x5000 size 0x1000 private_to_shared",
	}, "\n")
	tr, err := Parse(strings.NewReader(in), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Unrecognised != 4 || tr.Skipped != 1 || len(tr.Events) != 3 {
		t.Errorf("unrecognised %d, skipped %d, %d events; want 4, 1 and 3", tr.Unrecognised, tr.Skipped, len(tr.Events))
	}
}

// Whatever comes before the event name is a prefix: an ISO timestamp from
// -msg timestamp=on, a journal header, a thread id in a prefix of its own.
func TestParseQEMUAnyPrefix(t *testing.T) {
	in := strings.Join([]string{
		"2026-12-01T19:50:00.123456Z 12@1700000000.1:kvm_memory_fault start 0x1000 size 0x1000 flags 0x0",
		"2026-12-01T19:50:00.123457Z 12@1700000000.2:kvm_convert_memory start 0x1000 size 0x1000 private_to_shared",
		"Dec 01 19:50:00 host qemu[12]: kvm_convert_memory start 0x2000 size 0x1000 private_to_shared",
		"12@x.4:kvm_convert_memory start 0x3000 size 0x1000 private_to_shared",
		"\tsomething kvm_convert_memory start 0x4000 size 0x1800 shared_to_private",
	}, "\n")
	tr, err := Parse(strings.NewReader(in), Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := []Event{
		RAM{Name: "ram0", GPA: 0, Size: 1 << 30, Mode: Split},
		Attach{Dev: "dev0", IOMMU: Type1},
		Convert{GPA: 0x1000, Size: 0x1000, To: Shared}, // the fault; the conversion on thread 12 is folded
		Convert{GPA: 0x2000, Size: 0x1000, To: Shared},
		Convert{GPA: 0x3000, Size: 0x1000, To: Shared},
		Convert{GPA: 0x4000, Size: 0x1800, To: Private}, // misaligned, kept as traced
	}
	if diff := cmp.Diff(want, tr.Events); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if tr.Folded != 1 || tr.Unrecognised != 0 {
		t.Errorf("folded %d, unrecognised %d; want 1, 0", tr.Folded, tr.Unrecognised)
	}
}

func TestParseQEMUOptions(t *testing.T) {
	in := "kvm_convert_memory start 0x100000000 size 0x1000 private_to_shared\n"
	ram, err := ParseRAMLayout("0:2GiB,4GiB:2GiB")
	if err != nil {
		t.Fatal(err)
	}
	tr, err := Parse(strings.NewReader(in), Options{RAM: ram, Devices: 2, IOMMU: IOMMUFD, Mode: InPlace})
	if err != nil {
		t.Fatal(err)
	}
	want := []Event{
		RAM{Name: "ram0", GPA: 0, Size: 2 << 30, Mode: InPlace},
		RAM{Name: "ram1", GPA: 4 << 30, Size: 2 << 30, Mode: InPlace},
		Attach{Dev: "dev0", IOMMU: IOMMUFD},
		Attach{Dev: "dev1", IOMMU: IOMMUFD},
		Convert{GPA: 4 << 30, Size: 4096, To: Shared},
	}
	if diff := cmp.Diff(want, tr.Events); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}

	// Rounding up of the derived layout, and a type1 limit.
	tr, err = Parse(strings.NewReader("kvm_convert_memory start 0x40000000 size 0x1000 private_to_shared\n"), Options{Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	want = []Event{
		RAM{Name: "ram0", GPA: 0, Size: 2 << 30, Mode: Split},
		Attach{Dev: "dev0", IOMMU: Type1, Limit: 100},
		Convert{GPA: 1 << 30, Size: 4096, To: Shared},
	}
	if diff := cmp.Diff(want, tr.Events); diff != "" {
		t.Errorf("derived layout (-want +got):\n%s", diff)
	}

	// With a layout, a log without conversions is a machine with no events.
	tr, err = Parse(strings.NewReader("other\n"), Options{RAM: ram})
	if err != nil || len(tr.Events) != 3 {
		t.Errorf("no conversions with a layout: %v, %v", tr, err)
	}
	// Without, it is an error.
	if _, err := Parse(strings.NewReader("other\n"), Options{}); !errors.Is(err, ErrSyntax) {
		t.Errorf("no conversions, no layout: error %v, want ErrSyntax", err)
	}
	// The rounded-up end must not wrap.
	if _, err := Parse(strings.NewReader("kvm_convert_memory start 0xfffffffffff00000 size 0x1000 private_to_shared\n"), Options{}); !errors.Is(err, ErrValue) {
		t.Errorf("highest address near 2^64: error %v, want ErrValue", err)
	}
	for _, o := range []Options{
		{Devices: -1},
		{Devices: MaxDevices + 1},
		{IOMMU: IOMMUFD, Limit: 5},
		{IOMMU: 7},
		{Mode: 7},
		{RAM: []span.Range{{Start: 0, End: 4096}, {Start: 0, End: 8192}}},
		{RAM: []span.Range{{Start: 4096, End: 4096}}},
		{RAM: []span.Range{{Start: 1, End: 4097}}},
	} {
		if _, err := Parse(strings.NewReader(in), o); !errors.Is(err, ErrValue) {
			t.Errorf("options %+v: error %v, want ErrValue", o, err)
		}
	}
}

func TestParseQEMUKeepGoing(t *testing.T) {
	in := "kvm_convert_memory start 0x1000 size 0x1000 private_to_shared\n" +
		"kvm_convert_memory start 0x1000 size 0x1000 sideways\n" +
		"kvm_memory_fault start 0x1000 size 0x1000 flags 0x8\n" +
		"kvm_memory_fault start 0x1000 size 0x1000 flags 0xff\n"
	tr, err := Parse(strings.NewReader(in), Options{KeepGoing: true})
	var errs ParseErrors
	if !errors.As(err, &errs) || len(errs) != 2 || errs[0].Line != 2 || errs[1].Line != 4 {
		t.Fatalf("error %v, want errors on lines 2 and 4", err)
	}
	if len(tr.Events) != 4 {
		t.Errorf("%d events, want ram, attach and 2 conversions", len(tr.Events))
	}
}

func TestParseRAMLayout(t *testing.T) {
	got, err := ParseRAMLayout("0:2GiB, 4GiB:0x380000000 ,0x800000000 : 1 TiB")
	if err != nil {
		t.Fatal(err)
	}
	want := []span.Range{{Start: 0, End: 2 << 30}, {Start: 4 << 30, End: 18 << 30}, {Start: 32 << 30, End: 32<<30 + 1<<40}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	// Order is kept.
	got, err = ParseRAMLayout("4GiB:1GiB,0:1GiB")
	if err != nil || got[0].Start != 4<<30 {
		t.Errorf("order: %v, %v", got, err)
	}
	for _, s := range []string{
		"", " ", "0", "0:", ":4096", "0:4096,", "0:4096:4096", "0:0", "0:100", "0x800:4096",
		"0:2GiB,1GiB:2GiB", "0:4096,0:4096", "0xfffffffffffff000:0x2000", "-1:4096", "0:16GB",
	} {
		if got, err := ParseRAMLayout(s); !errors.Is(err, ErrValue) {
			t.Errorf("ParseRAMLayout(%q) = %v, %v; want ErrValue", s, got, err)
		}
	}
}

// FuzzParseQEMULog checks that parsing a QEMU log never panics, that errors
// carry a line number, that events made from the log are well formed and
// follow the machine events, and that the trace survives a JSON Lines round
// trip.
func FuzzParseQEMULog(f *testing.F) {
	f.Add(goldenQEMU)
	for _, c := range []string{
		"12345@1700000000.123456:kvm_convert_memory start 0x80000000 size 0x200000 shared_to_private",
		"kvm_memory_fault start 0x1000 size 0x1000 flags 0x8\nkvm_convert_memory start 0x1000 size 0x1000 shared_to_private",
		"kvm_memory_fault start 0x1000 size 0x1000 flags 0x9",
		"kvm_convert_memory start 0xfffffffffffff000 size 0x1000 private_to_shared",
		"1@1.1:kvm_convert_memory start 0x0 size 0x1000 private_to_shared",
		"x\n\nkvm_convert_memory",
		"@.:kvm_convert_memory start 0x0 size 0x1000 private_to_shared",
	} {
		f.Add(c)
	}
	f.Fuzz(func(t *testing.T, in string) {
		// Keep the input a QEMU log by detection.
		in = "log\n" + in
		for _, opts := range []Options{
			{KeepGoing: true},
			{KeepGoing: true, RAM: []span.Range{{Start: 0, End: 1 << 30}}, Devices: 2},
			{KeepGoing: true, MMIO: []span.Range{{Start: 3 << 30, End: 4 << 30}}},
		} {
			tr, err := Parse(strings.NewReader(in), opts)
			var errs ParseErrors
			if err != nil && !errors.As(err, &errs) {
				if tr != nil || !(errors.Is(err, ErrSyntax) || errors.Is(err, ErrValue) || errors.Is(err, ErrNotText)) {
					t.Fatalf("error %v", err)
				}
				continue
			}
			for _, e := range errs {
				if e.Line < 2 {
					t.Fatalf("error on line %d: %v", e.Line, e)
				}
			}
			// The machine first (line 0): RAM, the holes, the devices.
			head := 0
			for head < len(tr.Lines) && tr.Lines[head] == 0 {
				head++
			}
			if head < max(opts.Devices, 1)+1+len(opts.MMIO) || len(tr.Lines) != len(tr.Events) {
				t.Fatalf("%d events, %d lines, %d of the machine", len(tr.Events), len(tr.Lines), head)
			}
			v := NewValidator()
			for _, e := range tr.Events[:head] {
				if err := v.Check(e); err != nil {
					t.Fatalf("machine %v: %v", tr.Events[:head], err)
				}
			}
			var good []Event
			for i, e := range tr.Events {
				if err := checkParsed(e); err != nil {
					t.Fatalf("event %d %#v: %v", i, e, err)
				}
				if e.Check() == nil {
					good = append(good, e)
				}
				if _, conv := e.(Convert); conv != (i >= head) || (tr.Lines[i] == 0) != (i < head) {
					t.Fatalf("event %d %#v at line %d out of place", i, e, tr.Lines[i])
				}
			}
			var b strings.Builder
			w := NewWriter(&b)
			for _, e := range good {
				if err := w.Write(e); err != nil {
					t.Fatal(err)
				}
			}
			if err := w.Flush(); err != nil {
				t.Fatal(err)
			}
			back, err := Parse(strings.NewReader(b.String()), Options{})
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(good, back.Events); diff != "" {
				t.Fatalf("round trip (-first +second):\n%s", diff)
			}
		}
	})
}

// FuzzParseRAMLayout checks that accepted layouts are well formed and
// disjoint and that formatting them back gives the same layout, and that
// ParseMMIOLayout reads holes as ParseRAMLayout reads blocks.
func FuzzParseRAMLayout(f *testing.F) {
	for _, s := range []string{
		"0:2GiB,4GiB:14GiB", "0:4096", "0x100000000:1TiB", "0:2GiB,1GiB:2GiB", "", ",", "0:0",
		"4GiB:1GiB, 0:1GiB", "0xfffffffffffff000:0x1000",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		rs, err := ParseRAMLayout(s)
		holes, herr := ParseMMIOLayout(s)
		if (err == nil) != (herr == nil) || !cmp.Equal(rs, holes) {
			t.Fatalf("RAM %v, %v; MMIO %v, %v: the same layout parsed two ways", rs, err, holes, herr)
		}
		if err != nil {
			if !errors.Is(err, ErrValue) || !errors.Is(herr, ErrValue) || !strings.Contains(herr.Error(), "MMIO") {
				t.Fatalf("errors %v, %v do not wrap ErrValue or name what they are about", err, herr)
			}
			return
		}
		var parts []string
		for i, r := range rs {
			if r.Empty() || !r.Aligned(PageSize) {
				t.Fatalf("block %v", r)
			}
			for _, o := range rs[:i] {
				if o.Overlaps(r) {
					t.Fatalf("%v overlaps %v", o, r)
				}
			}
			parts = append(parts, FormatSize(r.Start)+":"+FormatSize(r.Len()))
		}
		back, err := ParseRAMLayout(strings.Join(parts, ","))
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(rs, back); diff != "" {
			t.Fatalf("round trip (-first +second):\n%s", diff)
		}
	})
}

// TestQEMUMMIO: MMIO holes given for a QEMU log are MMIO events, and the
// default RAM leaves them out; holes that overlap RAM or each other, or
// leave no RAM, are errors.
func TestQEMUMMIO(t *testing.T) {
	log := "kvm_convert_memory start 0xfe000000 size 0x1000 shared_to_private\n" +
		"kvm_convert_memory start 0x140000000 size 0x1000 private_to_shared\n"
	tr, err := Parse(strings.NewReader(log), Options{MMIO: []span.Range{{Start: 3 << 30, End: 4 << 30}}})
	if err != nil {
		t.Fatal(err)
	}
	want := []Event{
		RAM{Name: "ram0", GPA: 0, Size: 3 << 30, Mode: Split},
		RAM{Name: "ram1", GPA: 4 << 30, Size: 2 << 30, Mode: Split},
		MMIO{GPA: 3 << 30, Size: 1 << 30},
		Attach{Dev: "dev0", IOMMU: Type1},
		Convert{GPA: 0xfe000000, Size: 0x1000, To: Private},
		Convert{GPA: 0x140000000, Size: 0x1000, To: Shared},
	}
	if diff := cmp.Diff(want, tr.Events); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	v := NewValidator()
	for _, e := range tr.Events {
		if err := v.Check(e); err != nil {
			t.Errorf("%#v: %v", e, err)
		}
	}
	// Given RAM and holes.
	tr, err = Parse(strings.NewReader(log), Options{RAM: []span.Range{{End: 2 << 30}, {Start: 4 << 30, End: 8 << 30}}, MMIO: []span.Range{{Start: 3 << 30, End: 4 << 30}}})
	if err != nil || len(tr.Events) != 6 || tr.Events[2] != (MMIO{GPA: 3 << 30, Size: 1 << 30}) {
		t.Errorf("given RAM: %v, %v", tr, err)
	}
	for _, c := range []struct {
		opts Options
		why  string
	}{
		{Options{RAM: []span.Range{{End: 4 << 30}}, MMIO: []span.Range{{Start: 3 << 30, End: 4 << 30}}}, "overlap"},
		{Options{MMIO: []span.Range{{Start: 3 << 30, End: 4 << 30}, {Start: 3 << 30, End: 5 << 30}}}, "MMIO holes"},
		{Options{MMIO: []span.Range{{Start: 0x800, End: 4 << 30}}}, "MMIO hole"},
		{Options{MMIO: []span.Range{{Start: 0, End: 8 << 30}}}, "no RAM left"},
	} {
		if _, err := Parse(strings.NewReader(log), c.opts); !errors.Is(err, ErrValue) || !strings.Contains(err.Error(), c.why) {
			t.Errorf("%+v: %v, want %q", c.opts, err, c.why)
		}
	}
	if _, err := ParseMMIOLayout("3GiB:1GiB,3GiB:4096"); !errors.Is(err, ErrValue) || !strings.Contains(err.Error(), "MMIO holes") {
		t.Errorf("overlapping holes: %v", err)
	}
}

// TestQEMUDefaultRAM: the default RAM is sized by the conversions that can
// be RAM: not those that wrap or lie past 2^52, which are replayed as the
// refusals they are; a log with none says so, and one whose conversion
// lines are all malformed says what is wrong with the first.
func TestQEMUDefaultRAM(t *testing.T) {
	tr, err := Parse(strings.NewReader("kvm_convert_memory start 0x10000000000000 size 0x1000 private_to_shared\n"+
		"kvm_convert_memory start 0xfffffffffffff000 size 0x2000 private_to_shared\n"+
		"kvm_convert_memory start 0x40001000 size 0x1000 private_to_shared\n"), Options{})
	if err != nil || tr.Events[0] != (RAM{Name: "ram0", GPA: 0, Size: 2 << 30, Mode: Split}) || len(tr.Events) != 5 {
		t.Errorf("%v, %v", tr, err)
	}
	for _, c := range []struct{ log, why string }{
		{"kvm_convert_memory start 0xfffffffffffff000 size 0x2000 private_to_shared\n", "no conversion says how much RAM"},
		{"kvm_convert_memory start 0x0 size 0x0 private_to_shared\n", "no conversion says how much RAM"},
		{"x\nkvm_convert_memory start -0x1000 size 0x1000 private_to_shared\n", "the first line that tried, line 2: syntax error: start"},
	} {
		if _, err := Parse(strings.NewReader(c.log), Options{KeepGoing: true}); err == nil || !strings.Contains(err.Error(), c.why) {
			t.Errorf("%q: %v, want %q", c.log, err, c.why)
		} else if pe := (*ParseError)(nil); errors.As(err, &pe) {
			t.Errorf("%q: %v is a ParseError: a reader that keeps going would loop", c.log, err)
		}
	}
}

func TestReaderQEMU(t *testing.T) {
	in := "12@1.2:kvm_convert_memory start 0x1000 size 0x1000 private_to_shared\n" +
		"kvm_convert_memory start 0x1000 size 0x1000 bad\n" +
		"other\n" +
		"kvm_convert_memory start 0x1000 size 0x1000 shared_to_private\n"
	rd := NewReader(strings.NewReader(in), Options{Devices: 1})
	if rd.Format() != 0 {
		t.Errorf("format %v before Next", rd.Format())
	}
	type step struct {
		ev   Event
		line int
		err  bool
	}
	var got []step
	for {
		e, err := rd.Next()
		if err == io.EOF {
			break
		}
		var pe *ParseError
		if err != nil && !errors.As(err, &pe) {
			t.Fatal(err)
		}
		got = append(got, step{e, rd.Line(), err != nil})
	}
	want := []step{
		{RAM{Name: "ram0", GPA: 0, Size: 1 << 30, Mode: Split}, 0, false},
		{Attach{Dev: "dev0", IOMMU: Type1}, 0, false},
		{Convert{GPA: 0x1000, Size: 0x1000, To: Shared}, 1, false},
		{nil, 2, true},
		{Convert{GPA: 0x1000, Size: 0x1000, To: Private}, 4, false},
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(step{})); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if rd.Format() != QEMULog || rd.Unrecognised() != 1 || rd.Skipped() != 0 || rd.Folded() != 0 {
		t.Errorf("format %v unrecognised %d skipped %d folded %d", rd.Format(), rd.Unrecognised(), rd.Skipped(), rd.Folded())
	}
	// The end is sticky.
	if _, err := rd.Next(); err != io.EOF {
		t.Errorf("after the end: %v", err)
	}
}

// errReader fails after its data, as a broken input would.
type errReader struct{ data string }

func (r *errReader) Read(p []byte) (int, error) {
	if r.data == "" {
		return 0, errors.New("disk on fire")
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

func TestReaderErrors(t *testing.T) {
	// Bad options: every call says so.
	rd := NewReader(strings.NewReader("{}"), Options{Devices: -1})
	for range 2 {
		if _, err := rd.Next(); !errors.Is(err, ErrValue) {
			t.Errorf("bad options: %v", err)
		}
	}
	// An I/O error is returned as it is, in both formats, and stays.
	for _, in := range []string{`{"op":"detach","dev":"d"}` + "\n", "kvm_convert_memory start 0x0 size 0x1000 private_to_shared\n"} {
		rd := NewReader(&errReader{data: in}, Options{})
		var err error
		for range 5 {
			if _, err = rd.Next(); err != nil {
				break
			}
		}
		if err == nil || err.Error() != "disk on fire" {
			t.Errorf("%q: error %v, want the reader's", in, err)
		}
		if _, err2 := rd.Next(); err2 != err {
			t.Errorf("%q: error not sticky: %v", in, err2)
		}
		if _, err := Parse(&errReader{data: in}, Options{KeepGoing: true}); err == nil || err.Error() != "disk on fire" {
			t.Errorf("Parse %q: error %v, want the reader's", in, err)
		}
	}
}
