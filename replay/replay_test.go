package replay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/trace"
)

// replayText replays a JSON Lines trace and fails the test on any violation.
func replayText(t *testing.T, text string) (*Replayer, Result) {
	t.Helper()
	return replayWith(t, Options{}, text)
}

// replayWith is replayText with options.
func replayWith(t *testing.T, opts Options, text string) (*Replayer, Result) {
	t.Helper()
	tr, err := trace.Parse(strings.NewReader(text), trace.Options{})
	if err != nil {
		t.Fatal(err)
	}
	rp := New(opts)
	for i, e := range tr.Events {
		var ie *InputError
		var re *RunError
		if err := rp.Apply(e, tr.Lines[i]); err != nil && !errors.As(err, &ie) && !errors.As(err, &re) {
			t.Fatalf("line %d: %v", tr.Lines[i], err)
		}
	}
	if err := rp.Finish(); err != nil {
		t.Fatal(err)
	}
	return rp, rp.Result()
}

// want is what a golden test checks of a Result; every field is compared.
type want struct {
	events, conversions, rejected, inputErrors, diverged uint64
	runErrors                                            uint64
	reasons                                              map[string]uint64
	shared, unplugged                                    uint64
	devices                                              int
	base, gmem                                           runWant
}

type runWant struct {
	final, peak, maps, unmaps, cuts, splits, limit, failures uint64
	// policy is RunStats.Policy; "" stands for the run's usual one:
	// granule for the baseline, extent for gmem where a device was
	// attached.
	policy string
}

func (w want) check(t *testing.T, res Result) {
	t.Helper()
	got := want{
		events: res.Events, conversions: res.Conversions, rejected: res.Rejected, inputErrors: res.InputErrors, reasons: res.RejectedBy,
		diverged: res.Diverged, runErrors: res.RunErrors, shared: res.SharedBytes, unplugged: res.UnpluggedBytes, devices: res.Devices,
		base: runWant{res.Baseline.EntriesFinal, res.Baseline.EntriesPeak, res.Baseline.MapCalls, res.Baseline.UnmapCalls,
			res.Baseline.CutCalls, res.Baseline.Splits, res.Baseline.LimitFailures, res.Baseline.Failures, res.Baseline.Policy},
		gmem: runWant{res.Gmem.EntriesFinal, res.Gmem.EntriesPeak, res.Gmem.MapCalls, res.Gmem.UnmapCalls,
			res.Gmem.CutCalls, res.Gmem.Splits, res.Gmem.LimitFailures, res.Gmem.Failures, res.Gmem.Policy},
	}
	attached := len(res.Gmem.DevicePolicies) > 0
	if w.base.policy == "" && attached {
		w.base.policy = "granule"
	}
	if w.gmem.policy == "" && attached {
		w.gmem.policy = "extent"
	}
	if diff := cmp.Diff(w, got, cmp.AllowUnexported(want{}, runWant{}), cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("result (-want +got):\n%s\nviolations %v\nrejections %v", diff, res.ViolationDetails, res.Rejections)
	}
	if res.Violations != 0 {
		t.Errorf("%d violations: %v", res.Violations, res.ViolationDetails)
	}
	if res.SharedBytes+res.PrivateBytes+res.UnpluggedBytes != res.RAMBytes {
		t.Errorf("shared %d + private %d + unplugged %d != RAM %d", res.SharedBytes, res.PrivateBytes, res.UnpluggedBytes, res.RAMBytes)
	}
}

const ram1G = `{"op":"ram","name":"ram0","gpa":"0","size":"1GiB","mode":"split"}` + "\n"

// cut4KiB follows a device's attach line: 2 MiB made shared, then one page
// in its middle made private again, the conversion that splits an extent.
const cut4KiB = `
{"op":"convert","gpa":"0x200000","size":"2MiB","to":"shared"}
{"op":"convert","gpa":"0x201000","size":"4KiB","to":"private"}`

