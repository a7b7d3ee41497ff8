package guesttest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/internal/kvmtest"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/iommufd"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/vmm"
)

// The inplace backend runs what a kernel with mmap-able guest_memfd (6.18
// or later; the rig's linux-source-7.3) can show and 6.12 cannot:
// guest_memfd with MMAP|INIT_SHARED on a default VM, gmem's in-place memory
// on it with the edu device behind real VFIO type1 and iommufd (which pin
// the guest_memfd's pages through its mapping), IOMMU_IOAS_MAP_FILE,
// vmm's host-KVM tests (the /vmmtest binary), and gmem demo --mode
// inplace (/gmem). Where the kernel also converts in place with private
// memory (Linux 7.4), KVM_SET_MEMORY_ATTRIBUTES2 runs against a real pin.

const (
	vmmTestPath = "/vmmtest"
	gmemPath    = "/gmem"
	// mapFileIOVA is where the IOAS_MAP_FILE check maps its memfd.
	mapFileIOVA = 0x0E00_0000
)

func runInPlace(t *testing.T, bdf string) {
	const b = "inplace"
	var sup kvm.InPlaceSupport
	must(t, check(t, b, "guest-memfd-mmap", func(t *testing.T) { sup = inPlaceGuestMemfd(t) }))
	for _, be := range []struct {
		name string
		open func(t *testing.T) (iommu.Space, *Edu, func())
	}{
		{"type1", func(t *testing.T) (iommu.Space, *Edu, func()) { return openKVMType1(t, bdf) }},
		{"iommufd", func(t *testing.T) (iommu.Space, *Edu, func()) { return openKVMIOMMUFD(t, bdf) }},
	} {
		check(t, b, "guest-dma-"+be.name, func(t *testing.T) {
			sp, edu, done := be.open(t)
			t.Cleanup(done)
			inPlaceDevice(t, sp, edu, sup)
		})
	}
	check(t, b, "ioas-map-file", func(t *testing.T) { ioasMapFile(t, bdf) })
	if sup.OK() {
		check(t, b, "guest-memfd-attributes", func(t *testing.T) { guestMemfdAttributes(t, bdf) })
	} else {
		fmt.Printf("GMEM-RIG note inplace: KVM_SET_MEMORY_ATTRIBUTES2 checks not run on this kernel: %s\n", sup.Reason)
	}
	check(t, b, "demo", func(t *testing.T) { inPlaceDemo(t, bdf, sup) })
	vmmTests(t, b, sup)
}

// inPlaceGuestMemfd checks guest_memfd as in-place memory needs it on a
// default VM, and says what the kernel offers for private memory.
func inPlaceGuestMemfd(t *testing.T) kvm.InPlaceSupport {
	sys := openKVM(t)
	sup, err := sys.ProbeInPlace()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("in place with private memory: %+v", sup)
	vm := kvmtest.NewVM(t, sys, kvm.VMTypeDefault)
	caps, err := vm.ProbeCapabilities()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("default VM: %+v", caps)
	if caps.GuestMemfdFlags&kvm.InPlaceFlags != kvm.InPlaceFlags {
		t.Fatalf("KVM_CAP_GUEST_MEMFD_FLAGS %#x lacks MMAP|INIT_SHARED: this kernel has no in-place memory (6.18 or later needed; run with --kernel-source linux-source-7.3)", caps.GuestMemfdFlags)
	}
	if caps.GuestMemfdMemoryAttributes != 0 {
		t.Errorf("a default VM reports per-guest_memfd attributes %#x; it has no private memory", caps.GuestMemfdMemoryAttributes)
	}
	g := newGuestMemfd(t, vm, 16*pg, kvm.InPlaceFlags)
	mem, err := g.Mmap(0, 16*pg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Munmap(mem)
	if !allZero(mem) {
		t.Error("a new INIT_SHARED guest_memfd does not read zero")
	}
	pattern(mem, 5)
	second, err := g.Mmap(4*pg, pg)
	if err != nil {
		t.Fatal(err)
	}
	expectBytes(t, "a second mapping of the same pages", second, mem[4*pg:5*pg])
	g.Munmap(second)
	if err := g.Punch(4*pg, 2*pg); err != nil {
		t.Fatal(err)
	}
	if !allZero(mem[4*pg:6*pg]) || allZero(mem[6*pg:7*pg]) {
		t.Error("the punch did not zero exactly its pages")
	}
	// MMAP without INIT_SHARED: every page private, a host touch faults.
	priv := newGuestMemfd(t, vm, pg, kvm.GuestMemfdFlagMmap)
	pm, err := priv.Mmap(0, pg)
	if err != nil {
		t.Fatal(err)
	}
	if !faults(pm) {
		t.Error("a host read of a private (MMAP only) guest_memfd page did not fault")
	}
	priv.Munmap(pm)
	// Per-guest_memfd attributes: refused without the ioctl on a VM that
	// has none.
	err = g.SetMemoryAttributes2(kvm.MemoryAttributes2{Size: pg, Attributes: kvm.MemoryAttributePrivate})
	if !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("KVM_SET_MEMORY_ATTRIBUTES2 on a default VM's guest_memfd: %v, want refused", err)
	}
	if !sup.OK() {
		// Before 7.4 a VM with private memory refuses INIT_SHARED.
		sw := kvmtest.NewVM(t, sys, kvm.VMTypeSWProtected)
		flags, err := sw.CheckExtension(kvm.CapGuestMemfdFlags)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("SW-protected VM: KVM_CAP_GUEST_MEMFD_FLAGS %#x", flags)
		if flags&kvm.GuestMemfdFlagInitShared != 0 {
			t.Errorf("a SW-protected VM without per-guest_memfd attributes accepts INIT_SHARED (%#x)", flags)
		}
	}
	return sup
}

