package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/replay"
	"github.com/gmemproject/gmem/trace"
)

// replayTrace is a trace whose numbers are computed by hand: 2 MiB shared
// on type1 is 512 granules for the baseline and one extent for gmem.
const replayTrace = `{"op":"ram","name":"ram0","gpa":"0","size":"1GiB","mode":"split"}
{"op":"attach","dev":"dev0","iommu":"type1"}
{"op":"convert","gpa":"0x200000","size":"2MiB","to":"shared"}
`

// runReplayEnv runs gmem replay in-process with env and returns the exit
// code and both outputs.
func runReplayEnv(ctx context.Context, env replayEnv, args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	if env.stdin == nil {
		env.stdin = strings.NewReader("")
	}
	if env.newReplayer == nil {
		env.newReplayer = func(o replay.Options) replayer { return replay.New(o) }
	}
	if env.terminal == nil {
		env.terminal = func(io.Writer) bool { return false }
	}
	code := env.run(ctx, args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func writeFile(t *testing.T, name, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func decodeResult(t *testing.T, out string) replay.Result {
	t.Helper()
	var res replay.Result
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("output is not a JSON result: %v\n%s", err, out)
	}
	return res
}

func TestReplayOK(t *testing.T) {
	ctx := context.Background()
	file := writeFile(t, "t.jsonl", replayTrace)

	// Through the dispatch table, human output.
	code, out, errOut := runCmd(ctx, "replay", file)
	if code != exitOK || errOut != "" {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	for _, want := range []string{"3 events, 1 conversion,", "2.00 MiB shared", "IOMMU entries at the end", "512", "512.00x", "0 violations"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}

	// --json from stdin, flags after the file name.
	code, out, errOut = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(replayTrace)}, "-", "--json")
	if code != exitOK || errOut != "" {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	res := decodeResult(t, out)
	if res.Events != 3 || res.Conversions != 1 || res.SharedBytes != 2<<20 ||
		res.Baseline.EntriesFinal != 512 || res.Gmem.EntriesFinal != 1 || res.Baseline.MapCalls != 512 || res.Gmem.MapCalls != 1 {
		t.Errorf("result %+v", res)
	}

	// --svg writes a drawing.
	svg := filepath.Join(t.TempDir(), "map.svg")
	if code, _, errOut := runCmd(ctx, "replay", "--svg", svg, file); code != exitOK {
		t.Fatalf("--svg: exit %d, %s", code, errOut)
	}
	if b, err := os.ReadFile(svg); err != nil || !bytes.HasPrefix(b, []byte("<svg")) || !bytes.Contains(b, []byte("</svg>")) {
		t.Errorf("--svg wrote %.60q, %v", b, err)
	}

	// Machine flags are for QEMU logs only.
	code, _, errOut = runCmd(ctx, "replay", "--devices", "3", file)
	if code != exitOK || !strings.Contains(errOut, "--devices is for QEMU logs only") {
		t.Errorf("--devices on JSON Lines: exit %d, stderr %q", code, errOut)
	}

	// Help.
	code, out, _ = runCmd(ctx, "replay", "-h")
	if code != exitOK || !strings.Contains(out, "usage: gmem replay") || !strings.Contains(out, "--keep-going") {
		t.Errorf("help: exit %d, %q", code, out)
	}
}

// TestReplayQEMULog replays a QEMU trace log with the machine given by
// flags: two iommufd devices, each with 512 granules (baseline) or one
// extent (gmem); the kvm_memory_fault line and the conversion it causes are
// one conversion.
func TestReplayQEMULog(t *testing.T) {
	log := `some other event
kvm_convert_memory start 0x200000 size 0x200000 private_to_shared
7@1700000000.000001:kvm_memory_fault start 0x40000000 size 0x1000 flags 0x0
7@1700000000.000002:kvm_convert_memory start 0x40000000 size 0x1000 private_to_shared
`
	code, out, errOut := runReplayEnv(context.Background(), replayEnv{stdin: strings.NewReader(log)},
		"--json", "--ram", "0:1GiB,1GiB:1GiB", "--devices", "2", "--iommu", "iommufd", "-")
	if code != exitOK || errOut != "" {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
	res := decodeResult(t, out)
	if res.Conversions != 2 || res.Devices != 2 || res.RAMBytes != 2<<30 ||
		res.Baseline.EntriesFinal != 2*513 || res.Gmem.EntriesFinal != 2*2 {
		t.Errorf("result %+v", res)
	}
}

func TestReplayInputErrors(t *testing.T) {
	ctx := context.Background()
	bad := writeFile(t, "bad.jsonl", replayTrace+`{"op":"convert","gpa":"0x1000","size":"4KiB","to":"sideways"}
{"op":"convert","gpa":"0x200000","size":"4KiB","to":"private"}
`)
	for _, c := range []struct {
		args   []string
		code   int
		stderr string
		stdout string
	}{
		{nil, exitUsage, "no trace given", ""},
		{[]string{"a", "b"}, exitUsage, `unexpected argument "b"`, ""},
		{[]string{"--nope", "x"}, exitUsage, "flag provided but not defined", ""},
		{[]string{filepath.Join(t.TempDir(), "missing")}, exitUsage, "no such file", ""},
		{[]string{"--devices", "0", "-"}, exitUsage, "--devices 0", ""},
		{[]string{"--iommu", "iommufd", "--limit", "5", "-"}, exitUsage, "no entry limit", ""},
		{[]string{"--limit", "4294967296", "-"}, exitUsage, "--limit: invalid value: entry limit 4294967296 is past type1's largest", ""},
		{[]string{"--devices", "2000", "-"}, exitUsage, "--devices 2000: want 1 to 1024", ""},
		{[]string{"--bitmap-budget", "0", "-"}, exitUsage, "--bitmap-budget 0: want more than 0", ""},
		{[]string{"--iommu", "vfio", "-"}, exitUsage, "type1 or iommufd", ""},
		{[]string{"--ram", "0:3000", "-"}, exitUsage, "--ram", ""},
		// A malformed line stops the replay with its line number.
		{[]string{bad}, exitUsage, "line 4: ", ""},
		// --keep-going reports it, replays the rest, and still says the
		// input was bad.
		{[]string{"--keep-going", bad}, exitUsage, "line 4: ", "4 events, 2 conversions"},
	} {
		code, out, errOut := runReplayEnv(ctx, replayEnv{}, c.args...)
		if code != c.code || !strings.Contains(errOut, c.stderr) || !strings.Contains(out, c.stdout) || (c.stdout == "" && out != "") {
			t.Errorf("gmem replay %q: exit %d, stdout %.200q, stderr %q; want %d, %q, %q", c.args, code, out, errOut, c.code, c.stdout, c.stderr)
		}
	}
	// A QEMU log with a malformed conversion line.
	code, _, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader("kvm_convert_memory start 0x1000 size zz private_to_shared\n")}, "--ram", "0:1GiB", "-")
	if code != exitUsage || !strings.Contains(errOut, "line 1: ") {
		t.Errorf("malformed QEMU log: exit %d, stderr %q", code, errOut)
	}
	// A log with no conversion says nothing of the machine.
	code, _, errOut = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader("something else\n")}, "-")
	if code != exitUsage || !strings.Contains(errOut, "no RAM layout given") {
		t.Errorf("QEMU log without conversions: exit %d, stderr %q", code, errOut)
	}
}

