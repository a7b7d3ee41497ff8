package vmm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/internal/kvmtest"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
)

// needKVM skips the test where /dev/kvm cannot be opened or its KVM lacks
// the guest_memfd that memory of the given mode needs.
func needKVM(t *testing.T, mode guestmem.Mode) {
	t.Helper()
	kvmtest.NeedGuestMemfd(t, mode == guestmem.InPlace)
}

var modes = []guestmem.Mode{guestmem.InPlace, guestmem.Split}

// runKVM boots cfg's guest on a VM of the default type and runs it to the
// end. The expectations of these tests are the port path's; the
// SW-protected path (vmmcall, KVM attributes) is TestBuiltinSWProtected's
// and the rig's.
func runKVM(t *testing.T, cfg Config) Report {
	t.Helper()
	needKVM(t, cfg.Mode)
	cfg.DefaultVMType = true
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, rep := boot(ctx, t, cfg)
	return rep
}

// boot makes cfg's VM, closed at the end of the test (Close must
// succeed), and runs its guest to the end.
func boot(ctx context.Context, t *testing.T, cfg Config) (*VM, Report) {
	t.Helper()
	v, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := v.Close(); err != nil {
			t.Error(err)
		}
	})
	rep, err := v.Run(ctx)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	return v, rep
}

// expect derives from a scenario what a correct run reports.
func expect(s Scenario) (conv, rejected, allowed, blocked uint64) {
	for _, p := range s.Programs {
		for _, st := range p.Steps {
			switch {
			case st.Kind == StepConvert && st.Want == ConvStatusOK:
				conv++
			case st.Kind == StepConvert:
				rejected++
			case st.Kind == StepDMA && st.Want == DMAStatusOK:
				allowed++
			case st.Kind == StepDMA && st.Want == DMAStatusBlocked:
				blocked++
			}
		}
	}
	return
}

// checkBuiltinReport checks a run of the built-in scenario on vcpus vCPUs.
func checkBuiltinReport(t *testing.T, rep Report, mode guestmem.Mode, vcpus int, guestRan bool) {
	t.Helper()
	s := Builtin(vcpus)
	conv, rejected, allowed, blocked := expect(s)
	if !rep.OK() {
		t.Errorf("run failed: %d checks failed: %q, %d violations, error %q", rep.ChecksFailed, rep.FailedChecks, rep.Violations, rep.Error)
	}
	want := Report{
		GuestRan: guestRan, Mode: mode.String(), VCPUs: vcpus, Enforcement: string(guestmem.EnforceUserSpace),
		Conversions: conv, ConversionRequests: conv + rejected, Rejected: rejected,
		DMAAllowed: allowed, DMABlocked: blocked, ChecksPassed: len(s.Checks()),
		// The scenario makes everything private again: nothing mapped,
		// one run per block.
		IOMMUEntriesNow: 0, StateRuns: 2,
		// The default IOMMU, a type1 model, with the default policy.
		IOMMURules: "type1", IOMMUPolicy: "extent",
	}
	got := rep
	got.PagesToShared, got.PagesToPrivate, got.Punches = 0, 0, 0
	got.IOMMUEntriesPeak, got.IOMMUSplits = 0, 0
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("report (-want +got):\n%s", d)
	}
	if rep.PagesToShared == 0 || rep.PagesToShared != rep.PagesToPrivate {
		t.Errorf("pages to shared %d, to private %d: want equal and non-zero", rep.PagesToShared, rep.PagesToPrivate)
	}
	if (rep.Punches == 0) != (mode == guestmem.InPlace) {
		t.Errorf("%d punches in %v mode", rep.Punches, mode)
	}
	if rep.IOMMUEntriesPeak == 0 || rep.IOMMUSplits == 0 {
		t.Errorf("peak entries %d, splits %d: the scenario cuts entries", rep.IOMMUEntriesPeak, rep.IOMMUSplits)
	}
}

// TestBuiltinKVM runs the built-in scenario on real KVM in both modes.
func TestBuiltinKVM(t *testing.T) {
	for _, mode := range modes {
		for _, vcpus := range []int{1, 2} {
			t.Run(fmt.Sprintf("%v/%d", mode, vcpus), func(t *testing.T) {
				rep := runKVM(t, Config{Mode: mode, VCPUs: vcpus})
				checkBuiltinReport(t, rep, mode, vcpus, true)
			})
		}
	}
}

