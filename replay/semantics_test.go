//go:build linux

package replay

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/trace"
)

// direct drives guestmem the way a VMM does, without replay: one Memory on
// model backings configured as replay's gmem run, and one iommu.Model per
// device. It is the reference the replay is compared with.
type direct struct {
	mem  *guestmem.Memory
	devs map[string]*guestmem.Attachment
	ram  []trace.RAM
	mmio []trace.MMIO
}

// apply hands e to the library and returns its error ("" reason for
// success); machine events are collected until the first other event.
func (d *direct) apply(t *testing.T, e trace.Event) error {
	t.Helper()
	switch e := e.(type) {
	case trace.RAM:
		d.ram = append(d.ram, e)
		return nil
	case trace.MMIO:
		d.mmio = append(d.mmio, e)
		return nil
	}
	if d.mem == nil {
		cfg := guestmem.Config{Mode: guestmem.Split}
		if d.ram[0].Mode == trace.InPlace {
			cfg.Mode = guestmem.InPlace
		}
		for _, r := range d.ram {
			b, err := guestmem.NewModelBacking(r.Size, cfg.Mode)
			if err != nil {
				t.Fatal(err)
			}
			cfg.Blocks = append(cfg.Blocks, guestmem.BlockConfig{Name: r.Name, GPA: r.GPA, Size: r.Size, Backing: b, Hotplug: r.Block})
		}
		for i, h := range d.mmio {
			cfg.MMIO = append(cfg.MMIO, guestmem.Hole{Name: fmt.Sprint(i), GPA: h.GPA, Size: h.Size})
		}
		m, err := guestmem.New(cfg)
		if err != nil {
			t.Fatalf("the machine: %v", err)
		}
		d.mem, d.devs = m, map[string]*guestmem.Attachment{}
	}
	switch e := e.(type) {
	case trace.Attach:
		// As a VMM sets them up by default: iommufd IOASes that cut, and
		// the policy that picks the cut there and bounded extents on type1.
		caps := iommu.Caps{Rules: iommu.Type1v2, EntryLimit: e.Limit}
		if e.IOMMU == trace.IOMMUFD {
			caps = iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}
		}
		a, err := d.mem.AttachIOMMU(iommu.NewModel(caps), dma.Options{Policy: dma.Auto})
		if err == nil {
			d.devs[e.Dev] = a
		}
		return err
	case trace.Detach:
		a := d.devs[e.Dev]
		delete(d.devs, e.Dev)
		if a == nil {
			return nil
		}
		return a.Detach()
	case trace.Convert:
		to := memattr.Shared
		if e.To == trace.Private {
			to = memattr.Private
		}
		_, err := d.mem.Convert(guestmem.Request{GPA: e.GPA, Size: e.Size, To: to})
		return err
	case trace.Plug:
		return d.mem.Plug(e.GPA, e.Size)
	case trace.Unplug:
		return d.mem.Unplug(e.GPA, e.Size)
	}
	t.Fatalf("event %#v", e)
	return nil
}

// semanticsMachine is the guest of the request table: RAM below a PCI
// hole, unbacked memory above the hole, RAM from 4 GiB to 8 GiB, and right
// after it a virtio-mem block with its first 2 MiB plugged; one type1
// device with room for three mappings (a type1 limit of 4, one entry of
// which dma keeps free for splits: dma.DefaultSplitReserve).
const semanticsMachine = `{"op":"ram","name":"low","gpa":"0","size":"2GiB"}
{"op":"mmio","gpa":"0x80000000","size":"1GiB"}
{"op":"ram","name":"high","gpa":"0x100000000","size":"4GiB"}
{"op":"ram","name":"hot","gpa":"0x200000000","size":"1GiB","block":"2MiB"}
{"op":"attach","dev":"d","iommu":"type1","limit":4}
{"op":"plug","gpa":"0x200000000","size":"2MiB"}
`

