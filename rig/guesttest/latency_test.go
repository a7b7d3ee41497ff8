package guesttest

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/internal/bench"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/vmm"
)

// latencyPairs is how many times the guest converts a 4 KiB page and a
// 2 MiB range to shared and back: 2 × latencyPairs exits of each size.
const latencyPairs = 400

// TestRigLatency measures conversion latency as the guest sees it: the
// time from KVM_EXIT_HYPERCALL to the vCPU's next entry, for 4 KiB and
// 2 MiB conversions on a SW-protected VM whose shared memory a real IOMMU
// (type1, then iommufd) keeps mapped for the edu device. Each exit's time
// is split into the kernel calls gmem makes (KVM_SET_MEMORY_ATTRIBUTES,
// punches, the IOMMU's map and unmap), gmem's own work (the rest of the
// executor's time, with the VMM's model device's mapper and model IOMMU)
// and the VMM's (decoding, the invariant check, the answer). It prints
//
//	GMEM-RIG bench kvm latency <size>-<iommu> exits=N p50_ns= p99_ns= own_p50_ns= ... own_share_pct=
//
// for gmem bench --rig.
func TestRigLatency(t *testing.T) {
	requireGuest(t)
	if !wantBackend("kvm") {
		t.Skip("the kvm backend is not selected")
	}
	bdf := findEdu(t)
	for _, be := range []struct {
		name string
		open func(t *testing.T, bdf string) (iommu.Space, *Edu, func())
	}{{"type1", openKVMType1}, {"iommufd", openKVMIOMMUFD}} {
		check(t, "kvm", "latency-"+be.name, func(t *testing.T) {
			sp, _, done := be.open(t, bdf)
			t.Cleanup(done)
			kvmLatency(t, be.name, sp)
		})
	}
}

// exitCost is one conversion exit's time, split.
type exitCost struct {
	size                   uint64
	handled, took          time.Duration // exit to re-entry; the executor's part
	attrs, punches, iommus time.Duration // kernel calls in it
}

func (c exitCost) kernel() time.Duration { return c.attrs + c.punches + c.iommus }
func (c exitCost) own() time.Duration    { return c.took - c.kernel() }
func (c exitCost) vmm() time.Duration    { return c.handled - c.took }

