package vmm

import (
	"context"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
)

// runImage is recorded kvm_run contents: struct kvm_run (2352 bytes) and the
// port I/O data page after it, as a vCPU mapping holds them. Offsets are
// written as literal numbers from the uAPI reference so that a wrong
// constant in the code under test shows up.
type runImage []byte

const runMapSize = 3 * 4096

func newRun(reason uint32) runImage {
	b := make(runImage, runMapSize)
	binary.LittleEndian.PutUint32(b[8:], reason)
	return b
}

func (b runImage) u8(off int, v uint8) runImage { b[off] = v; return b }
func (b runImage) u16(off int, v uint16) runImage {
	binary.LittleEndian.PutUint16(b[off:], v)
	return b
}
func (b runImage) u32(off int, v uint32) runImage {
	binary.LittleEndian.PutUint32(b[off:], v)
	return b
}
func (b runImage) u64(off int, v uint64) runImage {
	binary.LittleEndian.PutUint64(b[off:], v)
	return b
}

// hypercallRun is KVM_EXIT_HYPERCALL (3): nr @32, args @40.., ret @88
// (preset to 0 as kernels since 6.14 do), flags @96 (bit 0: long mode).
func hypercallRun(nr, gpa, pages, attrs uint64) runImage {
	return newRun(3).u64(32, nr).u64(40, gpa).u64(48, pages).u64(56, attrs).u64(96, 1)
}

func hypercallRet(b runImage) uint64 { return binary.LittleEndian.Uint64(b[88:]) }

// faultRun is KVM_EXIT_MEMORY_FAULT (39): flags @32 (bit 3: private), gpa
// @40, size @48. KVM_RUN fails with EFAULT alongside it.
func faultRun(flags, gpa, size uint64) runImage {
	return newRun(39).u64(32, flags).u64(40, gpa).u64(48, size)
}

// ioRun is KVM_EXIT_IO (2): direction @32 (1 out), size @33, port @34,
// count @36, data_offset @40; the data at offset 4096.
func ioRun(out bool, size uint8, port uint16, count uint32, data ...byte) runImage {
	dir := uint8(0)
	if out {
		dir = 1
	}
	b := newRun(2).u8(32, dir).u8(33, size).u16(34, port).u32(36, count).u64(40, 4096)
	copy(b[4096:], data)
	return b
}

// testMachine is a Machine over memfd-backed memory (no KVM needed), with
// the conversion events recorded.
type testMachine struct {
	*Machine
	events []ConversionEvent
}

func newTestMachine(t testing.TB, mode guestmem.Mode, s Scenario, inject func(guestmem.Fault) error) *testMachine {
	t.Helper()
	cfg := memoryConfig(mode)
	cfg.Inject = inject
	mem, err := guestmem.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tm := &testMachine{}
	m, err := NewMachine(MachineConfig{
		Memory: mem, Scenario: s, MaxFaultRepeats: 3,
		OnConversion: func(e ConversionEvent) { tm.events = append(tm.events, e) },
	})
	if err != nil {
		t.Fatal(err)
	}
	tm.Machine = m
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Error(err)
		}
		if err := mem.Close(); err != nil {
			t.Error(err)
		}
	})
	return tm
}

// state is what a refused request must leave as it was.
type machineState struct {
	Runs     [][]guestmem.StateRun
	Recorded [][]guestmem.StateRun
	Mappings []iommu.Mapping
}

func (tm *testMachine) state() machineState {
	var s machineState
	for _, b := range tm.Memory().Blocks() {
		s.Runs = append(s.Runs, b.StateRuns())
		s.Recorded = append(s.Recorded, b.RecordedRuns())
	}
	s.Mappings = tm.IOMMU().Mappings()
	return s
}

func (tm *testMachine) shared(gpa uint64) bool {
	b := tm.Memory().Block(gpa)
	return b != nil && b.Attributes().Get(gpa-b.GPA()) == memattr.Shared
}

const (
	flagPrivate = 1 << 3   // KVM_MEMORY_EXIT_FLAG_PRIVATE
	attrPrivate = 1 << 4   // KVM_MAP_GPA_RANGE_ENCRYPTED
	hcMapGPA    = 12       // KVM_HC_MAP_GPA_RANGE
	buf         = 0x200000 // a GPA in ram0 the tests convert
)

