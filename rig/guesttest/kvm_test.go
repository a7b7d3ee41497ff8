package guesttest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/internal/bench"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/iommufd"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/vfio"
	"github.com/gmemproject/gmem/vmm"
)

// The kvm backend runs gmem on real KVM with private memory: a
// KVM_X86_SW_PROTECTED_VM of the guest kernel's kvm_amd (emulated SVM with
// nested paging), guest_memfd for the private side, a memfd for the shared
// side, the built-in guest asking with vmmcall, and the edu device behind
// real VFIO type1 and iommufd doing DMA into the memfd.

const (
	pg = 4096
	// scratchIOVA is a host page the tests map for the device, outside
	// guest RAM and below edu's 28-bit DMA mask: the device's staging area
	// for bytes it writes to guest memory and reads from it.
	scratchIOVA = 0x0F00_0000
	// eduBytes is the size of one edu transfer in these tests.
	eduBytes = 2048

	seedDevice  = 0xD0D0_0000_0000_0000
	seedGuest   = 0x6E57_0000_0000_0000
	seedPrivate = 0x9121_0000_0000_0000
	seedPlant   = 0x9A47_0000_0000_0000
)

func runKVM(t *testing.T, bdf string) {
	const b = "kvm"
	var sys *kvm.System
	t.Cleanup(func() {
		if sys != nil {
			sys.Close()
		}
	})
	must(t, check(t, b, "vm-types", func(t *testing.T) {
		var err error
		if sys, err = kvm.Open(); err != nil {
			t.Fatalf("%v (the rig's CPU must have SVM with NPT and the kernel KVM_AMD)", err)
		}
		types, err := sys.VMTypes()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) = %#x", types)
		if types&(1<<kvm.VMTypeSWProtected) == 0 {
			t.Fatalf("KVM_CAP_VM_TYPES %#x lacks KVM_X86_SW_PROTECTED_VM", types)
		}
		if ok, err := sys.SupportsVMType(kvm.VMTypeSWProtected); !ok || err != nil {
			t.Errorf("SupportsVMType(SW_PROTECTED) = %v, %v", ok, err)
		}
		// A type KVM does not offer is refused without the ioctl.
		if _, err := sys.CreateVM(13); !errors.Is(err, errors.ErrUnsupported) || !errors.Is(err, unix.EINVAL) {
			t.Errorf("CreateVM(13) = %v, want an UnsupportedError matching EINVAL", err)
		}
	}))

	must(t, check(t, b, "sw-protected-vm", func(t *testing.T) {
		def, err := sys.CreateVM(kvm.VMTypeDefault)
		if err != nil {
			t.Fatal(err)
		}
		defer def.Close()
		vm, err := sys.CreateVM(kvm.VMTypeSWProtected)
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		if vm.Type() != kvm.VMTypeSWProtected {
			t.Errorf("Type() = %d", vm.Type())
		}
		dc, err := def.ProbeCapabilities()
		if err != nil {
			t.Fatal(err)
		}
		c, err := vm.ProbeCapabilities()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("default VM: %+v", dc)
		t.Logf("SW-protected VM: %+v", c)
		if c.MemoryAttributes&kvm.MemoryAttributePrivate == 0 || dc.MemoryAttributes&kvm.MemoryAttributePrivate != 0 {
			t.Errorf("KVM_CAP_MEMORY_ATTRIBUTES: SW-protected %#x, default %#x; want PRIVATE on the first only",
				c.MemoryAttributes, dc.MemoryAttributes)
		}
		if !c.GuestMemfd || !c.UserMemory2 || !c.MemoryFaultInfo {
			t.Errorf("capabilities %+v lack guest_memfd, USER_MEMORY2 or MEMORY_FAULT_INFO", c)
		}
		if c.ExitHypercall&(1<<kvm.HCMapGPARange) == 0 {
			t.Errorf("KVM_CAP_EXIT_HYPERCALL %#x lacks KVM_HC_MAP_GPA_RANGE", c.ExitHypercall)
		}
		if err := vm.EnableExitHypercall(1 << kvm.HCMapGPARange); err != nil {
			t.Errorf("EnableExitHypercall(MAP_GPA_RANGE): %v", err)
		}
		if err := vm.EnableExitHypercall(1 << 40); !errors.Is(err, errors.ErrUnsupported) {
			t.Errorf("EnableExitHypercall(bit 40) = %v, want unsupported", err)
		}
		// guest_memfd, a memslot bound to it, and attributes both ways.
		g, err := vm.CreateGuestMemfd(16*pg, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		if _, err := g.Mmap(0, pg); !errors.Is(err, unix.ENODEV) {
			t.Errorf("mmap of guest_memfd = %v; 6.12 answers ENODEV (why the rig's memory is split)", err)
		}
		shared := memfdShared(t, 16*pg)
		if err := vm.SetUserMemoryRegion2(kvm.UserspaceMemoryRegion2{Slot: 0, Flags: kvm.MemGuestMemfd,
			GuestPhysAddr: 0x100000, MemorySize: 16 * pg, UserspaceAddr: kvm.HostAddr(shared), GuestMemfd: uint32(g.Fd())}); err != nil {
			t.Fatal(err)
		}
		for _, a := range []uint64{kvm.MemoryAttributePrivate, 0} {
			if err := vm.SetMemoryAttributes(kvm.MemoryAttributes{Address: 0x100000, Size: 4 * pg, Attributes: a}); err != nil {
				t.Errorf("KVM_SET_MEMORY_ATTRIBUTES(%#x): %v", a, err)
			}
		}
		if err := vm.SetMemoryAttributes(kvm.MemoryAttributes{Address: 0x100000, Size: pg, Attributes: 1 << 5}); !errors.Is(err, unix.EINVAL) {
			t.Errorf("unknown attribute bit = %v, want EINVAL", err)
		}
		if err := g.Punch(0, 4*pg); err != nil {
			t.Errorf("punch guest_memfd: %v", err)
		}
	}))

	check(t, b, "builtin-guest", func(t *testing.T) { kvmBuiltin(t) })
	check(t, b, "memory-fault", func(t *testing.T) { kvmMemoryFault(t) })

	type backend struct {
		name string
		open func(t *testing.T) (iommu.Space, *Edu, func())
	}
	for _, be := range []backend{
		{"type1", func(t *testing.T) (iommu.Space, *Edu, func()) { return openKVMType1(t, bdf) }},
		{"iommufd", func(t *testing.T) (iommu.Space, *Edu, func()) { return openKVMIOMMUFD(t, bdf) }},
	} {
		check(t, b, "device-dma-"+be.name, func(t *testing.T) {
			sp, edu, done := be.open(t)
			t.Cleanup(done) // after the VM's own cleanups
			kvmDevice(t, sp, edu)
		})
	}
	check(t, b, "device-cut-iommufd", func(t *testing.T) {
		sp, edu, done := openKVMIOMMUFD(t, bdf)
		t.Cleanup(done)
		kvmCut(t, sp, edu)
	})
	check(t, b, "rollback-type1", func(t *testing.T) {
		sp, edu, done := openKVMType1(t, bdf)
		t.Cleanup(done)
		kvmRollback(t, sp, edu)
	})
	check(t, b, "soak", func(t *testing.T) {
		sp, edu, done := openKVMType1(t, bdf)
		t.Cleanup(done)
		kvmSoak(t, sp, edu)
	})
}

