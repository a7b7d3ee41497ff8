//go:build linux

package kvm

import (
	"errors"
	"os"
	"runtime/debug"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/span"
)

// openKVM opens /dev/kvm or skips the test.
func openKVM(t testing.TB) *System {
	t.Helper()
	s, err := Open()
	if err != nil {
		t.Skipf("needs %s (read-write): %v", DevicePath, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// newVM creates a default VM, closed at the end of the test.
func newVM(t testing.TB, s *System) *VM {
	t.Helper()
	vm, err := s.CreateVM(VMTypeDefault)
	if err != nil {
		t.Fatalf("CreateVM: %v", err)
	}
	t.Cleanup(func() { vm.Close() })
	return vm
}

// needCap skips the test unless the VM answers cap with all of want.
func needCap(t testing.TB, vm *VM, c Cap, want uint64) uint64 {
	t.Helper()
	have, err := vm.CheckExtension(c)
	if err != nil {
		t.Fatalf("CheckExtension(%v): %v", c, err)
	}
	if uint64(have)&want != want || have == 0 {
		t.Skipf("needs %v with %#x; this VM answers %#x", c, want, have)
	}
	return uint64(have)
}

const sharedFlags = GuestMemfdFlagMmap | GuestMemfdFlagInitShared

// newShared creates a MMAP|INIT_SHARED guest_memfd and maps all of it.
func newShared(t testing.TB, vm *VM, size uint64) (*GuestMemfd, []byte) {
	t.Helper()
	needCap(t, vm, CapGuestMemfdFlags, sharedFlags)
	g, err := vm.CreateGuestMemfd(size, sharedFlags)
	if err != nil {
		t.Fatalf("CreateGuestMemfd: %v", err)
	}
	mem, err := g.Mmap(0, size)
	if err != nil {
		g.Close()
		t.Fatalf("Mmap: %v", err)
	}
	t.Cleanup(func() {
		g.Munmap(mem)
		g.Close()
	})
	return g, mem
}

func cloexec(t *testing.T, what string, fd int) {
	t.Helper()
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		t.Fatalf("F_GETFD %s: %v", what, err)
	}
	if fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("%s fd %d is not close-on-exec", what, fd)
	}
}

// TestCapabilities prints what the host answers and checks the answers that
// do not depend on the host.
func TestCapabilities(t *testing.T) {
	s := openKVM(t)
	v, err := s.GetAPIVersion()
	if err != nil || v != APIVersion {
		t.Fatalf("GetAPIVersion = %d, %v; want %d", v, err, APIVersion)
	}
	n, err := s.GetVCPUMmapSize()
	if err != nil {
		t.Fatal(err)
	}
	if n < runSize || n%PageSize != 0 {
		t.Errorf("GetVCPUMmapSize = %d: not whole pages holding kvm_run (%d)", n, runSize)
	}
	t.Logf("KVM_GET_API_VERSION %d, KVM_GET_VCPU_MMAP_SIZE %d", v, n)
	vm := newVM(t, s)
	for _, c := range []Cap{CapExitHypercall, CapUserMemory2, CapMemoryFaultInfo, CapMemoryAttributes,
		CapGuestMemfd, CapVMTypes, CapPreFaultMemory, CapGuestMemfdFlags} {
		sv, err := s.CheckExtension(c)
		if err != nil {
			t.Fatal(err)
		}
		vv, err := vm.CheckExtension(c)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%-27s (%d): system %#x, VM %#x", c, uint32(c), sv, vv)
	}
	caps, err := vm.ProbeCapabilities()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", caps)
	types, _ := s.CheckExtension(CapVMTypes)
	if caps.VMTypes != uint64(types) {
		t.Errorf("ProbeCapabilities VMTypes %#x, CheckExtension %#x", caps.VMTypes, types)
	}
	if types != 0 && types&(1<<VMTypeDefault) == 0 {
		t.Errorf("KVM_CAP_VM_TYPES %#x lacks the default VM type this VM was created with", types)
	}
	if !caps.GuestMemfd && caps.GuestMemfdFlags != 0 {
		t.Errorf("guest_memfd flags %#x without KVM_CAP_GUEST_MEMFD", caps.GuestMemfdFlags)
	}
	if got, err := s.VMTypes(); err != nil || (types != 0 && got != uint64(types)) || got&(1<<VMTypeDefault) == 0 {
		t.Errorf("VMTypes = %#x, %v; KVM_CAP_VM_TYPES %#x", got, err, types)
	}
	if _, err := s.CreateVM(63); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("CreateVM(63) = %v, want unsupported without the ioctl", err)
	}
	sw, err := s.CreateVM(VMTypeSWProtected)
	if (types&(1<<VMTypeSWProtected) != 0) != (err == nil) {
		t.Errorf("KVM_CREATE_VM(SW_PROTECTED) = %v, but KVM_CAP_VM_TYPES = %#x", err, types)
	}
	if err == nil {
		sw.Close()
	} else {
		t.Logf("KVM_CREATE_VM(SW_PROTECTED): %v", err)
	}
}