// TestHandleExitHypercall feeds recorded KVM_HC_MAP_GPA_RANGE exits: good
// requests are executed and answered 0, bad ones EINVAL with nothing
// changed, failures of the executor EAGAIN or EINVAL; the vCPU always
// continues.
func TestHandleExitHypercall(t *testing.T) {
	for _, mode := range []guestmem.Mode{guestmem.InPlace, guestmem.Split} {
		t.Run(mode.String(), func(t *testing.T) {
			var failNext error
			tm := newTestMachine(t, mode, Builtin(1), nil)
			tm.IOMMU().SetFault(func(c iommu.Call) error {
				err := failNext
				failNext = nil
				return err
			})
			for _, c := range []struct {
				name    string
				run     runImage
				ret     uint64
				changes bool
				shared  []uint64 // pages that must be shared afterwards
				private []uint64
				fail    error // the IOMMU's next call fails with it
			}{
				{name: "to shared", run: hypercallRun(hcMapGPA, buf, 4, 0), ret: 0, changes: true,
					shared: []uint64{buf, buf + 3*pg}, private: []uint64{buf + 4*pg}},
				{name: "to private, 2M page size hint", run: hypercallRun(hcMapGPA, buf+pg, 2, attrPrivate|1), ret: 0, changes: true,
					shared: []uint64{buf, buf + 3*pg}, private: []uint64{buf + pg, buf + 2*pg}},
				{name: "spanning ram0 and ram1", run: hypercallRun(hcMapGPA, RAM1GPA-pg, 2, 0), ret: 0, changes: true,
					shared: []uint64{RAM1GPA - pg, RAM1GPA}},
				{name: "same state", run: hypercallRun(hcMapGPA, buf, 1, 0), ret: 0},
				{name: "unaligned gpa", run: hypercallRun(hcMapGPA, buf+0x10, 1, attrPrivate), ret: 22},
				{name: "zero pages", run: hypercallRun(hcMapGPA, buf, 0, 0), ret: 22},
				{name: "unknown attribute bit", run: hypercallRun(hcMapGPA, buf, 1, attrPrivate|1<<5), ret: 22},
				{name: "page size 3", run: hypercallRun(hcMapGPA, buf, 1, 3), ret: 22},
				{name: "wraps", run: hypercallRun(hcMapGPA, 1<<64-pg, 2, 0), ret: 22},
				{name: "page count overflows", run: hypercallRun(hcMapGPA, 0, 1<<52, 0), ret: 22},
				{name: "beyond the address space", run: hypercallRun(hcMapGPA, MaxGPA, 1, 0), ret: 22},
				{name: "MMIO to private", run: hypercallRun(hcMapGPA, HoleGPA, 1, attrPrivate), ret: 22},
				{name: "RAM into MMIO to private", run: hypercallRun(hcMapGPA, HoleGPA-pg, 2, attrPrivate), ret: 22},
				{name: "MMIO to shared ignored", run: hypercallRun(hcMapGPA, HoleGPA, 4, 0), ret: 0},
				{name: "IOMMU out of entries", run: hypercallRun(hcMapGPA, buf+8*pg, 1, 0), ret: 11, fail: unix.ENOSPC},
				{name: "IOMMU refuses", run: hypercallRun(hcMapGPA, buf+8*pg, 1, 0), ret: 22, fail: unix.EINVAL},
				{name: "after the failures", run: hypercallRun(hcMapGPA, buf+8*pg, 1, 0), ret: 0, changes: true,
					shared: []uint64{buf + 8*pg}},
				{name: "other hypercall", run: hypercallRun(1, buf, 1, 0), ret: kvm.HypercallRetENOSYS},
			} {
				before := tm.state()
				failNext = c.fail
				act, err := tm.HandleRun(0, c.run, nil)
				if act != Continue || err != nil {
					t.Fatalf("%s: %v, %v; the vCPU must continue", c.name, act, err)
				}
				if got := hypercallRet(c.run); got != c.ret {
					t.Errorf("%s: ret %d, want %d", c.name, got, c.ret)
				}
				if d := cmp.Diff(before, tm.state()); (d != "") != c.changes {
					t.Errorf("%s: changed %v, want %v:\n%s", c.name, d != "", c.changes, d)
				}
				for _, p := range c.shared {
					if !tm.shared(p) {
						t.Errorf("%s: page %#x not shared", c.name, p)
					}
				}
				for _, p := range c.private {
					if tm.shared(p) {
						t.Errorf("%s: page %#x not private", c.name, p)
					}
				}
			}
			st := tm.Stats()
			if st.Violations != 0 || st.Hypercalls != 18 || st.HypercallRequests != 17 ||
				st.AnsweredOK != 6 || st.AnsweredEAGAIN != 1 || st.AnsweredEINVAL != 10 || st.Rejected != 9 || st.Failed != 2 {
				t.Errorf("stats %+v", st)
			}
			if len(tm.events) != 17 || tm.events[0].Source != SourceHypercall {
				t.Errorf("%d conversion events", len(tm.events))
			}
			// The executor's time is reported for requests that reached it,
			// none for those refused while decoding the hypercall.
			for _, e := range tm.events {
				var bad *kvm.MapGPARangeError
				if reached := !errors.As(e.Err, &bad); reached != (e.Took > 0) {
					t.Errorf("event %+v: took %v", e.Request, e.Took)
				}
			}
		})
	}
}

