package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/vmm"
)

// demoJSON is the part of the --json object the tests look at.
type demoJSON struct {
	GuestRan     bool     `json:"guest_ran"`
	Mode         string   `json:"mode"`
	VCPUs        int      `json:"vcpus"`
	Conversions  uint64   `json:"conversions"`
	DMAAllowed   uint64   `json:"dma_allowed"`
	DMABlocked   uint64   `json:"dma_blocked"`
	Violations   uint64   `json:"violations"`
	Enforcement  string   `json:"enforcement"`
	Flavour      string   `json:"flavour"`
	ChecksPassed int      `json:"checks_passed"`
	ChecksFailed int      `json:"checks_failed"`
	FailedChecks []string `json:"failed_checks"`
}

func runDemoEnv(env demoEnv, args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := env.run(context.Background(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func decodeDemo(t *testing.T, out string) demoJSON {
	t.Helper()
	var d demoJSON
	var raw map[string]any
	if err := json.Unmarshal([]byte(out), &raw); err != nil {
		t.Fatalf("stdout is not one JSON object: %v\n%s", err, out)
	}
	for _, k := range []string{"guest_ran", "conversions", "dma_allowed", "dma_blocked", "violations", "enforcement", "checks_passed", "checks_failed"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("JSON lacks %q", k)
		}
	}
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatal(err)
	}
	return d
}

func haveKVM(t *testing.T) {
	t.Helper()
	for _, mode := range []guestmem.Mode{guestmem.InPlace, guestmem.Split} {
		if err := probeKVM(kvm.DevicePath, mode); err != nil {
			t.Skipf("needs %s with guest_memfd for %v memory (Linux 6.18 for in place; scripts/rig --kernel-source linux-source-7.3 has it): %v", kvm.DevicePath, mode, err)
		}
	}
}

var realKVM = demoEnv{kvmPath: kvm.DevicePath}

// policiesListed reports whether help lists every policy of --policy, and
// the flag that keeps iommufd's huge pages.
func policiesListed(help string) bool {
	flat := strings.Join(strings.Fields(help), " ")
	for _, w := range []string{"POLICY: auto (cut where", "extent (one entry per conversion", "granule (one entry per 4 KiB", "or cut (entries as extent", "--iommufd-huge-pages"} {
		if !strings.Contains(flat, w) {
			return false
		}
	}
	return true
}

func TestDemoHelp(t *testing.T) {
	for _, args := range [][]string{{"-h"}, {"--help"}} {
		code, out, errOut := runDemoEnv(realKVM, args...)
		if code != exitOK || !strings.Contains(out, "usage: gmem demo") || !strings.Contains(out, "-no-kvm") || errOut != "" ||
			!policiesListed(out) {
			t.Errorf("demo %q: exit %d, stdout %.200q, stderr %q", args, code, out, errOut)
		}
	}
	code, out, _ := runCmd(context.Background(), "help", "demo")
	if code != exitOK || !strings.Contains(out, "usage: gmem demo") {
		t.Errorf("gmem help demo: exit %d, %.100q", code, out)
	}
}

func TestDemoUsageErrors(t *testing.T) {
	for _, c := range []struct {
		args   []string
		stderr string
	}{
		{[]string{"--mode", "fast"}, "--mode: want inplace or split"},
		{[]string{"--vcpus", "0"}, "--vcpus 0"},
		{[]string{"--vcpus", "9"}, "--vcpus 9"},
		{[]string{"--vcpus", "x"}, "invalid value"},
		{[]string{"--policy", "page"}, "--policy"},
		{[]string{"--iommu", "vfio"}, "--iommu"},
		{[]string{"--timeout", "0s"}, "--timeout"},
		{[]string{"--nope"}, "flag provided but not defined"},
		{[]string{"extra"}, `unexpected argument "extra"`},
		{[]string{"--vfio", "type2", "--vfio-device", "0000:00:03.0"}, "--vfio: want type1 or iommufd"},
		{[]string{"--vfio", "type1"}, "--vfio and --vfio-device go together"},
		{[]string{"--vfio-device", "0000:00:03.0"}, "--vfio and --vfio-device go together"},
		{[]string{"--policy", "cut"}, "--policy cut: the model IOMMU cannot cut (type1 never cuts"},
		{[]string{"--policy", "cut", "--iommu", "iommufd", "--iommufd-huge-pages"}, "--policy cut: the model IOMMU cannot cut (an IOAS that keeps huge pages"},
		{[]string{"--policy", "cut", "--iommu", "iommufd", "--vfio", "type1", "--vfio-device", "0000:00:03.0"}, "--policy cut with --vfio type1"},
		{[]string{"--iommufd-huge-pages"}, "--iommufd-huge-pages needs an iommufd IOAS"},
	} {
		code, out, errOut := runDemoEnv(realKVM, c.args...)
		if code != exitUsage || out != "" || !strings.Contains(errOut, c.stderr) || !strings.Contains(errOut, "gmem demo -h") {
			t.Errorf("demo %q: exit %d, stdout %q, stderr %q; want usage error %q", c.args, code, out, errOut, c.stderr)
		}
	}
}

// TestDemoNoKVM runs the scenario host-driven, asked for and because the
// KVM device is missing.
func TestDemoNoKVM(t *testing.T) {
	for _, c := range []struct {
		name string
		env  demoEnv
		args []string
		says string
	}{
		{"flag", realKVM, []string{"--no-kvm", "--json"}, "--no-kvm: running the scenario host-driven"},
		{"missing device", demoEnv{kvmPath: "/nonexistent/kvm"}, []string{"--json", "--mode", "split"}, "KVM cannot run the demo's guest"},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, out, errOut := runDemoEnv(c.env, c.args...)
			if code != exitOK {
				t.Fatalf("exit %d\nstdout %s\nstderr %s", code, out, errOut)
			}
			if !strings.Contains(errOut, c.says) || !strings.Contains(errOut, "[vCPU 0] pass") {
				t.Errorf("stderr does not say so or show progress:\n%s", errOut)
			}
			if c.name == "missing device" && !strings.Contains(errOut, "run scripts/rig --demo") {
				t.Errorf("stderr does not say how to see the real thing:\n%s", errOut)
			}
			d := decodeDemo(t, out)
			if d.GuestRan || d.ChecksFailed != 0 || d.ChecksPassed == 0 || d.Violations != 0 ||
				d.Conversions == 0 || d.DMAAllowed == 0 || d.DMABlocked == 0 || d.Enforcement != string(guestmem.EnforceUserSpace) ||
				!strings.Contains(d.Flavour, "without KVM") {
				t.Errorf("report %+v", d)
			}
		})
	}
}