// TestGolden replays small hand-written traces whose results are computed by
// hand in the comments.
func TestGolden(t *testing.T) {
	for _, c := range []struct {
		name  string
		opts  Options
		trace string
		want  want
	}{
		{
			// 2 MiB = 512 pages: the baseline maps 512 granules, gmem one
			// extent.
			name: "2MiB to shared on type1",
			trace: ram1G + `{"op":"attach","dev":"dev0","iommu":"type1"}
{"op":"convert","gpa":"0x200000","size":"2MiB","to":"shared"}`,
			want: want{events: 3, conversions: 1, shared: 2 << 20, devices: 1,
				base: runWant{final: 512, peak: 512, maps: 512},
				gmem: runWant{final: 1, peak: 1, maps: 1}},
		},
		{
			// One page in the middle back to private: the baseline unmaps
			// its granule (1 call); gmem unmaps the extent and maps the two
			// remainders (a split: 1 unmap, 2 maps).
			name:  "4KiB cut out of a 2MiB extent",
			trace: ram1G + `{"op":"attach","dev":"dev0","iommu":"type1"}` + cut4KiB,
			want: want{events: 4, conversions: 2, shared: 2<<20 - 4096, devices: 1,
				base: runWant{final: 511, peak: 512, maps: 512, unmaps: 1},
				gmem: runWant{final: 2, peak: 2, maps: 3, unmaps: 1, splits: 1}},
		},
		{
			// The same on iommufd: gmem's IOAS cuts, so the page is one
			// cut call and the two remainders stay mapped (a split, no
			// unmap, no remap).
			name:  "4KiB cut out of a 2MiB extent on iommufd",
			trace: ram1G + `{"op":"attach","dev":"dev0","iommu":"iommufd"}` + cut4KiB,
			want: want{events: 4, conversions: 2, shared: 2<<20 - 4096, devices: 1,
				base: runWant{final: 511, peak: 512, maps: 512, unmaps: 1},
				gmem: runWant{final: 2, peak: 2, maps: 1, cuts: 1, splits: 1, policy: "cut"}},
		},
		{
			// With huge pages kept the IOAS cannot cut: Auto maps bounded
			// extents, and the split unmaps and remaps as on type1.
			name:  "iommufd with huge pages kept",
			opts:  Options{IOMMUFDHugePages: true},
			trace: ram1G + `{"op":"attach","dev":"dev0","iommu":"iommufd"}` + cut4KiB,
			want: want{events: 4, conversions: 2, shared: 2<<20 - 4096, devices: 1,
				base: runWant{final: 511, peak: 512, maps: 512, unmaps: 1},
				gmem: runWant{final: 2, peak: 2, maps: 3, unmaps: 1, splits: 1}},
		},
		{
			// A conversion to private the type1 device cannot take (its
			// one entry cannot be split) after the iommufd device cut the
			// page: the library undoes the cut by mapping the page again,
			// as an entry of its own (the kernel cannot join areas). I3
			// holds for the pages, not for the number of entries.
			name: "undone cut",
			trace: ram1G + `{"op":"attach","dev":"dev0","iommu":"iommufd"}
{"op":"attach","dev":"dev1","iommu":"type1","limit":1}
{"op":"convert","gpa":"0x200000","size":"0x31000","to":"shared"}
{"op":"convert","gpa":"0x220000","size":"4KiB","to":"private"}`,
			want: want{events: 5, conversions: 2, rejected: 2, diverged: 2, reasons: map[string]uint64{ReasonNoEntries: 2}, shared: 0x31000, devices: 2,
				// The baseline maps 49 granules on dev0, is refused on dev1
				// and unmaps them again; gmem maps an entry on each, cuts
				// dev0's, and maps the page back: 3 entries on dev0.
				base: runWant{maps: 49, unmaps: 49, limit: 1, failures: 1},
				gmem: runWant{final: 4, peak: 4, maps: 3, cuts: 1, limit: 1, failures: 1, policy: PolicyMixed}},
		},
		{
			// The extent policy asked for on an IOAS that cuts: no cut.
			name:  "iommufd, extent asked for",
			opts:  Options{Policy: dma.Extent},
			trace: ram1G + `{"op":"attach","dev":"dev0","iommu":"iommufd"}` + cut4KiB,
			want: want{events: 4, conversions: 2, shared: 2<<20 - 4096, devices: 1,
				base: runWant{final: 511, peak: 512, maps: 512, unmaps: 1},
				gmem: runWant{final: 2, peak: 2, maps: 3, unmaps: 1, splits: 1}},
		},
		{
			// A type1 and an iommufd device under Auto: extent for one, cut
			// for the other.
			name: "type1 and iommufd",
			trace: ram1G + `{"op":"attach","dev":"a","iommu":"type1"}
{"op":"attach","dev":"b","iommu":"iommufd"}
{"op":"convert","gpa":"0x200000","size":"2MiB","to":"shared"}
{"op":"convert","gpa":"0x201000","size":"4KiB","to":"private"}`,
			want: want{events: 5, conversions: 2, shared: 2<<20 - 4096, devices: 2,
				base: runWant{final: 1022, peak: 1024, maps: 1024, unmaps: 2},
				gmem: runWant{final: 4, peak: 4, maps: 4, unmaps: 1, cuts: 1, splits: 2, policy: PolicyMixed}},
		},
		{
			// The whole range back: only the two runs still shared change,
			// one notification each, and every entry lies inside one of
			// them, so each run needs one unmap call per run: 1 + 2.
			name: "and all of it back to private",
			trace: ram1G + `{"op":"attach","dev":"dev0","iommu":"type1"}
{"op":"convert","gpa":"0x200000","size":"2MiB","to":"shared"}
{"op":"convert","gpa":"0x201000","size":"4KiB","to":"private"}
{"op":"convert","gpa":"0x200000","size":"2MiB","to":"private"}`,
			want: want{events: 5, conversions: 3, devices: 1,
				base: runWant{peak: 512, maps: 512, unmaps: 3},
				gmem: runWant{peak: 2, maps: 3, unmaps: 3, splits: 1}},
		},
		{
			// 1 MiB = 256 granules > limit 100: the baseline refuses before
			// mapping anything (ENOSPC); gmem needs 1 entry. Converting it
			// back is accepted by both (a no-op for the baseline).
			name: "type1 limit",
			trace: ram1G + `{"op":"attach","dev":"dev0","iommu":"type1","limit":100}
{"op":"convert","gpa":"0x100000","size":"1MiB","to":"shared"}
{"op":"convert","gpa":"0x100000","size":"1MiB","to":"private"}
{"op":"convert","gpa":"0x0","size":"400KiB","to":"shared"}`,
			// 400 KiB = 100 granules: exactly the limit.
			want: want{events: 5, conversions: 3, rejected: 1, diverged: 1, reasons: map[string]uint64{ReasonNoEntries: 1}, shared: 400 << 10, devices: 1,
				base: runWant{final: 100, peak: 100, maps: 100, limit: 1, failures: 1},
				gmem: runWant{final: 1, peak: 1, maps: 2, unmaps: 1}},
		},
		{
			// A conversion across RAM, the PCI hole and RAM again: the RAM
			// parts (one page each side) are mapped by each region's mapper,
			// the hole is ignored. Converting the hole to private is refused;
			// converting memory that is neither RAM nor MMIO to shared is
			// accepted and ignored, as QEMU does.
			name: "MMIO hole",
			trace: `{"op":"ram","name":"low","gpa":"0","size":"2GiB","mode":"split"}
{"op":"mmio","gpa":"2GiB","size":"2GiB"}
{"op":"ram","name":"high","gpa":"4GiB","size":"1GiB","mode":"split"}
{"op":"attach","dev":"dev0","iommu":"iommufd"}
{"op":"convert","gpa":"0x7ffff000","size":"0x80002000","to":"shared"}
{"op":"convert","gpa":"2GiB","size":"4KiB","to":"private"}
{"op":"convert","gpa":"5GiB","size":"4KiB","to":"shared"}`,
			want: want{events: 7, conversions: 3, rejected: 1, reasons: map[string]uint64{ReasonNotRAM: 1}, shared: 8192, devices: 1,
				base: runWant{final: 2, peak: 2, maps: 2, failures: 1},
				gmem: runWant{final: 2, peak: 2, maps: 2, failures: 1, policy: "cut"}},
		},
		{
			// virtio-mem: plug 4 MiB (2 blocks), share 2 pages in the first
			// block (baseline 2 entries, gmem 1), unplug that block: the
			// mappings go and its pages are private again. Converting
			// unplugged memory is refused.
			name: "hotplug",
			trace: ram1G + `{"op":"ram","name":"vmem","gpa":"4GiB","size":"1GiB","mode":"split","block":"2MiB"}
{"op":"attach","dev":"dev0","iommu":"type1"}
{"op":"plug","gpa":"4GiB","size":"4MiB"}
{"op":"convert","gpa":"4GiB","size":"8KiB","to":"shared"}
{"op":"convert","gpa":"0x100200000","size":"4KiB","to":"shared"}
{"op":"unplug","gpa":"4GiB","size":"2MiB"}
{"op":"convert","gpa":"4GiB","size":"4KiB","to":"shared"}`,
			want: want{events: 8, conversions: 3, rejected: 1, reasons: map[string]uint64{ReasonUnplugged: 1}, shared: 4096, unplugged: 1<<30 - 2<<20, devices: 1,
				base: runWant{final: 1, peak: 3, maps: 3, unmaps: 1, failures: 1},
				gmem: runWant{final: 1, peak: 2, maps: 2, unmaps: 1, failures: 1}},
		},
		{
			// In place: the mapping goes before the kernel converts (the
			// phase check would report I2 otherwise).
			name: "in place",
			trace: `{"op":"ram","name":"ram0","gpa":"0","size":"1GiB","mode":"inplace"}
{"op":"attach","dev":"dev0","iommu":"iommufd"}
{"op":"convert","gpa":"0","size":"64KiB","to":"shared"}
{"op":"convert","gpa":"0x8000","size":"32KiB","to":"private"}`,
			want: want{events: 4, conversions: 2, shared: 32 << 10, devices: 1,
				base: runWant{final: 8, peak: 16, maps: 16, unmaps: 1},
				gmem: runWant{final: 1, peak: 1, maps: 1, cuts: 1, splits: 1, policy: "cut"}},
		},
		{
			// A conversion over two RAM blocks with room for one entry: the
			// first block's page is mapped, the second refused, and the
			// first converted back: nothing changes, in either run.
			name: "refused across two blocks",
			trace: `{"op":"ram","name":"a","gpa":"0","size":"1GiB","mode":"split"}
{"op":"ram","name":"b","gpa":"1GiB","size":"1GiB","mode":"split"}
{"op":"attach","dev":"dev0","iommu":"type1","limit":1}
{"op":"convert","gpa":"0x3ffff000","size":"8KiB","to":"shared"}`,
			want: want{events: 4, conversions: 1, rejected: 1, reasons: map[string]uint64{ReasonNoEntries: 1}, devices: 1,
				base: runWant{maps: 1, unmaps: 1, limit: 1, failures: 1},
				gmem: runWant{maps: 1, unmaps: 1, limit: 1, failures: 1}},
		},
		{
			// Attaching after the guest shared 2 MiB: registering replays
			// it, 512 entries for the baseline (over the limit of 100, so
			// its attach fails: a run error, not a refused guest request)
			// and 1 for gmem. Detach drops what was mapped but keeps the
			// counts: an unmap on type1, a cut on gmem's iommufd IOAS,
			// which cuts (so gmem's devices had two policies).
			name: "attach after conversions, detach",
			trace: ram1G + `{"op":"convert","gpa":"0","size":"2MiB","to":"shared"}
{"op":"attach","dev":"dev0","iommu":"type1","limit":100}
{"op":"detach","dev":"dev0"}
{"op":"attach","dev":"dev1","iommu":"iommufd"}
{"op":"detach","dev":"dev1"}`,
			want: want{events: 6, conversions: 1, runErrors: 1, shared: 2 << 20,
				base: runWant{peak: 512, maps: 512, unmaps: 1},
				gmem: runWant{peak: 1, maps: 2, unmaps: 1, cuts: 1, policy: PolicyMixed}},
		},
		{
			// Events that describe an impossible machine are input errors,
			// not replayed; a request to share unbacked memory is accepted.
			name: "input errors",
			trace: ram1G + `{"op":"attach","dev":"dev0","iommu":"type1"}
{"op":"attach","dev":"dev0","iommu":"type1"}
{"op":"detach","dev":"nope"}
{"op":"plug","gpa":"0","size":"2MiB"}
{"op":"ram","name":"ram0","gpa":"2GiB","size":"1GiB","mode":"split"}
{"op":"ram","name":"other","gpa":"512MiB","size":"1GiB","mode":"split"}
{"op":"convert","gpa":"0xfffff000","size":"8KiB","to":"shared"}`,
			want: want{events: 8, conversions: 1, inputErrors: 5, devices: 1},
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, res := replayWith(t, c.opts, c.trace)
			c.want.check(t, res)
		})
	}
}