// kvmLatency runs the conversions on a VM whose memory a mapper keeps in
// step on space, and prints the distributions.
func kvmLatency(t *testing.T, iommuName string, space iommu.Space) {
	const (
		small = vmm.BuffersGPA + 0x100000 // 4 KiB pages, never adjacent
		large = vmm.RAM1GPA               // two 2 MiB ranges
		huge  = 2 << 20
	)
	sh, pr, ok := memattr.Shared, memattr.Private, uint32(vmm.ConvStatusOK)
	var steps []vmm.Step
	for i := range latencyPairs {
		p := small + uint64(i%64)*2*pg
		l := large + uint64(i%2)*huge
		steps = append(steps,
			vmm.Convert("4 KiB to shared", p, pg, sh, ok), vmm.Convert("4 KiB to private", p, pg, pr, ok),
			vmm.Convert("2 MiB to shared", l, huge, sh, ok), vmm.Convert("2 MiB to private", l, huge, pr, ok))
	}
	timed := &bench.TimedSpace{Space: space}
	var (
		v       *vmm.VM
		costs   []exitCost
		pending exitCost // the conversion of the exit being handled
		last    guestmem.Stats
		lastIO  time.Duration
	)
	onConv := func(e vmm.ConversionEvent) {
		pending = exitCost{size: e.Request.Size, took: e.Took}
		if e.Err != nil {
			t.Errorf("conversion %+v: %v", e.Request, e.Err)
		}
	}
	onExit := func(e vmm.ExitTiming) {
		if _, ok := e.Exit.(kvm.HypercallExit); !ok || pending.took == 0 {
			return
		}
		st, io := v.Memory().Stats(), timed.Spent()
		pending.handled = e.Handled
		pending.attrs, pending.punches, pending.iommus = st.AttributeTime-last.AttributeTime, st.PunchTime-last.PunchTime, io-lastIO
		costs = append(costs, pending)
		pending, last, lastIO = exitCost{}, st, io
	}
	var err error
	v, err = vmm.New(vmm.Config{Mode: guestmem.Split, Logger: testLogger(t), OnConversion: onConv, OnExit: onExit,
		Scenario: &vmm.Scenario{Programs: []vmm.Program{{Steps: steps}}}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := v.Close(); err != nil {
			t.Errorf("close VM: %v", err)
		}
	}()
	if v.Memory().Enforcement() != guestmem.EnforceKVM || v.RequestPath() != vmm.ViaHypercall {
		t.Fatalf("enforcement %q, request path %d: want KVM and vmmcall", v.Memory().Enforcement(), v.RequestPath())
	}
	att, err := v.Memory().AttachIOMMU(timed, dma.Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := att.Detach(); err != nil {
			t.Errorf("detach: %v", err)
		}
	}()
	// What the setup spent is not the conversions'.
	last, lastIO = v.Memory().Stats(), timed.Spent()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	rep, err := v.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Errorf("guest checks: %d passed, %d failed: %v", rep.ChecksPassed, rep.ChecksFailed, rep.FailedChecks)
	}
	for _, size := range []uint64{pg, huge} {
		var cs []exitCost
		for _, c := range costs {
			if c.size == size {
				cs = append(cs, c)
			}
		}
		if len(cs) != 2*latencyPairs {
			t.Errorf("%d exits of %d bytes measured, want %d", len(cs), size, 2*latencyPairs)
			continue
		}
		if size == huge && slices.ContainsFunc(cs, func(c exitCost) bool { return c.attrs == 0 || c.punches == 0 || c.iommus == 0 }) {
			t.Errorf("a 2 MiB conversion made no attribute call, punch or IOMMU call")
		}
		latencyLine(t, iommuName, size, cs)
	}
}

// latencyLine prints the distribution of cs, exits of one size.
func latencyLine(t *testing.T, iommuName string, size uint64, cs []exitCost) {
	pct := func(f func(exitCost) time.Duration) (p50, p99 int64) {
		xs := make([]float64, len(cs))
		for i, c := range cs {
			xs[i] = float64(f(c))
		}
		slices.Sort(xs)
		return int64(bench.Quantile(xs, 0.5)), int64(bench.Quantile(xs, 0.99))
	}
	var handled, own time.Duration
	for _, c := range cs {
		handled += c.handled
		own += c.own()
	}
	all50, all99 := pct(func(c exitCost) time.Duration { return c.handled })
	own50, own99 := pct(exitCost.own)
	k50, k99 := pct(exitCost.kernel)
	v50, _ := pct(exitCost.vmm)
	a50, _ := pct(func(c exitCost) time.Duration { return c.attrs })
	p50, _ := pct(func(c exitCost) time.Duration { return c.punches })
	i50, _ := pct(func(c exitCost) time.Duration { return c.iommus })
	share := 100 * float64(own) / float64(handled)
	sizeName := "4KiB"
	if size != pg {
		sizeName = "2MiB"
	}
	benchLine("kvm", "latency", sizeName+"-"+iommuName, "exits", len(cs), "bytes", size,
		"p50_ns", all50, "p99_ns", all99, "own_p50_ns", own50, "own_p99_ns", own99, "kernel_p50_ns", k50, "kernel_p99_ns", k99,
		"vmm_p50_ns", v50, "attr_p50_ns", a50, "punch_p50_ns", p50, "iommu_p50_ns", i50, "own_share_pct", fmt.Sprintf("%.1f", share))
	t.Logf("%s %s: exit to re-entry p50 %v p99 %v; gmem's own p50 %v p99 %v (%.1f%% of all), kernel p50 %v (attributes %v, punch %v, IOMMU %v), VMM p50 %v",
		iommuName, sizeName, time.Duration(all50), time.Duration(all99), time.Duration(own50), time.Duration(own99), share,
		time.Duration(k50), time.Duration(a50), time.Duration(p50), time.Duration(i50), time.Duration(v50))
}
