package guestmem

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guest"
	"github.com/gmemproject/gmem/internal/kvmtest"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
)

// openVM returns a default-type VM, skipping the test where /dev/kvm is
// missing or not usable, or its KVM lacks the guest_memfd memory of mode
// needs (guest_memfd; in place MMAP|INIT_SHARED).
func openVM(t testing.TB, mode Mode) *kvm.VM {
	t.Helper()
	vm, _ := kvmtest.GuestMemfdVM(t, mode == InPlace)
	return vm
}

// Guest layout of these tests: one 4 MiB block; page tables at 64 KiB,
// code at 128 KiB, the test page at 2 MiB.
const (
	tablesGPA = 0x10000
	codeGPA   = 0x20000
	stackGPA  = 0x80000
	testGPA   = 2 << 20
	blockSize = 4 << 20

	portSync  = 0x10 // the guest reached a point where the host acts
	portValue = 0x11 // the guest reports a dword
	pattern   = 0x0123_4567_89ab_cdef
)

// kvmGuest is guest memory on a VM with one vCPU loaded with code.
type kvmGuest struct {
	t    *testing.T
	mem  *Memory
	vcpu *kvm.VCPU
}

func newKVMGuest(t *testing.T, mode Mode, code func(a *guest.Asm)) *kvmGuest {
	t.Helper()
	vm := openVM(t, mode)
	mem, err := New(Config{Mode: mode, VM: vm, Blocks: []BlockConfig{{Name: "ram", GPA: 0, Size: blockSize}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mem.Close(); err != nil {
			t.Error(err)
		}
	})
	if mem.Enforcement() != EnforceUserSpace {
		t.Logf("enforcement %s", mem.Enforcement())
	}
	var a guest.Asm
	code(&a)
	a.Hlt()
	img, err := a.Assemble()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mem.Guest().WriteAt(img, codeGPA); err != nil {
		t.Fatal(err)
	}
	boot, err := guest.LongMode(mem.Guest(), guest.LongModeConfig{TablesGPA: tablesGPA, MapSize: blockSize, Entry: codeGPA, Stack: stackGPA})
	if err != nil {
		t.Fatal(err)
	}
	vcpu, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vcpu.Close() })
	if err := boot.Load(vcpu); err != nil {
		t.Fatal(err)
	}
	return &kvmGuest{t: t, mem: mem, vcpu: vcpu}
}

// run runs the vCPU until it writes to port (returning the dword) or halts
// (returning ok false).
func (g *kvmGuest) run(port uint16) (uint32, bool) {
	g.t.Helper()
	timer := time.AfterFunc(10*time.Second, func() { g.vcpu.Kick() })
	defer timer.Stop()
	for {
		e, err := g.vcpu.Run()
		if err != nil {
			g.t.Fatal(err)
		}
		switch e := e.(type) {
		case kvm.IOExit:
			if e.Direction == kvm.IOOut && e.Port == port {
				var b [4]byte
				copy(b[:], e.Data)
				return binary.LittleEndian.Uint32(b[:]), true
			}
			g.t.Fatalf("unexpected I/O exit %+v", e)
		case kvm.HLTExit:
			return 0, false
		case kvm.IntrExit:
			g.t.Fatal("guest did not finish in time")
		default:
			g.t.Fatalf("unexpected exit %T %+v", e, e)
		}
	}
}

// writeQwords emits: store pattern+i at gpa+8i for n qwords.
func writeQwords(a *guest.Asm, gpa uint64, n int, seed uint64) {
	a.MovImm64(guest.RBX, gpa)
	a.MovImm64(guest.RAX, seed)
	a.MovImm32(guest.RCX, uint32(n))
	l := a.NewLabel()
	a.Bind(l)
	a.Store(guest.RBX, 0, guest.RAX)
	a.AddImm(guest.RBX, 8)
	a.Inc(guest.RAX)
	a.Loop(guest.RCX, l)
}

// outDword emits out portValue, eax after loading the qword at gpa, low
// half then high half.
func outQword(a *guest.Asm, gpa uint64) {
	a.MovImm64(guest.RBX, gpa)
	a.Load(guest.RAX, guest.RBX, 0)
	a.Out(portValue, guest.Dword)
	a.Shr(guest.RAX, 32)
	a.Out(portValue, guest.Dword)
}

func qwords(n int, seed uint64) []byte {
	b := make([]byte, 8*n)
	for i := range n {
		binary.LittleEndian.PutUint64(b[8*i:], seed+uint64(i))
	}
	return b
}