// TestViolationsDetected breaks the state behind the library's back and
// expects the checks to report it: they can fail.
func TestViolationsDetected(t *testing.T) {
	setup := ram1G + `{"op":"attach","dev":"dev0","iommu":"type1"}
{"op":"convert","gpa":"0x200000","size":"2MiB","to":"shared"}`
	apply := func(rp *Replayer, line string) error {
		e, err := trace.ParseEvent([]byte(line))
		if err != nil {
			t.Fatal(err)
		}
		return rp.Apply(e, 99)
	}
	t.Run("mapping of a private page", func(t *testing.T) {
		rp, _ := replayTextOpen(t, setup)
		dev := rp.runs[1].devices["dev0"]
		if err := dev.model.Map(0x600000, 4096, nil); err != nil {
			t.Fatal(err)
		}
		err := apply(rp, `{"op":"convert","gpa":"0x600000","size":"4KiB","to":"private"}`)
		var v *Violation
		if !errors.As(err, &v) || v.Invariant != "I2" || v.Run != "gmem" || v.Line != 99 || v.Event != 4 {
			t.Fatalf("got %v, want an I2 violation in gmem at event 4, line 99", err)
		}
		if res := rp.Result(); res.Violations < 2 || !slices.ContainsFunc(res.ViolationDetails, func(v Violation) bool {
			return v.Invariant == "I1" && strings.Contains(v.Detail, "mappers hold 1 entries, its IOMMU 2")
		}) {
			t.Errorf("the entry count mismatch was not reported: %+v", res.ViolationDetails)
		}
	})
	// The executor's backend hook reports a device reaching memory between
	// the steps of a change: memory made private in place, or shared memory
	// discarded, while an entry still covers it.
	for _, c := range []struct {
		mode, when string
		fault      guestmem.Fault
	}{
		{"inplace", "in-place conversion to private", guestmem.Fault{Op: guestmem.OpSetAttributes, To: memattr.Private}},
		{"split", "discard of the shared memory", guestmem.Fault{Op: guestmem.OpPunch, To: memattr.Private, File: "shared"}},
	} {
		t.Run("mapping between steps, "+c.mode, func(t *testing.T) {
			rp, _ := replayTextOpen(t, `{"op":"ram","name":"ram0","gpa":"0","size":"1GiB","mode":"`+c.mode+`"}
{"op":"attach","dev":"dev0","iommu":"iommufd"}`)
			gmem := rp.runs[1]
			if err := gmem.devices["dev0"].model.Map(0x600000, 4096, nil); err != nil {
				t.Fatal(err)
			}
			c.fault.GPA = span.Range{Start: 0x600000, End: 0x602000}
			if err := gmem.observe(c.fault); err != nil {
				t.Fatal(err)
			}
			// The other steps are not checked: devices may map memory about
			// to be made private while it is still shared.
			other := c.fault
			other.Op, other.File = guestmem.OpPunch, "private"
			if c.mode == "inplace" {
				other.Op, other.To = guestmem.OpSetAttributes, memattr.Shared
			}
			if err := gmem.observe(other); err != nil {
				t.Fatal(err)
			}
			res := rp.Result()
			if res.Violations != 1 || res.ViolationDetails[0].Invariant != "I2" || !strings.Contains(res.ViolationDetails[0].Detail, c.when) {
				t.Fatalf("violations %+v, want one I2 at the %s", res.ViolationDetails, c.when)
			}
		})
	}
	t.Run("mapping removed", func(t *testing.T) {
		rp, _ := replayTextOpen(t, setup)
		dev := rp.runs[0].devices["dev0"]
		if _, err := dev.model.Unmap(0x3ff000, 4096); err != nil {
			t.Fatal(err)
		}
		err := rp.Finish()
		var v *Violation
		if !errors.As(err, &v) || v.Invariant != "I1" || v.Run != "baseline" || v.Event != 0 || !strings.Contains(v.Detail, "populated but not mapped") {
			t.Fatalf("got %v, want I1 in the baseline at the end", err)
		}
	})
	t.Run("runs disagree", func(t *testing.T) {
		rp, _ := replayTextOpen(t, setup)
		// Share a page in gmem only, with no device to notice.
		if err := rp.runs[1].mem.Blocks()[0].Attributes().Convert(0x800000, 4096, memattr.Shared); err != nil {
			t.Fatal(err)
		}
		err := rp.Finish()
		var v *Violation
		if !errors.As(err, &v) || v.Run != "both" || v.Invariant != "I4" {
			t.Fatalf("got %v, want the runs to disagree", err)
		}
	})
	t.Run("event range disagrees", func(t *testing.T) {
		rp, _ := replayTextOpen(t, setup)
		// A refused event must leave the state as it was: make the
		// baseline's IOMMU refuse, then change the state behind its back
		// from its fault hook, as a broken rollback would.
		base := rp.runs[0]
		base.devices["dev0"].model.SetFault(func(iommu.Call) error { return unix.EIO })
		err := apply(rp, `{"op":"convert","gpa":"0x800000","size":"4KiB","to":"shared"}`)
		if err != nil {
			t.Fatalf("refused event: %v", err)
		}
		res := rp.Result()
		if res.Rejected != 1 || res.Diverged != 1 || res.Baseline.Failures != 1 || res.Baseline.LimitFailures != 0 {
			t.Errorf("refusal not counted: %+v", res)
		}
		base.devices["dev0"].model.SetFault(nil)
		// Both accept the way back: the range is the same again.
		if err := apply(rp, `{"op":"convert","gpa":"0x800000","size":"4KiB","to":"private"}`); err != nil {
			t.Fatal(err)
		}
		if err := rp.Finish(); err != nil {
			t.Fatal(err)
		}
		if len(rp.diverged.Ranges()) != 0 {
			t.Errorf("diverged ranges left: %v", rp.diverged.Ranges())
		}
	})
}