// faultyReplayer reports a violation at one event, as a broken library
// would, so that the exit status for violations can be checked.
type faultyReplayer struct {
	*replay.Replayer
	at, applied uint64
}

func (f *faultyReplayer) ApplyContext(ctx context.Context, e trace.Event, line int) error {
	f.applied++
	if err := f.Replayer.ApplyContext(ctx, e, line); err != nil {
		return err
	}
	if f.applied == f.at {
		return &replay.Violation{Event: f.applied, Line: line, Run: "gmem", Invariant: "I2", Detail: "injected"}
	}
	return nil
}

func (f *faultyReplayer) Result() replay.Result {
	res := f.Replayer.Result()
	if f.applied >= f.at {
		res.Violations++
	}
	return res
}

func TestReplayViolation(t *testing.T) {
	for _, keepGoing := range []bool{false, true} {
		var f *faultyReplayer
		env := replayEnv{
			stdin: strings.NewReader(replayTrace),
			newReplayer: func(o replay.Options) replayer {
				f = &faultyReplayer{Replayer: replay.New(o), at: 2}
				return f
			},
		}
		args := []string{"--json", "-"}
		if keepGoing {
			args = append(args, "--keep-going")
		}
		code, out, errOut := runReplayEnv(context.Background(), env, args...)
		if code != exitFail || !strings.Contains(errOut, "I2 violated in gmem: injected") {
			t.Errorf("keep-going=%v: exit %d, stderr %q", keepGoing, code, errOut)
		}
		want := uint64(2) // stopped at the violation
		if keepGoing {
			want = 3
		}
		if res := decodeResult(t, out); f.applied != want || res.Violations != 1 {
			t.Errorf("keep-going=%v: %d events applied, %d violations; want %d, 1", keepGoing, f.applied, res.Violations, want)
		}
	}
}