// TestRequestSemantics is the table of ARCHITECTURE.md ("What a request
// means"), one subtest per row: each request's answer to the guest from
// guestmem directly and through replay, which must agree.
func TestRequestSemantics(t *testing.T) {
	for _, c := range []struct {
		row     string
		setup   string // requests before the one judged
		request string
		reason  string // "" for success
		ret     uint64 // what KVM_HC_MAP_GPA_RANGE returns to the guest
		shared  uint64 // shared bytes afterwards
	}{
		{row: "misaligned",
			request: `{"op":"convert","gpa":"0x1800","size":"4KiB","to":"shared"}`,
			reason:  ReasonMisaligned, ret: kvm.HypercallRetEINVAL},
		{row: "size 0",
			request: `{"op":"convert","gpa":"0x2000","size":"0","to":"shared"}`,
			reason:  ReasonEmpty, ret: kvm.HypercallRetEINVAL},
		{row: "wraps around",
			request: `{"op":"convert","gpa":"0xfffffffffffff000","size":"8KiB","to":"shared"}`,
			reason:  ReasonWraps, ret: kvm.HypercallRetEINVAL},
		{row: "beyond the address space",
			request: `{"op":"convert","gpa":"0x10000000000000","size":"4KiB","to":"shared"}`,
			reason:  ReasonBeyond, ret: kvm.HypercallRetEINVAL},
		{row: "MMIO to shared",
			request: `{"op":"convert","gpa":"0x80000000","size":"2MiB","to":"shared"}`,
			ret:     kvm.HypercallRetOK},
		{row: "MMIO to private",
			request: `{"op":"convert","gpa":"0x80000000","size":"2MiB","to":"private"}`,
			reason:  ReasonNotRAM, ret: kvm.HypercallRetEINVAL},
		{row: "unbacked to shared",
			request: `{"op":"convert","gpa":"0xc0000000","size":"2MiB","to":"shared"}`,
			ret:     kvm.HypercallRetOK},
		{row: "unbacked to private",
			request: `{"op":"convert","gpa":"0xc0000000","size":"2MiB","to":"private"}`,
			reason:  ReasonNotRAM, ret: kvm.HypercallRetEINVAL},
		{row: "RAM and MMIO to shared",
			request: `{"op":"convert","gpa":"0x7ffff000","size":"8KiB","to":"shared"}`,
			ret:     kvm.HypercallRetOK, shared: 4096},
		{row: "RAM and MMIO to private",
			setup:   `{"op":"convert","gpa":"0x7fff0000","size":"64KiB","to":"shared"}`,
			request: `{"op":"convert","gpa":"0x7fff0000","size":"128KiB","to":"private"}`,
			reason:  ReasonNotRAM, ret: kvm.HypercallRetEINVAL, shared: 64 << 10},
		{row: "spanning blocks",
			request: `{"op":"convert","gpa":"0x1fffff000","size":"8KiB","to":"shared"}`,
			ret:     kvm.HypercallRetOK, shared: 8192},
		{row: "same state",
			setup:   `{"op":"convert","gpa":"0x0","size":"64KiB","to":"shared"}`,
			request: `{"op":"convert","gpa":"0x0","size":"64KiB","to":"shared"}`,
			ret:     kvm.HypercallRetOK, shared: 64 << 10},
		{row: "mixed state",
			setup:   `{"op":"convert","gpa":"0x4000","size":"4KiB","to":"shared"}`,
			request: `{"op":"convert","gpa":"0x0","size":"64KiB","to":"shared"}`,
			ret:     kvm.HypercallRetOK, shared: 64 << 10},
		{row: "out of IOMMU entries",
			setup: `{"op":"convert","gpa":"0x0","size":"4KiB","to":"shared"}
{"op":"convert","gpa":"0x10000","size":"4KiB","to":"shared"}
{"op":"convert","gpa":"0x20000","size":"4KiB","to":"shared"}`,
			request: `{"op":"convert","gpa":"0x30000","size":"4KiB","to":"shared"}`,
			reason:  ReasonNoEntries, ret: kvm.HypercallRetEAGAIN, shared: 3 * 4096},
		{row: "plugged memory",
			request: `{"op":"convert","gpa":"0x200000000","size":"2MiB","to":"shared"}`,
			ret:     kvm.HypercallRetOK, shared: 2 << 20},
		{row: "unplugged memory",
			request: `{"op":"convert","gpa":"0x200200000","size":"4KiB","to":"shared"}`,
			reason:  ReasonUnplugged, ret: kvm.HypercallRetEINVAL},
		{row: "plug of plugged memory",
			request: `{"op":"plug","gpa":"0x200000000","size":"4MiB"}`,
			reason:  ReasonPlugged, ret: kvm.HypercallRetEINVAL},
		{row: "unplug of memory not all plugged",
			request: `{"op":"unplug","gpa":"0x200000000","size":"4MiB"}`,
			reason:  ReasonUnplugged, ret: kvm.HypercallRetEINVAL},
		{row: "partly plugged memory",
			request: `{"op":"convert","gpa":"0x2001ff000","size":"8KiB","to":"shared"}`,
			reason:  ReasonUnplugged, ret: kvm.HypercallRetEINVAL},
	} {
		t.Run(c.row, func(t *testing.T) {
			text := semanticsMachine + c.setup + "\n" + c.request + "\n"
			tr, err := trace.Parse(readerOf(text), trace.Options{})
			if err != nil {
				t.Fatal(err)
			}
			// The library, as a VMM drives it.
			d := &direct{}
			var last error
			for i, e := range tr.Events {
				err := d.apply(t, e)
				if i < len(tr.Events)-1 && err != nil {
					t.Fatalf("setup event %d %#v: %v", i+1, e, err)
				}
				last = err
			}
			if got := guestmem.HypercallRet(last); got != c.ret {
				t.Errorf("guestmem answers the guest %d (%v), want %d", got, last, c.ret)
			}
			if got := reasonOf(last); got != c.reason {
				t.Errorf("guestmem: %q (%v), want %q", got, last, c.reason)
			}
			if got := d.mem.StateStats().SharedBytes; got != c.shared {
				t.Errorf("guestmem: %d bytes shared, want %d", got, c.shared)
			}
			// The same through replay.
			rp := New(Options{})
			for i, e := range tr.Events {
				if err := rp.Apply(e, tr.Lines[i]); err != nil {
					t.Fatalf("replay, line %d: %v", tr.Lines[i], err)
				}
			}
			if err := rp.Finish(); err != nil {
				t.Fatal(err)
			}
			res := rp.Result()
			var got string
			for _, r := range res.Rejections {
				if r.Line == tr.Lines[len(tr.Lines)-1] && r.Run != "baseline" {
					got = r.Reason
				}
			}
			if got != c.reason {
				t.Errorf("replay: %q, want %q (%+v)", got, c.reason, res.Rejections)
			}
			if res.SharedBytes != c.shared {
				t.Errorf("replay: %d bytes shared, want %d", res.SharedBytes, c.shared)
			}
		})
	}
}

