//go:build linux

package guest

import (
	"encoding/binary"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gmemproject/gmem/internal/kvmtest"
	"github.com/gmemproject/gmem/kvm"
)

// Guest memory layout of these tests (guest physical addresses).
const (
	ramSize   = 4 << 20
	tablesGPA = 0x1000
	codeGPA   = 0x10000 // one page of code per vCPU
	dataGPA   = 0x20000
	stackTop  = 0x40000
	mapSize   = 2 << 30  // identity map: RAM, the MMIO hole, a second slot at 1 GiB
	mmioGPA   = 0x800000 // beyond RAM, inside the map: no memslot
	slot1GPA  = 1 << 30
)

// machine is a default VM with ramSize bytes of guest_memfd RAM at GPA 0,
// bound in slot 0 with userspace_addr the mmap of the same file.
type machine struct {
	vm   *kvm.VM
	gmem *kvm.GuestMemfd
	mem  []byte
}

func newMachine(t *testing.T) *machine {
	t.Helper()
	vm, _ := kvmtest.GuestMemfdVM(t, true)
	m := &machine{vm: vm}
	m.gmem, m.mem = m.addRAM(t, 0, 0, ramSize)
	return m
}

// addRAM binds a new MMAP|INIT_SHARED guest_memfd of size bytes at gpa.
func (m *machine) addRAM(t *testing.T, slot uint32, gpa, size uint64) (*kvm.GuestMemfd, []byte) {
	t.Helper()
	g, err := m.vm.CreateGuestMemfd(size, kvm.InPlaceFlags)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := g.Mmap(0, size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		g.Munmap(mem)
		g.Close()
	})
	err = m.vm.SetUserMemoryRegion2(kvm.UserspaceMemoryRegion2{
		Slot: slot, Flags: kvm.MemGuestMemfd, GuestPhysAddr: gpa, MemorySize: size,
		UserspaceAddr: kvm.HostAddr(mem), GuestMemfd: uint32(g.Fd()),
	})
	if err != nil {
		t.Fatal(err)
	}
	return g, mem
}

// boot assembles prog at codeGPA + id pages, writes the long-mode tables
// (shared by all vCPUs) and returns vCPU id ready to run it.
func (m *machine) boot(t *testing.T, id int, prog func(a *Asm)) *kvm.VCPU {
	t.Helper()
	var a Asm
	prog(&a)
	code, err := a.Assemble()
	if err != nil {
		t.Fatal(err)
	}
	entry := uint64(codeGPA + id*0x1000)
	if _, err := (Flat{Mem: m.mem}).WriteAt(code, int64(entry)); err != nil {
		t.Fatal(err)
	}
	b, err := LongMode(Flat{Mem: m.mem}, LongModeConfig{TablesGPA: tablesGPA, MapSize: mapSize,
		Entry: entry, Stack: uint64(stackTop - id*0x1000)})
	if err != nil {
		t.Fatal(err)
	}
	v, err := m.vm.CreateVCPU(id)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	if err := b.Load(v); err != nil {
		t.Fatal(err)
	}
	return v
}

// watchdog bounds how long a test guest may run before the test gives up
// on it; it only stops hung guests and is not a timing assertion.
const watchdog = 20 * time.Second

// run runs v until an exit other than port output or a spurious signal,
// collecting the dword or byte outputs per port. It fails the test if the
// watchdog had to stop the guest.
func run(t *testing.T, v *kvm.VCPU, out map[uint16][]uint32) kvm.Exit {
	t.Helper()
	var fired atomic.Bool
	timer := time.AfterFunc(watchdog, func() {
		fired.Store(true)
		v.Kick()
	})
	defer timer.Stop()
	for {
		ex, err := v.Run()
		if err != nil {
			t.Fatalf("vCPU %d: %v", v.ID(), err)
		}
		switch e := ex.(type) {
		case kvm.IntrExit:
			if fired.Load() {
				regs, _ := v.GetRegs()
				t.Fatalf("vCPU %d still running after %v (rip %#x)", v.ID(), watchdog, regs.RIP)
			}
			continue
		case kvm.IOExit:
			if e.Direction == kvm.IOOut && e.Count == 1 {
				var val uint32
				switch e.Size {
				case 1:
					val = uint32(e.Data[0])
				case 2:
					val = uint32(binary.LittleEndian.Uint16(e.Data))
				case 4:
					val = binary.LittleEndian.Uint32(e.Data)
				}
				out[e.Port] = append(out[e.Port], val)
				continue
			}
		}
		return ex
	}
}

