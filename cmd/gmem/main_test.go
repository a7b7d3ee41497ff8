package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"runtime/debug"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/gmemproject/gmem/trace"
)

// runCmd runs gmem in-process and returns the exit code and both outputs.
func runCmd(ctx context.Context, args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := run(ctx, args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestDispatch(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		args     []string
		code     int
		stdout   string // substring expected on stdout ("" for empty)
		stderr   string // substring expected on stderr ("" for empty)
		noStdout bool
	}{
		{nil, exitUsage, "", "usage: gmem COMMAND", true},
		{[]string{"help"}, exitOK, "usage: gmem COMMAND", "", false},
		{[]string{"-h"}, exitOK, "  gen ", "", false},
		{[]string{"--help"}, exitOK, "commands:", "", false},
		{[]string{"help", "gen"}, exitOK, "generators:", "", false},
		{[]string{"help", "nope"}, exitUsage, "", `unknown command "nope"`, true},
		{[]string{"nope"}, exitUsage, "", `unknown command "nope"`, true},
	} {
		code, out, errOut := runCmd(ctx, c.args...)
		if code != c.code || !strings.Contains(out, c.stdout) || !strings.Contains(errOut, c.stderr) || (c.noStdout && out != "") {
			t.Errorf("gmem %q: exit %d, stdout %.100q, stderr %.100q; want %d, %q, %q", c.args, code, out, errOut, c.code, c.stdout, c.stderr)
		}
	}
	// Every command is listed by help.
	_, out, _ := runCmd(ctx, "help")
	for _, c := range commands() {
		if !strings.Contains(out, "  "+c.name+" ") {
			t.Errorf("help does not list %q", c.name)
		}
	}
}

func TestGenExitCodes(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		args   []string
		code   int
		stderr string
	}{
		{[]string{"gen"}, exitUsage, "usage: gmem gen NAME"},
		{[]string{"gen", "nope"}, exitUsage, `unknown generator "nope"`},
		{[]string{"gen", "churn", "--nope"}, exitUsage, "flag provided but not defined"},
		{[]string{"gen", "churn", "extra"}, exitUsage, `unexpected argument "extra"`},
		{[]string{"gen", "churn", "--ram", "16GB"}, exitUsage, "ambiguous"},
		{[]string{"gen", "churn", "--ram", "100MiB"}, exitUsage, "multiple of 2 MiB"},
		{[]string{"gen", "churn", "--ram", "1GiB", "--iommu", "vfio"}, exitUsage, "type1 or iommufd"},
		{[]string{"gen", "churn", "--iommu", "iommufd", "--limit", "5"}, exitUsage, "no entry limit"},
		{[]string{"gen", "churn", "--limit", "4294967296"}, exitUsage, "largest dma_entry_limit, 4294967295"},
		{[]string{"gen", "churn", "--mode", "fast"}, exitUsage, "split or inplace"},
		{[]string{"gen", "churn", "--platform", "arm"}, exitUsage, "tdx or snp"},
		{[]string{"gen", "churn", "--events", "-1"}, exitUsage, "negative"},
		{[]string{"gen", "churn", "--events", "x"}, exitUsage, "invalid value"},
		{[]string{"gen", "churn", "--devices", "5000"}, exitUsage, "devices"},
		{[]string{"gen", "churn", "--large", "101"}, exitUsage, "percentage"},
		{[]string{"gen", "churn", "--large", "-1"}, exitUsage, "percentage"},
		{[]string{"gen", "hugepage", "--huge", "3MiB"}, exitUsage, "power of two"},
		{[]string{"gen", "hotplug", "--block", "3MiB"}, exitUsage, "power of two"},
		{[]string{"gen", "implicit", "--run", "1000"}, exitUsage, "run"},
		{[]string{"gen", "adversarial", "--window", "4KiB"}, exitUsage, "window"},
		{[]string{"gen", "boot", "--live", "-3"}, exitUsage, "live"},
		// 0 is the library's default for these: given, it is refused, not
		// silently replaced.
		{[]string{"gen", "boot", "--ram", "0"}, exitUsage, "--ram 0: want more than 0"},
		{[]string{"gen", "churn", "--events", "0"}, exitUsage, "--events 0"},
		{[]string{"gen", "churn", "--devices", "0"}, exitUsage, "--devices 0"},
		{[]string{"gen", "boot", "--vcpus", "0"}, exitUsage, "--vcpus 0"},
		{[]string{"gen", "implicit", "--run", "0"}, exitUsage, "--run 0"},
		{[]string{"gen", "adversarial", "--window", "0"}, exitUsage, "--window 0"},
	} {
		code, out, errOut := runCmd(ctx, c.args...)
		if code != c.code || !strings.Contains(errOut, c.stderr) || out != "" {
			t.Errorf("gmem %q: exit %d, stdout %.80q, stderr %q; want %d and %q", c.args, code, out, errOut, c.code, c.stderr)
		}
	}
}