// replayTextOpen is replayText without Finish.
func replayTextOpen(t *testing.T, text string) (*Replayer, Result) {
	t.Helper()
	tr, err := trace.Parse(strings.NewReader(text), trace.Options{})
	if err != nil {
		t.Fatal(err)
	}
	rp := New(Options{})
	for i, e := range tr.Events {
		if err := rp.Apply(e, tr.Lines[i]); err != nil {
			t.Fatalf("line %d: %v", tr.Lines[i], err)
		}
	}
	return rp, rp.Result()
}

// TestGenerators replays every generator at a small size, in several
// machine configurations, and expects no violation and no invalid event.
func TestGenerators(t *testing.T) {
	configs := []trace.Common{
		{RAM: 1 << 30, Events: 300, Devices: 2, IOMMU: trace.Type1, Mode: trace.Split, Platform: trace.TDX, Seed: 1},
		{RAM: 3 << 30, Events: 300, Devices: 1, IOMMU: trace.IOMMUFD, Mode: trace.InPlace, Platform: trace.SNP, Seed: 2},
		{RAM: 1 << 30, Events: 300, Devices: 1, IOMMU: trace.Type1, Limit: 300, Mode: trace.InPlace, Platform: trace.TDX, Seed: 3},
	}
	for i, c := range configs {
		gens := map[string]func() (func(func(trace.Event) bool), error){
			"boot":     func() (func(func(trace.Event) bool), error) { return trace.Boot(trace.BootOptions{Common: c}) },
			"churn":    func() (func(func(trace.Event) bool), error) { return trace.Churn(trace.ChurnOptions{Common: c}) },
			"implicit": func() (func(func(trace.Event) bool), error) { return trace.Implicit(trace.ImplicitOptions{Common: c}) },
			"hugepage": func() (func(func(trace.Event) bool), error) {
				return trace.Hugepage(trace.HugepageOptions{Common: c, Huge: 2 << 20})
			},
			"hotplug": func() (func(func(trace.Event) bool), error) { return trace.Hotplug(trace.HotplugOptions{Common: c}) },
			"adversarial": func() (func(func(trace.Event) bool), error) {
				return trace.Adversarial(trace.AdversarialOptions{Common: c, Window: 1 << 20})
			},
		}
		for name, gen := range gens {
			t.Run(fmt.Sprintf("%s/config%d", name, i), func(t *testing.T) {
				seq, err := gen()
				if err != nil {
					t.Fatal(err)
				}
				res := Events(seq, Options{})
				if res.Violations != 0 || res.InputErrors != 0 {
					t.Fatalf("%d violations, %d input errors: %v %v", res.Violations, res.InputErrors, res.ViolationDetails, res.InputErrorDetails)
				}
				// A generator asks only what a VMM grants: the only refusals
				// are the baseline's, for want of type1 entries.
				if res.Rejected != res.RejectedBy[ReasonNoEntries] || res.Rejected != res.Baseline.LimitFailures {
					t.Errorf("rejections other than the baseline's type1 limit: %v %v", res.RejectedBy, res.Rejections)
				}
				if res.Gmem.Failures != 0 {
					t.Errorf("gmem refused %d events: %v", res.Gmem.Failures, res.Rejections)
				}
				if res.Conversions == 0 || res.Gmem.MapCalls == 0 {
					t.Errorf("nothing replayed: %+v", res)
				}
				// gmem never needs more entries than the baseline.
				if res.Baseline.LimitFailures == 0 && res.Gmem.EntriesPeak > res.Baseline.EntriesPeak {
					t.Errorf("gmem peak %d > baseline peak %d", res.Gmem.EntriesPeak, res.Baseline.EntriesPeak)
				}
			})
		}
	}
}