func TestReplayInterrupted(t *testing.T) {
	seq, err := trace.Churn(trace.ChurnOptions{Common: trace.Common{RAM: 1 << 30, Events: 3000}})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	w := trace.NewWriter(&b)
	for e := range seq {
		if err := w.Write(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	code, out, errOut := runReplayEnv(ctx, replayEnv{stdin: &b}, "-")
	if code != exitFail || !strings.Contains(errOut, "interrupted after 0 events") || !strings.Contains(out, " 0 events") {
		t.Errorf("exit %d, stdout %.100q, stderr %q", code, out, errOut)
	}
}

func TestProgressLine(t *testing.T) {
	now := time.Now()
	s := &replaySession{}
	s.events.Store(123456)
	s.line.Store(123460)
	s.since.Store(now.Add(-3 * time.Second).UnixNano())
	in := &countingReader{size: 4 << 20}
	in.n.Store(1 << 20)
	p := &progress{start: now.Add(-20 * time.Second), input: in, s: s}
	if got, want := p.line(now), "replay: 123,456 events done, 1.00 MiB of 4.00 MiB read (25%), 20s; event 123,457 (line 123,460) running for 3s"; got != want {
		t.Errorf("progress %q\nwant     %q", got, want)
	}
	// A QEMU log, read whole: the line of the total.
	s.total.Store(200000)
	s.since.Store(0)
	if got, want := p.line(now), "replay: 123,456 events done, line 123,460 of 200,000, 20s"; got != want {
		t.Errorf("progress %q\nwant     %q", got, want)
	}
	s.finished.Store(true)
	if got := p.line(now); !strings.HasSuffix(got, "; final checks") {
		t.Errorf("progress %q", got)
	}

	// A diagnostic clears the progress line first; nothing is written once
	// closed.
	var b bytes.Buffer
	d := &diagWriter{w: &b}
	d.show("replay: 1 event done")
	fmt.Fprintln(d, "gmem replay: something")
	d.show("replay: 2 events done")
	d.close()
	fmt.Fprintln(d, "dropped")
	if got, want := b.String(), "\rreplay: 1 event done\x1b[K\r\x1b[Kgmem replay: something\n\rreplay: 2 events done\x1b[K\r\x1b[K"; got != want {
		t.Errorf("diagnostics %q\nwant        %q", got, want)
	}
	if isTerminal(&b) {
		t.Error("a buffer is a terminal")
	}
}

func TestFormatting(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{commas(0), "0"}, {commas(999), "999"}, {commas(1000), "1,000"}, {commas(4194304), "4,194,304"},
		{human(512), "512 B"}, {human(2 << 20), "2.00 MiB"}, {human(32 << 20), "32.0 MiB"}, {human(1 << 40), "1.00 TiB"}, {human(801 << 10), "801 KiB"},
		{ratio(512, 1), "512.00x"}, {ratio(0, 0), "-"}, {ratio(5, 0), "-"}, {ratio(0, 5), "-"}, {ratio(3, 3), "1.00x"}, {ratio(137438953472, 2857), "48,106,039x"},
		{human(1<<50 - 1<<30), "1.00 PiB"}, {human(102369), "100 KiB"}, {human(10238), "10.0 KiB"},
		{duration(1500), "1.50 µs"}, {duration(20), "20 ns"}, {duration(2.5e9), "2.50 s"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
}

// decodeInput reads the "input" object of --json.
func decodeInput(t *testing.T, out string) inputStats {
	t.Helper()
	var v struct {
		Input inputStats `json:"input"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	return v.Input
}

func TestReplayInputHandling(t *testing.T) {
	ctx := context.Background()
	qemuLog := "2026-12-01T19:50:00.123456Z 7@1700000000.000001:kvm_convert_memory start 0x200000 size 0x200000 private_to_shared\n" +
		"qemu-system-x86_64: some message\n"
	commented := "# a hand-written trace\n" + replayTrace

	// Detection says what it chose and why; counts are in --json.
	for _, c := range []struct {
		name, in string
		args     []string
		format   string
		reason   string
		skipped  int
		unrec    int
		conv     uint64
	}{
		{"jsonl", replayTrace, nil, "jsonl", "starts with '{'", 0, 0, 1},
		{"jsonl with a comment first", commented, nil, "jsonl", "line 2", 1, 0, 1},
		{"qemu with a timestamp prefix", qemuLog, []string{"--ram", "0:1GiB"}, "qemu", "does not start with '{'", 0, 1, 1},
		{"qemu given", qemuLog, []string{"--ram", "0:1GiB", "--format", "qemu"}, "qemu", "given", 0, 1, 1},
	} {
		args := append([]string{"--json", "-"}, c.args...)
		code, out, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(c.in)}, args...)
		if code != exitOK {
			t.Errorf("%s: exit %d, stderr %q", c.name, code, errOut)
			continue
		}
		in, res := decodeInput(t, out), decodeResult(t, out)
		if in.Format != c.format || !strings.Contains(in.FormatReason, c.reason) || in.Skipped != c.skipped || in.Unrecognised != c.unrec || res.Conversions != c.conv {
			t.Errorf("%s: input %+v, %d conversions; want %s (%q), %d skipped, %d unrecognised, %d conversions",
				c.name, in, res.Conversions, c.format, c.reason, c.skipped, c.unrec, c.conv)
		}
	}

	// The table prints the counts too.
	code, out, _ := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(commented)}, "-")
	if code != exitOK || !strings.Contains(out, "(jsonl, detected from line 2: starts with '{')") || !strings.Contains(out, "1 comments skipped, 0 unrecognised") {
		t.Errorf("table: exit %d\n%s", code, out)
	}

	// Nothing recognised in a QEMU log: a warning, and 0 conversions.
	code, _, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(replayTrace)}, "--format", "qemu", "--ram", "0:1GiB", "-")
	if code != exitOK || !strings.Contains(errOut, "warning") || !strings.Contains(errOut, "no kvm_convert_memory or kvm_memory_fault event recognised in 3 lines (3 unrecognised)") {
		t.Errorf("nothing recognised: exit %d, stderr %q", code, errOut)
	}

	// A QEMU log read as JSON Lines is malformed.
	code, _, errOut = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(qemuLog)}, "--format", "jsonl", "-")
	if code != exitUsage || !strings.Contains(errOut, "line 1: syntax error") {
		t.Errorf("--format jsonl on a QEMU log: exit %d, stderr %q", code, errOut)
	}
	if code, _, errOut := runReplayEnv(ctx, replayEnv{}, "--format", "json", "-"); code != exitUsage || !strings.Contains(errOut, "jsonl or qemu") {
		t.Errorf("--format json: exit %d, stderr %q", code, errOut)
	}

	// Empty input and a binary (this test's own executable) are input
	// errors, with --ram too.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	empty := writeFile(t, "empty", "")
	for _, c := range []struct {
		args []string
		why  string
	}{
		{[]string{empty}, "empty input"},
		{[]string{"--ram", "0:1GiB", empty}, "empty input"},
		{[]string{exe}, "not text"},
		{[]string{"--ram", "0:1GiB", exe}, "not text"},
		{[]string{"--format", "qemu", "--ram", "0:1GiB", exe}, "not text"},
	} {
		code, out, errOut := runReplayEnv(ctx, replayEnv{}, c.args...)
		if code != exitUsage || !strings.Contains(errOut, c.why) || out != "" {
			t.Errorf("%q: exit %d, stdout %.80q, stderr %q; want 2 and %q", c.args, code, out, errOut, c.why)
		}
	}

	// An output file that cannot be written is exit 2, not 1.
	file := writeFile(t, "t.jsonl", replayTrace)
	code, _, errOut = runReplayEnv(ctx, replayEnv{}, "--svg", filepath.Join(t.TempDir(), "no", "such", "dir.svg"), file)
	if code != exitUsage || !strings.Contains(errOut, "--svg") {
		t.Errorf("unwritable --svg: exit %d, stderr %q", code, errOut)
	}

	// A RAM block without a mode is split.
	code, out, _ = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(`{"op":"ram","name":"r","gpa":0,"size":"1GiB"}
{"op":"attach","dev":"d","iommu":"iommufd"}
`)}, "--json", "-")
	if res := decodeResult(t, out); code != exitOK || res.RAMBytes != 1<<30 {
		t.Errorf("RAM without mode: exit %d, %+v", code, res)
	}
}

// TestReplayTwoKindsOfBadInput: an impossible machine is an input error
// (line number, exit 2, --keep-going skips it); a request the VMM refuses
// is a rejected event (counted by reason, listed in --json, exit 0).
func TestReplayTwoKindsOfBadInput(t *testing.T) {
	ctx := context.Background()
	machine := `{"op":"ram","name":"ram0","gpa":"0","size":"4GiB"}
{"op":"mmio","gpa":"0xfe000000","size":"16MiB"}
{"op":"attach","dev":"d","iommu":"type1"}
{"op":"attach","dev":"d","iommu":"type1"}
{"op":"plug","gpa":"0","size":"2MiB"}
{"op":"convert","gpa":"0","size":"4KiB","to":"shared"}
`
	code, out, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(machine)}, "-")
	if code != exitUsage || !strings.Contains(errOut, "line 2: bad machine description: MMIO hole") || out != "" {
		t.Errorf("impossible machine: exit %d, stdout %.80q, stderr %q", code, out, errOut)
	}
	code, out, errOut = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(machine)}, "--keep-going", "--json", "-")
	res := decodeResult(t, out)
	if code != exitUsage || res.InputErrors != 3 || len(res.InputErrorDetails) != 3 || res.InputErrorDetails[1].Line != 4 ||
		!strings.Contains(errOut, "line 5: bad machine description: plug at 0x0: RAM block \"ram0\" is not hot-pluggable (skipped)") ||
		res.SharedBytes != 4096 {
		t.Errorf("--keep-going: exit %d, %+v, stderr %q", code, res, errOut)
	}

	requests := `{"op":"ram","name":"ram0","gpa":"0","size":"2GiB"}
{"op":"mmio","gpa":"0x80000000","size":"2GiB"}
{"op":"attach","dev":"d","iommu":"type1"}
{"op":"convert","gpa":"0x1800","size":"4KiB","to":"shared"}
{"op":"convert","gpa":"0x2000","size":"0","to":"shared"}
{"op":"convert","gpa":"0x80000000","size":"4KiB","to":"private"}
{"op":"convert","gpa":"0x80000000","size":"4KiB","to":"shared"}
{"op":"convert","gpa":"0x200000000","size":"4KiB","to":"private"}
{"op":"convert","gpa":"0x0","size":"4KiB","to":"shared"}
`
	code, out, errOut = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(requests)}, "--json", "-")
	res = decodeResult(t, out)
	want := map[string]uint64{replay.ReasonMisaligned: 1, replay.ReasonEmpty: 1, replay.ReasonNotRAM: 2}
	if code != exitOK || errOut != "" || res.Rejected != 4 || !maps.Equal(res.RejectedBy, want) || len(res.Rejections) != 4 ||
		res.Rejections[0].Line != 4 || res.Rejections[0].Reason != replay.ReasonMisaligned || res.SharedBytes != 4096 {
		t.Errorf("refused requests: exit %d, stderr %q, %+v", code, errOut, res)
	}
	code, out, _ = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(requests)}, "-")
	if code != exitOK || !strings.Contains(out, "rejected   4 guest requests (2 not RAM made private, 1 misaligned, 1 size 0), 0 by one run only") {
		t.Errorf("table: exit %d\n%s", code, out)
	}
}

// TestReadmeExamples replays the README's JSON Lines and QEMU log examples:
// they must run clean.
func TestReadmeExamples(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	block := func(after string) string {
		i := strings.Index(text, after)
		if i < 0 {
			t.Fatalf("README has no %q", after)
		}
		var lines []string
		for _, l := range strings.Split(text[i+len(after):], "\n")[1:] {
			if !strings.HasPrefix(l, "    ") {
				if len(lines) > 0 {
					break
				}
				continue
			}
			lines = append(lines, strings.TrimPrefix(l, "    "))
		}
		return strings.Join(lines, "\n") + "\n"
	}
	jsonl := block("The JSON Lines format, one event a line")
	code, out, errOut := runReplayEnv(context.Background(), replayEnv{stdin: strings.NewReader(jsonl)}, "--json", "-")
	res := decodeResult(t, out)
	if code != exitOK || errOut != "" || res.InputErrors != 0 || res.Rejected != 0 || res.Violations != 0 || res.Conversions == 0 {
		t.Errorf("README JSON Lines example: exit %d, stderr %q, %+v\n%s", code, errOut, res, jsonl)
	}
	log := block("$ cat qemu.log")
	log = log[:strings.Index(log, "$ ")]
	code, out, errOut = runReplayEnv(context.Background(), replayEnv{stdin: strings.NewReader(log)}, "--json", "--ram", "0:4GiB", "-")
	res = decodeResult(t, out)
	if code != exitOK || errOut != "" || res.Rejected != 0 || res.Violations != 0 || res.Conversions != 3 {
		t.Errorf("README QEMU example: exit %d, stderr %q, %+v\n%s", code, errOut, res, log)
	}
}

// TestReplayOptionsAndRunErrors: a --max-extent the mapper cannot take is a
// usage error before anything is read; a device a run cannot attach is an
// error of the run (exit 1, said on stderr), never a refused guest request.
func TestReplayOptionsAndRunErrors(t *testing.T) {
	ctx := context.Background()
	file := writeFile(t, "t.jsonl", replayTrace)
	for _, size := range []string{"3MiB", "1KiB", "0x3000"} {
		code, out, errOut := runReplayEnv(ctx, replayEnv{}, "--max-extent", size, file)
		if code != exitUsage || out != "" || !strings.Contains(errOut, "--max-extent "+size+": ") || !strings.Contains(errOut, "power of two") {
			t.Errorf("--max-extent %s: exit %d, stdout %.80q, stderr %q; want 2", size, code, out, errOut)
		}
	}
	for _, size := range []string{"4KiB", "1GiB", "none"} {
		if code, _, errOut := runReplayEnv(ctx, replayEnv{}, "--max-extent", size, file); code != exitOK {
			t.Errorf("--max-extent %s: exit %d, stderr %q", size, code, errOut)
		}
	}

	attach := `{"op":"ram","name":"ram0","gpa":"0","size":"1GiB"}
{"op":"convert","gpa":"0","size":"1MiB","to":"shared"}
{"op":"attach","dev":"d","iommu":"type1","limit":10}
{"op":"convert","gpa":"0x200000","size":"4KiB","to":"shared"}
`
	for _, keepGoing := range []bool{false, true} {
		args := []string{"--json", "-"}
		events := uint64(3)
		if keepGoing {
			args, events = append(args, "--keep-going"), 4
		}
		code, out, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(attach)}, args...)
		res := decodeResult(t, out)
		if code != exitFail || !strings.Contains(errOut, `line 3: the baseline run could not attach "d"`) || !strings.Contains(errOut, "1 device could not be attached") {
			t.Errorf("keep-going %v: exit %d, stderr %q; want 1", keepGoing, code, errOut)
		}
		if res.RunErrors != 1 || res.Rejected != 0 || res.Baseline.Failures != 0 || res.Events != events {
			t.Errorf("keep-going %v: %+v", keepGoing, res)
		}
	}
}

// genTrace runs gmem gen with args and returns the trace.
func genTrace(t *testing.T, args ...string) string {
	t.Helper()
	var gen, errOut bytes.Buffer
	if code := run(context.Background(), append([]string{"gen"}, args...), &gen, &errOut); code != exitOK {
		t.Fatalf("gen %v: exit %d, %s", args, code, errOut.String())
	}
	return gen.String()
}

// TestReplayPolicy: on an iommufd trace gmem cuts by default, with no window
// and nothing re-pinned, and says so in the table and the JSON; --policy
// extent and --iommufd-huge-pages give the bounded extent's window instead.
func TestReplayPolicy(t *testing.T) {
	ctx := context.Background()
	tr := genTrace(t, "hugepage", "--ram", "1GiB", "--events", "400", "--iommu", "iommufd")
	replayJSON := func(args ...string) replay.Result {
		t.Helper()
		code, out, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(tr)}, append([]string{"--json", "-"}, args...)...)
		if code != exitOK {
			t.Fatalf("%v: exit %d, %s", args, code, errOut)
		}
		return decodeResult(t, out)
	}
	cut := replayJSON()
	if g := cut.Gmem; g.Policy != "cut" || g.WindowBytes != 0 || g.RepinnedBytes != 0 || g.MaxWindow != 0 || g.CutCalls == 0 || g.Splits == 0 ||
		len(g.DevicePolicies) != 1 || !g.DevicePolicies[0].Cut || cut.Baseline.Policy != "granule" {
		t.Errorf("iommufd, auto: %+v", g)
	}
	for _, args := range [][]string{{"--policy", "extent"}, {"--iommufd-huge-pages"}, {"--policy", "auto", "--iommufd-huge-pages"}} {
		g := replayJSON(args...).Gmem
		if g.Policy != "extent" || g.WindowBytes == 0 || g.RepinnedBytes == 0 || g.CutCalls != 0 || g.Splits != cut.Gmem.Splits {
			t.Errorf("%v: %+v", args, g)
		}
		if hp := args[len(args)-1] == "--iommufd-huge-pages"; g.DevicePolicies[0].Cut == hp {
			t.Errorf("%v: device %+v", args, g.DevicePolicies[0])
		}
	}
	if g := replayJSON("--policy", "cut").Gmem; g.Policy != "cut" || g.CutCalls != cut.Gmem.CutCalls {
		t.Errorf("--policy cut: %+v", g)
	}

	code, out, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(tr)}, "-")
	if code != exitOK {
		t.Fatalf("exit %d, %s", code, errOut)
	}
	for _, want := range []string{
		"\npolicy     gmem: cut (iommufd, huge pages off); baseline: granule\n",
		fmt.Sprintf("\n%-27s %12s %12s %10s\n", "cut calls", "0", commas(cut.Gmem.CutCalls), "-"),
		"\nwindow                               0 B          0 B          -\n",
		"\nsplits: entries a conversion to private cut",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	_, out, _ = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(tr)}, "--iommufd-huge-pages", "-")
	if !strings.Contains(out, "\npolicy     gmem: extent (iommufd, huge pages kept); baseline: granule\n") {
		t.Errorf("huge pages kept: table\n%s", out)
	}
}

// TestReplayPolicyErrors: granule is the baseline's, cut needs a space that
// cuts: refused up front where the flags alone say so, and at the first
// device that cannot cut otherwise, as a usage error (exit 2) naming it,
// with no table; --keep-going replays the rest without it.
func TestReplayPolicyErrors(t *testing.T) {
	ctx := context.Background()
	for _, args := range [][]string{
		{"--policy", "granule"},
		{"--policy", "bogus"},
		{"--policy", "cut", "--iommufd-huge-pages"},
	} {
		code, out, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(replayTrace)}, append(args, "-")...)
		if code != exitUsage || out != "" || !strings.Contains(errOut, "--policy") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want a usage error", args, code, out, errOut)
		}
	}
	mixed := replayTrace + `{"op":"attach","dev":"nic","iommu":"iommufd"}
{"op":"convert","gpa":"0x201000","size":"4KiB","to":"private"}
`
	code, out, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(mixed)}, "--policy", "cut", "-")
	const why = `line 2: --policy cut: device "dev0" is type1: type1 never cuts; --policy auto cuts only where a device can`
	if code != exitUsage || out != "" || strings.Count(errOut, why) != 1 {
		t.Errorf("cut on type1: exit %d, stdout %q, stderr %q; want 2 and one line saying why", code, out, errOut)
	}
	code, out, _ = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(mixed)}, "--policy", "cut", "--json", "-")
	if e := decodeError(t, out); code != exitUsage || e == nil || e.Kind != "usage" || e.Line != 2 || !strings.Contains(e.Message, why) {
		t.Errorf("--json: exit %d, error %+v", code, e)
	}
	code, out, errOut = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(mixed)}, "--policy", "cut", "--keep-going", "--json", "-")
	res := decodeResult(t, out)
	if code != exitUsage || res.Events != 5 || res.RunErrors != 1 || res.Gmem.Policy != "cut" || res.Gmem.CutCalls != 1 || res.Violations != 0 {
		t.Errorf("--keep-going: exit %d, stderr %q, %+v", code, errOut, res)
	}
	// Auto on the same trace: one device of each.
	_, out, _ = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(mixed)}, "-")
	if !strings.Contains(out, "\npolicy     gmem: extent (type1: 1 device), cut (iommufd, huge pages off: 1 device); baseline: granule\n") {
		t.Errorf("mixed policies: table\n%s", out)
	}
}

// TestReplayHugepageIOMMUFD: the 16 GiB hugepage trace on iommufd, whose
// conversions to private cut shared 2 MiB extents, has no window and
// re-pins nothing with the default policy (cut); with --policy extent it has
// the bounded extent's figures, the same as on type1.
func TestReplayHugepageIOMMUFD(t *testing.T) {
	if testing.Short() {
		t.Skip("replays 16 GiB hugepage traces: not with -short")
	}
	ctx := context.Background()
	result := func(tr string, args ...string) replay.Result {
		t.Helper()
		code, out, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(tr)}, append([]string{"--json", "-"}, args...)...)
		if code != exitOK {
			t.Fatalf("%v: exit %d, %s", args, code, errOut)
		}
		return decodeResult(t, out)
	}
	iommufd := genTrace(t, "hugepage", "--ram", "16GiB", "--iommu", "iommufd")
	cut, extent := result(iommufd).Gmem, result(iommufd, "--policy", "extent").Gmem
	type1 := result(genTrace(t, "hugepage", "--ram", "16GiB")).Gmem
	if cut.Policy != "cut" || cut.WindowBytes != 0 || cut.RepinnedBytes != 0 || cut.MaxWindow != 0 || cut.Splits == 0 {
		t.Errorf("cut: %+v", cut)
	}
	if extent.Policy != "extent" || type1.Policy != "extent" || extent.WindowBytes == 0 || extent.MaxWindow == 0 || extent.MaxWindow > 2<<20 ||
		extent.WindowBytes != type1.WindowBytes || extent.RepinnedBytes != type1.RepinnedBytes || extent.Splits != type1.Splits {
		t.Errorf("extent on iommufd %+v, on type1 %+v: want the same bounded figures", extent, type1)
	}
}

// TestReplayPetabyte: a petabyte guest replays in bounded memory, and the
// output says that the baseline's state memory is computed, and why.
func TestReplayPetabyte(t *testing.T) {
	big := `{"op":"ram","name":"huge","gpa":"0","size":"1PiB"}
{"op":"attach","dev":"d","iommu":"type1"}
{"op":"convert","gpa":"1TiB","size":"2MiB","to":"shared"}
`
	code, out, errOut := runReplayEnv(context.Background(), replayEnv{stdin: strings.NewReader(big)}, "-")
	if code != exitOK || !strings.Contains(out, "note: the baseline's bitmaps would take 32GiB, past the replay's budget") {
		t.Errorf("exit %d, stderr %q\n%s", code, errOut, out)
	}
	code, out, _ = runReplayEnv(context.Background(), replayEnv{stdin: strings.NewReader(big)}, "--json", "-")
	res := decodeResult(t, out)
	if code != exitOK || res.Baseline.StateHow != replay.StateComputed || res.Baseline.StateBytes != 32<<30 || len(res.Notes) != 1 {
		t.Errorf("--json: exit %d, %+v", code, res)
	}
}

// stuckReplayer is in an event that does not end when asked to: an undo
// longer than the command's grace.
type stuckReplayer struct {
	*replay.Replayer
	release chan struct{}
}

func (s *stuckReplayer) ApplyContext(ctx context.Context, e trace.Event, line int) error {
	if _, ok := e.(trace.Convert); ok {
		<-s.release
	}
	return s.Replayer.ApplyContext(ctx, e, line)
}

// TestReplayInterruptGrace: an interrupted replay that cannot stop within
// the grace is abandoned: exit 1, "interrupted during event N", and with
// --json an error object, not a result.
func TestReplayInterruptGrace(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	ctx, cancel := context.WithCancel(context.Background())
	env := replayEnv{
		stdin:       strings.NewReader(replayTrace),
		newReplayer: func(o replay.Options) replayer { return &stuckReplayer{Replayer: replay.New(o), release: release} },
		grace:       10 * time.Millisecond,
	}
	go func() {
		time.Sleep(50 * time.Millisecond)
		cancel()
	}()
	code, out, errOut := runReplayEnv(ctx, env, "--json", "-")
	var v struct {
		Error *replayError `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("stdout is not JSON: %v\n%s", err, out)
	}
	if code != exitFail || !strings.Contains(errOut, "interrupted during event 3 (line 3)") || v.Error == nil || v.Error.Kind != "interrupted" || v.Error.Line != 3 {
		t.Errorf("exit %d, stderr %q, stdout %s", code, errOut, out)
	}
}

// decodeError reads the "error" object of --json.
func decodeError(t *testing.T, out string) *replayError {
	t.Helper()
	var v struct {
		Error *replayError `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("stdout is not one JSON object: %v\n%s", err, out)
	}
	return v.Error
}

// TestReplayJSONErrors: with --json, stdout is one JSON object whatever
// happens, with an "error" object exactly when the exit status is not 0.
func TestReplayJSONErrors(t *testing.T) {
	ctx := context.Background()
	bad := writeFile(t, "bad.jsonl", replayTrace+`{"op":"convert","gpa":"0x1000","size":"4KiB","to":"sideways"}
{"op":"attach","dev":"dev0","iommu":"type1"}
{"op":"convert","gpa":"0x200000","size":"4KiB","to":"private"}
`)
	for _, c := range []struct {
		name string
		args []string
		code int
		kind string
		line int
	}{
		{"malformed line", []string{bad}, exitUsage, "input", 4},
		{"missing file", []string{filepath.Join(t.TempDir(), "missing")}, exitUsage, "input", 0},
		{"empty input", []string{writeFile(t, "empty", "")}, exitUsage, "input", 0},
		{"bad flag value", []string{"--max-extent", "3MiB", bad}, exitUsage, "usage", 0},
		{"unknown flag", []string{"--nope", bad}, exitUsage, "usage", 0},
		{"keep going", []string{"--keep-going", bad}, exitUsage, "input", 0},
		{"clean", []string{writeFile(t, "ok.jsonl", replayTrace)}, exitOK, "", 0},
	} {
		code, out, errOut := runReplayEnv(ctx, replayEnv{}, append([]string{"--json"}, c.args...)...)
		e := decodeError(t, out)
		switch {
		case code != c.code:
			t.Errorf("%s: exit %d, want %d; stderr %q", c.name, code, c.code, errOut)
		case c.kind == "" && e != nil:
			t.Errorf("%s: error %+v with exit 0", c.name, e)
		case c.kind != "" && (e == nil || e.Kind != c.kind || e.Line != c.line || e.Message == ""):
			t.Errorf("%s: error %+v, want kind %q line %d", c.name, e, c.kind, c.line)
		}
	}
	// A stopped replay still reports what it replayed until then.
	_, out, _ := runReplayEnv(ctx, replayEnv{}, "--json", bad)
	if res := decodeResult(t, out); res.Events != 3 || res.Baseline.EntriesFinal != 512 {
		t.Errorf("partial result %+v", res)
	}

	// --keep-going counts and lists every input error, malformed lines and
	// impossible machine events together, as stderr reports them.
	code, out, errOut := runReplayEnv(ctx, replayEnv{}, "--json", "--keep-going", bad)
	res := decodeResult(t, out)
	if code != exitUsage || res.InputErrors != 2 || len(res.InputErrorDetails) != 2 || res.InputErrorsOmitted != 0 ||
		res.InputErrorDetails[0].Line != 4 || res.InputErrorDetails[0].Kind != "malformed" ||
		res.InputErrorDetails[1].Line != 5 || res.InputErrorDetails[1].Kind != replay.InputMachine ||
		!strings.Contains(errOut, "1 malformed line and 1 impossible machine event skipped") {
		t.Errorf("--keep-going: exit %d, stderr %q, %+v", code, errOut, res)
	}
}

// TestReplayDetails: the table and --json say how many rejections were
// left out; --details sets how many are described, all for every one.
func TestReplayDetails(t *testing.T) {
	var b strings.Builder
	b.WriteString(`{"op":"ram","name":"ram0","gpa":"0","size":"1GiB"}` + "\n")
	for i := range 30 {
		fmt.Fprintf(&b, `{"op":"convert","gpa":"%d","size":"0","to":"shared"}`+"\n", i*4096)
	}
	ctx := context.Background()
	for _, c := range []struct {
		args            []string
		listed, omitted uint64
		tableSays       string
	}{
		{nil, 20, 10, "... 25 more: --json describes 20 of the 30, --details all every one\n"},
		{[]string{"--details", "3"}, 3, 27, "... 27 more: --json describes 3 of the 30, --details all every one\n"},
		{[]string{"--details", "all"}, 30, 0, "... 25 more: --json describes all 30\n"},
	} {
		_, out, _ := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(b.String())}, append([]string{"--json", "-"}, c.args...)...)
		res := decodeResult(t, out)
		if res.Rejected != 30 || uint64(len(res.Rejections)) != c.listed || res.RejectionsOmitted != c.omitted {
			t.Errorf("%q: %d rejected, %d listed, %d omitted; want 30, %d, %d", c.args, res.Rejected, len(res.Rejections), res.RejectionsOmitted, c.listed, c.omitted)
		}
		_, out, _ = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(b.String())}, append([]string{"-"}, c.args...)...)
		if !strings.Contains(out, c.tableSays) {
			t.Errorf("%q: the table does not say %q:\n%s", c.args, c.tableSays, out)
		}
	}
	for _, bad := range []string{"0", "-1", "x"} {
		if code, _, errOut := runReplayEnv(ctx, replayEnv{}, "--details", bad, "-"); code != exitUsage || !strings.Contains(errOut, "--details") {
			t.Errorf("--details %s: exit %d, stderr %q", bad, code, errOut)
		}
	}
}

// TestReplaySVGStdout: --svg - writes the drawing to stdout in place of
// the table, and cannot share stdout with --json.
func TestReplaySVGStdout(t *testing.T) {
	ctx := context.Background()
	code, out, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(replayTrace)}, "--svg", "-", "-")
	if code != exitOK || !strings.HasPrefix(out, "<svg") || !strings.HasSuffix(strings.TrimSpace(out), "</svg>") || strings.Contains(out, "baseline") && !strings.Contains(out, "<svg") {
		t.Errorf("--svg -: exit %d, stderr %q, stdout %.100q", code, errOut, out)
	}
	if _, err := os.Stat("-"); err == nil {
		t.Error("--svg - wrote a file named -")
	}
	code, _, errOut = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(replayTrace)}, "--svg", "-", "--json", "-")
	if code != exitUsage || !strings.Contains(errOut, "both write to stdout") {
		t.Errorf("--svg - --json: exit %d, stderr %q", code, errOut)
	}
}

// TestReplayMMIOFlag: --mmio declares a QEMU log's holes: a conversion to
// private there is refused as MMIO, the default RAM leaves the hole out,
// and bad holes are usage errors.
func TestReplayMMIOFlag(t *testing.T) {
	ctx := context.Background()
	log := "kvm_convert_memory start 0xfe000000 size 0x1000 private_to_shared\n" +
		"kvm_convert_memory start 0x100000000 size 0x1000 private_to_shared\n"
	code, out, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(log)}, "--json", "--mmio", "3GiB:1GiB", "-")
	res := decodeResult(t, out)
	if code != exitOK || res.RAMBytes != 4<<30 || res.SharedBytes != 4096 || res.Rejected != 0 {
		t.Errorf("--mmio: exit %d, stderr %q, %+v", code, errOut, res)
	}
	// Without it the hole is RAM up to 5 GiB.
	_, out, _ = runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(log)}, "--json", "-")
	if res := decodeResult(t, out); res.RAMBytes != 5<<30 || res.SharedBytes != 8192 {
		t.Errorf("without --mmio: %+v", res)
	}
	for _, c := range []struct {
		args []string
		why  string
	}{
		{[]string{"--mmio", "3GiB"}, "--mmio"},
		{[]string{"--mmio", "0x800:4096"}, "4 KiB"},
		{[]string{"--ram", "0:4GiB", "--mmio", "3GiB:1GiB"}, "overlap"},
		{[]string{"--mmio", "3GiB:1GiB", "--mmio", "3GiB:2GiB"}, "overlap"},
	} {
		code, _, errOut := runReplayEnv(ctx, replayEnv{stdin: strings.NewReader(log)}, append(c.args, "-")...)
		if code != exitUsage || !strings.Contains(errOut, c.why) {
			t.Errorf("%q: exit %d, stderr %q; want 2 and %q", c.args, code, errOut, c.why)
		}
	}
}

// TestFlagErrorsSayTwoDashes: a flag error names the flag as help does.
func TestFlagErrorsSayTwoDashes(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		args []string
		flag string
	}{
		{[]string{"replay", "--ram", "16GB", "-"}, "ram"},
		{[]string{"replay", "--nope", "-"}, "nope"},
		{[]string{"replay", "-nope", "-"}, "nope"},
		{[]string{"replay", "--devices"}, "devices"},
		{[]string{"replay", "--json=maybe", "-"}, "json"},
		{[]string{"gen", "churn", "--ram", "16GB"}, "ram"},
		{[]string{"gen", "churn", "--nope"}, "nope"},
		{[]string{"demo", "--vcpus", "x"}, "vcpus"},
		{[]string{"demo", "--nope"}, "nope"},
		{[]string{"version", "--nope"}, "nope"},
	} {
		code, _, errOut := runCmd(ctx, c.args...)
		if code != exitUsage || !strings.Contains(errOut, "--"+c.flag) || strings.Contains(errOut, " -"+c.flag) {
			t.Errorf("gmem %q: exit %d, stderr %q; want --%s", c.args, code, errOut, c.flag)
		}
	}
}

// FuzzReplayFlags checks gmem replay's command line parser: no panic, and
// what it accepts is usable: a file, options the trace reader and the
// replay take, and a device count in range.
func FuzzReplayFlags(f *testing.F) {
	f.Add("--json\x00-")
	f.Add("--ram\x000:2GiB,4GiB:2GiB\x00--mmio\x002GiB:2GiB\x00log")
	f.Add("--max-extent\x00none\x00--details\x00all\x00x")
	f.Add("--limit\x0065535\x00--iommu\x00type1\x00--devices\x004\x00-")
	f.Add("--svg\x00-\x00--json\x00-")
	f.Add("--bitmap-budget\x001PiB\x00--keep-going\x00t")
	f.Add("--policy\x00cut\x00-")
	f.Add("--policy\x00granule\x00-")
	f.Add("--iommufd-huge-pages\x00--policy\x00cut\x00-")
	f.Add("--policy=extent\x00--iommufd-huge-pages\x00f")
	f.Fuzz(func(t *testing.T, joined string) {
		fl, _, err := parseReplayFlags(strings.Split(joined, "\x00"))
		if err != nil {
			return // a usage error or -h
		}
		if fl.file == "" || fl.devices < 1 || fl.devices > trace.MaxDevices || (fl.svg == "-" && fl.json) {
			t.Fatalf("accepted %q as %+v", joined, fl)
		}
		if err := fl.opts.Check(); err != nil {
			t.Fatalf("accepted %q with trace options %+v: %v", joined, fl.opts, err)
		}
		if err := fl.ropts.Validate(); err != nil {
			t.Fatalf("accepted %q with replay options %+v: %v", joined, fl.ropts, err)
		}
		if p := fl.ropts.Policy; p == dma.Granule || (p == dma.Cut && fl.ropts.IOMMUFDHugePages) || p != fl.policy || fl.ropts.IOMMUFDHugePages != fl.hugePages {
			t.Fatalf("accepted %q as policy %v, huge pages %v", joined, p, fl.ropts.IOMMUFDHugePages)
		}
	})
}

// TestReadmeBootExample: the README's boot example is today's output, but
// for the times.
func TestReadmeBootExample(t *testing.T) {
	if testing.Short() {
		t.Skip("replays a 16 GiB boot trace: not with -short")
	}
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	const cmd = "    $ go run ./cmd/gmem gen boot --ram 16GiB | go run ./cmd/gmem replay -\n"
	_, after, ok := strings.Cut(string(b), cmd)
	if !ok {
		t.Fatalf("README has no %q", cmd)
	}
	example, _, _ := strings.Cut(after, "\n    ...\n")
	var gen bytes.Buffer
	if code := run(context.Background(), []string{"gen", "boot", "--ram", "16GiB"}, &gen, io.Discard); code != exitOK {
		t.Fatalf("gen: exit %d", code)
	}
	code, out, errOut := runReplayEnv(context.Background(), replayEnv{stdin: &gen}, "-")
	if code != exitOK {
		t.Fatalf("replay: exit %d, %s", code, errOut)
	}
	timed := func(l string) bool {
		return strings.Contains(l, "replayed in") || strings.HasPrefix(strings.TrimSpace(l), "time per event")
	}
	want := strings.Split(example, "\n")
	got := strings.Split(out, "\n")
	for i, w := range want {
		w = strings.TrimPrefix(w, "    ")
		if i >= len(got) {
			t.Fatalf("README line %q past the output", w)
		}
		if !timed(w) && w != got[i] {
			t.Errorf("README line %d:\n  %q\noutput:\n  %q", i+1, w, got[i])
		}
	}
}

// slowReplayer takes a while over every event, as a big one would.
type slowReplayer struct {
	*replay.Replayer
	pause time.Duration
}

func (s *slowReplayer) ApplyContext(ctx context.Context, e trace.Event, line int) error {
	time.Sleep(s.pause)
	return s.Replayer.ApplyContext(ctx, e, line)
}

// TestReplayProgressTick: on a terminal the progress line is redrawn while
// the replay runs, and cleared before the result.
func TestReplayProgressTick(t *testing.T) {
	env := replayEnv{
		stdin: strings.NewReader(replayTrace),
		newReplayer: func(o replay.Options) replayer {
			return &slowReplayer{Replayer: replay.New(o), pause: 30 * time.Millisecond}
		},
		terminal:      func(io.Writer) bool { return true },
		progressEvery: 5 * time.Millisecond,
	}
	code, out, errOut := runReplayEnv(context.Background(), env, "-")
	if code != exitOK || !strings.Contains(errOut, "\rreplay: ") || !strings.Contains(errOut, " done") || !strings.HasSuffix(errOut, "\r\x1b[K") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
	if strings.Contains(out, "\r") {
		t.Errorf("progress on stdout: %q", out)
	}
}

// TestReplayLimitsTable: when the trace's limit refuses what the other run
// grants, the counts that follow the events are not compared, the entries
// needed with no limit are, and the dma_entry_limit lines say where QEMU
// stops and what to set.
func TestReplayLimitsTable(t *testing.T) {
	in := `{"op":"ram","name":"ram0","gpa":"0","size":"1GiB"}
{"op":"attach","dev":"d","iommu":"type1","limit":300}
{"op":"convert","gpa":"0","size":"1MiB","to":"shared"}
{"op":"convert","gpa":"2MiB","size":"1MiB","to":"shared"}
`
	code, out, errOut := runReplayEnv(context.Background(), replayEnv{stdin: strings.NewReader(in)}, "-")
	if code != exitOK {
		t.Fatalf("exit %d, %s", code, errOut)
	}
	for _, want := range []string{
		"1 device attached",
		"pinned                          1.00 MiB     2.00 MiB        n/c",
		"entries needed, no limit             512            2    256.00x",
		"n/c: not comparable: from event 4 the runs replayed different traces",
		"the limit of 300 first refuses at event 4 (line\n    4): QEMU stops the VM there; set vfio_iommu_type1.dma_entry_limit=512 or\n    more",
		"gmem: the limit of 300 is enough; the trace needs 3 entries at most",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	code, out, _ = runReplayEnv(context.Background(), replayEnv{stdin: strings.NewReader(in)}, "--json", "-")
	var v struct {
		Limits *replay.Limits `json:"dma_entry_limit"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil || code != exitOK || v.Limits == nil || v.Limits.Baseline.Limit != 512 ||
		v.Limits.Baseline.FirstRefusal == nil || v.Limits.Baseline.FirstRefusal.Line != 4 || v.Limits.Gmem.Limit != 3 {
		t.Errorf("--json: exit %d, %v, %+v", code, err, v.Limits)
	}
}