// openKVM opens /dev/kvm, closed at the end of the test: in the rig's
// guest it must be there.
func openKVM(t *testing.T) *kvm.System {
	t.Helper()
	sys, err := kvm.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sys.Close() })
	return sys
}

// newGuestMemfd creates a guest_memfd of size bytes with flags on vm,
// closed at the end of the test.
func newGuestMemfd(t *testing.T, vm *kvm.VM, size, flags uint64) *kvm.GuestMemfd {
	t.Helper()
	g, err := vm.CreateGuestMemfd(size, flags)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// inPlaceMemfd creates a guest_memfd of size bytes for memory in place
// (kvm.InPlaceFlags) on a new VM of vmType; it, the VM and /dev/kvm are
// closed at the end of the test.
func inPlaceMemfd(t *testing.T, vmType, size uint64) *kvm.GuestMemfd {
	t.Helper()
	return newGuestMemfd(t, kvmtest.NewVM(t, openKVM(t), vmType), size, kvm.InPlaceFlags)
}

// faults reports whether reading b[0] faults.
func faults(b []byte) (faulted bool) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() { faulted = recover() != nil }()
	sink = b[0]
	return false
}

// sink keeps faults' read from being optimised away.
var sink byte

// inPlaceDevice: the built-in guest's memory in place (one guest_memfd per
// block, mapped by the host and bound to the memslots) with the edu device
// behind a real IOMMU that maps that mapping. The guest makes a buffer
// shared and the device writes into the guest_memfd; the guest makes it
// private and writes: the device's next write is blocked, its read yields
// zeros, the host accessor refuses the page; back to shared the guest's
// bytes are still there (in place, nothing is punched).
func inPlaceDevice(t *testing.T, space iommu.Space, edu *Edu, sup kvm.InPlaceSupport) {
	const p = vmm.BuffersGPA + 0x100000
	steps := append(deviceRoundTrip(p, "P to shared", "P to private"),
		vmm.Convert("P to shared again", p, pg, memattr.Shared, vmm.ConvStatusOK),
		vmm.Verify("in place nothing was punched: P still holds the guest's bytes", p, eduBytes, seedPrivate+1),
		vmm.Host(4),
	)
	s := vmm.Scenario{Programs: []vmm.Program{{Steps: steps}}}
	r := newRigVM(t, guestmem.InPlace, space, edu, s, nil)
	mem := r.v.Memory()
	want := guestmem.EnforceUserSpace
	if sup.OK() {
		want = guestmem.EnforceGuestMemfd
	}
	if mem.Mode() != guestmem.InPlace || mem.Enforcement() != want {
		t.Fatalf("mode %v, enforcement %q; want in place, %q", mem.Mode(), mem.Enforcement(), want)
	}
	if _, ok := mem.Block(p).Backing().(*guestmem.KVMBacking); !ok {
		t.Fatalf("backing %T, want gmem's guest_memfd", mem.Block(p).Backing())
	}
	r.deviceRoundTripHost(p, "guest_memfd")
	r.host[3] = func() {
		if _, err := mem.ReadAt(make([]byte, 8), int64(p)); !errors.Is(err, guestmem.ErrPrivate) {
			t.Errorf("host read of private P: %v, want ErrPrivate", err)
		}
		r.deviceWrite(p, qwords(eduBytes, seedDevice+2))
		if got := r.deviceRead(p, eduBytes); !allZero(got) {
			t.Errorf("the device read private P")
		}
		if mem.Enforcement() == guestmem.EnforceUserSpace {
			// A default VM has no isolation: the host's mapping shows the
			// guest's private bytes, which the blocked write left alone.
			if !bytes.Equal(r.backing(p, eduBytes), qwords(eduBytes, seedPrivate+1)) {
				t.Errorf("the device's blocked write changed private P")
			}
		}
	}
	r.host[4] = func() {
		got := make([]byte, eduBytes)
		if _, err := mem.ReadAt(got, int64(p)); err != nil || !bytes.Equal(got, qwords(eduBytes, seedPrivate+1)) {
			t.Errorf("host read of P shared again: %v, or not the guest's bytes", err)
		}
		if got := r.deviceRead(p, eduBytes); !bytes.Equal(got, qwords(eduBytes, seedPrivate+1)) {
			t.Errorf("the device does not read P shared again")
		}
	}
	rep := r.run()
	ms := mem.Stats()
	t.Logf("%s: %d checks passed; %d conversions, %d punches, %d attribute calls; IOMMU %d map, %d unmap calls",
		rep.Enforcement, rep.ChecksPassed, rep.Conversions, ms.Punches, ms.AttributeCalls, r.att.Stats().MapCalls, r.att.Stats().UnmapCalls)
	if ms.Punches != 0 || rep.Punches != 0 {
		t.Errorf("in-place conversions punched %d times", ms.Punches)
	}
	if r.att.Stats().MapCalls == 0 {
		t.Error("the real IOMMU never mapped the guest_memfd")
	}
}