// TestPolicies replays one hugepage trace, whose conversions to private
// fall inside shared extents, with each policy the gmem run can have. On
// iommufd the default is the cut: no window and nothing re-pinned, a cut
// call per split; the extent policy asked for, or an IOAS that keeps huge
// pages, gives type1's bounded-extent figures exactly, with a window of at
// most two 2 MiB chunks per conversion. Every run ends in the same state
// with the same entries.
func TestPolicies(t *testing.T) {
	run := func(iommuKind trace.IOMMU, opts Options) Result {
		t.Helper()
		seq, err := trace.Hugepage(trace.HugepageOptions{Common: trace.Common{RAM: 2 << 30, Events: 1500, Devices: 1,
			IOMMU: iommuKind, Mode: trace.Split, Platform: trace.TDX, Seed: 7}, Huge: 2 << 20})
		if err != nil {
			t.Fatal(err)
		}
		res := Events(seq, opts)
		if res.Violations != 0 || res.RunErrors != 0 || res.Rejected != 0 {
			t.Fatalf("%v %+v: %d violations, %d run errors, %d rejected: %v %v", iommuKind, opts, res.Violations, res.RunErrors, res.Rejected,
				res.ViolationDetails, res.RunErrorDetails)
		}
		return res
	}
	cut := run(trace.IOMMUFD, Options{})
	extent := run(trace.IOMMUFD, Options{Policy: dma.Extent})
	kept := run(trace.IOMMUFD, Options{IOMMUFDHugePages: true})
	explicitCut := run(trace.IOMMUFD, Options{Policy: dma.Cut})
	type1 := run(trace.Type1, Options{})

	g := cut.Gmem
	if g.Policy != "cut" || cut.Baseline.Policy != "granule" {
		t.Errorf("iommufd, auto: gmem %q, baseline %q; want cut and granule", g.Policy, cut.Baseline.Policy)
	}
	if g.WindowBytes != 0 || g.MaxWindow != 0 || g.RepinnedBytes != 0 || g.Splits == 0 || g.CutCalls == 0 {
		t.Errorf("iommufd, cut: window %d (largest %d), re-pinned %d, %d splits, %d cut calls; want no window, nothing re-pinned, and cuts",
			g.WindowBytes, g.MaxWindow, g.RepinnedBytes, g.Splits, g.CutCalls)
	}
	want := []DevicePolicy{{Dev: "dev0", IOMMU: "iommufd", Cut: true, Policy: "cut"}}
	if !slices.Equal(g.DevicePolicies, want) {
		t.Errorf("device policies %+v, want %+v", g.DevicePolicies, want)
	}
	if b := cut.Baseline.DevicePolicies; len(b) != 1 || b[0].Cut || b[0].Policy != "granule" || b[0].Space() != "iommufd, huge pages kept" {
		t.Errorf("the baseline's iommufd device: %+v, want QEMU's IOAS (huge pages kept) mapped by granule", b)
	}
	if d := explicitCut.Gmem; d.Policy != "cut" || d.MapCalls != g.MapCalls || d.CutCalls != g.CutCalls || d.WindowBytes != 0 {
		t.Errorf("cut asked for: %+v, want what auto did: %+v", d, g)
	}

	for name, r := range map[string]Result{"iommufd, extent": extent, "iommufd, huge pages kept": kept, "type1, auto": type1} {
		e := r.Gmem
		if e.Policy != "extent" || e.CutCalls != 0 {
			t.Errorf("%s: policy %q with %d cut calls, want extent and none", name, e.Policy, e.CutCalls)
		}
		if e.WindowBytes == 0 || e.RepinnedBytes == 0 || e.MaxWindow == 0 || e.MaxWindow > 2*dma.DefaultMaxExtent {
			t.Errorf("%s: window %d (largest %d), re-pinned %d; want a window bounded by two chunks", name, e.WindowBytes, e.MaxWindow, e.RepinnedBytes)
		}
		// The same splits and state as the cut, with two more map calls
		// and one unmap per split (a page from the middle of an entry)
		// at most.
		if e.Splits != g.Splits || e.EntriesFinal != g.EntriesFinal || e.EntriesPeak != g.EntriesPeak || r.SharedBytes != cut.SharedBytes {
			t.Errorf("%s: %d splits, %d entries (peak %d), %d shared; the cut: %d, %d (%d), %d", name, e.Splits, e.EntriesFinal, e.EntriesPeak,
				r.SharedBytes, g.Splits, g.EntriesFinal, g.EntriesPeak, cut.SharedBytes)
		}
		if e.MapCalls <= g.MapCalls || e.MapCalls > g.MapCalls+2*g.Splits || e.PinnedBytes != g.PinnedBytes+e.RepinnedBytes {
			t.Errorf("%s: %d map calls pinning %d (%d re-pinned); the cut: %d pinning %d, %d splits", name, e.MapCalls, e.PinnedBytes,
				e.RepinnedBytes, g.MapCalls, g.PinnedBytes, g.Splits)
		}
	}
	// Bounded extent costs the same on type1 and iommufd.
	for _, r := range []Result{kept, type1} {
		a, b := r.Gmem, extent.Gmem
		if a.MapCalls != b.MapCalls || a.UnmapCalls != b.UnmapCalls || a.WindowBytes != b.WindowBytes || a.RepinnedBytes != b.RepinnedBytes {
			t.Errorf("bounded extent differs between spaces: %+v against %+v", a, b)
		}
	}
	if d := kept.Gmem.DevicePolicies; len(d) != 1 || d[0].Cut || d[0].Space() != "iommufd, huge pages kept" {
		t.Errorf("huge pages kept: %+v", d)
	}
	if d := type1.Gmem.DevicePolicies; len(d) != 1 || d[0].Space() != "type1" {
		t.Errorf("type1: %+v", d)
	}
}

// TestPolicyOptions: the gmem run takes auto, extent or cut; granule (the
// baseline's), cut with no space that cuts and an unknown policy are
// refused up front, and cut on a device that cannot cut is a run error
// that says so.
func TestPolicyOptions(t *testing.T) {
	for _, c := range []struct {
		opts Options
		ok   bool
	}{
		{Options{}, true},
		{Options{Policy: dma.Extent}, true},
		{Options{Policy: dma.Cut}, true},
		{Options{Policy: dma.Extent, IOMMUFDHugePages: true}, true},
		{Options{IOMMUFDHugePages: true}, true},
		{Options{Policy: dma.Granule}, false},
		{Options{Policy: dma.Cut, IOMMUFDHugePages: true}, false},
		{Options{Policy: dma.Policy(9)}, false},
	} {
		if err := c.opts.Validate(); (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrOptions)) {
			t.Errorf("Validate(%+v) = %v, want ok %v", c.opts, err, c.ok)
		}
	}
	_, res := replayWith(t, Options{Policy: dma.Cut}, ram1G+`{"op":"attach","dev":"t","iommu":"type1"}
{"op":"attach","dev":"f","iommu":"iommufd"}
{"op":"convert","gpa":"0","size":"2MiB","to":"shared"}
{"op":"convert","gpa":"4KiB","size":"4KiB","to":"private"}`)
	if res.RunErrors != 1 || len(res.RunErrorDetails) != 1 {
		t.Fatalf("run errors %d: %v", res.RunErrors, res.RunErrorDetails)
	}
	re := res.RunErrorDetails[0]
	if re.Run != "gmem" || !errors.Is(re.Err, dma.ErrOptions) || !strings.Contains(re.Message, "cut") {
		t.Errorf("run error %+v, want gmem's, wrapping dma.ErrOptions", re)
	}
	if res.Gmem.Policy != "cut" || res.Gmem.CutCalls != 1 || len(res.Gmem.DevicePolicies) != 1 || res.Baseline.Policy != "granule" {
		t.Errorf("gmem %+v, baseline %+v", res.Gmem, res.Baseline)
	}
}

// TestGeneratorsKernelModel replays the in-place traces of every generator
// on the kernel's in-place rules (Options.KernelModel): every conversion to
// private reaches a kernel that refuses pinned pages, with the devices'
// IOMMUs as the pinners, and none is refused; the kernel's attributes end
// equal to the state, and the results are those of the replay without the
// model.
func TestGeneratorsKernelModel(t *testing.T) {
	configs := []trace.Common{
		{RAM: 3 << 30, Events: 300, Devices: 2, IOMMU: trace.IOMMUFD, Mode: trace.InPlace, Platform: trace.SNP, Seed: 4},
		{RAM: 1 << 30, Events: 300, Devices: 1, IOMMU: trace.Type1, Limit: 300, Mode: trace.InPlace, Platform: trace.TDX, Seed: 5},
	}
	for i, c := range configs {
		gens := map[string]func() (func(func(trace.Event) bool), error){
			"boot":    func() (func(func(trace.Event) bool), error) { return trace.Boot(trace.BootOptions{Common: c}) },
			"churn":   func() (func(func(trace.Event) bool), error) { return trace.Churn(trace.ChurnOptions{Common: c}) },
			"hotplug": func() (func(func(trace.Event) bool), error) { return trace.Hotplug(trace.HotplugOptions{Common: c}) },
			"adversarial": func() (func(func(trace.Event) bool), error) {
				return trace.Adversarial(trace.AdversarialOptions{Common: c, Window: 1 << 20})
			},
		}
		for name, gen := range gens {
			t.Run(fmt.Sprintf("%s/config%d", name, i), func(t *testing.T) {
				var res [2]Result
				for j, model := range []bool{false, true} {
					seq, err := gen()
					if err != nil {
						t.Fatal(err)
					}
					res[j] = Events(seq, Options{KernelModel: model})
				}
				plain, kernel := res[0], res[1]
				if kernel.Violations != 0 || kernel.Gmem.Failures != 0 {
					t.Fatalf("%d violations, gmem refused %d events: %v %v", kernel.Violations, kernel.Gmem.Failures, kernel.ViolationDetails, kernel.Rejections)
				}
				if kernel.Conversions == 0 || kernel.Conversions != plain.Conversions || kernel.Rejected != plain.Rejected ||
					kernel.Gmem.MapCalls != plain.Gmem.MapCalls || kernel.Gmem.EntriesPeak != plain.Gmem.EntriesPeak ||
					kernel.Baseline.MapCalls != plain.Baseline.MapCalls || kernel.SharedBytes != plain.SharedBytes {
					t.Errorf("on the kernel model %+v\nwithout it %+v", kernel, plain)
				}
			})
		}
	}
}