// TestGuestMemfdFlags creates guest_memfd files with every flag combination
// the VM may accept and one it never does.
func TestGuestMemfdFlags(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	needCap(t, vm, CapGuestMemfd, 1)
	have, err := vm.CheckExtension(CapGuestMemfdFlags)
	if err != nil {
		t.Fatal(err)
	}
	for flags := range uint64(8) {
		g, err := vm.CreateGuestMemfd(1<<20, flags)
		if flags&^uint64(have) != 0 {
			var ue *UnsupportedError
			if !errors.As(err, &ue) || !errors.Is(err, unix.EINVAL) || !errors.Is(err, errors.ErrUnsupported) {
				t.Errorf("flags %#x (cap %#x): got %v, want an UnsupportedError matching EINVAL", flags, have, err)
			}
			if g != nil {
				t.Errorf("flags %#x: file returned with the error", flags)
			}
			// The kernel itself says EINVAL too.
			if fd, err := vm.createGuestMemfd(1<<20, flags); !errors.Is(err, unix.EINVAL) {
				t.Errorf("raw KVM_CREATE_GUEST_MEMFD flags %#x: fd %d, %v; want EINVAL", flags, fd, err)
				if fd >= 0 {
					unix.Close(fd)
				}
			}
			continue
		}
		if err != nil {
			t.Errorf("flags %#x (cap %#x): %v", flags, have, err)
			continue
		}
		if g.Size() != 1<<20 || g.Flags() != flags {
			t.Errorf("flags %#x: Size %#x Flags %#x", flags, g.Size(), g.Flags())
		}
		cloexec(t, "guest_memfd", g.Fd())
		var st unix.Stat_t
		if err := unix.Fstat(g.Fd(), &st); err != nil || st.Size != 1<<20 {
			t.Errorf("flags %#x: fstat size %d, %v", flags, st.Size, err)
		}
		if err := g.Close(); err != nil {
			t.Error(err)
		}
	}
	for _, size := range []uint64{0, 100, PageSize + 1} {
		if g, err := vm.CreateGuestMemfd(size, 0); !errors.Is(err, unix.EINVAL) {
			t.Errorf("size %d: %v, want EINVAL", size, err)
			if g != nil {
				g.Close()
			}
		}
	}
}

// touch reads b[off] with faults turned into panics, and reports whether it
// faulted (a SIGBUS on a private guest_memfd page). The value is returned so
// that the load cannot be optimised away.
func touch(b []byte, off int) (v byte, faulted bool) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if recover() != nil {
			faulted = true
		}
	}()
	return b[off], false
}