// TestKVMGuestWritesHostReads: the guest writes a shared page and a private
// page; the host reads the shared one through the accessor, which refuses
// the private one.
func TestKVMGuestWritesHostReads(t *testing.T) {
	for _, mode := range []Mode{InPlace, Split} {
		t.Run(mode.String(), func(t *testing.T) {
			g := newKVMGuest(t, mode, func(a *guest.Asm) {
				writeQwords(a, testGPA, 512, pattern)
				writeQwords(a, testGPA+PageSize, 512, ^uint64(pattern))
			})
			if _, err := g.mem.Convert(Request{GPA: testGPA, Size: PageSize, To: memattr.Shared}); err != nil {
				t.Fatal(err)
			}
			if _, ok := g.run(0); ok {
				t.Fatal("guest did not halt")
			}
			got := make([]byte, PageSize)
			if _, err := g.mem.ReadAt(got, testGPA); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, qwords(512, pattern)) {
				t.Errorf("host read of the shared page: % x...", got[:16])
			}
			if _, err := g.mem.ReadAt(got, testGPA+PageSize); !errors.Is(err, ErrPrivate) {
				t.Errorf("host read of the private page: %v, want ErrPrivate", err)
			}
			// The bytes are there for the guest (this host cannot keep
			// them from the host, which is why the accessor must).
			if _, err := g.mem.Guest().ReadAt(got, testGPA+PageSize); err != nil || !bytes.Equal(got, qwords(512, ^uint64(pattern))) {
				t.Errorf("guest view of the private page: %v", err)
			}
			if _, err := g.mem.WriteAt(got, testGPA+PageSize); !errors.Is(err, ErrPrivate) {
				t.Errorf("host write of the private page: %v, want ErrPrivate", err)
			}
		})
	}
}

// TestKVMHolePunch: the guest writes a page, the host frees it, the guest
// reads it back as zero. Split memory frees the shared memfd page when the
// page becomes private; in-place memory is punched in its guest_memfd.
func TestKVMHolePunch(t *testing.T) {
	for _, c := range []struct {
		name  string
		mode  Mode
		punch func(g *kvmGuest) error
		want  uint64
	}{
		{"split conversion", Split, func(g *kvmGuest) error {
			if _, err := g.mem.Convert(Request{GPA: testGPA, Size: PageSize, To: memattr.Private}); err != nil {
				return err
			}
			_, err := g.mem.Convert(Request{GPA: testGPA, Size: PageSize, To: memattr.Shared})
			return err
		}, 0},
		{"inplace guest_memfd punch", InPlace, func(g *kvmGuest) error {
			return g.mem.blocks[0].backing.Discard(SharedSide, testGPA, PageSize)
		}, 0},
		{"inplace conversion keeps bytes", InPlace, func(g *kvmGuest) error {
			if _, err := g.mem.Convert(Request{GPA: testGPA, Size: PageSize, To: memattr.Private}); err != nil {
				return err
			}
			_, err := g.mem.Convert(Request{GPA: testGPA, Size: PageSize, To: memattr.Shared})
			return err
		}, pattern},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := newKVMGuest(t, c.mode, func(a *guest.Asm) {
				writeQwords(a, testGPA, 512, pattern)
				a.Out(portSync, guest.Dword)
				outQword(a, testGPA)
			})
			if _, err := g.mem.Convert(Request{GPA: testGPA, Size: PageSize, To: memattr.Shared}); err != nil {
				t.Fatal(err)
			}
			if _, ok := g.run(portSync); !ok {
				t.Fatal("guest halted early")
			}
			if err := c.punch(g); err != nil {
				t.Fatal(err)
			}
			lo, ok1 := g.run(portValue)
			hi, ok2 := g.run(portValue)
			if !ok1 || !ok2 {
				t.Fatal("guest halted early")
			}
			if got := uint64(hi)<<32 | uint64(lo); got != c.want {
				t.Errorf("guest read %#x after the host acted, want %#x", got, c.want)
			}
			host := make([]byte, 8)
			if _, err := g.mem.ReadAt(host, testGPA); err != nil {
				t.Fatal(err)
			}
			if got := binary.LittleEndian.Uint64(host); got != c.want {
				t.Errorf("host read %#x, want %#x", got, c.want)
			}
			if _, ok := g.run(0); ok {
				t.Fatal("guest did not halt")
			}
		})
	}
}