// TestHandleExitMemoryFault feeds recorded KVM_EXIT_MEMORY_FAULT exits:
// implicit conversions in the direction of the access; bad contents are
// refused and the vCPU continues, unless the same failing fault repeats.
func TestHandleExitMemoryFault(t *testing.T) {
	tm := newTestMachine(t, guestmem.Split, Builtin(1), nil)
	for _, c := range []struct {
		name    string
		run     runImage
		runErr  error
		changes bool
		ret     uint64
	}{
		{name: "shared access", run: faultRun(0, buf, 2*pg), runErr: unix.EFAULT, changes: true},
		{name: "private access", run: faultRun(flagPrivate, buf, pg), runErr: unix.EFAULT, changes: true},
		{name: "hwpoison errno", run: faultRun(0, buf+4*pg, pg), runErr: unix.EHWPOISON, changes: true},
		{name: "unaligned gpa", run: faultRun(0, buf+1, pg), runErr: unix.EFAULT, ret: 22},
		{name: "unaligned size", run: faultRun(0, buf, 100), runErr: unix.EFAULT, ret: 22},
		{name: "zero size", run: faultRun(0, buf, 0), runErr: unix.EFAULT, ret: 22},
		{name: "unknown flag bits", run: faultRun(1<<5, buf, pg), runErr: unix.EFAULT, ret: 22},
		{name: "wraps", run: faultRun(0, 1<<64-pg, 2*pg), runErr: unix.EFAULT, ret: 22},
		{name: "private MMIO", run: faultRun(flagPrivate, HoleGPA, pg), runErr: unix.EFAULT, ret: 22},
	} {
		before := tm.state()
		n := len(tm.events)
		act, err := tm.HandleRun(0, c.run, c.runErr)
		if act != Continue || err != nil {
			t.Fatalf("%s: %v, %v; the vCPU must continue", c.name, act, err)
		}
		if d := cmp.Diff(before, tm.state()); (d != "") != c.changes {
			t.Errorf("%s: changed %v, want %v:\n%s", c.name, d != "", c.changes, d)
		}
		if len(tm.events) != n+1 {
			t.Fatalf("%s: %d events, want one", c.name, len(tm.events)-n)
		}
		if e := tm.events[n]; e.Ret != c.ret || e.Source != SourceMemoryFault {
			t.Errorf("%s: event %+v, want answer %d", c.name, e, c.ret)
		}
	}
	if !tm.shared(buf+pg) || tm.shared(buf) || !tm.shared(buf+4*pg) {
		t.Error("memory faults did not convert in the access's direction")
	}
	// The same bad fault again and again: stopped at the third time in a
	// row (a good one first ends the run of the table's last case).
	if act, _ := tm.HandleRun(0, faultRun(0, buf+6*pg, pg), unix.EFAULT); act != Continue {
		t.Fatal("good fault did not continue")
	}
	for i := 1; i <= 3; i++ {
		act, err := tm.HandleRun(0, faultRun(flagPrivate, HoleGPA, pg), unix.EFAULT)
		want := Continue
		if i == 3 {
			want = Stop
		}
		if act != want || (err != nil) != (want == Stop) {
			t.Fatalf("repeat %d: %v, %v", i, act, err)
		}
	}
	// A success in between resets the count.
	for i := range 4 {
		if act, _ := tm.HandleRun(0, faultRun(0, buf+8*pg, pg), unix.EFAULT); act != Continue {
			t.Fatal("good fault did not continue")
		}
		if act, _ := tm.HandleRun(0, faultRun(flagPrivate, HoleGPA, pg), unix.EFAULT); act != Continue {
			t.Fatalf("bad fault %d after a good one stopped the vCPU", i)
		}
	}
	// KVM_RUN failing with another errno is not a memory fault.
	if act, err := tm.HandleRun(0, faultRun(0, buf, pg), unix.EINVAL); act != Stop || !errors.Is(err, unix.EINVAL) {
		t.Errorf("EINVAL from KVM_RUN: %v, %v", act, err)
	}
	if st := tm.Stats(); st.Violations != 0 {
		t.Errorf("%d violations", st.Violations)
	}
}