// testLogger logs to the test's output.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// qwords returns size bytes of little-endian qwords seed, seed+1, ..., the
// pattern of the scenario's Fill and Verify steps.
func qwords(size int, seed uint64) []byte {
	b := make([]byte, size)
	for q := range size / 8 {
		binary.LittleEndian.PutUint64(b[8*q:], seed+uint64(q))
	}
	return b
}

// kvmBuiltin runs the demo's scenario on a SW-protected VM with 2 vCPUs.
func kvmBuiltin(t *testing.T) {
	s := vmm.BuiltinSharedCode(2)
	v, err := vmm.New(vmm.Config{Mode: guestmem.Split, Scenario: &s, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if e := v.Memory().Enforcement(); e != guestmem.EnforceKVM {
		t.Fatalf("enforcement %q, want %q", e, guestmem.EnforceKVM)
	}
	if v.KVM().Type() != kvm.VMTypeSWProtected || v.RequestPath() != vmm.ViaHypercall {
		t.Fatalf("VM type %d, request path %d: want SW-protected and vmmcall", v.KVM().Type(), v.RequestPath())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	rep, err := v.Run(ctx)
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	st, ms := v.Machine().Stats(), v.Memory().Stats()
	t.Logf("guest ran %v: %d checks passed, %d failed; %d KVM_EXIT_HYPERCALL, %d port requests, "+
		"%d KVM_SET_MEMORY_ATTRIBUTES, %d punches, %d DMA allowed, %d blocked",
		took.Round(time.Millisecond), rep.ChecksPassed, rep.ChecksFailed, st.Hypercalls, st.PortRequests,
		ms.AttributeCalls, ms.Punches, rep.DMAAllowed, rep.DMABlocked)
	if !rep.OK() || rep.ChecksPassed != len(s.Checks()) {
		t.Errorf("report not OK: %d of %d checks passed: %v", rep.ChecksPassed, len(s.Checks()), rep.FailedChecks)
	}
	if !rep.GuestRan || rep.Enforcement != string(guestmem.EnforceKVM) {
		t.Errorf("report: guest_ran %v, enforcement %q", rep.GuestRan, rep.Enforcement)
	}
	if st.Hypercalls == 0 || st.HypercallRequests == 0 || st.PortRequests != 0 {
		t.Errorf("%d hypercall exits (%d requests), %d port requests: want vmmcall only", st.Hypercalls, st.HypercallRequests, st.PortRequests)
	}
	if ms.Punches == 0 || ms.AttributeCalls == 0 || st.Violations != 0 {
		t.Errorf("punches %d, attribute calls %d, violations %d", ms.Punches, ms.AttributeCalls, st.Violations)
	}
}

// kvmMemoryFault provokes a real KVM_EXIT_MEMORY_FAULT: a PRIVATE
// attribute planted in KVM for a page of the MMIO hole, where no
// guest_memfd can back a private access. The guest reads it; KVM_RUN fails
// with EFAULT and exit reason 39, the VMM finds the range is not RAM,
// clears the attribute, and the guest's read goes on as MMIO (all ones).
// A RAM page next to it, private with guest_memfd behind it, raises none.
func kvmMemoryFault(t *testing.T) {
	const p = vmm.BuffersGPA + 0x200000
	s := vmm.Scenario{Programs: []vmm.Program{{Steps: []vmm.Step{
		vmm.Fill(p, 8, seedPrivate+5),
		vmm.Touch("private RAM reads the guest's own qword, no fault", p, seedPrivate+5),
		vmm.Touch("the MMIO hole reads all ones after the memory fault", vmm.HoleGPA, ^uint64(0)),
		vmm.Touch("and again, without a fault", vmm.HoleGPA+8, ^uint64(0)),
	}}}}
	var events []vmm.ConversionEvent
	v, err := vmm.New(vmm.Config{Mode: guestmem.Split, Scenario: &s, Logger: testLogger(t),
		OnConversion: func(e vmm.ConversionEvent) { events = append(events, e) }})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.KVM().SetMemoryAttributes(kvm.MemoryAttributes{Address: vmm.HoleGPA, Size: pg,
		Attributes: kvm.MemoryAttributePrivate}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rep, err := v.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st := v.Machine().Stats()
	t.Logf("%d KVM_EXIT_MEMORY_FAULT, %d stray attributes cleared, %d MMIO exits; events %+v; %d checks passed",
		st.MemoryFaults, st.StrayAttributes, st.MMIOExits, events, rep.ChecksPassed)
	if !rep.OK() || rep.ChecksPassed != 3 {
		t.Errorf("checks: %d passed: %v", rep.ChecksPassed, rep.FailedChecks)
	}
	if st.MemoryFaults != 1 || st.StrayAttributes != 1 || st.MMIOExits < 2 {
		t.Errorf("%d memory faults, %d stray attributes cleared, %d MMIO exits; want 1, 1, 2", st.MemoryFaults, st.StrayAttributes, st.MMIOExits)
	}
	if len(events) != 1 || events[0].Source != vmm.SourceMemoryFault || events[0].Request.GPA != vmm.HoleGPA ||
		events[0].Request.Size != pg || events[0].Request.To != memattr.Private {
		t.Errorf("conversion events %+v, want one private memory fault on the hole page", events)
	}
}

// kvmRig is a SW-protected VM with a real device: the edu device behind a
// real IOMMU space that a second dma.Mapper per block keeps equal to the
// shared pages, mapping the memfds of the shared side.
type kvmRig struct {
	t       *testing.T
	v       *vmm.VM
	att     *guestmem.Attachment
	space   iommu.Space
	edu     *Edu
	scratch []byte
	host    map[uint32]func()
}

// newKVMRig creates the SW-protected split VM for scenario s. inject is
// passed to guestmem.
func newKVMRig(t *testing.T, space iommu.Space, edu *Edu, s vmm.Scenario, inject func(guestmem.Fault) error) *kvmRig {
	t.Helper()
	r := newRigVM(t, guestmem.Split, space, edu, s, inject)
	if r.v.Memory().Enforcement() != guestmem.EnforceKVM || r.v.RequestPath() != vmm.ViaHypercall {
		t.Fatalf("enforcement %q, request path %d: want KVM and vmmcall", r.v.Memory().Enforcement(), r.v.RequestPath())
	}
	return r
}

// newRigVM creates the VM vmm.New picks for memory of mode, running
// scenario s, with the device's space attached and its scratch page mapped.
func newRigVM(t *testing.T, mode guestmem.Mode, space iommu.Space, edu *Edu, s vmm.Scenario, inject func(guestmem.Fault) error) *kvmRig {
	t.Helper()
	r := &kvmRig{t: t, space: space, edu: edu, host: map[uint32]func(){}}
	var err error
	r.v, err = vmm.New(vmm.Config{Mode: mode, Scenario: &s, Logger: testLogger(t), Inject: inject,
		OnHostCall: func(cpu int, id uint32) {
			f, ok := r.host[id]
			if !ok {
				t.Errorf("host call %d has no handler", id)
				return
			}
			f()
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.v.Close(); err != nil {
			t.Errorf("close VM: %v", err)
		}
	})
	r.scratch = mmapShared(t, pg)
	if err := space.Map(scratchIOVA, pg, r.scratch); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := space.Unmap(scratchIOVA, pg); err != nil {
			t.Errorf("unmap scratch: %v", err)
		}
	})
	// The kvm checks spend type1's table to its last entry (rollback-type1);
	// the split reserve that keeps entries back for conversions to private
	// has checks of its own (split_test.go).
	if r.att, err = r.v.Memory().AttachIOMMU(space, dma.Options{Logger: testLogger(t), SplitReserve: dma.NoReserve}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.att.Detach(); err != nil {
			t.Errorf("detach: %v", err)
		}
	})
	return r
}

// run runs the guest and checks that every scenario check passed.
func (r *kvmRig) run() vmm.Report {
	t := r.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	rep, err := r.v.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Errorf("guest checks: %d passed, %d failed: %v", rep.ChecksPassed, rep.ChecksFailed, rep.FailedChecks)
	}
	return rep
}

// backing returns the shared-side memory (the memfd) behind [gpa, gpa+n).
func (r *kvmRig) backing(gpa uint64, n int) []byte {
	b := r.v.Memory().Block(gpa)
	if b == nil {
		r.t.Fatalf("%#x is not guest RAM", gpa)
	}
	off := gpa - b.GPA()
	return b.SharedBacking()[off : off+uint64(n)]
}

// deviceWrite has edu write data at gpa: the bytes go from the scratch
// page into the device's buffer, then from the buffer to IOVA gpa.
func (r *kvmRig) deviceWrite(gpa uint64, data []byte) {
	copy(r.scratch, data)
	if err := r.edu.ToDevice(scratchIOVA, len(data)); err != nil {
		r.t.Error(err)
	}
	if err := r.edu.ToRAM(gpa, len(data)); err != nil {
		r.t.Error(err)
	}
}

// deviceRead has edu read n bytes at gpa and returns them (through the
// device's buffer and the scratch page). A read the IOMMU blocks yields
// zeros.
func (r *kvmRig) deviceRead(gpa uint64, n int) []byte {
	if err := r.edu.ToDevice(gpa, n); err != nil {
		r.t.Error(err)
	}
	clear(r.scratch)
	if err := r.edu.ToRAM(scratchIOVA, n); err != nil {
		r.t.Error(err)
	}
	return bytes.Clone(r.scratch[:n])
}

// avail returns the space's free entries.
func (r *kvmRig) avail() uint64 {
	n, _, err := r.space.Avail()
	if err != nil {
		r.t.Error(err)
	}
	return n
}

// kvmDevice: the guest makes a buffer shared, the device writes it and the
// guest reads the device's bytes; the device reads what the guest wrote;
// the guest makes it private again and writes private bytes: they never
// appear in the memfd, the device's next write is blocked (the memfd and
// the guest's private bytes unchanged) and its next read yields zeros.
// Shared and private once more, the page reads zero: the conversion to
// shared punched its guest_memfd page.
func kvmDevice(t *testing.T, space iommu.Space, edu *Edu) {
	const p = vmm.BuffersGPA + 0x100000
	sh, pr := memattr.Shared, memattr.Private
	steps := append(deviceRoundTrip(p, "P to shared (vmmcall)", "P back to private (vmmcall)"),
		// Attributes alone keep guest_memfd's contents; the punch of the side
		// a conversion leaves frees them.
		vmm.Convert("P to shared again", p, pg, sh, vmm.ConvStatusOK),
		vmm.Convert("P to private again", p, pg, pr, vmm.ConvStatusOK),
		vmm.Touch("private P reads zero: its guest_memfd page was punched", p, 0),
		vmm.Touch("the rest of P too", p+eduBytes, 0),
	)
	s := vmm.Scenario{Programs: []vmm.Program{{Steps: steps}}}
	// Counted, for the cuts: a space that cuts removes pages with Cut.
	cs := &countedSpace{Space: space}
	r := newKVMRig(t, cs, edu, s, nil)
	r.deviceRoundTripHost(p, "memfd")
	r.host[3] = func() {
		if !allZero(r.backing(p, pg)) {
			t.Errorf("the memfd behind private P is not zero: the guest's private bytes or old shared ones are visible")
		}
		if bytes.Contains(r.backing(0, vmm.RAM0Size), qwords(64, seedPrivate+1)) {
			t.Errorf("the guest's private bytes appear in the shared memfd")
		}
		r.deviceWrite(p, qwords(eduBytes, seedDevice+2))
		if !allZero(r.backing(p, pg)) {
			t.Errorf("the device's write to private P reached the memfd")
		}
		if got := r.deviceRead(p, eduBytes); !allZero(got) {
			t.Errorf("the device read private P: %x...", got[:16])
		}
	}
	rep := r.run()
	st := r.att.Stats()
	cuts := uint64(cs.cuts.Load())
	t.Logf("guest: %d checks passed; real IOMMU: %d map calls, %d unmap calls, %d cut calls, %d entries now; punches %d",
		rep.ChecksPassed, st.MapCalls, st.UnmapCalls, cuts, st.Entries, rep.Punches)
	if st.MapCalls == 0 || st.UnmapCalls+cuts == 0 {
		t.Errorf("the real IOMMU saw %d maps and %d unmaps or cuts", st.MapCalls, st.UnmapCalls+cuts)
	}
}

// deviceRoundTrip is how both device scenarios start on page p: P becomes
// shared (toShared), the device writes it (host step 1) and the guest
// reads the device's bytes; the guest writes the second half and the
// device reads it (host step 2); P becomes private (toPrivate), the guest
// fills it (host step 3) and reads its own bytes back, not the device's.
// deviceRoundTripHost is its host side.
func deviceRoundTrip(p uint64, toShared, toPrivate string) []vmm.Step {
	return []vmm.Step{
		vmm.Convert(toShared, p, pg, memattr.Shared, vmm.ConvStatusOK),
		vmm.Host(1),
		vmm.Verify("the guest reads the device's bytes", p, eduBytes, seedDevice+1),
		vmm.Fill(p+eduBytes, eduBytes, seedGuest+1),
		vmm.Host(2),
		vmm.Convert(toPrivate, p, pg, memattr.Private, vmm.ConvStatusOK),
		vmm.Fill(p, eduBytes, seedPrivate+1),
		vmm.Host(3),
		vmm.Verify("private P holds the guest's bytes, not the device's", p, eduBytes, seedPrivate+1),
	}
}

// deviceRoundTripHost sets host steps 1 and 2 of deviceRoundTrip: the
// device's write to shared P must land in the backing (named backing in
// the message) and the device must read the guest's shared bytes.
func (r *kvmRig) deviceRoundTripHost(p uint64, backing string) {
	r.host[1] = func() {
		r.deviceWrite(p, qwords(eduBytes, seedDevice+1))
		if !bytes.Equal(r.backing(p, eduBytes), qwords(eduBytes, seedDevice+1)) {
			r.t.Errorf("the device's write to shared P did not land in the %s", backing)
		}
	}
	r.host[2] = func() {
		if got := r.deviceRead(p+eduBytes, eduBytes); !bytes.Equal(got, qwords(eduBytes, seedGuest+1)) {
			r.t.Errorf("the device did not read the guest's shared bytes")
		}
	}
}

// failNext is the real space with one call made to fail on demand.
type failNext struct {
	iommu.Space
	mapping, unmap atomic.Bool
}

// Map fails once with EIO, without calling the kernel, when armed.
func (f *failNext) Map(iova, size uint64, host []byte) error {
	if f.mapping.CompareAndSwap(true, false) {
		return unix.EIO
	}
	return f.Space.Map(iova, size, host)
}

// Unmap fails once with EIO, without calling the kernel, when armed.
func (f *failNext) Unmap(iova, size uint64) (uint64, error) {
	if f.unmap.CompareAndSwap(true, false) {
		return 0, unix.EIO
	}
	return f.Space.Unmap(iova, size)
}

// kvmRollback: with the type1 budget spent, one conversion to shared too
// many fails and the guest gets EAGAIN; the kernel shows it undone (the
// guest still reads its private bytes, not the ones the host planted in
// the memfd; DMA_AVAIL as before; the device still reaches the old shared
// pages; nothing punched). Then a failure is injected once at each other
// backend step: KVM_SET_MEMORY_ATTRIBUTES, the IOMMU unmap, the IOMMU map,
// the punch.
func kvmRollback(t *testing.T, space iommu.Space, edu *Edu) {
	sp := &failNext{Space: space}
	var failOp atomic.Int32 // a guestmem.Op to fail once
	inject := func(f guestmem.Fault) error {
		if failOp.CompareAndSwap(int32(f.Op), 0) {
			return fmt.Errorf("injected %v failure: %w", f.Op, unix.EIO)
		}
		return nil
	}
	// The VM's own shared memory takes one entry (ram0's code and tables),
	// the scratch page one.
	before, limited, err := space.Avail()
	if err != nil || !limited {
		t.Fatalf("type1 Avail = %d, %v, %v", before, limited, err)
	}
	k := int(before) - 2 // conversions that fit
	if k < 2 {
		t.Fatalf("dma_entry_limit leaves %d entries, need at least 4", before)
	}
	const base = vmm.RAM1GPA
	page := func(i int) uint64 { return base + uint64(i)*2*pg } // never adjacent
	q := page(k)                                                // the one too many
	sh, pr := memattr.Shared, memattr.Private
	ok, again, inval := uint32(vmm.ConvStatusOK), uint32(vmm.ConvStatusEAGAIN), uint32(vmm.ConvStatusEINVAL)
	var st []vmm.Step
	st = append(st, vmm.Fill(q, eduBytes, seedPrivate+3))
	for i := range k {
		st = append(st, vmm.Convert(fmt.Sprintf("page %d to shared", i), page(i), pg, sh, ok))
	}
	st = append(st,
		vmm.Host(10),
		vmm.Convert("one entry too many: EAGAIN", q, pg, sh, again),
		vmm.Host(11),
		vmm.Verify("Q still private: the guest reads its own bytes, not the planted ones", q, eduBytes, seedPrivate+3),
		// Injected failures, each on a budget with room again.
		vmm.Convert("page 0 back to private", page(0), pg, pr, ok),
		vmm.Host(20), // arm KVM_SET_MEMORY_ATTRIBUTES
		vmm.Convert("Q to shared, attributes fail: EINVAL", q, pg, sh, inval),
		vmm.Verify("Q still private after the attribute failure", q, eduBytes, seedPrivate+3),
		vmm.Host(21), // arm the punch of Q's guest_memfd side
		vmm.Convert("Q to shared, punch fails: EINVAL", q, pg, sh, inval),
		vmm.Verify("Q still private after the punch failure", q, eduBytes, seedPrivate+3),
		vmm.Host(22), // check, then arm the IOMMU unmap
		vmm.Convert("page 1 to private, unmap fails: EINVAL", page(1), pg, pr, inval),
		vmm.Host(23), // check, then arm the IOMMU map
		vmm.Convert("Q to shared, map fails: EINVAL", q, pg, sh, inval),
		vmm.Verify("Q still private after the map failure", q, eduBytes, seedPrivate+3),
		vmm.Host(24),
		vmm.Convert("Q to shared at last", q, pg, sh, ok),
		vmm.Verify("shared Q reads the bytes the host planted", q, eduBytes, seedPlant),
	)
	r := newKVMRig(t, sp, edu, vmm.Scenario{Programs: []vmm.Program{{Steps: st}}}, inject)
	if a := r.avail(); a != before-2 {
		t.Fatalf("DMA_AVAIL %d after attaching, want %d", a, before-2)
	}
	var availFull, punches uint64
	r.host[10] = func() {
		availFull, punches = r.avail(), r.v.Memory().Stats().Punches
		if availFull != 0 {
			t.Errorf("DMA_AVAIL %d after %d conversions, want 0", availFull, k)
		}
		copy(r.backing(q, eduBytes), qwords(eduBytes, seedPlant))
	}
	expectUndone := func(what string) {
		if a := r.avail(); a != availFull {
			t.Errorf("%s: DMA_AVAIL %d, before %d", what, a, availFull)
		}
		if n := r.v.Memory().Stats().Punches; n != punches {
			t.Errorf("%s: %d punches, before %d", what, n, punches)
		}
		if !bytes.Equal(r.backing(q, eduBytes), qwords(eduBytes, seedPlant)) {
			t.Errorf("%s: the memfd behind Q changed", what)
		}
	}
	r.host[11] = func() {
		expectUndone("after ENOSPC")
		r.deviceWrite(page(0), qwords(eduBytes, seedDevice+3))
		if !bytes.Equal(r.backing(page(0), eduBytes), qwords(eduBytes, seedDevice+3)) {
			t.Errorf("after ENOSPC the device no longer reaches shared page 0")
		}
	}
	r.host[20] = func() {
		// Page 0 went back to private: one entry free, its memfd page punched.
		availFull++
		punches = r.v.Memory().Stats().Punches
		failOp.Store(int32(guestmem.OpSetAttributes))
	}
	r.host[21] = func() {
		expectUndone("after the attribute failure")
		failOp.Store(int32(guestmem.OpPunch))
	}
	r.host[22] = func() {
		expectUndone("after the punch failure")
		if failOp.Load() != 0 {
			t.Errorf("no punch was attempted")
		}
		sp.unmap.Store(true)
	}
	r.host[23] = func() {
		if sp.unmap.Load() {
			t.Errorf("no unmap was attempted")
		}
		if a := r.avail(); a != availFull {
			t.Errorf("after the unmap failure: DMA_AVAIL %d, before %d", a, availFull)
		}
		r.deviceWrite(page(1), qwords(eduBytes, seedDevice+4))
		if !bytes.Equal(r.backing(page(1), eduBytes), qwords(eduBytes, seedDevice+4)) {
			t.Errorf("after the unmap failure the device no longer reaches page 1")
		}
		sp.mapping.Store(true)
	}
	r.host[24] = func() {
		if sp.mapping.Load() {
			t.Errorf("no map was attempted")
		}
		expectUndone("after the map failure")
	}
	rep := r.run()
	ms := r.v.Memory().Stats()
	t.Logf("type1 budget %d: %d conversions fit, the next answered EAGAIN; guest: %d checks passed; "+
		"executor: %d failed, %d undo failures", before, k, rep.ChecksPassed, ms.Failed, ms.UndoFailures)
	if ms.Failed != 5 || ms.UndoFailures != 0 {
		t.Errorf("%d failed conversions, %d undo failures; want 5 and 0", ms.Failed, ms.UndoFailures)
	}
}

// countedSpace counts the calls gmem makes on a real space. It cuts when
// the space under it does (Caps().Cut is the space's).
type countedSpace struct {
	iommu.Space
	maps, unmaps, cuts atomic.Int64
}

// Map maps and counts.
func (s *countedSpace) Map(iova, size uint64, host []byte) error {
	s.maps.Add(1)
	return s.Space.Map(iova, size, host)
}

// Unmap unmaps and counts.
func (s *countedSpace) Unmap(iova, size uint64) (uint64, error) {
	s.unmaps.Add(1)
	return s.Space.Unmap(iova, size)
}

// Cut cuts and counts; EOPNOTSUPP if the space under it is no Cutter.
func (s *countedSpace) Cut(iova, size uint64) (uint64, error) {
	s.cuts.Add(1)
	c, ok := s.Space.(iommu.Cutter)
	if !ok {
		return 0, unix.EOPNOTSUPP
	}
	return c.Cut(iova, size)
}

// calls is a snapshot of a countedSpace's counts and the mappers' window
// and re-pinned bytes.
type calls struct {
	maps, unmaps, cuts int64
	window, repinned   uint64
}

func (r *kvmRig) calls(s *countedSpace) calls {
	st := r.att.Stats()
	return calls{s.maps.Load(), s.unmaps.Load(), s.cuts.Load(), st.WindowBytes, st.RepinnedBytes}
}

func (c calls) sub(d calls) calls {
	return calls{c.maps - d.maps, c.unmaps - d.unmaps, c.cuts - d.cuts, c.window - d.window, c.repinned - d.repinned}
}

// kvmCut: on an iommufd space that cuts, where dma's default (Auto) is the
// cut policy, the guest makes a 16-page buffer shared (one entry) and then
// one page in its middle private: one cut and nothing else, no unmap, no
// map, window and re-pinned 0. The device reaches the pages on either side
// and not the private one. Then a conversion of another page of the buffer
// fails at the punch, after the cut: the executor undoes it (the page is
// mapped again, nothing unmapped), the guest gets EINVAL, and the device
// reaches that page again.
func kvmCut(t *testing.T, space iommu.Space, edu *Edu) {
	if !space.Caps().Cut {
		if s, ok := space.(*iommufd.Space); ok {
			t.Fatalf("the iommufd space does not cut: %s", s.CutReason())
		}
		t.Fatal("the space does not cut")
	}
	const (
		b     = vmm.RAM1GPA + 0x100000
		pages = 16
		p     = b + 7*pg  // made private
		q     = b + 10*pg // its conversion fails
	)
	sh, pr := memattr.Shared, memattr.Private
	ok, inval := uint32(vmm.ConvStatusOK), uint32(vmm.ConvStatusEINVAL)
	s := vmm.Scenario{Programs: []vmm.Program{{Steps: []vmm.Step{
		vmm.Convert("B to shared", b, pages*pg, sh, ok),
		vmm.Host(1),
		vmm.Convert("page 7 of B to private", p, pg, pr, ok),
		vmm.Host(2),
		vmm.Verify("the guest reads the device's bytes on page 6", p-pg, eduBytes, seedDevice+6),
		vmm.Verify("and on page 8", p+pg, eduBytes, seedDevice+8),
		vmm.Host(3), // arm the punch
		vmm.Convert("page 10 to private, punch fails: EINVAL", q, pg, pr, inval),
		vmm.Host(4),
		vmm.Verify("page 10 is still shared: the guest reads the device's bytes", q, eduBytes, seedDevice+10),
		vmm.Convert("B back to private", b, pages*pg, pr, ok),
	}}}}
	var failOp atomic.Int32
	inject := func(f guestmem.Fault) error {
		if failOp.CompareAndSwap(int32(f.Op), 0) {
			return fmt.Errorf("injected %v failure: %w", f.Op, unix.EIO)
		}
		return nil
	}
	cs := &countedSpace{Space: space}
	r := newKVMRig(t, cs, edu, s, inject)
	policy := r.att.Mappers()[0].Policy()
	if policy != dma.Cut {
		t.Fatalf("dma chose the %v policy on a space that cuts, want cut", policy)
	}
	var before calls
	writes := func(what string, pages ...uint64) {
		t.Helper()
		for _, i := range pages {
			r.deviceWrite(b+i*pg, qwords(eduBytes, seedDevice+i))
			if !bytes.Equal(r.backing(b+i*pg, eduBytes), qwords(eduBytes, seedDevice+i)) {
				t.Errorf("%s: the device's write to shared page %d did not land", what, i)
			}
		}
	}
	r.host[1] = func() {
		writes("shared B", 0, 15)
		before = r.calls(cs)
	}
	r.host[2] = func() {
		d := r.calls(cs).sub(before)
		t.Logf("policy %s: page 7 to private made %d cut, %d unmap and %d map calls; window %d bytes, re-pinned %d",
			policy, d.cuts, d.unmaps, d.maps, d.window, d.repinned)
		if d.cuts != 1 || d.unmaps != 0 || d.maps != 0 || d.window != 0 || d.repinned != 0 {
			t.Errorf("the cut policy made %+v, want one cut and nothing else", d)
		}
		writes("next to private page 7", 0, 6, 8, 15)
		r.deviceWrite(p, qwords(eduBytes, seedDevice+7))
		if !allZero(r.backing(p, pg)) {
			t.Error("the device's write to private page 7 reached the memfd")
		}
		if got := r.deviceRead(p, eduBytes); !allZero(got) {
			t.Errorf("the device read private page 7: %x...", got[:16])
		}
	}
	r.host[3] = func() {
		before = r.calls(cs)
		failOp.Store(int32(guestmem.OpPunch))
	}
	r.host[4] = func() {
		if failOp.Load() != 0 {
			t.Error("no punch was attempted")
		}
		d := r.calls(cs).sub(before)
		t.Logf("policy %s: the failed conversion of page 10 and its undo made %d cut, %d unmap and %d map calls", policy, d.cuts, d.unmaps, d.maps)
		if d.cuts != 1 || d.unmaps != 0 || d.maps == 0 {
			t.Errorf("the cut policy's failed conversion and undo made %+v, want a cut, a map back and no unmap", d)
		}
		writes("after the undone conversion", 9, 10, 11)
	}
	rep := r.run()
	t.Logf("guest: %d checks passed; policy %s", rep.ChecksPassed, policy)
}

// kvmSoak runs rounds of real conversions (vmmcall, KVM attributes, type1
// map and unmap, punches) with device checks between them, each round on a
// new VM, and checks that file descriptors and memory do not grow.
func kvmSoak(t *testing.T, space iommu.Space, edu *Edu) {
	const (
		rounds    = 4
		perRound  = 2500 // conversions
		window    = 64   // pages converted in turn
		dmaEvery  = 625  // conversion pairs between real device checks
		modelDMAs = 50
	)
	base := uint64(vmm.RAM1GPA + 0x100000)
	sh, pr := memattr.Shared, memattr.Private
	var fds []int
	var rss, shmem, heap []uint64
	total, deviceChecks := 0, 0
	timed := &bench.TimedSpace{Space: space}
	var viol uint64
	start := time.Now()
	for round := range rounds {
		var st []vmm.Step
		host := map[uint32]func(*kvmRig){}
		for j := range perRound / 2 {
			p := base + uint64(j%window)*2*pg
			st = append(st, vmm.Convert("to shared", p, 2*pg, sh, vmm.ConvStatusOK))
			if j%(perRound/2/modelDMAs) == 0 {
				seed := seedDevice | uint64(round)<<40 | uint64(j)<<20
				st = append(st, vmm.DeviceFill(seed),
					vmm.DMAToRAM("model device writes shared", p, pg, vmm.DMAStatusOK),
					vmm.Verify("model device's bytes", p, pg, seed))
			}
			if j%dmaEvery == 0 {
				id := uint32(1000 + 2*j)
				seed := seedDevice | 1<<39 | uint64(round)<<40 | uint64(j)<<20
				st = append(st, vmm.Host(id), vmm.Verify("edu's bytes", p, eduBytes, seed))
				host[id] = func(r *kvmRig) {
					r.deviceWrite(p, qwords(eduBytes, seed))
					deviceChecks++
				}
				st = append(st, vmm.Convert("to private", p, 2*pg, pr, vmm.ConvStatusOK), vmm.Host(id+1))
				host[id+1] = func(r *kvmRig) {
					r.deviceWrite(p, qwords(eduBytes, seed+1))
					if !allZero(r.backing(p, 2*pg)) {
						t.Errorf("round %d: edu reached private %#x", round, p)
					}
					deviceChecks++
				}
				continue
			}
			st = append(st, vmm.Convert("to private", p, 2*pg, pr, vmm.ConvStatusOK))
		}
		t.Run(fmt.Sprintf("round-%d", round), func(t *testing.T) {
			r := newKVMRig(t, timed, edu, vmm.Scenario{Programs: []vmm.Program{{Steps: st}}}, nil)
			for id, f := range host {
				r.host[id] = func() { f(r) }
			}
			r.run()
			ms := r.v.Memory().Stats()
			total += int(ms.Conversions)
			viol += r.v.Machine().Stats().Violations
		})
		// Measured with the collector's garbage returned to the kernel, so
		// that what is left is what the rounds kept.
		debug.FreeOSMemory()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fds = append(fds, countFDs(t))
		rss = append(rss, statusKiB(t, "VmRSS"))
		shmem = append(shmem, statusKiB(t, "RssShmem"))
		heap = append(heap, ms.HeapAlloc>>10)
	}
	took := time.Since(start)
	iommuTime := timed.Spent()
	t.Logf("soak: %d real conversions in %d VMs, %d edu checks, %d violations, %v (%v of it in type1 map/unmap ioctls); "+
		"after each round: open fds %v, VmRSS KiB %v, RssShmem KiB %v, Go heap KiB %v",
		total, rounds, deviceChecks, viol, took.Round(time.Millisecond), iommuTime.Round(time.Millisecond), fds, rss, shmem, heap)
	fmt.Printf("GMEM-RIG soak conversions=%d edu_checks=%d violations=%d fds=%v rss_kib=%v shmem_kib=%v heap_kib=%v seconds=%.1f iommu_seconds=%.1f\n",
		total, deviceChecks, viol, fds, rss, shmem, heap, took.Seconds(), iommuTime.Seconds())
	if total < rounds*perRound {
		t.Errorf("%d conversions, want %d", total, rounds*perRound)
	}
	if viol != 0 {
		t.Errorf("%d invariant violations", viol)
	}
	for i := 1; i < len(fds); i++ {
		if fds[i] != fds[0] {
			t.Errorf("open fds grew: %v", fds)
			break
		}
	}
	// The shared side of guest RAM is shmem (memfds): a round that left a
	// VM's memory behind would add to RssShmem. VmRSS is printed but not
	// judged: it also counts the binary's code pages as they are first
	// run, and the runtime's free pages until the kernel takes them.
	if shmem[len(shmem)-1] > shmem[0]+256 {
		t.Errorf("RssShmem grew from %d to %d KiB", shmem[0], shmem[len(shmem)-1])
	}
	if heap[len(heap)-1] > heap[0]+1<<10 {
		t.Errorf("the Go heap grew from %d to %d KiB", heap[0], heap[len(heap)-1])
	}
}

// countFDs counts this process's open file descriptors.
func countFDs(t *testing.T) int {
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// statusKiB reads a kB field of /proc/self/status.
func statusKiB(t *testing.T, field string) uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			var n uint64
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &n)
			return n
		}
	}
	t.Fatalf("no %s in /proc/self/status", field)
	return 0
}