// TestTerabyte replays the boot of a 1 TiB guest: gmem's state stays small,
// the baseline's is the bitmap QEMU would hold (1 bit per 4 KiB page), and
// the baseline runs out of type1 entries at the swiotlb pool where gmem does
// not.
func TestTerabyte(t *testing.T) {
	seq, err := trace.Boot(trace.BootOptions{Common: trace.Common{RAM: 1 << 40, Events: 100, Seed: 1}})
	if err != nil {
		t.Fatal(err)
	}
	res := Events(seq, Options{})
	if res.Violations != 0 || res.InputErrors != 0 || res.Gmem.Failures != 0 {
		t.Fatalf("%d violations, %d input errors, gmem refused %d: %v", res.Violations, res.InputErrors, res.Gmem.Failures, res.ViolationDetails)
	}
	if res.RAMBytes != 1<<40 {
		t.Errorf("RAM %d, want 1 TiB", res.RAMBytes)
	}
	if want := uint64(1<<40) / 4096 / 8; res.Baseline.StateBytes != want {
		t.Errorf("baseline state %d bytes, want %d", res.Baseline.StateBytes, want)
	}
	if res.Gmem.StateBytes > 64<<10 {
		t.Errorf("gmem state %d bytes for a few hundred runs", res.Gmem.StateBytes)
	}
	if res.Baseline.LimitFailures == 0 || res.Gmem.LimitFailures != 0 || res.Baseline.EntriesPeak > defaultType1Limit {
		t.Errorf("limit failures baseline %d gmem %d, baseline peak %d", res.Baseline.LimitFailures, res.Gmem.LimitFailures, res.Baseline.EntriesPeak)
	}
	// The pool is 1 GiB at the top of the low 2 GiB: gmem maps it with one
	// entry per 2 MiB request.
	if res.Gmem.EntriesPeak < 512 || res.Gmem.EntriesPeak > 512+600 {
		t.Errorf("gmem peak %d entries, want 512 for the pool plus the live buffers", res.Gmem.EntriesPeak)
	}
}

func TestProgress(t *testing.T) {
	var calls []uint64
	rp := New(Options{ProgressEvery: 10, Progress: func(n uint64) { calls = append(calls, n) }})
	e := trace.RAM{Name: "r", GPA: 0, Size: 1 << 30, Mode: trace.Split}
	for range 35 {
		_ = rp.Apply(e, 0) // the repeats are input errors; they still count
	}
	if diff := cmp.Diff([]uint64{10, 20, 30}, calls); diff != "" {
		t.Errorf("progress calls (-want +got):\n%s", diff)
	}
	if res := rp.Result(); res.InputErrors != 34 || len(res.InputErrorDetails) != DefaultMaxDetails {
		t.Errorf("input errors %d (%d described), want 34 (%d)", res.InputErrors, len(res.InputErrorDetails), DefaultMaxDetails)
	}
	if err := rp.Finish(); err != nil {
		t.Fatal(err)
	}
	if err := rp.Apply(e, 0); err == nil {
		t.Error("Apply after Finish succeeded")
	}
	if err := rp.Finish(); err == nil {
		t.Error("second Finish succeeded")
	}
}

// TestResultJSON checks the field names other tools rely on.
func TestResultJSON(t *testing.T) {
	_, res := replayText(t, ram1G+`{"op":"attach","dev":"d","iommu":"type1"}`)
	b, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	if _, ok := m["rejected_by"].(map[string]any); !ok {
		t.Errorf("field rejected_by missing or not an object")
	}
	for _, k := range []string{"events", "conversions", "input_errors", "rejected", "violations", "shared_bytes", "private_bytes", "unplugged_bytes"} {
		if _, ok := m[k].(float64); !ok {
			t.Errorf("field %q missing or not a number", k)
		}
	}
	for _, run := range []string{"baseline", "gmem"} {
		sub, ok := m[run].(map[string]any)
		if !ok {
			t.Fatalf("object %q missing", run)
		}
		for _, k := range []string{"entries_final", "entries_peak", "map_calls", "unmap_calls", "cut_calls", "splits", "state_bytes", "limit_failures", "ns_per_event",
			"pinned_bytes", "repinned_bytes", "window_bytes", "max_window"} {
			if _, ok := sub[k].(float64); !ok {
				t.Errorf("%s.%s missing or not a number", run, k)
			}
		}
		want := map[string]string{"baseline": "granule", "gmem": "extent"}[run]
		if p, _ := sub["policy"].(string); p != want {
			t.Errorf("%s.policy = %v, want %q", run, sub["policy"], want)
		}
		devs, _ := sub["device_policies"].([]any)
		if len(devs) != 1 {
			t.Fatalf("%s.device_policies = %v, want one device", run, sub["device_policies"])
		}
		d, _ := devs[0].(map[string]any)
		if d["dev"] != "d" || d["iommu"] != "type1" || d["cut"] != false || d["policy"] != want {
			t.Errorf("%s.device_policies[0] = %v", run, d)
		}
	}
}

// TestInputErrors: an impossible machine is not replayed, whether the
// Validator or the library finds it, and every later event that needs it is
// an input error too.
func TestInputErrors(t *testing.T) {
	for _, c := range []struct {
		name, trace string
		line        int
		why         string
	}{
		{"RAM after a request", ram1G + `{"op":"convert","gpa":"0","size":"4KiB","to":"shared"}
{"op":"ram","name":"late","gpa":"2GiB","size":"1GiB"}`, 3, "declared first"},
		{"a request before any RAM", `{"op":"convert","gpa":"0","size":"4KiB","to":"shared"}`, 1, "before any RAM"},
		{"RAM past the address space", `{"op":"ram","name":"far","gpa":"0x10000000000000","size":"1GiB"}
{"op":"convert","gpa":"0","size":"4KiB","to":"shared"}`, 2, "the library refuses the machine"},
	} {
		t.Run(c.name, func(t *testing.T) {
			tr, err := trace.Parse(strings.NewReader(c.trace), trace.Options{})
			if err != nil {
				t.Fatal(err)
			}
			rp := New(Options{})
			var first *InputError
			for i, e := range tr.Events {
				var ie *InputError
				if err := rp.Apply(e, tr.Lines[i]); errors.As(err, &ie) && first == nil {
					first = ie
				} else if err != nil && !errors.As(err, &ie) {
					t.Fatal(err)
				}
			}
			if err := rp.Finish(); err != nil {
				t.Fatal(err)
			}
			res := rp.Result()
			if first == nil || first.Line != c.line || !strings.Contains(first.Error(), c.why) || !errors.Is(first, trace.ErrMachine) {
				t.Fatalf("first input error %v, want line %d: %q", first, c.line, c.why)
			}
			if res.InputErrors == 0 || res.Rejected != 0 || res.Violations != 0 {
				t.Errorf("result %+v", res)
			}
		})
	}
}