// reasonOf is Reason, with "" for success.
func reasonOf(err error) string {
	if err == nil {
		return ""
	}
	return Reason(err)
}

// outcomes replays events and returns, for the gmem run, the reason of
// every refused event by its 1-based index.
func replayOutcomes(t *testing.T, events []trace.Event) (map[int]string, Result) {
	t.Helper()
	rp := New(Options{MaxDetails: len(events) + 1})
	out := map[int]string{}
	for i, e := range events {
		var ie *InputError
		var re *RunError
		if err := rp.Apply(e, i+1); err != nil && !errors.As(err, &ie) && !errors.As(err, &re) {
			t.Fatalf("event %d %#v: %v", i+1, e, err)
		}
	}
	if err := rp.Finish(); err != nil {
		t.Fatal(err)
	}
	res := rp.Result()
	// An attach the gmem run could not do is refused by guestmem directly
	// too.
	for _, re := range res.RunErrorDetails {
		if re.Run == "gmem" {
			out[re.Line] = Reason(re.Err)
		}
	}
	for _, r := range res.Rejections {
		if r.Run != "baseline" {
			out[r.Line] = r.Reason
		}
	}
	return out, res
}

// directOutcomes drives the library directly with the events the replay
// accepted as a machine (input errors are skipped, as replay skips them)
// and returns the reason of every refused event.
func directOutcomes(t *testing.T, events []trace.Event) (map[int]string, *direct) {
	t.Helper()
	v := trace.NewValidator()
	d := &direct{}
	out := map[int]string{}
	for i, e := range events {
		if v.Check(e) != nil {
			continue
		}
		if err := d.apply(t, e); err != nil {
			out[i+1] = Reason(err)
		}
	}
	return out, d
}