// openKVMType1 opens the edu device through a type1 container.
func openKVMType1(t *testing.T, bdf string) (iommu.Space, *Edu, func()) {
	t.Helper()
	group, err := vfio.IOMMUGroup(bdf)
	if err != nil {
		t.Fatal(err)
	}
	s, err := openType1(bdf, group)
	if err != nil {
		t.Fatal(err)
	}
	return s.sp, s.edu, func() {
		if err := s.close(); err != nil {
			t.Errorf("closing type1: %v", err)
		}
	}
}

// openKVMIOMMUFD opens the edu device through its cdev bound to an
// iommufd IOAS.
func openKVMIOMMUFD(t *testing.T, bdf string) (iommu.Space, *Edu, func()) {
	t.Helper()
	_, sp, edu, done := openIOMMUFDEdu(t, bdf)
	return sp, edu, done
}

// openIOMMUFDEdu opens the edu device through its cdev bound to an iommufd
// IOAS and returns the iommufd too, for the ioctls a Space does not offer.
func openIOMMUFDEdu(t *testing.T, bdf string) (*iommufd.IOMMUFD, *iommufd.Space, *Edu, func()) {
	t.Helper()
	var closers []func() error
	done := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			if err := closers[i](); err != nil {
				t.Errorf("closing iommufd: %v", err)
			}
		}
	}
	fail := func(err error) {
		done()
		t.Fatal(err)
	}
	f, err := iommufd.Open()
	if err != nil {
		t.Fatal(err)
	}
	closers = append(closers, f.Close)
	ioas, err := f.IOASAlloc()
	if err != nil {
		fail(err)
	}
	path, err := vfio.CdevPath(bdf)
	if err != nil {
		fail(err)
	}
	d, err := vfio.OpenCdev(path)
	if err != nil {
		fail(err)
	}
	closers = append(closers, d.Close)
	if _, err := d.BindIOMMUFD(f.Fd()); err != nil {
		fail(err)
	}
	if _, err := d.AttachIOMMUFDPT(ioas); err != nil {
		fail(err)
	}
	sp, err := iommufd.NewSpace(f, ioas)
	if err != nil {
		fail(err)
	}
	edu, err := NewEdu(d)
	if err != nil {
		fail(err)
	}
	closers = append(closers, edu.Close)
	return f, sp, edu, done
}
