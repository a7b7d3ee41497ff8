package main

import (
	"bytes"
	"compress/gzip"
	"io"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

type cpioEntry struct {
	Name           string
	Mode           uint32
	Data           string
	RMajor, RMinor uint32
}

// readCPIO decodes a newc archive independently of cpioWriter, following the
// kernel's buffer-format description.
func readCPIO(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	align := func() { off = (off + 3) &^ 3 }
	for {
		if off+110 > len(b) {
			t.Fatalf("truncated header at %d", off)
		}
		h := string(b[off : off+110])
		if h[:6] != "070701" {
			t.Fatalf("bad magic %q at %d", h[:6], off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(h[6+8*i:14+8*i], 16, 32)
			if err != nil {
				t.Fatalf("field %d: %v", i, err)
			}
			return uint32(v)
		}
		mode, size, rmaj, rmin, namesize := field(1), field(6), field(9), field(10), field(11)
		off += 110
		name := string(b[off : off+int(namesize)-1])
		if b[off+int(namesize)-1] != 0 {
			t.Fatalf("name %q not NUL-terminated", name)
		}
		off += int(namesize)
		align()
		data := string(b[off : off+int(size)])
		off += int(size)
		align()
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return out
		}
		out = append(out, cpioEntry{name, mode, data, rmaj, rmin})
	}
}

func TestInitramfs(t *testing.T) {
	var buf bytes.Buffer
	if err := writeInitramfs(&buf, []byte("BUSYBOX"), []byte("TEST-BINARY-123"), nil, []byte("VMM-TESTS"), 90*time.Second); err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	got := readCPIO(t, raw)
	var names []string
	for _, e := range got {
		names = append(names, e.Name)
	}
	want := []string{"bin", "dev", "proc", "sys", "tmp", "dev/console", "bin/busybox", "init", "guesttest", "vmmtest"}
	if d := cmp.Diff(want, names); d != "" {
		t.Fatalf("entries (-want +got):\n%s", d)
	}
	byName := map[string]cpioEntry{}
	for _, e := range got {
		byName[e.Name] = e
	}
	if e := byName["dev/console"]; e.Mode != modeChar|0o600 || e.RMajor != 5 || e.RMinor != 1 {
		t.Errorf("dev/console = %+v, want char 5:1", e)
	}
	if e := byName["bin/busybox"]; e.Data != "BUSYBOX" || e.Mode != modeReg|0o755 {
		t.Errorf("bin/busybox = %+v", e)
	}
	if e := byName["guesttest"]; e.Data != "TEST-BINARY-123" {
		t.Errorf("guesttest data = %q", e.Data)
	}
	if e := byName["vmmtest"]; e.Data != "VMM-TESTS" || e.Mode != modeReg|0o755 {
		t.Errorf("vmmtest = %+v", e)
	}
	init := byName["init"].Data
	for _, s := range []string{"#!/bin/busybox sh", "-test.timeout=1m30s", "GMEM-RIG end rc=$?", "poweroff -f", "GMEM_RIG=1"} {
		if !strings.Contains(init, s) {
			t.Errorf("init lacks %q:\n%s", s, init)
		}
	}
	if e := byName["dev"]; e.Mode != modeDir|0o755 {
		t.Errorf("dev mode = %o", e.Mode)
	}
}

func TestCPIORejectsBadNames(t *testing.T) {
	for _, name := range []string{"", "/abs", "a\x00b"} {
		c := newCPIOWriter(io.Discard)
		c.File(name, 0o644, nil)
		if err := c.Close(); err == nil {
			t.Errorf("name %q accepted", name)
		}
	}
}

func TestVerdicts(t *testing.T) {
	tests := []struct {
		name     string
		lines    []string
		backends []string
		want     []string
		ok       bool
	}{
		{
			name: "both pass",
			lines: []string{
				"GMEM-RIG check type1 get-info pass",
				"[    1.2] DMAR: fault GMEM-RIG check type1 dma-round-trip pass", // kernel text in front
				"GMEM-RIG check iommufd ranges pass\r",
				"GMEM-RIG end rc=0",
			},
			backends: []string{"type1", "iommufd"},
			want:     []string{"rig: type1 pass 2 checks", "rig: iommufd pass 1 checks"},
			ok:       true,
		},
		{
			name:     "one failing check",
			lines:    []string{"GMEM-RIG check type1 a pass", "GMEM-RIG check type1 b fail", "GMEM-RIG end rc=1"},
			backends: []string{"type1"},
			want:     []string{"rig: type1 fail 1 of 2 checks: b(fail)"},
		},
		{
			name: "a failing check says why",
			lines: []string{
				"=== RUN   TestRig/type1/a",
				"    split_test.go:10: a passing check's log line",
				"GMEM-RIG check type1 a pass",
				"=== RUN   TestRig/type1/b",
				"    split_test.go:349: the device write did not land",
				"[   52.0] DMAR: DRHD: handling fault status reg 2",
				"        helpers_test.go:7: deeper",
				"GMEM-RIG check type1 b fail",
				"=== RUN   TestRig/type1/c",
				"GMEM-RIG check type1 c fail",
				"GMEM-RIG end rc=1",
			},
			backends: []string{"type1"},
			want: []string{
				"rig: type1 fail 2 of 3 checks: b(fail) c(fail)",
				"rig:   b: split_test.go:349: the device write did not land",
				"rig:   b: helpers_test.go:7: deeper",
			},
		},
		{
			name:     "a failing check of one backend does not fail the other",
			lines:    []string{"GMEM-RIG check type1 a fail", "GMEM-RIG check iommufd b pass", "GMEM-RIG end rc=1"},
			backends: []string{"type1", "iommufd"},
			want:     []string{"rig: type1 fail 1 of 1 checks: a(fail)", "rig: iommufd pass 1 checks"},
		},
		{
			name:     "skip is a failure",
			lines:    []string{"GMEM-RIG check iommufd a skip", "GMEM-RIG end rc=0"},
			backends: []string{"iommufd"},
			want:     []string{"rig: iommufd fail 1 of 1 checks: a(skip)"},
		},
		{
			name:     "never reported",
			lines:    []string{"Kernel panic - not syncing"},
			backends: []string{"type1", "iommufd"},
			want:     []string{"rig: type1 fail: the guest never reported", "rig: iommufd fail: the guest never reported"},
		},
		{
			name:     "stopped mid-way",
			lines:    []string{"GMEM-RIG check type1 a pass"},
			backends: []string{"type1", "iommufd"},
			want:     []string{"rig: type1 fail: 1 checks passed, then the guest stopped reporting", "rig: iommufd fail: the guest never reported"},
		},
		{
			name:     "binary failed outside a check",
			lines:    []string{"GMEM-RIG check type1 a pass", "GMEM-RIG end rc=2"},
			backends: []string{"type1"},
			want:     []string{"rig: type1 fail: 1 checks passed but the test binary exited with rc=2"},
		},
		{
			name:     "ended without checks",
			lines:    []string{"GMEM-RIG end rc=0"},
			backends: []string{"iommufd"},
			want:     []string{"rig: iommufd fail: no checks reported (test binary rc=0)"},
		},
		{
			name:     "look-alikes ignored",
			lines:    []string{"GMEM-RIG check type2 a pass", "GMEM-RIG check type1 a passed", "GMEM-RIG end rc=x", "GMEM-RIG check type1 b pass", "GMEM-RIG end rc=0"},
			backends: []string{"type1"},
			want:     []string{"rig: type1 pass 1 checks"},
			ok:       true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := NewVerdicts()
			for _, l := range tt.lines {
				v.Line(strings.TrimRight(l, "\r"))
			}
			got, ok := v.Summary(tt.backends)
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("Summary (-want +got):\n%s", d)
			}
			if ok != tt.ok {
				t.Errorf("ok = %v, want %v", ok, tt.ok)
			}
		})
	}
}

