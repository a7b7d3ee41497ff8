package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/internal/kvmtest"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
)

// TestCompileHypercall checks the vmmcall encoding of a Convert step: rax
// 12, rbx the GPA, rcx the page count, rdx the attributes, then vmmcall,
// and no conversion-port access.
func TestCompileHypercall(t *testing.T) {
	p := Program{Steps: []Step{Convert("c", 0x123000, 3*pg, memattr.Private, ConvStatusOK)}}
	code, err := CompileFor(p, 0, 0, ViaHypercall)
	if err != nil {
		t.Fatal(err)
	}
	le := func(op []byte, v uint64) []byte { return binary.LittleEndian.AppendUint64(op, v) }
	for _, want := range [][]byte{
		{0xB8, 12, 0, 0, 0},              // mov eax, 12
		le([]byte{0x48, 0xBB}, 0x123000), // mov rbx, gpa
		le([]byte{0x48, 0xB9}, 3),        // mov rcx, pages
		le([]byte{0x48, 0xBA}, 0x10),     // mov rdx, ENCRYPTED
		{0x0F, 0x01, 0xD9},               // vmmcall
	} {
		if !bytes.Contains(code, want) {
			t.Errorf("code lacks % x", want)
		}
	}
	port, err := Compile(p, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(port, []byte{0x0F, 0x01, 0xD9}) {
		t.Error("port code contains vmmcall")
	}
	if _, err := CompileFor(p, 0, 0, RequestPath(7)); !errors.Is(err, ErrScenario) {
		t.Errorf("unknown request path: %v", err)
	}
	// A step that wants EINVAL also accepts KVM's own -KVM_EINVAL.
	inval, err := CompileFor(Program{Steps: []Step{Convert("z", 0, 0, memattr.Shared, ConvStatusEINVAL)}}, 0, 0, ViaHypercall)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(inval, le([]byte{0x48, 0xB9}, kvmEINVAL)) || kvmEINVAL != 1<<64-22 {
		t.Errorf("EINVAL check lacks -KVM_EINVAL (%#x)", kvmEINVAL)
	}
	if hypercallAttrs(ConvToShared) != 0 || hypercallAttrs(ConvToPrivate) != kvm.MapGPARangeEncrypted || hypercallAttrs(7) != 7 {
		t.Error("hypercallAttrs")
	}
}

// TestHostCallAndTouch runs host calls and touches host-driven: the host
// call runs between the steps around it, a touch of RAM reads the guest's
// bytes and one of the MMIO hole all ones.
func TestHostCallAndTouch(t *testing.T) {
	a := uint64(BuffersGPA)
	s := Scenario{Programs: []Program{{Steps: []Step{
		Convert("share", a, pg, memattr.Shared, ConvStatusOK),
		Host(5),
		Touch("fresh shared RAM reads zero", a, 0),
		Touch("hole", HoleGPA, ^uint64(0)),
		Touch("wrong value fails", a, 1),
	}}}}
	var calls []uint32
	rep, err := RunHostDriven(context.Background(), Config{Mode: guestmem.Split, Scenario: &s, OnHostCall: func(cpu int, id uint32) {
		calls = append(calls, id)
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(calls) != 1 || calls[0] != 5 {
		t.Errorf("host calls %v, want [5]", calls)
	}
	if rep.ChecksPassed != 3 || rep.ChecksFailed != 1 {
		t.Errorf("%d passed, %d failed (%v); want 3 and 1", rep.ChecksPassed, rep.ChecksFailed, rep.FailedChecks)
	}
	bad := s
	bad.Programs = []Program{{Steps: []Step{Touch("x", MapSize, 0)}}}
	if err := bad.Validate(); !errors.Is(err, ErrScenario) {
		t.Errorf("touch beyond the mapped memory: %v", err)
	}
	bad.Programs = []Program{{Steps: []Step{Host(1 << 31), {Kind: StepHost, Seed: 1 << 33}}}}
	if err := bad.Validate(); !errors.Is(err, ErrScenario) {
		t.Errorf("host call beyond 32 bits: %v", err)
	}
}

// TestHostCallPlants has a host call plant bytes the guest then reads.
func TestHostCallPlants(t *testing.T) {
	a := uint64(BuffersGPA)
	s := Scenario{Programs: []Program{{Steps: []Step{
		Convert("share", a, pg, memattr.Shared, ConvStatusOK),
		Host(1),
		Touch("planted", a, 0x1122334455667788),
		Verify("planted qwords", a+8, 16, 7),
	}}}}
	var mem *guestmem.Memory
	cfg := Config{Mode: guestmem.Split, Scenario: &s}
	cfg.OnHostCall = func(cpu int, id uint32) {
		b := make([]byte, 24)
		binary.LittleEndian.PutUint64(b, 0x1122334455667788)
		binary.LittleEndian.PutUint64(b[8:], 7)
		binary.LittleEndian.PutUint64(b[16:], 8)
		if _, err := mem.WriteAt(b, int64(a)); err != nil {
			t.Error(err)
		}
	}
	// The machine is run by hand so that the host call can reach the memory.
	m := memoryConfig(guestmem.Split)
	var err error
	if mem, err = guestmem.New(m); err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	mach, err := NewMachine(cfg.machine(mem, s))
	if err != nil {
		t.Fatal(err)
	}
	defer mach.Close()
	if err := Interpret(context.Background(), mach, 0, s.Programs[0], 0, mem.Guest()); err != nil {
		t.Fatal(err)
	}
	if passed, failed := mach.Verdict(); passed != 3 || len(failed) != 0 {
		t.Errorf("%d passed, failed %v", passed, failed)
	}
	if st := mach.Stats(); st.HostCalls != 1 {
		t.Errorf("%d host calls", st.HostCalls)
	}
}

// TestStrayPrivateAttribute feeds a private memory fault on the MMIO hole
// to a machine that can set KVM attributes: it clears the attribute and
// the vCPU continues; without the setter the fault is refused as before.
func TestStrayPrivateAttribute(t *testing.T) {
	s := Builtin(1)
	mem, err := guestmem.New(memoryConfig(guestmem.Split))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	var set []kvm.MemoryAttributes
	fail := false
	m, err := NewMachine(MachineConfig{Memory: mem, Scenario: s, MaxFaultRepeats: 2,
		SetKVMAttributes: func(a kvm.MemoryAttributes) error {
			set = append(set, a)
			if fail {
				return unix.EIO
			}
			return nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	act, err := m.HandleRun(0, faultRun(flagPrivate, HoleGPA, pg), unix.EFAULT)
	if act != Continue || err != nil {
		t.Fatalf("private fault on the hole: %v, %v", act, err)
	}
	if len(set) != 1 || set[0] != (kvm.MemoryAttributes{Address: HoleGPA, Size: pg}) {
		t.Errorf("attributes set %+v", set)
	}
	if st := m.Stats(); st.StrayAttributes != 1 || st.MemoryFaults != 1 {
		t.Errorf("stats %+v", st)
	}
	// A shared fault on the hole and a private one on RAM are not stray.
	if act, _ := m.HandleRun(0, faultRun(0, HoleGPA, pg), unix.EFAULT); act != Continue || len(set) != 1 {
		t.Errorf("shared fault on the hole: %v, %d sets", act, len(set))
	}
	if act, _ := m.HandleRun(0, faultRun(flagPrivate, buf, pg), unix.EFAULT); act != Continue || len(set) != 1 {
		t.Errorf("private fault on RAM: %v, %d sets", act, len(set))
	}
	// A setter that fails: the fault is refused and repeats stop the vCPU.
	fail = true
	m.HandleRun(0, faultRun(flagPrivate, HoleGPA+pg, pg), unix.EFAULT)
	if act, err := m.HandleRun(0, faultRun(flagPrivate, HoleGPA+pg, pg), unix.EFAULT); act != Stop || !errors.Is(err, unix.EIO) {
		t.Errorf("failing setter, repeated: %v, %v", act, err)
	}
}

// TestBuiltinSWProtected runs the built-in scenario on a
// KVM_X86_SW_PROTECTED_VM where the host offers one (the rig's guest
// kernel does): KVM keeps the attributes, the guest asks with vmmcall.
func TestBuiltinSWProtected(t *testing.T) {
	needKVM(t, guestmem.Split)
	ok, err := kvmtest.Open(t).SupportsVMType(kvm.VMTypeSWProtected)
	if err != nil {
		t.Fatal(err)
	}
	if !ok {
		t.Skip("needs KVM_X86_SW_PROTECTED_VM in KVM_CAP_VM_TYPES (scripts/rig runs this path)")
	}
	v, rep := boot(context.Background(), t, Config{Mode: guestmem.Split, VCPUs: 2})
	st := v.Machine().Stats()
	if !rep.OK() || rep.ChecksPassed != len(BuiltinSharedCode(2).Checks()) || rep.Enforcement != string(guestmem.EnforceKVM) {
		t.Errorf("report %+v", rep)
	}
	if v.RequestPath() == ViaHypercall && (st.HypercallRequests == 0 || st.PortRequests != 0) {
		t.Errorf("vmmcall path: %d hypercall requests, %d port requests", st.HypercallRequests, st.PortRequests)
	}
	// The guest's code and tables stay shared: one entry, the rest private.
	if rep.IOMMUEntriesNow != 1 || rep.StateRuns != 3 {
		t.Errorf("entries now %d, state runs %d; want 1 and 3", rep.IOMMUEntriesNow, rep.StateRuns)
	}
}

// TestBuiltinInPlacePrivate runs the built-in scenario in place on a VM
// with private memory where the host converts in place (Linux 7.4's
// per-guest_memfd attributes): the guest_memfd keeps the attributes, a
// conversion to private goes to the kernel only after the device has let
// go, and nothing is punched.
func TestBuiltinInPlacePrivate(t *testing.T) {
	needKVM(t, guestmem.InPlace)
	sup, err := kvmtest.Open(t).ProbeInPlace()
	if err != nil {
		t.Fatal(err)
	}
	if !sup.OK() {
		t.Skipf("needs in-place conversion with private memory (Linux 7.4 with kvm.gmem_in_place_conversion=1 or CONFIG_KVM_VM_MEMORY_ATTRIBUTES=n, and KVM_X86_SW_PROTECTED_VM): %s", sup.Reason)
	}
	_, rep := boot(context.Background(), t, Config{Mode: guestmem.InPlace, VCPUs: 2})
	if !rep.OK() || rep.ChecksPassed != len(BuiltinSharedCode(2).Checks()) || rep.Enforcement != string(guestmem.EnforceGuestMemfd) {
		t.Errorf("report %+v", rep)
	}
	if rep.Punches != 0 {
		t.Errorf("%d punches in place", rep.Punches)
	}
}