// TestRunErrors: an attach a run cannot do is neither a guest request nor
// an input error but a *RunError, whatever the reason; options the mapper
// refuses are caught by Validate first.
func TestRunErrors(t *testing.T) {
	for _, c := range []struct {
		name    string
		opts    Options
		trace   string
		runs    []string
		why     string
		invalid bool
	}{
		{"max extent not a power of two", Options{MaxExtent: 3 << 20}, ram1G + `{"op":"attach","dev":"d","iommu":"type1"}`,
			[]string{"gmem"}, "not a power of two", true},
		{"max extent below a page", Options{MaxExtent: 1 << 10}, ram1G + `{"op":"attach","dev":"d","iommu":"iommufd"}`,
			[]string{"gmem"}, "at least 4 KiB", true},
		{"out of entries for what is shared", Options{}, ram1G + `{"op":"convert","gpa":"0","size":"1MiB","to":"shared"}
{"op":"attach","dev":"d","iommu":"type1","limit":10}`, []string{"baseline"}, "no space left", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := c.opts.Validate(); (err != nil) != c.invalid || (err != nil && !errors.Is(err, ErrOptions)) {
				t.Errorf("Validate: %v, want invalid %v wrapping ErrOptions", err, c.invalid)
			}
			tr, err := trace.Parse(strings.NewReader(c.trace), trace.Options{})
			if err != nil {
				t.Fatal(err)
			}
			rp := New(c.opts)
			var got []string
			for i, e := range tr.Events {
				err := rp.Apply(e, tr.Lines[i])
				var re *RunError
				switch {
				case errors.As(err, &re):
					got = append(got, re.Run)
					if re.Line != tr.Lines[i] || !strings.Contains(re.Error(), c.why) || !strings.Contains(re.Error(), `could not attach "d"`) {
						t.Errorf("run error %q, want line %d and %q", re, tr.Lines[i], c.why)
					}
				case err != nil:
					t.Fatalf("line %d: %v", tr.Lines[i], err)
				}
			}
			if err := rp.Finish(); err != nil {
				t.Fatal(err)
			}
			res := rp.Result()
			if !slices.Equal(got, c.runs) || res.RunErrors != uint64(len(c.runs)) || len(res.RunErrorDetails) != len(c.runs) {
				t.Errorf("run errors %v (%d counted, %v), want %v", got, res.RunErrors, res.RunErrorDetails, c.runs)
			}
			if res.Rejected != 0 || len(res.RejectedBy) != 0 || res.Diverged != 0 || res.Baseline.Failures != 0 || res.Gmem.Failures != 0 || res.Violations != 0 {
				t.Errorf("a failed attach counted as a refused request: %+v", res)
			}
		})
	}
	if err := (Options{MaxExtent: dma.Unbounded}).Validate(); err != nil {
		t.Errorf("unbounded: %v", err)
	}
	if err := (Options{}).Validate(); err != nil {
		t.Errorf("zero options: %v", err)
	}
}

// TestBitmapBytes: the size the replay computes for the baseline's bitmaps
// is what guestmem allocates, for plain and hot-pluggable blocks of odd
// sizes.
func TestBitmapBytes(t *testing.T) {
	for _, ram := range [][]trace.RAM{
		{{Name: "a", GPA: 0, Size: 1 << 30}},
		{{Name: "a", GPA: 0, Size: 3 << 12}},
		{{Name: "a", GPA: 0, Size: 65 << 12}, {Name: "b", GPA: 1 << 30, Size: 1 << 30, Block: 2 << 20}},
		{{Name: "h", GPA: 4 << 30, Size: 128 << 20, Block: 4 << 10}},
		{{Name: "h", GPA: 4 << 30, Size: 64 << 20, Block: 64 << 20}},
	} {
		rp := New(Options{BitmapBudget: ^uint64(0)})
		for _, e := range ram {
			e.Mode = trace.Split
			if err := rp.Apply(e, 0); err != nil {
				t.Fatal(err)
			}
		}
		if err := rp.Apply(trace.Attach{Dev: "d", IOMMU: trace.IOMMUFD}, 0); err != nil {
			t.Fatal(err)
		}
		res := rp.Result()
		if got := bitmapBytes(ram); res.Baseline.StateBytes != got || res.Baseline.StateHow != StateMeasured {
			t.Errorf("%+v: guestmem's bitmaps take %d bytes (%q), computed %d", ram, res.Baseline.StateBytes, res.Baseline.StateHow, got)
		}
	}
}

// TestBitmapBudget: past the budget the baseline's bitmaps are not
// allocated; its answers and entries are the same, its state memory is
// computed, and a note says so. A petabyte guest replays in bounded memory.
func TestBitmapBudget(t *testing.T) {
	seq, err := trace.Churn(trace.ChurnOptions{Common: trace.Common{RAM: 4 << 30, Events: 500, Seed: 3}})
	if err != nil {
		t.Fatal(err)
	}
	events := collectEvents(seq)
	full := Events(slices.Values(events), Options{})
	small := Events(slices.Values(events), Options{BitmapBudget: 64 << 10})
	if full.Baseline.StateHow != StateMeasured || len(full.Notes) != 0 {
		t.Errorf("4 GiB within the default budget: %q, notes %q", full.Baseline.StateHow, full.Notes)
	}
	if small.Baseline.StateHow != StateComputed || small.Baseline.StateBytes != full.Baseline.StateBytes ||
		len(small.Notes) != 1 || !strings.Contains(small.Notes[0], "past the replay's budget of 64KiB") {
		t.Errorf("past the budget: %q %d bytes (want %d), notes %q", small.Baseline.StateHow, small.Baseline.StateBytes, full.Baseline.StateBytes, small.Notes)
	}
	if small.Violations != 0 || small.Baseline.EntriesPeak != full.Baseline.EntriesPeak || small.Baseline.MapCalls != full.Baseline.MapCalls ||
		small.Rejected != full.Rejected || small.SharedBytes != full.SharedBytes {
		t.Errorf("the baseline without bitmaps answers differently: %+v\nwith bitmaps %+v", small, full)
	}

	const pib = 1 << 50
	res := Events(slices.Values([]trace.Event{
		trace.RAM{Name: "huge", GPA: 0, Size: pib, Mode: trace.Split},
		trace.Attach{Dev: "d", IOMMU: trace.Type1},
		trace.Convert{GPA: 1 << 40, Size: 2 << 20, To: trace.Shared},
	}), Options{})
	if res.Violations != 0 || res.Baseline.StateHow != StateComputed || res.Baseline.StateBytes != pib/4096/8 ||
		res.Baseline.EntriesFinal != 512 || res.Gmem.EntriesFinal != 1 || len(res.Notes) != 1 {
		t.Errorf("1 PiB: %+v", res)
	}
}