// TestDemoPolicy: the report says which policy the model IOMMU ran, and on
// what: an iommufd model cuts by default (with cut calls), type1 maps
// bounded extents, and --iommufd-huge-pages makes iommufd do the same.
func TestDemoPolicy(t *testing.T) {
	env := demoEnv{kvmPath: "/nonexistent/kvm"}
	for _, c := range []struct {
		args         []string
		policy, line string
		cut          bool
	}{
		{nil, "extent", "policy        extent on the model (type1)\n", false},
		{[]string{"--iommu", "iommufd"}, "cut", "policy        cut on the model (iommufd, huge pages off): ", true},
		{[]string{"--iommu", "iommufd", "--policy", "cut"}, "cut", "policy        cut on the model (iommufd, huge pages off): ", true},
		{[]string{"--iommu", "iommufd", "--policy", "extent"}, "extent", "policy        extent on the model (iommufd, huge pages off)\n", true},
		{[]string{"--iommu", "iommufd", "--iommufd-huge-pages"}, "extent", "policy        extent on the model (iommufd, huge pages kept: no cut)\n", false},
		{[]string{"--policy", "granule"}, "granule", "policy        granule on the model (type1)\n", false},
	} {
		args := append([]string{"--no-kvm", "--quiet"}, c.args...)
		code, out, errOut := runDemoEnv(env, args...)
		if code != exitOK || !strings.Contains(out, "\n  "+c.line) {
			t.Errorf("%v: exit %d, stderr %q, report lacks %q:\n%s", c.args, code, errOut, c.line, out)
		}
		code, out, _ = runDemoEnv(env, append(args, "--json")...)
		var d struct {
			Rules    string `json:"iommu_rules"`
			Cut      bool   `json:"iommu_cut"`
			Policy   string `json:"iommu_policy"`
			CutCalls uint64 `json:"iommu_cut_calls"`
			Splits   uint64 `json:"iommu_splits"`
		}
		if err := json.Unmarshal([]byte(out), &d); err != nil || code != exitOK || d.Policy != c.policy || d.Cut != c.cut ||
			(d.CutCalls > 0) != (c.policy == "cut") {
			t.Errorf("%v --json: exit %d, %v, %+v", c.args, code, err, d)
		}
	}
}