func FuzzVerdictLine(f *testing.F) {
	f.Add("GMEM-RIG check type1 get-info pass")
	f.Add("GMEM-RIG end rc=0")
	f.Add("xx GMEM-RIG check iommufd a fail yy")
	f.Add("GMEM-RIG end rc=99999999999999999999")
	f.Add("")
	f.Fuzz(func(t *testing.T, line string) {
		v := NewVerdicts()
		carried := v.Line(line)
		if carried && !strings.Contains(line, Marker) {
			t.Fatalf("line without the marker carried a verdict: %q", line)
		}
		lines, ok := v.Summary(Backends)
		if len(lines) != len(Backends) {
			t.Fatalf("%d summary lines for %d backends", len(lines), len(Backends))
		}
		// One line can never make both backends pass, and it never makes any
		// backend pass without an end line.
		if ok {
			t.Fatalf("one line %q passed every backend", line)
		}
	})
}

func TestStream(t *testing.T) {
	in := "boot\r\nGMEM-RIG check type1 a pass\r\nGMEM-RIG end rc=0" // no final newline
	var out bytes.Buffer
	v := NewVerdicts()
	if err := stream(strings.NewReader(in), &out, v); err != nil {
		t.Fatal(err)
	}
	if out.String() != in {
		t.Errorf("console copy = %q, want %q", out.String(), in)
	}
	if got, ok := v.Summary([]string{"type1"}); !ok {
		t.Errorf("Summary = %v", got)
	}
}

func TestQEMUArgs(t *testing.T) {
	if joined := strings.Join(qemuArgs("K", "I", "all", 16, "", false), " "); strings.Contains(joined, "GMEM_RIG_BENCH") {
		t.Errorf("QEMU command without bench sets GMEM_RIG_BENCH: %s", joined)
	}
	if joined := strings.Join(qemuArgs("K", "I", "all", 16, "", true), " "); !strings.Contains(joined, "GMEM_RIG_BENCH=1") {
		t.Errorf("QEMU command with bench lacks GMEM_RIG_BENCH=1: %s", joined)
	}
	args := qemuArgs("K", "I", "all", 16, "", false)
	joined := strings.Join(args, " ")
	for _, s := range []string{
		"-machine q35,kernel-irqchip=split", "-accel tcg", "-device intel-iommu,intremap=on,caching-mode=on",
		"-device edu", "-cpu qemu64,+svm,+npt", "-kernel K", "-initrd I", "-nographic", "-no-reboot", "no_timer_check",
		"vfio_iommu_type1.dma_entry_limit=16", "GMEM_RIG_ENTRY_LIMIT=16", "intel_iommu=on", "GMEM_RIG_BACKEND=all",
	} {
		if !strings.Contains(joined, s) {
			t.Errorf("QEMU command lacks %q: %s", s, joined)
		}
	}
}