// TestInterrupted: a context that ends in the middle of a long event stops
// it at the next map call; the library undoes the event, which is neither a
// refusal nor counted, and the replay takes no more events.
func TestInterrupted(t *testing.T) {
	for _, run := range []int{0, 1} {
		ctx, cancel := context.WithCancel(context.Background())
		rp := New(Options{})
		for _, e := range []trace.Event{
			trace.RAM{Name: "r", GPA: 0, Size: 1 << 30, Mode: trace.Split},
			trace.Attach{Dev: "d", IOMMU: trace.IOMMUFD},
		} {
			if err := rp.ApplyContext(ctx, e, 0); err != nil {
				t.Fatal(err)
			}
		}
		// Cancel at the 1000th map call of one run: the baseline maps 4 KiB
		// granules, gmem 2 MiB extents.
		maps, at := 0, []int{1000, 10}[run]
		model := rp.runs[run].devices["d"].model
		model.SetFault(func(c iommu.Call) error {
			if c.Op == iommu.OpMap {
				if maps++; maps == at {
					cancel()
				}
			}
			return rp.fault(c)
		})
		err := rp.ApplyContext(ctx, trace.Convert{GPA: 0, Size: 512 << 20, To: trace.Shared}, 3)
		if !errors.Is(err, ErrInterrupted) || !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "during event 3 (line 3)") {
			t.Fatalf("run %d: %v, want an interruption during event 3", run, err)
		}
		if n := model.Len(); n != 0 {
			t.Errorf("run %d: %d entries left after the undo", run, n)
		}
		if err := rp.Apply(trace.Convert{GPA: 0, Size: 4096, To: trace.Shared}, 4); !errors.Is(err, ErrInterrupted) {
			t.Errorf("run %d: Apply after the interruption: %v", run, err)
		}
		if err := rp.Finish(); err != nil {
			t.Errorf("run %d: Finish: %v", run, err)
		}
		res := rp.Result()
		if !res.Interrupted || res.Events != 2 || res.Conversions != 0 || res.Rejected != 0 || res.Baseline.Failures != 0 ||
			res.Gmem.Failures != 0 || res.Violations != 0 || res.SharedBytes != 0 {
			t.Errorf("run %d: %+v", run, res)
		}
	}

	// Cancelled before an event: nothing is applied.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	rp := New(Options{})
	if err := rp.ApplyContext(ctx, trace.RAM{Name: "r", GPA: 0, Size: 1 << 30}, 1); !errors.Is(err, ErrInterrupted) || !strings.Contains(err.Error(), "after 0 events") {
		t.Errorf("cancelled before: %v", err)
	}
	if res := rp.Result(); !res.Interrupted || res.Events != 0 {
		t.Errorf("cancelled before: %+v", res)
	}
}

// TestLimits answers "what dma_entry_limit does this trace need?" for a
// trace computed by hand: 1 MiB shared, then another MiB that a limit of
// 300 refuses to the baseline (512 granules), then a 4 KiB cut.
func TestLimits(t *testing.T) {
	_, res := replayWith(t, Options{Limits: true}, ram1G+`{"op":"attach","dev":"d","iommu":"type1","limit":300}
{"op":"convert","gpa":"0","size":"1MiB","to":"shared"}
{"op":"convert","gpa":"2MiB","size":"1MiB","to":"shared"}
{"op":"convert","gpa":"0","size":"4KiB","to":"private"}
{"op":"attach","dev":"e","iommu":"iommufd"}`)
	l := res.Limits
	if l == nil {
		t.Fatal("no limits for a type1 trace")
	}
	if l.Devices != 1 || l.Given != 300 {
		t.Errorf("devices %d, given %d", l.Devices, l.Given)
	}
	// The baseline: 512 granules at the peak with no limit, refused first
	// at event 4 (line 4).
	b := l.Baseline
	if b.Peak != 512 || b.Limit != 512 || b.Refusals != 1 || b.FirstRefusal == nil || b.FirstRefusal.Event != 4 || b.FirstRefusal.Line != 4 ||
		!strings.Contains(b.Advice, "first refuses at event 4 (line 4): QEMU stops the VM there; set vfio_iommu_type1.dma_entry_limit=512 or more") {
		t.Errorf("baseline %+v", b)
	}
	// gmem: two extents, then a cut leaves two (0 and the rest of the
	// first MiB, and the second MiB: 2 after the cut of [0, 4K)); with its
	// split reserve a limit of 3 holds them.
	g := l.Gmem
	if g.Peak != 2 || g.Limit != 3 || g.Refusals != 0 || g.FirstRefusal != nil || !strings.Contains(g.Advice, "the limit of 300 is enough; the trace needs 3 entries") {
		t.Errorf("gmem %+v", g)
	}
	// The limited runs are what they were: the baseline stopped at 256,
	// 255 after the cut, and as many for the iommufd device attached last.
	if res.Baseline.EntriesPeak != 2*255 || res.Baseline.LimitFailures != 1 {
		t.Errorf("baseline run %+v", res.Baseline)
	}

	_, res = replayWith(t, Options{Limits: true}, ram1G+`{"op":"attach","dev":"d","iommu":"iommufd"}
{"op":"convert","gpa":"0","size":"1MiB","to":"shared"}`)
	if res.Limits != nil {
		t.Errorf("limits for an iommufd trace: %+v", res.Limits)
	}

	// Without Options.Limits: no second replay, no answer.
	rp := New(Options{})
	for _, e := range []trace.Event{
		trace.RAM{Name: "r", GPA: 0, Size: 1 << 30, Mode: trace.Split},
		trace.Attach{Dev: "d", IOMMU: trace.Type1},
		trace.Convert{GPA: 0, Size: 1 << 20, To: trace.Shared},
	} {
		if err := rp.Apply(e, 0); err != nil {
			t.Fatal(err)
		}
	}
	if res := rp.Result(); res.Limits != nil || len(rp.shadows) != 0 || res.Baseline.EntriesFinal != 256 {
		t.Errorf("without Limits: %+v, %d shadows", res.Limits, len(rp.shadows))
	}
}

// TestLimitFor compares limitFor with a scan from 0 up, for the gmem
// reserve and none.
func TestLimitFor(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	none := func(uint64) uint64 { return 0 }
	for i := range 2000 {
		peak := uint64(i)
		if i >= 1000 {
			peak = rng.Uint64N(200000)
		}
		for _, reserve := range []func(uint64) uint64{none, dma.DefaultSplitReserve} {
			want := uint64(0)
			if peak > 0 {
				for want = peak; want-min(reserve(want), want) < peak; want++ {
				}
			}
			if got := limitFor(peak, reserve); got != want {
				t.Fatalf("limitFor(%d) = %d, want %d", peak, got, want)
			}
		}
	}
}