func TestGenHelp(t *testing.T) {
	ctx := context.Background()
	for _, g := range trace.Generators() {
		for _, h := range []string{"-h", "--help"} {
			code, out, errOut := runCmd(ctx, "gen", g.Name, h)
			if code != exitOK || errOut != "" {
				t.Errorf("gen %s %s: exit %d, stderr %q", g.Name, h, code, errOut)
			}
			for _, want := range []string{g.Summary, g.Behaviour, "--ram SIZE", "--seed", "--events", "--devices", "--iommu", "--limit", "--mode", "--platform"} {
				if !strings.Contains(out, want) {
					t.Errorf("gen %s %s: help lacks %q", g.Name, h, want)
				}
			}
		}
	}
	// Every generator of the library has flags here, and no others.
	var specs, infos []string
	for _, s := range genSpecs() {
		specs = append(specs, s.name)
	}
	for _, g := range trace.Generators() {
		infos = append(infos, g.Name)
	}
	if diff := cmp.Diff(infos, specs); diff != "" {
		t.Errorf("generators (-library +command):\n%s", diff)
	}
}

func TestGenOutput(t *testing.T) {
	ctx := context.Background()
	for _, g := range trace.Generators() {
		args := []string{"gen", g.Name, "--ram", "2GiB", "--events", "300", "--seed", "3", "--devices", "2"}
		code, out, errOut := runCmd(ctx, args...)
		if code != exitOK || errOut != "" {
			t.Fatalf("gmem %q: exit %d, stderr %q", args, code, errOut)
		}
		tr, err := trace.Parse(strings.NewReader(out), trace.Options{})
		if err != nil {
			t.Fatalf("%s output: %v", g.Name, err)
		}
		v := trace.NewValidator()
		attach := 0
		for _, e := range tr.Events {
			if err := v.Check(e); err != nil {
				t.Fatalf("%s: %v", g.Name, err)
			}
			if _, ok := e.(trace.Attach); ok {
				attach++
			}
		}
		if attach != 2 || len(tr.Events) < 300 {
			t.Errorf("%s: %d events, %d devices", g.Name, len(tr.Events), attach)
		}
		// Same flags, same bytes; another seed, other bytes.
		if _, again, _ := runCmd(ctx, args...); again != out {
			t.Errorf("%s: output differs between runs", g.Name)
		}
		args[len(args)-3] = "4"
		if _, other, _ := runCmd(ctx, args...); other == out {
			t.Errorf("%s: seeds 3 and 4 give the same output", g.Name)
		}
	}

	// The flags reach the library: compare with the library's own output.
	code, out, _ := runCmd(ctx, "gen", "hugepage", "--ram", "3GiB", "--events", "50", "--seed", "9",
		"--iommu", "iommufd", "--mode", "inplace", "--platform", "snp", "--huge", "1GiB", "--live", "2")
	if code != exitOK {
		t.Fatalf("exit %d", code)
	}
	seq, err := trace.Hugepage(trace.HugepageOptions{
		Common: trace.Common{RAM: 3 << 30, Events: 50, Seed: 9, IOMMU: trace.IOMMUFD, Mode: trace.InPlace, Platform: trace.SNP},
		Huge:   1 << 30,
		Live:   2,
	})
	if err != nil {
		t.Fatal(err)
	}
	var want bytes.Buffer
	w := trace.NewWriter(&want)
	for e := range seq {
		if err := w.Write(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want.String(), out); diff != "" {
		t.Errorf("gen output differs from the library's (-library +command):\n%s", diff)
	}
	// --large 0 means no 16 KiB buffers at all.
	_, out, _ = runCmd(ctx, "gen", "churn", "--ram", "1GiB", "--events", "500", "--large", "0")
	if strings.Contains(out, `"16KiB"`) || !strings.Contains(out, `"4KiB"`) {
		t.Error("--large 0 still produced 16 KiB buffers")
	}
}

func TestGenInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	code, _, errOut := runCmd(ctx, "gen", "churn", "--ram", "1GiB", "--events", "10")
	if code != exitFail || !strings.Contains(errOut, "interrupted") {
		t.Errorf("cancelled run: exit %d, stderr %q; want %d", code, errOut, exitFail)
	}
}

// failWriter fails every write, as a closed pipe would.
type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("broken pipe") }

func TestGenWriteError(t *testing.T) {
	var errOut bytes.Buffer
	code := run(context.Background(), []string{"gen", "churn", "--ram", "1GiB", "--events", "100000"}, failWriter{}, &errOut)
	if code != exitFail || !strings.Contains(errOut.String(), "broken pipe") {
		t.Errorf("write failure: exit %d, stderr %q; want %d", code, errOut.String(), exitFail)
	}
}