// ioasMapFile maps a memfd into an IOAS by file (IOMMU_IOAS_MAP_FILE, Linux
// 6.13): the device reads and writes its pages with no user mapping
// involved, and after the unmap reaches nothing. guest_memfd is refused.
func ioasMapFile(t *testing.T, bdf string) {
	f, sp, edu, done := openIOMMUFDEdu(t, bdf)
	t.Cleanup(done)
	fd, err := unix.MemfdCreate("gmem-map-file", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, 2*pg); err != nil {
		t.Fatal(err)
	}
	view, err := unix.Mmap(fd, 0, 2*pg, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(view)
	pattern(view[pg:], 9)
	scratch := mmapShared(t, pg)
	if err := sp.Map(scratchIOVA, pg, scratch); err != nil {
		t.Fatal(err)
	}
	defer sp.Unmap(scratchIOVA, pg)
	flags := iommufd.MapFixedIOVA | iommufd.MapReadable | iommufd.MapWriteable
	iova, err := f.IOASMapFile(sp.IOAS(), mapFileIOVA, fd, 0, 2*pg, flags)
	if err != nil {
		t.Fatalf("IOMMU_IOAS_MAP_FILE of a memfd: %v", err)
	}
	if iova != mapFileIOVA {
		t.Errorf("mapped at %#x, want %#x", iova, mapFileIOVA)
	}
	// The device reads page 1 of the file.
	if err := edu.ToDevice(mapFileIOVA+pg, eduBytes); err != nil {
		t.Fatal(err)
	}
	if err := edu.ToRAM(scratchIOVA, eduBytes); err != nil {
		t.Fatal(err)
	}
	expectBytes(t, "the device's read of the file-mapped page", scratch[:eduBytes], view[pg:pg+eduBytes])
	// The device writes page 0 of the file.
	pattern(scratch[:eduBytes], 3)
	if err := edu.ToDevice(scratchIOVA, eduBytes); err != nil {
		t.Fatal(err)
	}
	if err := edu.ToRAM(mapFileIOVA, eduBytes); err != nil {
		t.Fatal(err)
	}
	expectBytes(t, "the memfd after the device's write", view[:eduBytes], scratch[:eduBytes])
	if n, err := f.IOASUnmap(sp.IOAS(), mapFileIOVA, 2*pg); err != nil || n != 2*pg {
		t.Fatalf("IOMMU_IOAS_UNMAP: %d, %v", n, err)
	}
	clear(view)
	if err := edu.ToDevice(scratchIOVA, eduBytes); err != nil {
		t.Fatal(err)
	}
	if err := edu.ToRAM(mapFileIOVA, eduBytes); err != nil {
		t.Fatal(err)
	}
	if !allZero(view) {
		t.Error("the device reached the file after the unmap")
	}
	// guest_memfd cannot be pinned by file.
	g := inPlaceMemfd(t, kvm.VMTypeDefault, 2*pg)
	if _, err := f.IOASMapFile(sp.IOAS(), mapFileIOVA, g.Fd(), 0, 2*pg, flags); !errors.Is(err, unix.EINVAL) {
		t.Errorf("IOMMU_IOAS_MAP_FILE of a guest_memfd: %v, want EINVAL (only shmem and hugetlbfs files are pinned by file)", err)
		if err == nil {
			f.IOASUnmap(sp.IOAS(), mapFileIOVA, 2*pg)
		}
	}
}

// guestMemfdAttributes runs KVM_SET_MEMORY_ATTRIBUTES2 on a kernel with
// in-place conversion: a page mapped by a real VFIO type1 IOMMU is pinned,
// so a conversion to private over it is refused whole with EAGAIN naming
// it; after the unmap it goes through and the host's mapping faults.
func guestMemfdAttributes(t *testing.T, bdf string) {
	g := inPlaceMemfd(t, kvm.VMTypeSWProtected, 4*pg)
	mem, err := g.Mmap(0, 4*pg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Munmap(mem)
	pattern(mem, 7)
	sp, _, done := openKVMType1(t, bdf)
	t.Cleanup(done)
	const iova = 0x0D00_0000
	if err := sp.Map(iova, pg, mem[2*pg:3*pg]); err != nil {
		t.Fatal(err)
	}
	err = g.SetMemoryAttributes2(kvm.MemoryAttributes2{Size: 4 * pg, Attributes: kvm.MemoryAttributePrivate})
	var pe *kvm.PinnedError
	if !errors.As(err, &pe) || pe.Offset != 2*pg {
		t.Errorf("to private over a VFIO-mapped page: %v, want a PinnedError at %#x", err, 2*pg)
	}
	if faults(mem) {
		t.Error("a refused conversion made page 0 private")
	}
	if _, err := sp.Unmap(iova, pg); err != nil {
		t.Fatal(err)
	}
	if err := g.SetMemoryAttributes2(kvm.MemoryAttributes2{Size: 4 * pg, Attributes: kvm.MemoryAttributePrivate}); err != nil {
		t.Fatalf("after the unmap: %v", err)
	}
	if !faults(mem[pg:]) {
		t.Error("a host read of a private page did not fault")
	}
	if err := g.SetMemoryAttributes2(kvm.MemoryAttributes2{Size: 4 * pg}); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, pg)
	pattern(want, 7)
	expectBytes(t, "page 0 after a round trip", mem[:pg], want)
}

// inPlaceDemo runs gmem demo --mode inplace with the edu device behind
// real VFIO type1, as a user would.
func inPlaceDemo(t *testing.T, bdf string, sup kvm.InPlaceSupport) {
	if _, err := os.Stat(gmemPath); err != nil {
		t.Fatalf("the initramfs has no %s (scripts/rig packs it for --backend inplace): %v", gmemPath, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, gmemPath, "demo", "--mode", "inplace", "--vfio", "type1", "--vfio-device", bdf, "--json", "--quiet")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	t.Logf("gmem demo --mode inplace: %v\n%s%s", err, errOut.String(), out.String())
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		GuestRan     bool   `json:"guest_ran"`
		Mode         string `json:"mode"`
		Enforcement  string `json:"enforcement"`
		Flavour      string `json:"flavour"`
		ChecksPassed int    `json:"checks_passed"`
		ChecksFailed int    `json:"checks_failed"`
		Violations   uint64 `json:"violations"`
		Punches      uint64 `json:"punches"`
		VFIOMaps     uint64 `json:"vfio_map_calls"`
	}
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("the demo's output is not its JSON report: %v", err)
	}
	flavour := "in place on a default VM"
	if sup.OK() {
		flavour = "in place with private memory"
	}
	if !rep.GuestRan || rep.Mode != "inplace" || rep.ChecksPassed == 0 || rep.ChecksFailed != 0 || rep.Violations != 0 ||
		rep.Punches != 0 || rep.VFIOMaps == 0 || !strings.HasPrefix(rep.Flavour, flavour) {
		t.Errorf("report %+v; want the guest on KVM in place (%s), every check passed, no punch, real VFIO maps", rep, flavour)
	}
}