// TestOnExit checks that OnExit sees every exit the machine handled, each
// with the time it kept its vCPU out of the guest.
func TestOnExit(t *testing.T) {
	needKVM(t, guestmem.Split)
	var timings []ExitTiming
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	v, _ := boot(ctx, t, Config{Mode: guestmem.Split, VCPUs: 1, DefaultVMType: true, OnExit: func(e ExitTiming) { timings = append(timings, e) }})
	var io, halts uint64
	for _, e := range timings {
		if e.CPU != 0 || e.Handled <= 0 || e.Exit == nil {
			t.Fatalf("exit timing %+v", e)
		}
		switch e.Exit.(type) {
		case kvm.IOExit:
			io++
		case kvm.HLTExit:
			halts++
		}
	}
	if st := v.Machine().Stats(); io == 0 || halts != 1 || io != st.IOExits {
		t.Errorf("%d exit timings: %d port I/O (the machine counts %d), %d halts; want every I/O exit and one halt", len(timings), io, st.IOExits, halts)
	}
}

// TestBuiltinHostDriven runs the built-in scenario with software vCPUs.
func TestBuiltinHostDriven(t *testing.T) {
	for _, mode := range modes {
		for _, vcpus := range []int{1, 3} {
			t.Run(fmt.Sprintf("%v/%d", mode, vcpus), func(t *testing.T) {
				rep, err := RunHostDriven(context.Background(), Config{Mode: mode, VCPUs: vcpus})
				if err != nil {
					t.Fatal(err)
				}
				checkBuiltinReport(t, rep, mode, vcpus, false)
			})
		}
	}
}

// TestPolicyReported: the report says which rules the model IOMMU follows,
// whether it cuts, and the policy its mappers resolved; on an iommufd model
// that cuts the default policy cuts entries in place, with cut calls.
func TestPolicyReported(t *testing.T) {
	for _, c := range []struct {
		caps   iommu.Caps
		policy dma.Policy
		want   string
	}{
		{iommu.Caps{Rules: iommu.Type1v2}, dma.Auto, "extent"},
		{iommu.Caps{Rules: iommu.IOMMUFD}, dma.Auto, "extent"},
		{iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}, dma.Auto, "cut"},
		{iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}, dma.Extent, "extent"},
		{iommu.Caps{Rules: iommu.Type1v2}, dma.Granule, "granule"},
	} {
		rep, err := RunHostDriven(context.Background(), Config{Mode: guestmem.Split, VCPUs: 2, IOMMU: iommu.NewModel(c.caps), Policy: c.policy})
		if err != nil {
			t.Fatal(err)
		}
		if !rep.OK() || rep.IOMMURules != c.caps.Rules.String() || rep.IOMMUCut != c.caps.Cut || rep.IOMMUPolicy != c.want {
			t.Errorf("%+v, %v: ok %v, rules %q, cut %v, policy %q; want %q", c.caps, c.policy, rep.OK(), rep.IOMMURules, rep.IOMMUCut, rep.IOMMUPolicy, c.want)
		}
		if cuts := rep.IOMMUCutCalls > 0; cuts != (c.want == "cut") || (c.want != "granule" && rep.IOMMUSplits == 0) {
			t.Errorf("%+v, %v: %d cut calls, %d splits", c.caps, c.policy, rep.IOMMUCutCalls, rep.IOMMUSplits)
		}
	}
	_, err := RunHostDriven(context.Background(), Config{Mode: guestmem.Split, VCPUs: 1, Policy: dma.Cut})
	if !errors.Is(err, dma.ErrOptions) {
		t.Errorf("cut on the default type1 model: %v, want dma.ErrOptions", err)
	}
}

// TestPeakCountsCuts: a cut in the middle of an entry leaves two, so the
// peak the report gives counts entries made by cuts, not only by maps.
func TestPeakCountsCuts(t *testing.T) {
	s := Scenario{Programs: []Program{{Steps: []Step{
		Convert("share four pages", BuffersGPA, 4*4096, memattr.Shared, ConvStatusOK),
		Convert("a page in the middle back", BuffersGPA+4096, 4096, memattr.Private, ConvStatusOK),
	}}}}
	rep, err := RunHostDriven(context.Background(), Config{Mode: guestmem.Split, Scenario: &s, IOMMU: iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD, Cut: true})})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() || rep.IOMMUPolicy != "cut" || rep.IOMMUCutCalls != 1 || rep.IOMMUEntriesNow != 2 || rep.IOMMUEntriesPeak != 2 {
		t.Errorf("report %+v: want one cut, two entries at the peak and at the end", rep)
	}
}