// outQword emits code that sends the 64-bit value in r to port as two
// dwords, low half first. It clobbers rax.
func outQword(a *Asm, port uint8, r Reg) {
	a.Mov(RAX, r)
	a.Out(port, Dword)
	a.Shr(RAX, 32)
	a.Out(port, Dword)
}

func halves(v uint64) []uint32 { return []uint32{uint32(v), uint32(v >> 32)} }

func expectExit[E kvm.Exit](t *testing.T, ex kvm.Exit) E {
	t.Helper()
	e, ok := ex.(E)
	if !ok {
		t.Fatalf("exit %#v, want %T", ex, *new(E))
	}
	return e
}

func checkOut(t *testing.T, out map[uint16][]uint32, port uint16, want []uint32) {
	t.Helper()
	got := out[port]
	if len(got) != len(want) {
		t.Fatalf("port %#x got %#x, want %#x", port, got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("port %#x got %#x, want %#x", port, got, want)
		}
	}
}

// TestGuestWritesAndPunch runs a long-mode guest on guest_memfd memory: it
// writes patterns, reports them by port output and halts; the host checks
// them through the mmap, punches one page out of the guest_memfd, and the
// guest then reads zeros there (and its data on the next page intact), as
// does the host.
func TestGuestWritesAndPunch(t *testing.T) {
	m := newMachine(t)
	const p1, p2, p3 = 0x0123456789abcdef, 0xfeedfacecafebeef, 0x5555aaaa3333cccc
	v := m.boot(t, 0, func(a *Asm) {
		a.MovImm64(RBX, dataGPA)
		a.MovImm64(RCX, p1)
		a.Store(RBX, 0, RCX)
		a.Store(RBX, 0xff8, RCX)
		a.MovImm64(RCX, p2)
		a.Store(RBX, 0x1000, RCX)
		a.Load(RDX, RBX, 0)
		outQword(a, 0x10, RDX)
		a.Hlt()
		// After the punch.
		a.Load(RDX, RBX, 0)
		outQword(a, 0x11, RDX)
		a.Load(RDX, RBX, 0xff8)
		outQword(a, 0x11, RDX)
		a.Load(RDX, RBX, 0x1000)
		outQword(a, 0x12, RDX)
		a.MovImm64(RCX, p3)
		a.Store(RBX, 8, RCX)
		a.Hlt()
	})
	out := map[uint16][]uint32{}
	expectExit[kvm.HLTExit](t, run(t, v, out))
	checkOut(t, out, 0x10, halves(p1))
	le := binary.LittleEndian
	if got := le.Uint64(m.mem[dataGPA:]); got != p1 {
		t.Fatalf("host reads %#x at %#x, want %#x", got, dataGPA, uint64(p1))
	}
	if got := le.Uint64(m.mem[dataGPA+0xff8:]); got != p1 {
		t.Fatalf("host reads %#x at %#x", got, dataGPA+0xff8)
	}
	if got := le.Uint64(m.mem[dataGPA+0x1000:]); got != p2 {
		t.Fatalf("host reads %#x at %#x", got, dataGPA+0x1000)
	}

	if err := m.gmem.Punch(dataGPA, kvm.PageSize); err != nil {
		t.Fatal(err)
	}
	expectExit[kvm.HLTExit](t, run(t, v, out))
	checkOut(t, out, 0x11, []uint32{0, 0, 0, 0})
	checkOut(t, out, 0x12, halves(p2))
	for i := dataGPA; i < dataGPA+kvm.PageSize; i++ {
		want := byte(0)
		if i >= dataGPA+8 && i < dataGPA+16 {
			want = byte(uint64(p3) >> (8 * (i - dataGPA - 8)))
		}
		if m.mem[i] != want {
			t.Fatalf("host reads %#x at %#x after the punch, want %#x", m.mem[i], i, want)
		}
	}
}