// TestHandleExitOther covers the exits that are not conversion requests.
func TestHandleExitOther(t *testing.T) {
	tm := newTestMachine(t, guestmem.InPlace, Builtin(2), nil)
	put := func(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
	// vCPU 0 converts through its port. String I/O writes each element
	// to the same port: the last one stays in the register.
	steps := []runImage{
		ioRun(true, 4, convPort(0, ConvGPALo), 2, append(put(0xdead000), put(buf)...)...),
		ioRun(true, 4, convPort(0, ConvGPAHi), 1, put(0)...),
		ioRun(true, 4, convPort(0, ConvSizeLo), 1, put(pg)...),
		ioRun(true, 4, convPort(0, ConvAttr), 1, put(ConvToShared)...),
		ioRun(true, 4, convPort(0, ConvDoorbell), 1, put(1)...),
	}
	for _, r := range steps {
		if act, err := tm.HandleRun(0, r, nil); act != Continue || err != nil {
			t.Fatalf("%v, %v", act, err)
		}
	}
	if !tm.shared(buf) {
		t.Fatal("port conversion did not happen")
	}
	in := ioRun(false, 4, convPort(0, ConvStatus), 1)
	tm.HandleRun(0, in, nil)
	if got := binary.LittleEndian.Uint32(in[4096:]); got != ConvStatusOK {
		t.Errorf("status %#x", got)
	}
	// vCPU 1 cannot reach vCPU 0's bank: reads as all ones.
	in = ioRun(false, 4, convPort(0, ConvStatus), 1)
	tm.HandleRun(1, in, nil)
	if got := binary.LittleEndian.Uint32(in[4096:]); got != 0xFFFF_FFFF {
		t.Errorf("vCPU 1 read vCPU 0's status: %#x", got)
	}
	// A byte read of a register: all ones, one byte.
	in = ioRun(false, 1, convPort(0, ConvStatus), 1)
	in[4097] = 0x55
	tm.HandleRun(0, in, nil)
	if in[4096] != 0xFF || in[4097] != 0x55 {
		t.Errorf("byte read wrote % x", in[4096:4098])
	}
	// MMIO read: all ones.
	mmio := newRun(6).u64(32, HoleGPA).u32(48, 4).u8(52, 0)
	if act, _ := tm.HandleRun(0, mmio, nil); act != Continue || binary.LittleEndian.Uint32(mmio[40:]) != 0xFFFF_FFFF {
		t.Errorf("MMIO read: %v % x", act, mmio[40:44])
	}
	for _, c := range []struct {
		name   string
		run    runImage
		runErr error
		want   Action
	}{
		{"hlt", newRun(5), nil, Halt},
		{"shutdown", newRun(8), nil, Stop},
		{"internal error", newRun(17), nil, Stop},
		{"fail entry", newRun(9), nil, Stop},
		{"interrupted", newRun(0), unix.EINTR, Continue},
		{"exit reason 1000", newRun(1000), nil, Stop},
		{"too short", runImage(make([]byte, 100)), nil, Stop},
		{"bad io size", ioRun(true, 3, ConsolePort, 1), nil, Stop},
	} {
		act, err := tm.HandleRun(0, c.run, c.runErr)
		if act != c.want || (err != nil) != (c.want == Stop) {
			t.Errorf("%s: %v, %v, want %v", c.name, act, err, c.want)
		}
	}
	if act, err := tm.HandleRun(5, newRun(5), nil); act != Stop || err == nil {
		t.Errorf("unknown vCPU: %v, %v", act, err)
	}
	if st := tm.Stats(); st.UnknownIO != 2 || st.PortRequests != 1 || st.MMIOExits != 1 {
		t.Errorf("stats %+v", st)
	}
}

// TestConsole checks how result words are matched with checks.
func TestConsole(t *testing.T) {
	s := Scenario{Programs: []Program{
		{Steps: []Step{Convert("a", buf, pg, memattr.Shared, 0), Fill(buf, 8, 1), Verify("b", buf, 8, 1)}},
		{Steps: []Step{DMAToRAM("c", buf, 8, 0)}},
	}}
	var got []CheckResult
	tm := newTestMachine(t, guestmem.InPlace, s, nil)
	tm.onCheck = func(r CheckResult) { got = append(got, r) }
	tm.PortOut(0, ConsolePort, 4, ResultWord(0, true, 0))
	tm.PortOut(0, ConsolePort, 4, ResultWord(1, false, 5))
	tm.PortOut(0, ConsolePort, 4, ResultWord(1, true, 0))  // twice
	tm.PortOut(1, ConsolePort, 4, ResultWord(0, true, 0))  // not vCPU 1's
	tm.PortOut(0, ConsolePort, 4, ResultWord(99, true, 0)) // no such check
	tm.PortOut(0, ConsolePort, 4, ResultDone)
	want := []CheckResult{
		{Check: Check{ID: 0, CPU: 0, Name: "a"}, Passed: true},
		{Check: Check{ID: 1, CPU: 0, Name: "b"}, Passed: false, Detail: 5},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("checks (-want +got):\n%s", d)
	}
	if d := cmp.Diff(want, tm.Results()); d != "" {
		t.Errorf("results (-want +got):\n%s", d)
	}
	passed, failed := tm.Verdict()
	if passed != 1 || len(failed) != 6 {
		t.Errorf("verdict %d passed, failed %q", passed, failed)
	}
	for _, w := range []string{`"b": failed, detail 0x5`, `"c": not reported`, "reported twice", "for no check of its own", "vCPU 1 did not finish"} {
		if !strings.Contains(strings.Join(failed, "\n"), w) {
			t.Errorf("verdict lacks %q", w)
		}
	}
}

// FuzzHandleRun feeds arbitrary kvm_run contents to the exit handler: it
// must not panic, must answer every hypercall it continues after with 0,
// EINVAL, EAGAIN or -ENOSYS, and must keep the invariants.
func FuzzHandleRun(f *testing.F) {
	f.Add([]byte(hypercallRun(hcMapGPA, buf, 4, 0)[:128]), uint8(0))
	f.Add([]byte(hypercallRun(hcMapGPA, buf+1, 4, attrPrivate)[:128]), uint8(0))
	f.Add([]byte(faultRun(flagPrivate, buf, pg)[:128]), uint8(1))
	f.Add([]byte(faultRun(1<<9, buf, 0)[:128]), uint8(2))
	f.Add([]byte(ioRun(true, 4, convPort(0, ConvDoorbell), 1, 1, 0, 0, 0)[:128]), uint8(0))
	f.Add([]byte(newRun(8)[:64]), uint8(3))
	tm := newTestMachine(f, guestmem.Split, Builtin(1), nil)
	errs := []error{nil, unix.EFAULT, unix.EHWPOISON, unix.EINTR, unix.EINVAL}
	f.Fuzz(func(t *testing.T, head []byte, e uint8) {
		run := newRun(0)
		copy(run, head)
		// Keep any I/O data inside the mapping half of the time.
		if e&0x80 == 0 {
			run.u64(40, 4096)
		}
		runErr := errs[int(e&0x7f)%len(errs)]
		reason := binary.LittleEndian.Uint32(run[8:])
		act, err := tm.HandleRun(0, run, runErr)
		if act == Continue && err != nil {
			t.Fatalf("continue with error %v", err)
		}
		if act == Continue && runErr == nil && reason == 3 {
			switch r := hypercallRet(run); r {
			case 0, 11, 22, kvm.HypercallRetENOSYS:
			default:
				t.Fatalf("hypercall answered %d", r)
			}
		}
		if st := tm.Stats(); st.Violations != 0 {
			t.Fatalf("%d violations", st.Violations)
		}
	})
}

// FuzzPorts drives the devices with arbitrary port writes from two vCPUs:
// no panic, and the invariants hold after every conversion.
func FuzzPorts(f *testing.F) {
	f.Add([]byte{0x00, 0x0c, 0, 0, 0x20, 0, 0x08, 0x0c, 0, 0x10, 0, 0, 0x14, 0x0c, 1, 0, 0, 0})
	f.Add([]byte{0x14, 0x0d, 2, 0, 0, 0, 0x10, 0x0d, 0, 0x10, 0, 0})
	f.Add([]byte{0x00, 0x0e, 0xff, 0xff, 0, 0})
	tm := newTestMachine(f, guestmem.InPlace, Builtin(2), nil)
	f.Fuzz(func(t *testing.T, ops []byte) {
		for len(ops) >= 6 {
			port := binary.LittleEndian.Uint16(ops)
			v := binary.LittleEndian.Uint32(ops[2:])
			cpu := int(port>>15) & 1
			port &= 0x7fff
			// Keep conversions inside RAM most of the time: GPA high = 0.
			if port&^0x1f == ConvPortBase+uint16(cpu)*ConvPortStride && port&0x1f == ConvGPAHi {
				v &= 0xf
			}
			tm.PortOut(cpu, port, 4, v)
			tm.PortIn(cpu, port, 4)
			ops = ops[6:]
		}
		if st := tm.Stats(); st.Violations != 0 {
			t.Fatalf("%d violations", st.Violations)
		}
	})
}

// FuzzCompile checks that every step Validate accepts compiles, and that
// the interpreter runs it without panicking.
func FuzzCompile(f *testing.F) {
	f.Add(uint8(StepConvert), uint64(buf), uint64(pg), uint32(1), uint64(0), uint32(0), uint32(0))
	f.Add(uint8(StepFill), uint64(buf), uint64(64), uint32(0), uint64(7), uint32(0), uint32(0))
	f.Add(uint8(StepVerify), uint64(buf), uint64(64), uint32(0), uint64(7), uint32(0), uint32(0))
	f.Add(uint8(StepDMA), uint64(buf), uint64(pg), uint32(0), uint64(0), uint32(DMACmdToRAM), uint32(2))
	f.Add(uint8(StepDeviceFill), uint64(0), uint64(0), uint32(0), uint64(1<<63), uint32(0), uint32(0))
	f.Add(uint8(StepFill), uint64(1<<64-8), uint64(16), uint32(0), uint64(7), uint32(0), uint32(0))
	f.Add(uint8(StepHost), uint64(0), uint64(0), uint32(0), uint64(9), uint32(0), uint32(0))
	f.Add(uint8(StepTouch), uint64(HoleGPA), uint64(0), uint32(0), ^uint64(0), uint32(0), uint32(0))
	f.Add(uint8(StepConvert), uint64(buf+1), uint64(pg/2), uint32(7), uint64(0), uint32(0), uint32(ConvStatusEINVAL))
	tm := newTestMachine(f, guestmem.Split, Builtin(1), nil)
	f.Fuzz(func(t *testing.T, kind uint8, gpa, size uint64, attr uint32, seed uint64, cmd, want uint32) {
		st := Step{Kind: StepKind(kind), Name: "fuzz", GPA: gpa, Size: size, Attr: attr, Seed: seed, Cmd: cmd, Want: want}
		s := Scenario{Programs: []Program{{Steps: []Step{st}}}}
		if err := s.Validate(); err != nil {
			return
		}
		for _, path := range []RequestPath{ViaPort, ViaHypercall} {
			code, err := CompileFor(s.Programs[0], 0, 0, path)
			if err != nil || len(code) == 0 {
				t.Fatalf("valid step %+v did not compile (path %d): %v", st, path, err)
			}
		}
		if err := Interpret(context.Background(), tm.Machine, 0, s.Programs[0], 0, tm.Memory().Guest()); err != nil {
			t.Fatalf("valid step %+v: %v", st, err)
		}
		if st := tm.Stats(); st.Violations != 0 {
			t.Fatalf("%d violations", st.Violations)
		}
	})
}
