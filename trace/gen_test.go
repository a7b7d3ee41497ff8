package trace

import (
	"bytes"
	"errors"
	"iter"
	"runtime"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gmemproject/gmem/span"
)

// generator builds one generator's events from common options and one knob
// (0 for its default), so that tests can treat them alike.
type generator struct {
	name string
	make func(c Common, knob int) (iter.Seq[Event], error)
}

func generators() []generator {
	return []generator{
		{"boot", func(c Common, k int) (iter.Seq[Event], error) { return Boot(BootOptions{Common: c, Live: k}) }},
		{"churn", func(c Common, k int) (iter.Seq[Event], error) { return Churn(ChurnOptions{Common: c, Live: k}) }},
		{"implicit", func(c Common, k int) (iter.Seq[Event], error) {
			return Implicit(ImplicitOptions{Common: c, Run: min(k, 256)})
		}},
		{"hugepage", func(c Common, k int) (iter.Seq[Event], error) {
			return Hugepage(HugepageOptions{Common: c, Live: k})
		}},
		{"hotplug", func(c Common, k int) (iter.Seq[Event], error) { return Hotplug(HotplugOptions{Common: c, Live: k}) }},
		{"adversarial", func(c Common, k int) (iter.Seq[Event], error) {
			return Adversarial(AdversarialOptions{Common: c, Window: uint64(k) * 8192})
		}},
	}
}

func collect(seq iter.Seq[Event]) []Event {
	var out []Event
	for e := range seq {
		out = append(out, e)
	}
	return out
}

// checkTrace checks what every generated trace must satisfy: machine events
// first, then only workload events, all valid under the Validator. It
// returns the number of events after the machine.
func checkTrace(t *testing.T, evs []Event) int {
	t.Helper()
	v := NewValidator()
	setup := true
	work := 0
	for i, e := range evs {
		switch e.(type) {
		case RAM, MMIO, Attach:
			if !setup {
				t.Fatalf("event %d %#v after the workload started", i, e)
			}
		default:
			setup = false
			work++
		}
		if err := v.Check(e); err != nil {
			t.Fatalf("event %d %#v: %v", i, e, err)
		}
	}
	return work
}