// portLog records the port accesses of each vCPU.
type portLog struct {
	mu  sync.Mutex
	ops map[int][]string
}

func (l *portLog) record(cpu int, port uint16, out bool, v uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ops == nil {
		l.ops = map[int][]string{}
	}
	dir := "in"
	if out {
		dir = "out"
	}
	l.ops[cpu] = append(l.ops[cpu], fmt.Sprintf("%s %#x %#x", dir, port, v))
}

// TestCompiledMatchesInterpreter: the guest's machine code and the
// interpreter make the same port accesses with the same values, vCPU by
// vCPU, so a host-driven run is the same scenario.
func TestCompiledMatchesInterpreter(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			var guest, host portLog
			runKVM(t, Config{Mode: mode, VCPUs: 2, portTrace: guest.record})
			if _, err := RunHostDriven(context.Background(), Config{Mode: mode, VCPUs: 2, portTrace: host.record}); err != nil {
				t.Fatal(err)
			}
			if len(guest.ops[0]) < 100 || len(guest.ops[1]) < 100 {
				t.Fatalf("too few port accesses: %d, %d", len(guest.ops[0]), len(guest.ops[1]))
			}
			if d := cmp.Diff(host.ops, guest.ops); d != "" {
				t.Errorf("port accesses differ (-interpreter +guest):\n%s", d)
			}
		})
	}
}

// wrongScenario has checks that must fail, each with a known detail.
func wrongScenario() (Scenario, []CheckResult) {
	const p = BuffersGPA
	s := Scenario{Programs: []Program{{Steps: []Step{
		Convert("valid request expected to fail", p, pg, memattr.Shared, ConvStatusEINVAL),
		Convert("invalid request expected to pass", p+1, pg, memattr.Shared, ConvStatusOK),
		DeviceFill(7),
		DMAToRAM("DMA to a shared page expected blocked", p, pg, DMAStatusBlocked),
		Verify("pattern intact before the guest breaks it", p, 64, 7),
		Fill(p+24, 8, 99),
		Verify("pattern broken at qword 3", p, 64, 7),
		DMAToRAM("DMA to a private page expected to pass", p+pg, pg, DMAStatusOK),
	}}}}
	want := []CheckResult{
		{Check: Check{0, 0, "valid request expected to fail"}, Passed: false, Detail: 0},
		{Check: Check{1, 0, "invalid request expected to pass"}, Passed: false, Detail: 22},
		{Check: Check{2, 0, "DMA to a shared page expected blocked"}, Passed: false, Detail: 0},
		{Check: Check{3, 0, "pattern intact before the guest breaks it"}, Passed: true},
		{Check: Check{4, 0, "pattern broken at qword 3"}, Passed: false, Detail: 3},
		{Check: Check{5, 0, "DMA to a private page expected to pass"}, Passed: false, Detail: 2},
	}
	return s, want
}

// TestChecksCanFail: wrong expectations fail, in the guest and in the
// interpreter alike, with the observed value as detail.
func TestChecksCanFail(t *testing.T) {
	s, want := wrongScenario()
	var got []CheckResult
	rep, err := RunHostDriven(context.Background(), Config{Scenario: &s, OnCheck: func(r CheckResult) { got = append(got, r) }})
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("host-driven results (-want +got):\n%s", d)
	}
	if rep.OK() || rep.ChecksFailed != 5 || rep.ChecksPassed != 1 {
		t.Errorf("report %+v", rep)
	}
	t.Run("kvm", func(t *testing.T) {
		got = nil
		rep := runKVM(t, Config{Scenario: &s, OnCheck: func(r CheckResult) { got = append(got, r) }})
		if d := cmp.Diff(want, got); d != "" {
			t.Errorf("guest results (-want +got):\n%s", d)
		}
		if rep.OK() || rep.ChecksFailed != 5 {
			t.Errorf("report %+v", rep)
		}
	})
}