// TestDemoVFIOReport: the report of a real IOMMU says its policy and
// whether its space cut, and if not why (the real path runs in the rig:
// scripts/rig --demo).
func TestDemoVFIOReport(t *testing.T) {
	yes, no := true, false
	for _, c := range []struct {
		rep  demoReport
		want string
	}{
		{demoReport{VFIO: "iommufd", VFIOPolicy: "cut", VFIOCut: &yes, VFIOCutCalls: 20},
			"  VFIO policy   cut (the IOAS cuts: huge pages off, set as its file's compat IOAS)\n"},
		{demoReport{VFIO: "iommufd", VFIOPolicy: "extent", VFIOCut: &no, VFIOCutReason: "large IOMMU pages kept (SpaceOptions.HugePages)"},
			"  VFIO policy   extent (the IOAS does not cut: large IOMMU pages kept (SpaceOptions.HugePages))\n"},
		{demoReport{VFIO: "type1", VFIOPolicy: "extent", VFIOCut: &no}, "  VFIO policy   extent (type1 never cuts)\n"},
	} {
		c.rep.VFIODevice, c.rep.Mode = "0000:00:03.0", "split"
		var b bytes.Buffer
		writeDemoReport(&b, c.rep)
		if !strings.Contains(b.String(), c.want) || !strings.Contains(b.String(), fmt.Sprintf("%d cut calls", c.rep.VFIOCutCalls)) {
			t.Errorf("report lacks %q:\n%s", c.want, b.String())
		}
		j, err := json.Marshal(c.rep)
		if err != nil || !strings.Contains(string(j), fmt.Sprintf(`"vfio_cut":%v`, *c.rep.VFIOCut)) || !strings.Contains(string(j), `"vfio_policy":"`+c.rep.VFIOPolicy+`"`) {
			t.Errorf("JSON %s, %v", j, err)
		}
	}
	if j, _ := json.Marshal(demoReport{}); strings.Contains(string(j), "vfio") {
		t.Errorf("without --vfio the JSON has VFIO fields: %s", j)
	}
}

// TestDemoVFIOWithoutKVM: a real IOMMU needs a guest, so without KVM the
// demo refuses --vfio as a usage error and says how to see the real thing.
func TestDemoVFIOWithoutKVM(t *testing.T) {
	code, _, errOut := runDemoEnv(demoEnv{kvmPath: "/nonexistent/kvm"}, "--vfio", "type1", "--vfio-device", "0000:00:03.0")
	if code != exitUsage || !strings.Contains(errOut, "--vfio needs KVM") || !strings.Contains(errOut, "scripts/rig --demo") {
		t.Errorf("exit %d, stderr %s", code, errOut)
	}
	code, _, errOut = runDemoEnv(demoEnv{kvmPath: "/nonexistent/kvm"}, "--no-kvm", "--vfio", "type1", "--vfio-device", "0000:00:03.0")
	if code != exitUsage || !strings.Contains(errOut, "not --no-kvm") {
		t.Errorf("--no-kvm --vfio: exit %d, stderr %s", code, errOut)
	}
}

// TestDemoTimeout: a timeout that stops the scenario is said once, and the
// checks it never reached are one line of the report.
func TestDemoTimeout(t *testing.T) {
	code, out, errOut := runDemoEnv(demoEnv{kvmPath: "/nonexistent/kvm"}, "--no-kvm", "--quiet", "--timeout", "1ns")
	if code != exitFail {
		t.Fatalf("exit %d, want 1\n%s\n%s", code, out, errOut)
	}
	all := out + errOut
	if n := strings.Count(all, "--timeout 1ns reached"); n != 1 || strings.Contains(all, "deadline exceeded") {
		t.Errorf("the timeout said %d times:\n%s", n, all)
	}
	if n := strings.Count(out, "not reported"); n != 1 || !strings.Contains(out, "checks not reported before it stopped") {
		t.Errorf("%d lines of unreported checks:\n%s", n, out)
	}
	code, out, errOut = runDemoEnv(demoEnv{kvmPath: "/nonexistent/kvm"}, "--no-kvm", "--quiet", "--json", "--timeout", "1ns")
	var d struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &d); err != nil || code != exitFail || d.Error != "--timeout 1ns reached before the scenario finished" || strings.Count(errOut, "\n") != 1 {
		t.Errorf("--json: exit %d, %v, error %q, stderr %q", code, err, d.Error, errOut)
	}
}