// TestGuestInAndMMIO checks both directions of port I/O and MMIO: the
// host's answers to in and to an MMIO read reach the guest, and an MMIO
// write reaches the host with its address and data.
func TestGuestInAndMMIO(t *testing.T) {
	m := newMachine(t)
	v := m.boot(t, 0, func(a *Asm) {
		a.MovImm64(RBX, dataGPA)
		a.In(0x20, Dword)
		a.Store32(RBX, 0, RAX)
		a.MovImm64(RCX, mmioGPA)
		a.Store32(RCX, 4, RAX)
		a.Load32(RDX, RCX, 0x10)
		a.Mov(RAX, RDX)
		a.Out(0x21, Dword)
		a.MovImm32(RDX, 0x1234)
		a.InDX(Byte)
		a.Out(0x22, Byte)
		a.Hlt()
	})
	out := map[uint16][]uint32{}
	io := expectExit[kvm.IOExit](t, run(t, v, out))
	if io.Direction != kvm.IOIn || io.Port != 0x20 || io.Size != 4 || io.Count != 1 {
		t.Fatalf("in exit %+v", io)
	}
	binary.LittleEndian.PutUint32(io.Data, 0xcafebabe)

	w := expectExit[kvm.MMIOExit](t, run(t, v, out))
	if !w.IsWrite || w.PhysAddr != mmioGPA+4 || len(w.Data) != 4 || binary.LittleEndian.Uint32(w.Data) != 0xcafebabe {
		t.Fatalf("mmio write %+v", w)
	}
	r := expectExit[kvm.MMIOExit](t, run(t, v, out))
	if r.IsWrite || r.PhysAddr != mmioGPA+0x10 || len(r.Data) != 4 {
		t.Fatalf("mmio read %+v", r)
	}
	binary.LittleEndian.PutUint32(r.Data, 0x11223344)

	io = expectExit[kvm.IOExit](t, run(t, v, out))
	if io.Direction != kvm.IOIn || io.Port != 0x1234 || io.Size != 1 {
		t.Fatalf("in al, dx exit %+v", io)
	}
	io.Data[0] = 0x7e
	expectExit[kvm.HLTExit](t, run(t, v, out))
	checkOut(t, out, 0x21, []uint32{0x11223344})
	checkOut(t, out, 0x22, []uint32{0x7e})
	if got := binary.LittleEndian.Uint32(m.mem[dataGPA:]); got != 0xcafebabe {
		t.Errorf("guest stored %#x from in, want 0xcafebabe", got)
	}
}