// TestFaultInjectionKVM fails steps of the guest's conversions: the guest
// gets EINVAL or EAGAIN, state, attributes and mappings stay as they were,
// the device still cannot reach the pages (or still can), and the VM runs
// on to convert successfully afterwards.
func TestFaultInjectionKVM(t *testing.T) {
	const p = BuffersGPA + 0x40000
	eio := fmt.Errorf("injected: %w", unix.EIO)
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			// The fault of each conversion, by its index.
			type fault struct {
				backend guestmem.Op // a backend op fails with err
				iommu   iommu.Op    // or an IOMMU op does
				err     error
			}
			plan := map[int]fault{
				0: {backend: guestmem.OpSetAttributes, err: eio},
				1: {iommu: iommu.OpMap, err: unix.ENOSPC},
				3: {iommu: iommu.OpUnmap, err: unix.EBUSY},
				4: {backend: guestmem.OpSetAttributes, err: unix.ENOMEM},
			}
			if mode == guestmem.Split {
				plan[5] = fault{backend: guestmem.OpPunch, err: eio}
			}
			steps := []Step{
				Convert("to shared, attributes fail", p, 2*pg, memattr.Shared, ConvStatusEINVAL),
				DMAToRAM("still private", p, pg, DMAStatusBlocked),
				Convert("to shared, IOMMU full", p, 2*pg, memattr.Shared, ConvStatusEAGAIN),
				DMAToRAM("still private after IOMMU failure", p+pg, pg, DMAStatusBlocked),
				Convert("to shared", p, 2*pg, memattr.Shared, ConvStatusOK),
				DeviceFill(5),
				DMAToRAM("device writes", p, pg, DMAStatusOK),
				Convert("one page to private, IOMMU busy", p+pg, pg, memattr.Private, ConvStatusEAGAIN),
				DMAToRAM("still shared after failed unmap", p+pg, pg, DMAStatusOK),
				Convert("to private, attributes out of memory", p, 2*pg, memattr.Private, ConvStatusEAGAIN),
				DMAToRAM("still shared after failed attributes", p, pg, DMAStatusOK),
				Verify("bytes intact", p, pg, 5),
			}
			if mode == guestmem.Split {
				steps = append(steps,
					Convert("to private, punch fails", p, 2*pg, memattr.Private, ConvStatusEINVAL),
					DMAToRAM("still shared after failed punch", p, pg, DMAStatusOK))
			}
			steps = append(steps,
				Convert("to private", p, 2*pg, memattr.Private, ConvStatusOK),
				DMAToRAM("refused at last", p, pg, DMAStatusBlocked))
			s := Scenario{Programs: []Program{{Steps: steps}}}

			var mu sync.Mutex
			idx := 0
			fired := map[int]bool{}
			shoot := func(be guestmem.Op, io iommu.Op) error {
				mu.Lock()
				defer mu.Unlock()
				f, ok := plan[idx]
				if !ok || fired[idx] || (f.backend != be || f.iommu != io) {
					return nil
				}
				fired[idx] = true
				return f.err
			}
			model := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
			model.SetFault(func(c iommu.Call) error { return shoot(0, c.Op) })
			var v *VM
			var last machineState
			var failures []string
			cfg := Config{
				Mode: mode, Scenario: &s, IOMMU: model, DefaultVMType: true,
				Inject: func(f guestmem.Fault) error { return shoot(f.Op, 0) },
				OnConversion: func(e ConversionEvent) {
					tm := &testMachine{Machine: v.Machine()}
					now := tm.state()
					mu.Lock()
					defer mu.Unlock()
					if e.Err != nil {
						if d := cmp.Diff(last, now); d != "" {
							failures = append(failures, fmt.Sprintf("conversion %d failed but changed state:\n%s", idx, d))
						}
						if !fired[idx] {
							failures = append(failures, fmt.Sprintf("conversion %d failed without a fault: %v", idx, e.Err))
						}
					}
					last = now
					idx++
				},
			}
			needKVM(t, mode)
			var err error
			v, err = New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer v.Close()
			last = (&testMachine{Machine: v.Machine()}).state()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			rep, err := v.Run(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range failures {
				t.Error(f)
			}
			if !rep.OK() {
				t.Errorf("guest checks failed: %q (error %q)", rep.FailedChecks, rep.Error)
			}
			if len(fired) != len(plan) {
				t.Errorf("%d of %d planned faults fired", len(fired), len(plan))
			}
			if rep.Failed != uint64(len(plan)) {
				t.Errorf("report: %d failed conversions, want %d", rep.Failed, len(plan))
			}
		})
	}
}