func TestParseBackend(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want []string
	}{{"all", Backends}, {"type1", []string{"type1"}}, {"iommufd", []string{"iommufd"}}, {"kvm", []string{"kvm"}}, {"inplace", []string{"inplace"}}} {
		got, err := parseBackend(tt.in)
		if err != nil || !slices.Equal(got, tt.want) {
			t.Errorf("parseBackend(%q) = %v, %v", tt.in, got, err)
		}
	}
	if _, err := parseBackend("type2"); err == nil {
		t.Error("parseBackend(type2) succeeded")
	}
}

func FuzzCPIO(f *testing.F) {
	f.Add("init", []byte("#!/bin/sh\n"))
	f.Add("bin/busybox", []byte{0, 1, 2})
	f.Add("a", []byte{})
	f.Fuzz(func(t *testing.T, name string, data []byte) {
		var buf bytes.Buffer
		c := newCPIOWriter(&buf)
		c.File(name, 0o644, data)
		err := c.Close()
		bad := name == "" || strings.HasPrefix(name, "/") || strings.ContainsRune(name, 0)
		if bad {
			if err == nil {
				t.Fatalf("name %q accepted", name)
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		got := readCPIO(t, buf.Bytes())
		want := []cpioEntry{{Name: name, Mode: modeReg | 0o644, Data: string(data)}}
		if d := cmp.Diff(want, got); d != "" {
			t.Fatalf("round trip (-want +got):\n%s", d)
		}
	})
}

func TestBooted(t *testing.T) {
	v := NewVerdicts()
	v.Line("[ 0.004] Kernel panic - not syncing: timer doesn't work")
	if v.Booted() {
		t.Error("Booted after a panic line")
	}
	v.Line("GMEM-RIG boot kernel 6.12.117, backend all")
	if !v.Booted() {
		t.Error("not Booted after the boot line")
	}
}

func TestStreamStripsEscapes(t *testing.T) {
	in := "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\nBooting\x1b[2J GMEM-RIG boot x\n"
	var out bytes.Buffer
	v := NewVerdicts()
	if err := stream(strings.NewReader(in), &out, v); err != nil {
		t.Fatal(err)
	}
	if want := "SeaBIOS\nBooting GMEM-RIG boot x\n"; out.String() != want {
		t.Errorf("console copy = %q, want %q", out.String(), want)
	}
	if !v.Booted() {
		t.Error("boot line not seen")
	}
}

func TestDemoVerdict(t *testing.T) {
	v := NewVerdicts()
	for _, l := range []string{
		"GMEM-RIG boot kernel 6.12",
		`{"guest_ran":true,"vfio":"type1"}`,
		"[ 1.0] {not json",
		"GMEM-RIG demo rc=0",
	} {
		v.Line(l)
	}
	if rc, ended := v.Demo(); rc != 0 || !ended {
		t.Errorf("Demo = %d, %v", rc, ended)
	}
	if got := v.JSON(); got != `{"guest_ran":true,"vfio":"type1"}` {
		t.Errorf("JSON = %q", got)
	}
	v.Line("GMEM-RIG demo rc=1")
	if rc, _ := v.Demo(); rc != 1 {
		t.Errorf("Demo rc = %d, want 1", rc)
	}
	args := strings.Join(qemuArgs("K", "I", "iommufd", 65535, "json", false), " ")
	for _, s := range []string{"GMEM_RIG_DEMO=json", "GMEM_RIG_VFIO=iommufd", "dma_entry_limit=65535"} {
		if !strings.Contains(args, s) {
			t.Errorf("demo QEMU command lacks %q: %s", s, args)
		}
	}
	if strings.Contains(strings.Join(qemuArgs("K", "I", "all", 16, "", false), " "), "GMEM_RIG_DEMO") {
		t.Error("test boot sets GMEM_RIG_DEMO")
	}
}

// TestVerdictsInPlace: the inplace backend's lines are counted as its own,
// and "all" does not ask for it.
func TestVerdictsInPlace(t *testing.T) {
	v := NewVerdicts()
	for _, l := range []string{
		"GMEM-RIG check inplace guest-memfd-mmap pass",
		"GMEM-RIG check inplace vmm-TestBuiltinKVM pass",
		"GMEM-RIG end rc=0",
	} {
		v.Line(l)
	}
	lines, ok := v.Summary([]string{InPlace})
	if !ok || len(lines) != 1 || lines[0] != "rig: inplace pass 2 checks" {
		t.Errorf("summary %q, %v", lines, ok)
	}
	if slices.Contains(Backends, InPlace) {
		t.Errorf("all (%v) includes %s, which 6.12 cannot run", Backends, InPlace)
	}
}