// TestDemoKVM runs gmem demo on real KVM in both modes.
func TestDemoKVM(t *testing.T) {
	haveKVM(t)
	want := len(vmm.Builtin(2).Checks())
	for _, mode := range []string{"inplace", "split"} {
		t.Run(mode, func(t *testing.T) {
			code, out, errOut := runDemoEnv(realKVM, "--json", "--mode", mode)
			if code != exitOK {
				t.Fatalf("exit %d\nstdout %s\nstderr %s", code, out, errOut)
			}
			d := decodeDemo(t, out)
			if !d.GuestRan || d.Mode != mode || d.VCPUs != 2 || d.ChecksPassed != want || d.ChecksFailed != 0 || d.Violations != 0 {
				t.Errorf("report %+v", d)
			}
			// The flavour follows the mode and who kept the attributes.
			wantFlavour := map[string]string{
				"inplace/" + string(guestmem.EnforceUserSpace):  "in place on a default VM",
				"inplace/" + string(guestmem.EnforceGuestMemfd): "in place with private memory",
				"split/" + string(guestmem.EnforceUserSpace):    "split on a default VM",
				"split/" + string(guestmem.EnforceKVM):          "split with private memory",
			}[mode+"/"+d.Enforcement]
			if wantFlavour == "" || !strings.HasPrefix(d.Flavour, wantFlavour) {
				t.Errorf("mode %s, enforcement %s: flavour %q, want %q...", mode, d.Enforcement, d.Flavour, wantFlavour)
			}
			if !strings.Contains(errOut, "booting the built-in guest") {
				t.Errorf("no progress line:\n%s", errOut)
			}
		})
	}
	t.Run("human", func(t *testing.T) {
		code, out, errOut := runDemoEnv(realKVM, "--quiet", "--vcpus", "1", "--policy", "granule", "--iommu", "iommufd")
		if code != exitOK || errOut != "" {
			t.Fatalf("exit %d\nstdout %s\nstderr %s", code, out, errOut)
		}
		for _, w := range []string{"guest ran on KVM", "checks ", "0 failed", "conversions ", "DMA ", "blocked by the IOMMU",
			"IOMMU entries peak", "state map", "0 violations", "enforcement   user-space", "flavour       in place on a default VM", "result: PASS"} {
			if !strings.Contains(out, w) {
				t.Errorf("report lacks %q:\n%s", w, out)
			}
		}
	})
}

// TestDemoFailingCheck: one failing check makes the exit status 1 and the
// report name it.
func TestDemoFailingCheck(t *testing.T) {
	s := vmm.Scenario{Programs: []vmm.Program{{Steps: []vmm.Step{
		vmm.Convert("expected to be refused but valid", vmm.BuffersGPA, 4096, memattr.Shared, vmm.ConvStatusEINVAL),
		vmm.Convert("to private", vmm.BuffersGPA, 4096, memattr.Private, vmm.ConvStatusOK),
	}}}}
	env := demoEnv{kvmPath: "/nonexistent/kvm", scenario: &s}
	code, out, errOut := runDemoEnv(env)
	if code != exitFail {
		t.Fatalf("exit %d, want %d\nstdout %s\nstderr %s", code, exitFail, out, errOut)
	}
	if !strings.Contains(out, "result: FAIL") || !strings.Contains(out, "expected to be refused but valid") || !strings.Contains(out, "1 passed, 1 failed") {
		t.Errorf("report:\n%s", out)
	}
	if !strings.Contains(errOut, "FAIL (detail 0x0)") {
		t.Errorf("progress does not show the failure:\n%s", errOut)
	}
	code, out, _ = runDemoEnv(env, "--json")
	if d := decodeDemo(t, out); code != exitFail || d.ChecksFailed != 1 || len(d.FailedChecks) != 1 {
		t.Errorf("json: exit %d, %+v", code, d)
	}
}

// FuzzDemoFlags checks the flag parser: no panic, and what it accepts is
// in range.
func FuzzDemoFlags(f *testing.F) {
	f.Add("--mode\x00split\x00--vcpus\x003")
	f.Add("--json\x00--no-kvm")
	f.Add("--vcpus=-1")
	f.Add("--policy\x00granule\x00--iommu\x00iommufd\x00--timeout\x001ms")
	f.Add("--policy\x00cut\x00--iommu\x00iommufd")
	f.Add("--policy\x00cut\x00--iommufd-huge-pages\x00--iommu\x00iommufd")
	f.Add("--policy=auto\x00--vfio\x00iommufd\x00--vfio-device\x00x\x00--iommufd-huge-pages")
	f.Add("-h")
	f.Fuzz(func(t *testing.T, joined string) {
		args := strings.Split(joined, "\x00")
		fl, _, err := parseDemoFlags(args)
		if err != nil {
			return // a usage error or -h
		}
		if fl.vcpus < 1 || fl.vcpus > vmm.MaxVCPUs || fl.timeout <= 0 ||
			(fl.mode != guestmem.InPlace && fl.mode != guestmem.Split) {
			t.Fatalf("accepted %q as %+v", args, fl)
		}
		// Cut only where the model and the real IOMMU can cut; huge
		// pages kept only where there is an iommufd IOAS.
		if (fl.policy == dma.Cut && (!fl.modelCaps().Cut || fl.vfio == "type1")) || (fl.hugePages && fl.rules != iommu.IOMMUFD && fl.vfio != "iommufd") {
			t.Fatalf("accepted %q as %+v", args, fl)
		}
	})
}