// TestRunCancel stops a running guest from outside: Run returns the
// context's error and a report marked with it.
func TestRunCancel(t *testing.T) {
	needKVM(t, guestmem.Split)
	var steps []Step
	for range 2000 {
		steps = append(steps, Fill(BuffersGPA, 2*mib, 1))
	}
	s := Scenario{Programs: []Program{{Steps: steps}, {Steps: steps}}}
	v, err := New(Config{Scenario: &s})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	rep, err := v.Run(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("run: %v, want the deadline", err)
	}
	if rep.Error == "" || rep.OK() || !rep.GuestRan {
		t.Errorf("report %+v", rep)
	}
	if _, err := v.Run(context.Background()); err == nil {
		t.Error("a second Run was accepted")
	}
}

func TestScenarioValidate(t *testing.T) {
	good := Step{Kind: StepFill, GPA: BuffersGPA, Size: 8}
	for _, c := range []struct {
		name string
		s    Scenario
	}{
		{"no programs", Scenario{}},
		{"too many programs", Scenario{Programs: make([]Program, MaxVCPUs+1)}},
		{"unknown kind", Scenario{Programs: []Program{{Steps: []Step{{Kind: 99}}}}}},
		{"fill not qwords", Scenario{Programs: []Program{{Steps: []Step{{Kind: StepFill, GPA: BuffersGPA, Size: 7}}}}}},
		{"fill over code", Scenario{Programs: []Program{{Steps: []Step{{Kind: StepFill, GPA: CodeGPA, Size: 8}}}}}},
		{"verify past RAM", Scenario{Programs: []Program{{Steps: []Step{{Kind: StepVerify, GPA: HoleGPA - 8, Size: 16}}}}}},
		{"verify wraps", Scenario{Programs: []Program{{Steps: []Step{{Kind: StepVerify, GPA: 1<<64 - 8, Size: 16}}}}}},
		{"bad DMA command", Scenario{Programs: []Program{{Steps: []Step{{Kind: StepDMA, Cmd: 9}}}}}},
		{"DMA length too big", Scenario{Programs: []Program{{Steps: []Step{{Kind: StepDMA, Cmd: DMACmdToRAM, Size: 1 << 32}}}}}},
	} {
		if err := c.s.Validate(); !errors.Is(err, ErrScenario) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	if err := (Scenario{Programs: []Program{{Steps: []Step{good}}}}).Validate(); err != nil {
		t.Error(err)
	}
	for n := 1; n <= MaxVCPUs; n++ {
		if err := Builtin(n).Validate(); err != nil {
			t.Errorf("Builtin(%d): %v", n, err)
		}
	}
	if _, err := Compile(Program{}, MaxVCPUs, 0); err == nil {
		t.Error("Compile accepted vCPU MaxVCPUs")
	}
}

// TestLoad checks that the largest built-in scenario fits below the stacks.
func TestLoad(t *testing.T) {
	mem, err := guestmem.New(memoryConfig(guestmem.InPlace))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	entries, err := Load(mem.Guest(), Builtin(MaxVCPUs))
	if err != nil {
		t.Fatal(err)
	}
	for i, e := range entries {
		if e < CodeGPA || e >= StacksGPA || e%4096 != 0 || (i > 0 && e <= entries[i-1]) {
			t.Errorf("entry %d at %#x", i, e)
		}
	}
	t.Logf("program entries %#x", entries)
}

func TestResultWord(t *testing.T) {
	for _, c := range []struct {
		id     int
		passed bool
		detail uint32
		want   uint32
	}{
		{0, true, 0, 0},
		{5, true, 0, 5},
		{5, false, 22, 5 | 22<<16 | 1<<31},
		{0xFFFE, false, 0xFFFFF, 0xFFFE | 0x7FFF<<16 | 1<<31},
	} {
		if got := ResultWord(c.id, c.passed, c.detail); got != c.want {
			t.Errorf("ResultWord(%d, %v, %#x) = %#x, want %#x", c.id, c.passed, c.detail, got, c.want)
		}
	}
}