// sevenFour is how the tests that need Linux 7.4's in-place conversion say
// so when they skip.
const sevenFour = "needs in-place conversion with private memory"

var (
	goRunRE    = regexp.MustCompile(`^=== (?:RUN|CONT|NAME)\s+(\S+)`)
	goResultRE = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+) `)
	goLogRE    = regexp.MustCompile(`^\s+\S+_test\.go:\d+: (.*)$`)
)

// goTest is one top-level test of a go test -v run: its verdict, the
// subtests that failed or skipped, and what it and they logged.
type goTest struct {
	Verdict      string
	Failed       []string
	Skipped      []string
	Log          []string
	SubtestCount int
}

// parseGoTest reads the output of a test binary run with -test.v: the
// top-level tests in order. Log lines belong to the test the last RUN,
// CONT or NAME line named; a subtest's verdict may come after its
// parent's.
func parseGoTest(out []byte) ([]string, map[string]*goTest) {
	tests := map[string]*goTest{}
	var order []string
	logs := map[string][]string{}
	get := func(name string) *goTest {
		if tests[name] == nil {
			tests[name] = &goTest{}
			order = append(order, name)
		}
		return tests[name]
	}
	current := ""
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if m := goRunRE.FindStringSubmatch(line); m != nil {
			current = m[1]
			continue
		}
		if m := goResultRE.FindStringSubmatch(line); m != nil {
			top, sub, isSub := strings.Cut(m[2], "/")
			t := get(top)
			what := m[2]
			if l := logs[m[2]]; len(l) > 0 {
				what += ": " + strings.Join(l, "; ")
			}
			switch {
			case !isSub:
				t.Verdict, t.Log = m[1], logs[top]
			case m[1] == "FAIL":
				t.Failed = append(t.Failed, what)
			case m[1] == "SKIP":
				t.Skipped = append(t.Skipped, what)
			}
			if isSub && sub != "" {
				t.SubtestCount++
			}
			continue
		}
		if m := goLogRE.FindStringSubmatch(line); m != nil && current != "" {
			logs[current] = append(logs[current], m[1])
		}
	}
	return order, tests
}

// vmmTests runs vmm's tests (the /vmmtest binary) on this kernel's KVM and
// reports each top-level test as a check: it passes when the test passed
// and nothing in it was skipped. A test that skips for want of Linux 7.4's
// in-place conversion, on a kernel that lacks it, is reported as a note,
// not a check.
func vmmTests(t *testing.T, backend string, sup kvm.InPlaceSupport) {
	if _, err := os.Stat(vmmTestPath); err != nil {
		check(t, backend, "vmm-tests", func(t *testing.T) {
			t.Fatalf("the initramfs has no %s (scripts/rig packs it for --backend inplace): %v", vmmTestPath, err)
		})
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, runErr := exec.CommandContext(ctx, vmmTestPath, "-test.v", "-test.timeout=170s").CombinedOutput()
	order, tests := parseGoTest(out)
	if len(order) == 0 {
		check(t, backend, "vmm-tests", func(t *testing.T) {
			t.Fatalf("%s reported no tests (%v):\n%s", vmmTestPath, runErr, strings.Join(tail(strings.Split(string(out), "\n"), 20), "\n"))
		})
		return
	}
	failed := false
	for _, name := range order {
		r := tests[name]
		if !sup.OK() && r.Verdict == "SKIP" && strings.Contains(strings.Join(r.Log, " "), sevenFour) {
			fmt.Printf("GMEM-RIG note inplace: vmm %s not run on this kernel: %s\n", name, strings.Join(r.Log, "; "))
			continue
		}
		failed = failed || r.Verdict != "PASS"
		check(t, backend, "vmm-"+name, func(t *testing.T) {
			switch r.Verdict {
			case "":
				t.Errorf("%s never reported its end (%v)", name, runErr)
			case "FAIL":
				t.Errorf("failed: %s; subtests failed: %s", strings.Join(r.Log, "; "), strings.Join(r.Failed, " | "))
			case "SKIP":
				t.Errorf("skipped on a kernel that should run it: %s", strings.Join(r.Log, "; "))
			}
			for _, s := range r.Skipped {
				t.Errorf("subtest skipped on a kernel that should run it: %s", s)
			}
		})
	}
	if runErr != nil && !failed {
		check(t, backend, "vmm-tests", func(t *testing.T) {
			t.Fatalf("%s: %v with every test passed:\n%s", vmmTestPath, runErr, strings.Join(tail(strings.Split(string(out), "\n"), 20), "\n"))
		})
	}
}
