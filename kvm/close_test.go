//go:build linux

package kvm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio/fdiotest"
)

// TestCloseRacesCalls closes a System and a VM while goroutines keep
// asking them KVM_GET_API_VERSION and KVM_CHECK_EXTENSION, and opens pipes
// right after each Close so that the freed numbers name other files. Each
// call must either give the right answer or ErrClosed: an ioctl that
// reached a recycled number would fail with ENOTTY (a pipe) or EBADF.
func TestCloseRacesCalls(t *testing.T) {
	probe := openKVM(t)
	wantCap, err := probe.CheckExtension(CapUserMemory2)
	if err != nil {
		t.Fatal(err)
	}
	isClosed := func(err error) bool { return errors.Is(err, ErrClosed) }
	const rounds = 100
	for round := range rounds {
		s, err := Open()
		if err != nil {
			t.Fatal(err)
		}
		vm, err := s.CreateVM(VMTypeDefault)
		if err != nil {
			t.Fatal(err)
		}
		race := fdiotest.NewRace(t, isClosed)
		call := func(name string, f func() (int, error), want int) {
			race.Go(name, func() error {
				got, err := f()
				if errors.Is(err, ErrClosed) && !errors.Is(err, fs.ErrClosed) {
					race.Fail("%s: %v does not match fs.ErrClosed", name, err)
				}
				if err == nil && got != want {
					return fmt.Errorf("got %d, want %d or ErrClosed", got, want)
				}
				return err
			}, fdiotest.OK)
		}
		call("System.GetAPIVersion", s.GetAPIVersion, APIVersion)
		call("System.CheckExtension", func() (int, error) { return s.CheckExtension(CapUserMemory2) }, wantCap)
		call("VM.CheckExtension", func() (int, error) { return vm.CheckExtension(CapUserMemory2) }, wantCap)
		race.Start(round)
		race.Close(s.Close)
		race.Close(vm.Close)
		race.Wait(round)
		if err := s.Close(); err != ErrClosed {
			t.Fatalf("second Close = %v, want ErrClosed", err)
		}
	}
}

// TestVCPUCloseRaces closes vCPUs while other goroutines Kick them, set
// and read immediate_exit (all of which touch the kvm_run mapping Close
// unmaps) and read their registers. Nothing may fault, and each call either
// works or answers ErrClosed.
func TestVCPUCloseRaces(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	isClosed := func(err error) bool { return errors.Is(err, ErrClosed) }
	const rounds = 100
	for round := range rounds {
		// A vCPU id stays taken until the VM goes: one id a round.
		v, err := vm.CreateVCPU(round)
		if err != nil {
			t.Fatal(err)
		}
		race := fdiotest.NewRace(t, isClosed)
		race.Go("Kick", v.Kick, fdiotest.OK)
		race.Go("SetImmediateExit", func() error {
			v.SetImmediateExit(false)
			if v.Fd() < 0 && !v.ImmediateExit() {
				return errors.New("ImmediateExit after Close is false")
			}
			if v.Fd() < 0 {
				return ErrClosed
			}
			return nil
		}, fdiotest.OK)
		race.Go("GetRegs", func() error { _, err := v.GetRegs(); return err }, fdiotest.OK)
		race.Start(round)
		race.Close(v.Close)
		race.Wait(round)
		if v.RunData() != nil {
			t.Fatal("RunData after Close is not nil")
		}
	}
}

// vcpuMappings counts this process's kvm_run mappings.
func vcpuMappings(t *testing.T) int {
	t.Helper()
	m, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(m), "kvm-vcpu")
}