// TestKVMSoak converts 100,000 times (10,000 with -short) on real
// guest_memfd memory with the model IOMMU attached, touching the pages made
// shared, and checks that neither open file descriptors nor resident memory
// grow beyond a small bound.
func TestKVMSoak(t *testing.T) {
	total := 100_000
	if testing.Short() {
		total = 10_000
	}
	for _, mode := range []Mode{InPlace, Split} {
		t.Run(mode.String(), func(t *testing.T) {
			vm := openVM(t, mode)
			const size = 16 << 20
			mem, err := New(Config{Mode: mode, VM: vm, Blocks: []BlockConfig{
				{Name: "a", GPA: 0, Size: size / 2}, {Name: "b", GPA: size / 2, Size: size / 2}}})
			if err != nil {
				t.Fatal(err)
			}
			defer mem.Close()
			model := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
			att, err := mem.AttachIOMMU(model, dma.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer att.Detach()
			touch := make([]byte, PageSize)
			step := func(i int) {
				// Deterministic, varied requests: lengths 1..64 pages,
				// spanning the two blocks now and then.
				x := uint64(i)*2654435761 + 12345
				pages := 1 + x%64
				gpa := (x >> 8) % (size/PageSize - pages) * PageSize
				to := memattr.State(x >> 40 & 1)
				res, err := mem.Convert(Request{GPA: gpa, Size: pages * PageSize, To: to})
				if err != nil {
					t.Fatalf("conversion %d: %v", i, err)
				}
				if to == memattr.Shared && res.Changed > 0 {
					touch[0] = byte(i)
					if _, err := mem.WriteAt(touch, int64(gpa)); err != nil {
						t.Fatalf("conversion %d: touch: %v", i, err)
					}
				}
			}
			warm := total / 10
			for i := range warm {
				step(i)
			}
			fds0, rss0 := openFDs(t), residentBytes(t)
			for i := warm; i < total; i++ {
				step(i)
				if i%10_000 == 0 {
					if err := att.Check(); err != nil {
						t.Fatal(err)
					}
				}
			}
			if err := att.Check(); err != nil {
				t.Fatal(err)
			}
			fds1, rss1 := openFDs(t), residentBytes(t)
			st := mem.Stats()
			t.Logf("%s: %d conversions (%d pages to shared, %d to private, %d punches), fds %d -> %d, RSS %d KiB -> %d KiB, %d IOMMU entries, state %+v",
				mode, st.Requests, st.PagesToShared, st.PagesToPrivate, st.Punches, fds0, fds1, rss0>>10, rss1>>10, model.Len(), mem.StateStats())
			if st.Requests != uint64(total) || st.Failed != 0 {
				t.Errorf("stats %+v", st)
			}
			if fds1 > fds0 {
				t.Errorf("open fds grew from %d to %d", fds0, fds1)
			}
			// The guest memory is 16 MiB; whatever it holds is already
			// resident after the warm-up. Allow for the Go heap's slack.
			const bound = 32 << 20
			if rss1 > rss0+bound {
				t.Errorf("resident memory grew by %d KiB (bound %d KiB)", (rss1-rss0)>>10, bound>>10)
			}
		})
	}
}

func openFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func residentBytes(t testing.TB) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		t.Fatalf("statm: %q", b)
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return pages * uint64(unix.Getpagesize())
}

// TestKVMMemslots checks the memslot binding: creating a second Memory over
// the same slots fails, and closing frees them for reuse.
func TestKVMMemslots(t *testing.T) {
	vm := openVM(t, Split)
	cfg := Config{Mode: Split, VM: vm, Blocks: []BlockConfig{{Name: "a", GPA: 0, Size: 1 << 20}}}
	m1, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if s, ok := m1.Blocks()[0].Slot(); !ok || s != 0 {
		t.Errorf("slot %d, %v", s, ok)
	}
	if m2, err := New(cfg); err == nil {
		m2.Close()
		t.Error("a second memory on the same slot and GPA was accepted")
	}
	if err := m1.Close(); err != nil {
		t.Fatal(err)
	}
	m3, err := New(cfg)
	if err != nil {
		t.Fatalf("slot not freed by Close: %v", err)
	}
	if err := m3.Close(); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkKVMConvert converts 16 pages back and forth on real guest_memfd
// memory with the model IOMMU attached: one iteration is one conversion.
func BenchmarkKVMConvert(b *testing.B) {
	for _, mode := range []Mode{InPlace, Split} {
		b.Run(mode.String(), func(b *testing.B) {
			vm := openVM(b, mode)
			mem, err := New(Config{Mode: mode, VM: vm, Blocks: []BlockConfig{{Name: "a", GPA: 0, Size: 16 << 20}}})
			if err != nil {
				b.Fatal(err)
			}
			defer mem.Close()
			att, err := mem.AttachIOMMU(iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2}), dma.Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer att.Detach()
			to := memattr.Shared
			for b.Loop() {
				if _, err := mem.Convert(Request{GPA: 1 << 20, Size: 16 * PageSize, To: to}); err != nil {
					b.Fatal(err)
				}
				to = opposite(to)
			}
		})
	}
}