// mainEnv, set in the environment, makes the test binary run gmem's main
// with its arguments, so that tests can signal a real process.
const mainEnv = "GMEM_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(mainEnv) == "1" {
		main()
	}
	os.Exit(m.Run())
}

// gmemProcess starts gmem with args as a process of its own.
func gmemProcess(t *testing.T, args ...string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, &out, &errOut
}

// TestReplaySignals: SIGINT and SIGTERM stop a replay inside one long event
// (a 16 GiB conversion: 4,194,304 map calls for the baseline, tens of
// seconds), with exit status 1 and "interrupted", not full results.
func TestReplaySignals(t *testing.T) {
	if testing.Short() {
		t.Skip("needs a few seconds per signal: not with -short")
	}
	file := writeFile(t, "long.jsonl", `{"op":"ram","name":"ram0","gpa":"0","size":"32GiB"}
{"op":"attach","dev":"d","iommu":"iommufd"}
{"op":"convert","gpa":"0","size":"16GiB","to":"shared"}
{"op":"convert","gpa":"0","size":"16GiB","to":"private"}
`)
	for _, sig := range []os.Signal{os.Interrupt, syscall.SIGTERM} {
		cmd, out, errOut := gmemProcess(t, "replay", file)
		time.Sleep(time.Second)
		sent := time.Now()
		if err := cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		var err error
		select {
		case err = <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			t.Fatalf("%v: still running 20 s after the signal: ignored", sig)
		}
		t.Logf("%v: exited %v after the signal", sig, time.Since(sent).Round(time.Millisecond))
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != exitFail || !strings.Contains(errOut.String(), "interrupted") {
			t.Errorf("%v: %v, stderr %q; want exit 1 and interrupted", sig, err, errOut)
		}
		if strings.Contains(out.String(), "conversions, replayed in") && !strings.Contains(out.String(), " 2 events") {
			t.Errorf("%v: printed a full result:\n%s", sig, out)
		}
	}
}

func TestVersion(t *testing.T) {
	ctx := context.Background()
	code, out, errOut := runCmd(ctx, "version")
	if code != exitOK || errOut != "" || !strings.HasPrefix(out, "gmem ") || !strings.Contains(out, "github.com/gmemproject/gmem") {
		t.Errorf("exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	code, out, _ = runCmd(ctx, "version", "--json")
	var v versionInfo
	if err := json.Unmarshal([]byte(out), &v); err != nil || code != exitOK || v.Module != "github.com/gmemproject/gmem" || v.GoVersion == "" || v.Version == "" {
		t.Errorf("--json: exit %d, %v, %+v", code, err, v)
	}
	if code, _, errOut := runCmd(ctx, "version", "extra"); code != exitUsage || !strings.Contains(errOut, "unexpected argument") {
		t.Errorf("extra argument: exit %d, %q", code, errOut)
	}
	// The revision, when the build has one.
	bi := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/gmemproject/gmem", Version: "v0.3.0"},
		Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "4b9e7e1"}, {Key: "vcs.time", Value: "2026-12-06T22:03:00Z"},
			{Key: "vcs.modified", Value: "true"}, {Key: "GOOS", Value: "linux"}, {Key: "GOARCH", Value: "amd64"}}}
	if got, want := formatVersion(buildVersion(bi)), "gmem v0.3.0 (github.com/gmemproject/gmem), revision 4b9e7e1 of 2026-12-06T22:03:00Z, modified, go1.26.8 linux/amd64"; got != want {
		t.Errorf("%q\nwant %q", got, want)
	}
}

// TestHelpLayout: every command's help lays its flags out the same way:
// "  --name KIND" and the usage beside it or below, within 80 columns; not
// package flag's "  -name" with the usage on a tab-indented line.
func TestHelpLayout(t *testing.T) {
	for _, args := range [][]string{{"gen", "churn", "-h"}, {"replay", "-h"}, {"demo", "-h"}, {"version", "-h"}} {
		code, out, _ := runCmd(context.Background(), args...)
		_, flags, ok := strings.Cut(out, "\nflags:\n")
		if code != exitOK || !ok {
			t.Errorf("%q: exit %d, no flags section:\n%s", args, code, out)
			continue
		}
		flags, _, _ = strings.Cut(flags, "\n\n")
		heads := 0
		for _, l := range strings.Split(strings.TrimRight(flags, "\n"), "\n") {
			switch {
			case len(l) > 80 || strings.Contains(l, "\t"):
				t.Errorf("%q: line %q is wider than 80 columns or has a tab", args, l)
			case strings.HasPrefix(l, "  --"):
				heads++
			case strings.HasPrefix(l, "    ") && strings.TrimSpace(l) != "":
			default:
				t.Errorf("%q: line %q is neither a flag nor its usage", args, l)
			}
		}
		if heads == 0 {
			t.Errorf("%q: no flags listed", args)
		}
	}
}