// TestTwoVCPUs runs two vCPUs at once, each on its own code, stack and data
// page, each counting in a loop.
func TestTwoVCPUs(t *testing.T) {
	m := newMachine(t)
	const iters = 100000
	vs := make([]*kvm.VCPU, 2)
	for id := range vs {
		vs[id] = m.boot(t, id, func(a *Asm) {
			a.MovImm64(RBX, uint64(dataGPA+id*0x1000))
			a.MovImm64(RCX, iters)
			a.Xor(RDX, RDX)
			top := a.NewLabel()
			a.Bind(top)
			a.Inc(RDX)
			a.Store(RBX, 0, RDX)
			a.Loop(RCX, top)
			a.Load(RAX, RBX, 0)
			a.AddImm(RAX, int32(id)<<24)
			a.Out(uint8(0x30+id), Dword)
			a.Hlt()
		})
	}
	outs := make([]map[uint16][]uint32, len(vs))
	exits := make([]kvm.Exit, len(vs))
	errs := make([]error, len(vs))
	// t.Fatal must run on the test goroutine, so the vCPU goroutines only
	// collect.
	var wg sync.WaitGroup
	for id, v := range vs {
		outs[id] = map[uint16][]uint32{}
		wg.Go(func() {
			for {
				ex, err := v.Run()
				if err != nil {
					errs[id] = err
					return
				}
				if io, ok := ex.(kvm.IOExit); ok && io.Direction == kvm.IOOut && io.Size == 4 {
					outs[id][io.Port] = append(outs[id][io.Port], binary.LittleEndian.Uint32(io.Data))
					continue
				}
				if _, ok := ex.(kvm.IntrExit); ok {
					continue
				}
				exits[id] = ex
				return
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(watchdog):
		for _, v := range vs {
			v.Kick()
		}
		<-done
		t.Fatalf("vCPUs still running after %v", watchdog)
	}
	for id := range vs {
		if errs[id] != nil {
			t.Fatalf("vCPU %d: %v", id, errs[id])
		}
		expectExit[kvm.HLTExit](t, exits[id])
		checkOut(t, outs[id], uint16(0x30+id), []uint32{uint32(id)<<24 + iters})
		if got := binary.LittleEndian.Uint64(m.mem[dataGPA+id*0x1000:]); got != iters {
			t.Errorf("vCPU %d counter %d, want %d", id, got, iters)
		}
	}
}

// TestTwoMemslots gives the guest a second guest_memfd at 1 GiB in slot 1
// and checks that writes land in the right file and a punch in the second
// file reaches the guest.
func TestTwoMemslots(t *testing.T) {
	m := newMachine(t)
	g1, mem1 := m.addRAM(t, 1, slot1GPA, 2<<20)
	const p0, p1 = 0x1111222233334444, 0x9999888877776666
	v := m.boot(t, 0, func(a *Asm) {
		a.MovImm64(RBX, dataGPA)
		a.MovImm64(RSI, slot1GPA+0x3000)
		a.MovImm64(RCX, p0)
		a.Store(RBX, 0, RCX)
		a.MovImm64(RCX, p1)
		a.Store(RSI, 0, RCX)
		a.Hlt()
		a.Load(RDX, RSI, 0)
		outQword(a, 0x40, RDX)
		a.Load(RDX, RBX, 0)
		outQword(a, 0x41, RDX)
		a.Hlt()
	})
	out := map[uint16][]uint32{}
	expectExit[kvm.HLTExit](t, run(t, v, out))
	le := binary.LittleEndian
	if got := le.Uint64(m.mem[dataGPA:]); got != p0 {
		t.Errorf("slot 0 file at %#x: %#x", dataGPA, got)
	}
	if got := le.Uint64(mem1[0x3000:]); got != p1 {
		t.Errorf("slot 1 file at 0x3000: %#x", got)
	}
	if got := le.Uint64(m.mem[0x3000:]); got != 0 {
		t.Errorf("slot 0 file at 0x3000 holds %#x: the write went to the wrong file", got)
	}
	if err := g1.Punch(0x3000, kvm.PageSize); err != nil {
		t.Fatal(err)
	}
	expectExit[kvm.HLTExit](t, run(t, v, out))
	checkOut(t, out, 0x40, []uint32{0, 0})
	checkOut(t, out, 0x41, halves(p0))
}

// TestKick stops a guest that spins forever, twice. The host waits until
// the guest's counter moves, so the vCPU is known to be inside KVM_RUN and
// only the signal can bring it out; afterwards immediate_exit alone keeps
// KVM_RUN from entering the guest.
func TestKick(t *testing.T) {
	m := newMachine(t)
	v := m.boot(t, 0, func(a *Asm) {
		a.MovImm64(RBX, dataGPA)
		a.Xor(RDX, RDX)
		l := a.NewLabel()
		a.Bind(l)
		a.Inc(RDX)
		a.Store(RBX, 0, RDX)
		a.Jmp(l)
	})
	counter := func() uint64 { return binary.LittleEndian.Uint64(m.mem[dataGPA:]) }
	for round := range 2 {
		v.SetImmediateExit(false)
		before := counter()
		type result struct {
			ex  kvm.Exit
			err error
		}
		res := make(chan result, 1)
		go func() {
			ex, err := v.Run()
			for err == nil && ex.Reason() == kvm.ExitIntr && !v.ImmediateExit() {
				ex, err = v.Run() // a signal other than the kick: carry on
			}
			res <- result{ex, err}
		}()
		deadline := time.Now().Add(watchdog)
		for counter() == before {
			if time.Now().After(deadline) {
				v.Kick()
				<-res
				t.Fatalf("round %d: guest counter stuck at %d", round, before)
			}
			time.Sleep(time.Millisecond)
		}
		if err := v.Kick(); err != nil {
			t.Fatal(err)
		}
		select {
		case r := <-res:
			if r.err != nil {
				t.Fatal(r.err)
			}
			expectExit[kvm.IntrExit](t, r.ex)
		case <-time.After(watchdog):
			t.Fatalf("round %d: Kick did not stop the vCPU within %v", round, watchdog)
		}
		if !v.ImmediateExit() {
			t.Error("immediate_exit not set after Kick")
		}
		// The guest is stopped: its counter stays put.
		stopped := counter()
		time.Sleep(5 * time.Millisecond)
		if counter() != stopped {
			t.Fatalf("round %d: guest still running after the IntrExit", round)
		}
	}
	// immediate_exit is still set from the last Kick.
	ex, err := v.Run()
	if err != nil {
		t.Fatal(err)
	}
	expectExit[kvm.IntrExit](t, ex)
	v.SetImmediateExit(false)
	if v.ImmediateExit() {
		t.Error("immediate_exit still set after clearing it")
	}
}

// TestUd2Shutdown checks that an exception with no IDT ends the guest with
// a shutdown exit, as LongMode documents.
func TestUd2Shutdown(t *testing.T) {
	m := newMachine(t)
	v := m.boot(t, 0, func(a *Asm) { a.Ud2() })
	out := map[uint16][]uint32{}
	expectExit[kvm.ShutdownExit](t, run(t, v, out))
}