func TestGenerators(t *testing.T) {
	for _, g := range generators() {
		t.Run(g.name, func(t *testing.T) {
			c := Common{RAM: 4 << 30, Seed: 7, Events: 3000, Devices: 2}
			seq, err := g.make(c, 0)
			if err != nil {
				t.Fatal(err)
			}
			evs := collect(seq)
			work := checkTrace(t, evs)
			want := c.Events
			if g.name == "boot" {
				// Boot conversions come on top: swiotlb of 6% of 4 GiB in
				// 2 MiB pieces.
				want += (int(swiotlbSize(4<<30)) + hugePage2M - 1) / hugePage2M
			}
			if work != want {
				t.Errorf("%d workload events, want %d", work, want)
			}
			attaches := 0
			for _, e := range evs {
				if a, ok := e.(Attach); ok {
					attaches++
					if a.IOMMU != Type1 || a.Limit != 0 {
						t.Errorf("attach %+v: want type1 without limit", a)
					}
				}
			}
			if attaches != 2 {
				t.Errorf("%d devices attached, want 2", attaches)
			}

			// Same options, same trace; the sequence can be walked twice.
			if diff := cmp.Diff(evs, collect(seq)); diff != "" {
				t.Errorf("second walk differs:\n%s", diff)
			}
			seq2, err := g.make(c, 0)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(evs, collect(seq2)); diff != "" {
				t.Errorf("same seed differs:\n%s", diff)
			}
			c.Seed = 8
			seq3, err := g.make(c, 0)
			if err != nil {
				t.Fatal(err)
			}
			if cmp.Equal(evs, collect(seq3)) {
				t.Error("seeds 7 and 8 give the same trace")
			}

			// A consumer may stop early.
			n := 0
			for range seq {
				n++
				if n == 10 {
					break
				}
			}

			// Round trip through JSON Lines.
			var b bytes.Buffer
			w := NewWriter(&b)
			for _, e := range evs {
				if err := w.Write(e); err != nil {
					t.Fatal(err)
				}
			}
			if err := w.Flush(); err != nil {
				t.Fatal(err)
			}
			tr, err := Parse(&b, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(evs, tr.Events); diff != "" {
				t.Errorf("JSON Lines round trip:\n%s", diff)
			}
		})
	}
}

func TestGeneratorMachine(t *testing.T) {
	seq, err := Churn(ChurnOptions{Common: Common{RAM: 6 << 30, Events: 1, Devices: 1, IOMMU: IOMMUFD, Mode: InPlace}})
	if err != nil {
		t.Fatal(err)
	}
	evs := collect(seq)
	want := []Event{
		RAM{Name: "ram-below-4g", GPA: 0, Size: 2 << 30, Mode: InPlace},
		RAM{Name: "ram-above-4g", GPA: 4 << 30, Size: 4 << 30, Mode: InPlace},
		MMIO{GPA: 2 << 30, Size: 2 << 30},
		Attach{Dev: "dev0", IOMMU: IOMMUFD},
	}
	if diff := cmp.Diff(want, evs[:4]); diff != "" {
		t.Errorf("machine (-want +got):\n%s", diff)
	}
	seq, err = Churn(ChurnOptions{Common: Common{RAM: 1 << 30, Events: 1, Limit: 1000}})
	if err != nil {
		t.Fatal(err)
	}
	evs = collect(seq)
	want = []Event{
		RAM{Name: "ram-below-4g", GPA: 0, Size: 1 << 30, Mode: Split},
		MMIO{GPA: 2 << 30, Size: 2 << 30},
		Attach{Dev: "dev0", IOMMU: Type1, Limit: 1000},
	}
	if diff := cmp.Diff(want, evs[:3]); diff != "" {
		t.Errorf("small machine (-want +got):\n%s", diff)
	}
}

func TestGeneratorOptionErrors(t *testing.T) {
	for _, c := range []struct {
		name string
		make func() (iter.Seq[Event], error)
	}{
		{"ram too small", func() (iter.Seq[Event], error) { return Churn(ChurnOptions{Common: Common{RAM: 64 << 20}}) }},
		{"ram too big", func() (iter.Seq[Event], error) { return Churn(ChurnOptions{Common: Common{RAM: 2 << 50}}) }},
		{"ram not 2 MiB", func() (iter.Seq[Event], error) { return Churn(ChurnOptions{Common: Common{RAM: 1<<30 + 4096}}) }},
		{"negative events", func() (iter.Seq[Event], error) { return Churn(ChurnOptions{Common: Common{Events: -1}}) }},
		{"too many devices", func() (iter.Seq[Event], error) {
			return Churn(ChurnOptions{Common: Common{Devices: MaxDevices + 1}})
		}},
		{"negative devices", func() (iter.Seq[Event], error) { return Churn(ChurnOptions{Common: Common{Devices: -1}}) }},
		{"iommufd limit", func() (iter.Seq[Event], error) {
			return Churn(ChurnOptions{Common: Common{IOMMU: IOMMUFD, Limit: 10}})
		}},
		{"bad iommu", func() (iter.Seq[Event], error) { return Churn(ChurnOptions{Common: Common{IOMMU: 9}}) }},
		{"bad mode", func() (iter.Seq[Event], error) { return Churn(ChurnOptions{Common: Common{Mode: 9}}) }},
		{"bad platform", func() (iter.Seq[Event], error) { return Churn(ChurnOptions{Common: Common{Platform: 9}}) }},
		{"live negative", func() (iter.Seq[Event], error) { return Churn(ChurnOptions{Live: -1}) }},
		{"live too big", func() (iter.Seq[Event], error) { return Boot(BootOptions{Live: MaxLive + 1}) }},
		{"vcpus negative", func() (iter.Seq[Event], error) { return Boot(BootOptions{VCPUs: -1}) }},
		{"large above 100", func() (iter.Seq[Event], error) { return Churn(ChurnOptions{Large: 101}) }},
		{"run too long", func() (iter.Seq[Event], error) { return Implicit(ImplicitOptions{Run: 257}) }},
		{"run negative", func() (iter.Seq[Event], error) { return Implicit(ImplicitOptions{Run: -1}) }},
		{"huge not a power of two", func() (iter.Seq[Event], error) { return Hugepage(HugepageOptions{Huge: 3 << 20}) }},
		{"huge too big", func() (iter.Seq[Event], error) { return Hugepage(HugepageOptions{Huge: 2 << 30}) }},
		{"huge too small", func() (iter.Seq[Event], error) { return Hugepage(HugepageOptions{Huge: 1 << 20}) }},
		{"huge does not fit", func() (iter.Seq[Event], error) {
			return Hugepage(HugepageOptions{Common: Common{RAM: 512 << 20}, Huge: 1 << 30})
		}},
		{"block not a power of two", func() (iter.Seq[Event], error) { return Hotplug(HotplugOptions{Block: 3 << 20}) }},
		{"block too big", func() (iter.Seq[Event], error) { return Hotplug(HotplugOptions{Block: 2 << 30}) }},
		{"hotplug size not a multiple", func() (iter.Seq[Event], error) {
			return Hotplug(HotplugOptions{Hotplug: 200 << 20})
		}},
		{"hotplug size too big", func() (iter.Seq[Event], error) { return Hotplug(HotplugOptions{Hotplug: 1 << 50}) }},
		{"window odd", func() (iter.Seq[Event], error) { return Adversarial(AdversarialOptions{Window: 4096}) }},
		{"window too big", func() (iter.Seq[Event], error) {
			return Adversarial(AdversarialOptions{Common: Common{RAM: 1 << 30}, Window: 2 << 30})
		}},
	} {
		if seq, err := c.make(); !errors.Is(err, ErrValue) || seq != nil {
			t.Errorf("%s: error %v, want ErrValue and no sequence", c.name, err)
		}
	}
}

func TestRequests(t *testing.T) {
	const k, m = 4 << 10, 2 << 20
	r := func(a, b uint64) span.Range { return span.Range{Start: a, End: b} }
	for _, c := range []struct {
		p    Platform
		in   span.Range
		want []span.Range
	}{
		{TDX, r(0, k), []span.Range{r(0, k)}},
		{TDX, r(m/2, 2*m+m/2+k), []span.Range{r(m/2, m+m/2), r(m+m/2, 2*m+m/2), r(2*m+m/2, 2*m+m/2+k)}},
		{SNP, r(0, 16*k), []span.Range{r(0, 16*k)}},
		// 4 KiB entries up to the 2 MiB boundary, then 2 MiB entries, then
		// a 4 KiB tail: one exit per run of same-size entries.
		{SNP, r(m-2*k, 3*m+k), []span.Range{r(m-2*k, m), r(m, 3*m), r(3*m, 3*m+k)}},
		// At most 253 entries per request.
		{SNP, r(0, 300*k), []span.Range{r(0, 253*k), r(253*k, 300*k)}},
		{SNP, r(0, 600*m), []span.Range{r(0, 253*m), r(253*m, 506*m), r(506*m, 600*m)}},
		// A request of 253 entries mixing sizes splits where the size
		// changes, and the next request continues.
		{SNP, r(m-k, m+253*m), []span.Range{r(m-k, m), r(m, 253*m), r(253*m, 254*m)}},
	} {
		var got []span.Range
		requests(c.p, c.in, func(x span.Range) bool { got = append(got, x); return true })
		if diff := cmp.Diff(c.want, got); diff != "" {
			t.Errorf("%v %v (-want +got):\n%s", c.p, c.in, diff)
		}
	}
}

func TestSwiotlbSize(t *testing.T) {
	for _, c := range []struct{ ram, want uint64 }{
		{128 << 20, 64 << 20},
		{1 << 30, 64 << 20},
		{16 << 30, 3933 * 256 << 10}, // 6% = 1030792146 bytes, rounded up to 256 KiB
		{17 << 30, 1 << 30},
		{1 << 40, 1 << 30},
	} {
		if got := swiotlbSize(c.ram); got != c.want {
			t.Errorf("swiotlbSize(%s) = %d, want %d", FormatSize(c.ram), got, c.want)
		}
	}
}

// firstConversions returns the first n conversions of a trace.
func firstConversions(evs []Event, n int) []Convert {
	var out []Convert
	for _, e := range evs {
		if c, ok := e.(Convert); ok && len(out) < n {
			out = append(out, c)
		}
	}
	return out
}

func TestBootSwiotlb(t *testing.T) {
	pool := swiotlbSize(16 << 30)
	// TDX: 2 MiB pieces from the start of the pool, contiguous, at the top
	// of the RAM below 4 GiB.
	seq, err := Boot(BootOptions{Common: Common{RAM: 16 << 30, Events: 10, Seed: 3}})
	if err != nil {
		t.Fatal(err)
	}
	pieces := int((pool + hugePage2M - 1) / hugePage2M)
	conv := firstConversions(collect(seq), pieces)
	start := conv[0].GPA
	if end := start + pool; end > lowTop || end < lowTop-swiotlbSlack {
		t.Errorf("pool [%#x, %#x) not at the top of low RAM", start, end)
	}
	next := start
	for i, c := range conv {
		if c.GPA != next || c.To != Shared || (c.Size != hugePage2M && i != len(conv)-1) {
			t.Fatalf("piece %d %+v: want a 2 MiB shared piece at %#x", i, c, next)
		}
		next += c.Size
	}
	if next != start+pool {
		t.Errorf("pieces cover [%#x, %#x), want %s", start, next, FormatSize(pool))
	}

	// SNP: GHCB pages first, then the pool in page-state-change requests.
	seq, err = Boot(BootOptions{Common: Common{RAM: 16 << 30, Events: 10, Seed: 3, Platform: SNP}, VCPUs: 3})
	if err != nil {
		t.Fatal(err)
	}
	evs := collect(seq)
	conv = firstConversions(evs, 1000)
	for _, c := range conv[:3] {
		if c.Size != PageSize || c.To != Shared {
			t.Errorf("GHCB %+v: want one shared page", c)
		}
	}
	var want []span.Range
	poolStart := conv[3].GPA
	requests(SNP, span.Range{Start: poolStart, End: poolStart + pool}, func(r span.Range) bool {
		want = append(want, r)
		return true
	})
	var got []span.Range
	for _, c := range conv[3 : 3+len(want)] {
		got = append(got, c.Range())
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("SNP pool requests (-want +got):\n%s", diff)
	}
	if work := checkTrace(t, evs); work != 10+3+len(want) {
		t.Errorf("%d events after the machine, want %d", work, 10+3+len(want))
	}
}

// TestChurnPairs checks the churn model: buffers of the configured sizes,
// naturally aligned, each made private exactly as it was shared, never more
// than Live outstanding.
func TestChurnPairs(t *testing.T) {
	for _, g := range []struct {
		name  string
		make  func() (iter.Seq[Event], error)
		sizes []uint64
		live  int
	}{
		{"churn", func() (iter.Seq[Event], error) {
			return Churn(ChurnOptions{Common: Common{RAM: 1 << 30, Events: 5000, Seed: 1}, Live: 50, Large: 50})
		}, []uint64{4 << 10, 16 << 10}, 50},
		{"churn small only", func() (iter.Seq[Event], error) {
			return Churn(ChurnOptions{Common: Common{RAM: 1 << 30, Events: 2000, Seed: 1}, Live: 50, Large: -1})
		}, []uint64{4 << 10}, 50},
		{"boot", func() (iter.Seq[Event], error) {
			return Boot(BootOptions{Common: Common{RAM: 1 << 30, Events: 5000, Seed: 1}, Live: 40})
		}, []uint64{4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10}, 40},
	} {
		seq, err := g.make()
		if err != nil {
			t.Fatal(err)
		}
		evs := collect(seq)
		checkTrace(t, evs)
		live := map[span.Range]bool{}
		seen := map[uint64]bool{}
		for _, e := range evs {
			c, ok := e.(Convert)
			if !ok {
				continue
			}
			if g.name == "boot" && c.Size > 64<<10 {
				continue // the swiotlb
			}
			r := c.Range()
			if c.To == Shared {
				if !slices.Contains(g.sizes, c.Size) || c.GPA%c.Size != 0 {
					t.Fatalf("%s: buffer %v: want one of %v, naturally aligned", g.name, r, g.sizes)
				}
				live[r] = true
				seen[c.Size] = true
				if len(live) > g.live {
					t.Fatalf("%s: %d buffers live, limit %d", g.name, len(live), g.live)
				}
			} else {
				if !live[r] {
					t.Fatalf("%s: %v made private but not shared as such", g.name, r)
				}
				delete(live, r)
			}
		}
		if len(seen) != len(g.sizes) {
			t.Errorf("%s: sizes seen %v, want all of %v", g.name, seen, g.sizes)
		}
	}
}

func TestImplicitPages(t *testing.T) {
	seq, err := Implicit(ImplicitOptions{Common: Common{RAM: 1 << 30, Events: 4000, Seed: 2}, Run: 4, Live: 64})
	if err != nil {
		t.Fatal(err)
	}
	evs := collect(seq)
	checkTrace(t, evs)
	shared := map[uint64]bool{}
	adjacent := 0
	var prev Convert
	for _, e := range evs {
		c, ok := e.(Convert)
		if !ok {
			continue
		}
		if c.Size != PageSize {
			t.Fatalf("%+v: want one page", c)
		}
		if c.To == Shared {
			if shared[c.GPA] {
				t.Fatalf("%+v: page shared twice", c)
			}
			shared[c.GPA] = true
		} else {
			if !shared[c.GPA] {
				t.Fatalf("%+v: page made private but not shared", c)
			}
			delete(shared, c.GPA)
		}
		if len(shared) > 64 {
			t.Fatalf("%d pages shared, limit 64", len(shared))
		}
		if c.To == prev.To && c.GPA == prev.GPA+PageSize {
			adjacent++
		}
		prev = c
	}
	// Runs of mean 4 pages: about three of four faults follow the previous
	// page.
	if adjacent < 4000/2 {
		t.Errorf("only %d of 4000 faults follow the previous page", adjacent)
	}
}

func TestHugepagePieces(t *testing.T) {
	for _, huge := range []uint64{2 << 20, 1 << 30} {
		// SNP delivers a whole 2 MiB range as one request and a 1 GiB one
		// as three (253, 253 and 6 entries of 2 MiB); either way the first
		// request is larger than any piece.
		seq, err := Hugepage(HugepageOptions{Common: Common{RAM: 4 << 30, Events: 3000, Seed: 5, Platform: SNP}, Huge: huge, Live: 3})
		if err != nil {
			t.Fatal(err)
		}
		evs := collect(seq)
		checkTrace(t, evs)
		var live []span.Range // shared huge ranges
		var pending []span.Range
		var pendingTo State
		var releasing span.Range
		partial := 0
		for _, e := range evs {
			c, ok := e.(Convert)
			if !ok {
				continue
			}
			r := c.Range()
			if len(pending) > 0 {
				// The rest of a whole-range conversion, in order.
				if r != pending[0] || c.To != pendingTo {
					t.Fatalf("%v to %v, want %v to %v", r, c.To, pending[0], pendingTo)
				}
				pending = pending[1:]
				if len(pending) == 0 && pendingTo == Private {
					live = slices.DeleteFunc(live, func(x span.Range) bool { return x == releasing })
				}
				continue
			}
			var in span.Range
			for _, h := range live {
				if h.ContainsRange(r) {
					in = h
				}
			}
			var parts []span.Range
			whole := func(h span.Range) {
				requests(SNP, h, func(x span.Range) bool { parts = append(parts, x); return true })
			}
			switch {
			case in.Empty():
				h := span.Range{Start: r.Start, End: r.Start + huge}
				whole(h)
				if c.To != Shared || r.Start%huge != 0 || r != parts[0] {
					t.Fatalf("%v: neither inside a shared huge range nor the start of a new one", r)
				}
				live = append(live, h)
				if len(live) > 3 {
					t.Fatalf("%d huge ranges live, limit 3", len(live))
				}
				pending, pendingTo = parts[1:], Shared
			case c.Size <= huge/4:
				partial++
				if r.Start%c.Size != 0 || !span.IsPowerOfTwo(c.Size) {
					t.Fatalf("piece %v of %v: want a naturally aligned power of two", r, in)
				}
			default:
				whole(in)
				if c.To != Private || r != parts[0] {
					t.Fatalf("%v inside %v: neither a piece nor the start of a release", r, in)
				}
				releasing = in
				pending, pendingTo = parts[1:], Private
				if len(pending) == 0 {
					live = slices.DeleteFunc(live, func(x span.Range) bool { return x == in })
				}
			}
		}
		if partial < 1000 {
			t.Errorf("huge %s: %d partial conversions of 3000", FormatSize(huge), partial)
		}
	}
}

func TestHotplugTrace(t *testing.T) {
	seq, err := Hotplug(HotplugOptions{Common: Common{RAM: 1 << 30, Events: 20000, Seed: 4}, Hotplug: 1 << 30, Live: 32})
	if err != nil {
		t.Fatal(err)
	}
	evs := collect(seq)
	checkTrace(t, evs)
	var vmem RAM
	for _, e := range evs {
		if r, ok := e.(RAM); ok && r.Block != 0 {
			vmem = r
		}
	}
	want := RAM{Name: "virtio-mem0", GPA: 4 << 30, Size: 1 << 30, Mode: Split, Block: 2 << 20}
	if vmem != want {
		t.Fatalf("virtio-mem region %+v, want %+v", vmem, want)
	}
	plugs, unplugs, inside := 0, 0, 0
	for _, e := range evs {
		switch e := e.(type) {
		case Plug:
			plugs++
			// Whole requests never cross a 128 MiB memory block.
			if (e.GPA-vmem.GPA)/linuxMemoryBlock != (e.GPA+e.Size-1-vmem.GPA)/linuxMemoryBlock {
				t.Errorf("plug %v crosses a memory block", e.Range())
			}
		case Unplug:
			unplugs++
			if e.Size != vmem.Block && e.Size != linuxMemoryBlock {
				t.Errorf("unplug %v: want one device block or one memory block", e.Range())
			}
		case Convert:
			if vmem.Range().ContainsRange(e.Range()) {
				inside++
			}
		}
	}
	if plugs < 5 || unplugs < 5 || inside < 100 {
		t.Errorf("%d plugs, %d unplugs, %d conversions in hot-plugged memory: want some of each", plugs, unplugs, inside)
	}
}

func TestAdversarialCycle(t *testing.T) {
	const w = 1 << 20 // 256 pages
	seq, err := Adversarial(AdversarialOptions{Common: Common{RAM: 1 << 30, Seed: 9}, Window: w})
	if err != nil {
		t.Fatal(err)
	}
	evs := collect(seq)
	work := checkTrace(t, evs)
	conv := firstConversions(evs, work)
	// One cycle: 128 + 128 + 1 + 128 + 1 (a 1 MiB window is one request).
	if len(conv) != 386 {
		t.Fatalf("%d conversions, want one cycle of 386", len(conv))
	}
	start := conv[0].GPA
	if start%hugePage2M != 0 {
		t.Errorf("window at %#x, want a 2 MiB boundary", start)
	}
	check := func(phase string, cs []Convert, to State, step uint64) {
		for i, c := range cs {
			want := Convert{GPA: start + uint64(i)*step, Size: PageSize, To: to}
			if step == 0 {
				want = Convert{GPA: start, Size: w, To: to}
			}
			if c != want {
				t.Fatalf("%s %d: %+v, want %+v", phase, i, c, want)
			}
		}
	}
	check("alternate to shared", conv[:128], Shared, 2*PageSize)
	check("alternate to private", conv[128:256], Private, 2*PageSize)
	check("window to shared", conv[256:257], Shared, 0)
	check("cuts", conv[257:385], Private, 2*PageSize)
	check("window to private", conv[385:], Private, 0)

	// More events continue with the other parity.
	seq, err = Adversarial(AdversarialOptions{Common: Common{RAM: 1 << 30, Seed: 9, Events: 387}, Window: w})
	if err != nil {
		t.Fatal(err)
	}
	conv = firstConversions(collect(seq), 1000)
	if last := conv[len(conv)-1]; last != (Convert{GPA: start + PageSize, Size: PageSize, To: Shared}) {
		t.Errorf("first event of the second cycle %+v, want the odd page", last)
	}
}

// TestGeneratorsBoundedMemory checks that a 1 TiB guest costs no per-page
// (or per-block) memory: a bitmap of 1 TiB would be 32 MiB.
func TestGeneratorsBoundedMemory(t *testing.T) {
	for _, g := range generators() {
		seq, err := g.make(Common{RAM: 1 << 40, Events: 2000, Seed: 1}, 0)
		if err != nil {
			t.Fatal(err)
		}
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		n := 0
		for range seq {
			n++
		}
		runtime.ReadMemStats(&after)
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 4<<20 {
			t.Errorf("%s: %d events of a 1 TiB guest allocated %d bytes", g.name, n, alloc)
		}
		if n < 2000 {
			t.Errorf("%s: %d events", g.name, n)
		}
	}
}

// FuzzGenerators runs every generator with fuzzed options on small guests:
// whatever the options, a generator either refuses them with ErrValue or
// produces a valid trace of the requested length.
func FuzzGenerators(f *testing.F) {
	f.Add(uint8(0), uint64(1), uint16(512), uint16(300), uint16(0), uint8(0))
	f.Add(uint8(1), uint64(2), uint16(128), uint16(1000), uint16(3), uint8(1))
	f.Add(uint8(2), uint64(3), uint16(4096), uint16(500), uint16(200), uint8(2))
	f.Add(uint8(3), uint64(4), uint16(3000), uint16(800), uint16(1), uint8(3))
	f.Add(uint8(4), uint64(5), uint16(256), uint16(2000), uint16(2), uint8(0))
	f.Add(uint8(5), uint64(6), uint16(130), uint16(1000), uint16(64), uint8(1))
	f.Fuzz(func(t *testing.T, which uint8, seed uint64, ramMiB, events, knob uint16, flags uint8) {
		gs := generators()
		g := gs[int(which)%len(gs)]
		c := Common{
			RAM:    uint64(ramMiB) << 20,
			Seed:   seed,
			Events: int(events % 3000),
		}
		if flags&1 != 0 {
			c.Platform = SNP
		}
		if flags&2 != 0 {
			c.IOMMU = IOMMUFD
		}
		seq, err := g.make(c, int(knob%300))
		if err != nil {
			if !errors.Is(err, ErrValue) {
				t.Fatalf("%s: error %v does not wrap ErrValue", g.name, err)
			}
			return
		}
		evs := collect(seq)
		work := checkTrace(t, evs)
		if c.Events > 0 && work < c.Events {
			t.Fatalf("%s: %d events after the machine, want at least %d", g.name, work, c.Events)
		}
	})
}