// TestDifferential replays random traces and every generator's, and drives
// guestmem directly with the same events: the replay must give the same
// answer to every request, and end in the same state.
func TestDifferential(t *testing.T) {
	var traces [][]trace.Event
	rng := rand.New(rand.NewPCG(11, 1))
	for range 60 {
		data := make([]byte, 5*(20+rng.IntN(150)))
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		// Start with a RAM block so that the machine is there.
		data[0] = 0
		traces = append(traces, fuzzEvents(data))
	}
	c := trace.Common{RAM: 3 << 30, Events: 400, Devices: 2, IOMMU: trace.Type1, Limit: 200, Seed: 5}
	for _, g := range []func() (func(func(trace.Event) bool), error){
		func() (func(func(trace.Event) bool), error) { return trace.Boot(trace.BootOptions{Common: c}) },
		func() (func(func(trace.Event) bool), error) { return trace.Churn(trace.ChurnOptions{Common: c}) },
		func() (func(func(trace.Event) bool), error) { return trace.Implicit(trace.ImplicitOptions{Common: c}) },
		func() (func(func(trace.Event) bool), error) {
			return trace.Hugepage(trace.HugepageOptions{Common: c, Huge: 2 << 20})
		},
		func() (func(func(trace.Event) bool), error) { return trace.Hotplug(trace.HotplugOptions{Common: c}) },
		func() (func(func(trace.Event) bool), error) {
			return trace.Adversarial(trace.AdversarialOptions{Common: c, Window: 1 << 20})
		},
	} {
		seq, err := g()
		if err != nil {
			t.Fatal(err)
		}
		traces = append(traces, collectEvents(seq))
	}
	refused := 0
	for i, evs := range traces {
		got, res := replayOutcomes(t, evs)
		want, d := directOutcomes(t, evs)
		if diff := cmp.Diff(want, got); diff != "" {
			t.Fatalf("trace %d: refusals by event (-guestmem +replay):\n%s", i, diff)
		}
		if res.Violations != 0 {
			t.Fatalf("trace %d: %v", i, res.ViolationDetails)
		}
		if d.mem != nil {
			st := d.mem.StateStats()
			if st.SharedBytes != res.SharedBytes || st.PrivateBytes != res.PrivateBytes || st.UnpluggedBytes != res.UnpluggedBytes {
				t.Fatalf("trace %d: guestmem ends with %+v, replay with %+v", i, st, res)
			}
		}
		refused += len(want)
	}
	// The random traces must exercise refusals, or the comparison says
	// little.
	if refused < 100 {
		t.Errorf("only %d refusals in all traces", refused)
	}
}

func collectEvents(seq func(func(trace.Event) bool)) []trace.Event {
	var out []trace.Event
	for e := range seq {
		out = append(out, e)
	}
	return out
}

func readerOf(s string) *strings.Reader { return strings.NewReader(s) }