// TestCloseStopsRun closes a vCPU from another goroutine while its guest
// spins in KVM_RUN and never exits by itself. Close must interrupt the run
// and wait for it, not deadlock and not unmap kvm_run under it; Run then
// answers IntrExit (or ErrClosed if it was between two KVM_RUNs) and every
// later call ErrClosed.
func TestCloseStopsRun(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	const memSize = 0x3000
	mem, err := unix.Mmap(-1, 0, memSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	// Real mode at 0x1000: inc word [0x2000]; jmp back.
	copy(mem[0x1000:], []byte{0xff, 0x06, 0x00, 0x20, 0xeb, 0xfa})
	if err := vm.SetUserMemoryRegion2(UserspaceMemoryRegion2{MemorySize: memSize, UserspaceAddr: HostAddr(mem)}); err != nil {
		t.Fatal(err)
	}
	maps0 := vcpuMappings(t)
	v, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	sr, err := v.GetSregs()
	if err != nil {
		t.Fatal(err)
	}
	sr.CS.Base, sr.CS.Selector = 0, 0
	if err := v.SetSregs(sr); err != nil {
		t.Fatal(err)
	}
	if err := v.SetRegs(Regs{RIP: 0x1000, RFLAGS: 2}); err != nil {
		t.Fatal(err)
	}

	type result struct {
		ex  Exit
		err error
	}
	res := make(chan result, 1)
	go func() {
		for {
			ex, err := v.Run()
			if err == nil && ex.Reason() == ExitIntr && !v.ImmediateExit() {
				continue // a signal other than the Close: carry on
			}
			res <- result{ex, err}
			return
		}
	}()
	// The watchdog only bounds a hung guest or Close; it asserts no timing.
	const watchdog = 20 * time.Second
	counter := func() uint16 { return uint16(mem[0x2000]) | uint16(mem[0x2001])<<8 }
	deadline := time.Now().Add(watchdog)
	for counter() == 0 {
		if time.Now().After(deadline) {
			v.Close()
			t.Fatalf("the guest never ran: %+v", <-res)
		}
		time.Sleep(time.Millisecond)
	}
	closed := make(chan error, 1)
	go func() { closed <- v.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(watchdog):
		t.Fatalf("Close did not return within %v while the guest spun", watchdog)
	}
	select {
	case r := <-res:
		if r.err != nil && !errors.Is(r.err, ErrClosed) {
			t.Errorf("Run during Close: %v", r.err)
		}
		if r.err == nil {
			if _, ok := r.ex.(IntrExit); !ok {
				t.Errorf("Run during Close: exit %#v, want IntrExit", r.ex)
			}
		}
	case <-time.After(watchdog):
		t.Fatalf("Run did not return within %v of Close", watchdog)
	}
	if _, err := v.Run(); !errors.Is(err, ErrClosed) {
		t.Errorf("Run after Close: %v", err)
	}
	if err := v.Kick(); !errors.Is(err, ErrClosed) {
		t.Errorf("Kick after Close: %v", err)
	}
	if err := v.SetHypercallRet(0); !errors.Is(err, ErrClosed) {
		t.Errorf("SetHypercallRet after Close: %v", err)
	}
	if !v.ImmediateExit() || v.RunData() != nil || v.Fd() != -1 {
		t.Errorf("after Close: ImmediateExit %v, RunData %d bytes, Fd %d", v.ImmediateExit(), len(v.RunData()), v.Fd())
	}
	if n := vcpuMappings(t); n != maps0 {
		t.Errorf("kvm_run mappings %d after Close, %d before the vCPU", n, maps0)
	}
}

// TestClosedControl: Control runs its function with the live descriptor,
// and never after Close.
func TestClosedControl(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	var got uintptr
	if err := vm.Control(func(fd uintptr) { got = fd }); err != nil || int(got) != vm.Fd() {
		t.Fatalf("Control: fd %d (Fd %d), %v", got, vm.Fd(), err)
	}
	v, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	mfd, err := unix.MemfdCreate("gmem", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(mfd, PageSize); err != nil {
		t.Fatal(err)
	}
	g, err := NewGuestMemfd(mfd, 0)
	if err != nil {
		t.Fatal(err)
	}
	ran := false
	for name, c := range map[string]interface {
		Control(func(uintptr)) error
		Close() error
	}{"System": s, "VM": vm, "VCPU": v, "GuestMemfd": g} {
		if err := c.Close(); err != nil {
			t.Fatalf("%s.Close: %v", name, err)
		}
		if err := c.Control(func(uintptr) { ran = true }); !errors.Is(err, ErrClosed) {
			t.Errorf("%s.Control after Close: %v", name, err)
		}
	}
	if ran {
		t.Error("Control ran its function after Close")
	}
	if _, err := g.Mmap(0, PageSize); !errors.Is(err, ErrClosed) {
		t.Errorf("GuestMemfd.Mmap after Close: %v", err)
	}
	if err := g.Punch(0, PageSize); !errors.Is(err, ErrClosed) {
		t.Errorf("GuestMemfd.Punch after Close: %v", err)
	}
}