func TestGuestMemfdMmap(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	have := needCap(t, vm, CapGuestMemfdFlags, GuestMemfdFlagMmap)

	// Without MMAP the file cannot be mapped.
	g0, err := vm.CreateGuestMemfd(1<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer g0.Close()
	if b, err := g0.Mmap(0, 1<<20); !errors.Is(err, unix.ENODEV) {
		t.Errorf("mmap of a flags=0 guest_memfd: %v, want ENODEV", err)
		if b != nil {
			g0.Munmap(b)
		}
	}

	// MMAP without INIT_SHARED: mappable, but every page is private, so a
	// host access faults.
	g1, err := vm.CreateGuestMemfd(1<<20, GuestMemfdFlagMmap)
	if err != nil {
		t.Fatal(err)
	}
	defer g1.Close()
	b1, err := g1.Mmap(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if _, faulted := touch(b1, 0); !faulted {
		t.Error("host read of a private (MMAP only) guest_memfd page did not fault")
	}
	g1.Munmap(b1)

	if have&GuestMemfdFlagInitShared == 0 {
		t.Skipf("KVM_CAP_GUEST_MEMFD_FLAGS %#x lacks INIT_SHARED", have)
	}
	g, mem := newShared(t, vm, 1<<20)
	for _, off := range []int{0, 1<<20 - 1} {
		if v, faulted := touch(mem, off); faulted || v != 0 {
			t.Fatalf("host read at %#x of a new INIT_SHARED guest_memfd: %#x, faulted %v", off, v, faulted)
		}
	}
	mem[5] = 0xa5
	// A second mapping of the same file sees the same page.
	part, err := g.Mmap(0, PageSize)
	if err != nil {
		t.Fatal(err)
	}
	if part[5] != 0xa5 {
		t.Errorf("second mapping reads %#x", part[5])
	}
	g.Munmap(part)
	for _, c := range []struct {
		off, n uint64
		want   error
	}{
		{1, PageSize, span.ErrAlign},
		{0, 100, span.ErrAlign},
		{0, 0, span.ErrEmpty},
		{PageSize, 1 << 20, span.ErrBounds},
		{^uint64(0) &^ (PageSize - 1), 2 * PageSize, span.ErrOverflow},
	} {
		if b, err := g.Mmap(c.off, c.n); !errors.Is(err, c.want) {
			t.Errorf("Mmap(%#x, %#x) = %v, want %v", c.off, c.n, err, c.want)
			if b != nil {
				g.Munmap(b)
			}
		}
	}
}

func TestGuestMemfdPunchAllocate(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	g, mem := newShared(t, vm, 16*PageSize)
	for i := range mem {
		mem[i] = byte(i/PageSize + 1)
	}
	if err := g.Punch(3*PageSize, 2*PageSize); err != nil {
		t.Fatal(err)
	}
	for i := range mem {
		want := byte(i/PageSize + 1)
		if p := i / PageSize; p == 3 || p == 4 {
			want = 0
		}
		if mem[i] != want {
			t.Fatalf("byte %#x = %#x after punching pages 3-4, want %#x", i, mem[i], want)
		}
	}
	// The punched pages come back as fresh zeroed pages and hold data again.
	mem[3*PageSize] = 7
	if mem[3*PageSize] != 7 {
		t.Error("punched page not writable again")
	}
	if err := g.Allocate(0, 16*PageSize); err != nil {
		t.Errorf("Allocate whole file: %v", err)
	}
	if mem[3*PageSize] != 7 || mem[0] != 1 {
		t.Error("Allocate changed existing data")
	}
	for _, c := range []struct {
		off, n uint64
		want   error
	}{
		{100, PageSize, span.ErrAlign},
		{0, PageSize + 1, span.ErrAlign},
		{0, 0, span.ErrEmpty},
		{15 * PageSize, 2 * PageSize, span.ErrBounds},
	} {
		if err := g.Punch(c.off, c.n); !errors.Is(err, c.want) {
			t.Errorf("Punch(%#x, %#x) = %v, want %v", c.off, c.n, err, c.want)
		}
		if err := g.Allocate(c.off, c.n); !errors.Is(err, c.want) {
			t.Errorf("Allocate(%#x, %#x) = %v, want %v", c.off, c.n, err, c.want)
		}
	}
	if mem[0] != 1 || mem[15*PageSize] != 16 {
		t.Error("refused calls changed data")
	}
}

// TestMemslot2 binds memslots to a MMAP|INIT_SHARED guest_memfd, with
// userspace_addr the mmap of that same file, and checks the kernel's rules
// for such slots.
func TestMemslot2(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	needCap(t, vm, CapUserMemory2, 1)
	g, mem := newShared(t, vm, 4<<20)
	slot := UserspaceMemoryRegion2{
		Slot: 0, Flags: MemGuestMemfd, GuestPhysAddr: 0, MemorySize: 2 << 20,
		UserspaceAddr: HostAddr(mem), GuestMemfd: uint32(g.Fd()), GuestMemfdOffset: 0,
	}
	if err := vm.SetUserMemoryRegion2(slot); err != nil {
		t.Fatalf("bind: %v", err)
	}
	// Slot 1 binds the second half of the file, at GPA 1 GiB.
	slot1 := slot
	slot1.Slot, slot1.GuestPhysAddr, slot1.GuestMemfdOffset = 1, 1<<30, 2<<20
	slot1.UserspaceAddr = HostAddr(mem[2<<20:])
	if err := vm.SetUserMemoryRegion2(slot1); err != nil {
		t.Fatalf("bind second half: %v", err)
	}

	bad := func(vm *VM, name string, r UserspaceMemoryRegion2, want ...unix.Errno) {
		t.Helper()
		err := vm.SetUserMemoryRegion2(r)
		for _, w := range want {
			if errors.Is(err, w) {
				return
			}
		}
		t.Errorf("%s: %v, want one of %v", name, err, want)
	}
	r := slot
	r.Flags |= MemLogDirtyPages
	r.Slot = 2
	r.GuestPhysAddr = 2 << 30
	bad(vm, "GUEST_MEMFD|LOG_DIRTY_PAGES", r, unix.EINVAL)
	r.Flags = MemGuestMemfd | MemReadonly
	bad(vm, "GUEST_MEMFD|READONLY", r, unix.EINVAL)
	r = slot
	r.GuestPhysAddr = 4 << 30
	bad(vm, "move a guest_memfd slot", r, unix.EINVAL)
	r = slot
	r.Slot, r.GuestPhysAddr = 3, 8<<30
	bad(vm, "second binding of the same range", r, unix.EINVAL, unix.EEXIST)
	r = slot1
	r.Slot, r.GuestPhysAddr, r.GuestMemfdOffset, r.MemorySize = 4, 16<<30, 3<<20, 2<<20
	bad(vm, "binding past the end of the file", r, unix.EINVAL)
	r.GuestMemfdOffset = 100
	bad(vm, "unaligned guest_memfd offset", r, unix.EINVAL)

	// A guest_memfd belongs to its VM.
	bad(newVM(t, s), "guest_memfd of another VM", slot, unix.EINVAL)

	// Delete and create again: the only way to change a guest_memfd slot.
	del := slot
	del.MemorySize = 0
	if err := vm.SetUserMemoryRegion2(del); err != nil {
		t.Fatalf("delete: %v", err)
	}
	slot.GuestPhysAddr = 4 << 30
	if err := vm.SetUserMemoryRegion2(slot); err != nil {
		t.Fatalf("re-create at a new GPA: %v", err)
	}
}

func TestSetMemoryAttributes(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	have, err := vm.CheckExtension(CapMemoryAttributes)
	if err != nil {
		t.Fatal(err)
	}
	a := MemoryAttributes{Address: 0, Size: 2 << 20, Attributes: MemoryAttributePrivate}
	err = vm.SetMemoryAttributes(a)
	if uint64(have)&MemoryAttributePrivate == 0 {
		var ue *UnsupportedError
		if !errors.As(err, &ue) || !errors.Is(err, errors.ErrUnsupported) {
			t.Fatalf("SetMemoryAttributes with KVM_CAP_MEMORY_ATTRIBUTES %#x: %v, want UnsupportedError", have, err)
		}
		// The probe is right to stay away: the kernel refuses too.
		raw := vm.setMemoryAttributes(a)
		if !errors.Is(raw, unix.ENOTTY) && !errors.Is(raw, unix.EINVAL) {
			t.Errorf("raw KVM_SET_MEMORY_ATTRIBUTES: %v, want ENOTTY or EINVAL", raw)
		}
		t.Logf("KVM_CAP_MEMORY_ATTRIBUTES %#x: %v; the ioctl itself: %v", have, err, raw)
		return
	}
	if err != nil {
		t.Fatalf("SetMemoryAttributes private: %v", err)
	}
	a.Attributes = 0
	if err := vm.SetMemoryAttributes(a); err != nil {
		t.Fatalf("SetMemoryAttributes shared: %v", err)
	}
	a.Attributes = 1 << 62
	if err := vm.SetMemoryAttributes(a); !errors.Is(err, unix.EINVAL) {
		t.Errorf("unknown attribute bit: %v, want EINVAL", err)
	}
}

func TestEnableCapExitHypercall(t *testing.T) {
	s := openKVM(t)
	vm := newVM(t, s)
	have := needCap(t, vm, CapExitHypercall, 1<<HCMapGPARange)
	if err := vm.EnableCap(EnableCap{Cap: CapExitHypercall, Args: [4]uint64{1 << HCMapGPARange}}); err != nil {
		t.Fatalf("enable MAP_GPA_RANGE exits: %v", err)
	}
	if err := vm.EnableExitHypercall(1 << HCMapGPARange); err != nil {
		t.Errorf("EnableExitHypercall(MAP_GPA_RANGE): %v", err)
	}
	if err := vm.EnableExitHypercall(0); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("EnableExitHypercall(0) = %v, want unsupported", err)
	}
	for bit := range uint(64) {
		if have&(1<<bit) == 0 {
			err := vm.EnableCap(EnableCap{Cap: CapExitHypercall, Args: [4]uint64{1 << bit}})
			if !errors.Is(err, unix.EINVAL) {
				t.Errorf("enable hypercall %d outside the cap %#x: %v, want EINVAL", bit, have, err)
			}
			break
		}
	}
}

func TestCloseAndCloexec(t *testing.T) {
	s := openKVM(t)
	cloexec(t, "/dev/kvm", s.Fd())
	vm, err := s.CreateVM(VMTypeDefault)
	if err != nil {
		t.Fatal(err)
	}
	cloexec(t, "VM", vm.Fd())
	v, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	cloexec(t, "vCPU", v.Fd())
	if v.ID() != 0 || len(v.RunData()) < runSize {
		t.Errorf("vCPU id %d, kvm_run mapping %d bytes", v.ID(), len(v.RunData()))
	}
	if _, err := vm.CreateVCPU(0); !errors.Is(err, unix.EEXIST) {
		t.Errorf("second vCPU 0: %v, want EEXIST", err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("second vCPU Close: %v", err)
	}
	if _, err := v.Run(); !errors.Is(err, ErrClosed) {
		t.Errorf("Run after Close: %v", err)
	}
	if _, err := v.GetRegs(); !errors.Is(err, ErrClosed) {
		t.Errorf("GetRegs after Close: %v", err)
	}
	if err := vm.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.CreateGuestMemfd(PageSize, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("CreateGuestMemfd after Close: %v", err)
	}
	if err := vm.SetUserMemoryRegion2(UserspaceMemoryRegion2{}); !errors.Is(err, ErrClosed) {
		t.Errorf("SetUserMemoryRegion2 after Close: %v", err)
	}
	if _, err := vm.CheckExtension(CapGuestMemfd); !errors.Is(err, ErrClosed) {
		t.Errorf("CheckExtension after Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVM(0); !errors.Is(err, ErrClosed) {
		t.Errorf("CreateVM after Close: %v", err)
	}
}

// kvmResources counts this process's open file descriptors and its
// mappings of KVM objects (guest_memfd files and kvm_run pages).
func kvmResources(t *testing.T) (fds, maps int) {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	m, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(m), "\n") {
		if strings.Contains(l, "kvm") {
			maps++
		}
	}
	return len(ents), maps
}

// TestSoakNoLeak creates, maps, punches and closes guest_memfd files, and
// creates VMs with vCPUs, many times over, and checks that no file
// descriptor or mapping is left behind.
func TestSoakNoLeak(t *testing.T) {
	s := openKVM(t)
	probe := newVM(t, s)
	needCap(t, probe, CapGuestMemfdFlags, sharedFlags)
	iters := 2000
	if testing.Short() {
		iters = 100
	}
	fds0, maps0 := kvmResources(t)
	for i := range iters {
		vm, err := s.CreateVM(VMTypeDefault)
		if err != nil {
			t.Fatal(err)
		}
		for j := range 4 {
			g, err := vm.CreateGuestMemfd(2<<20, sharedFlags)
			if err != nil {
				t.Fatal(err)
			}
			mem, err := g.Mmap(0, 2<<20)
			if err != nil {
				t.Fatal(err)
			}
			mem[j*PageSize] = byte(i)
			if err := g.Punch(uint64(j)*PageSize, PageSize); err != nil {
				t.Fatal(err)
			}
			if mem[j*PageSize] != 0 {
				t.Fatalf("iteration %d: punched page reads %#x", i, mem[j*PageSize])
			}
			if j == 0 {
				err := vm.SetUserMemoryRegion2(UserspaceMemoryRegion2{Flags: MemGuestMemfd,
					MemorySize: 2 << 20, UserspaceAddr: HostAddr(mem), GuestMemfd: uint32(g.Fd())})
				if err != nil {
					t.Fatal(err)
				}
			}
			if err := g.Munmap(mem); err != nil {
				t.Fatal(err)
			}
			if err := g.Close(); err != nil {
				t.Fatal(err)
			}
		}
		v, err := vm.CreateVCPU(0)
		if err != nil {
			t.Fatal(err)
		}
		if err := v.Close(); err != nil {
			t.Fatal(err)
		}
		if err := vm.Close(); err != nil {
			t.Fatal(err)
		}
	}
	fds1, maps1 := kvmResources(t)
	t.Logf("%d iterations: fds %d -> %d, KVM mappings %d -> %d", iters, fds0, fds1, maps0, maps1)
	if fds1 != fds0 || maps1 != maps0 {
		t.Errorf("leak after %d iterations: fds %d -> %d, KVM mappings %d -> %d", iters, fds0, fds1, maps0, maps1)
	}
}
