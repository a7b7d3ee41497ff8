package replay

import (
	"encoding/binary"
	"errors"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/trace"
)

// fuzzEvents decodes bytes into events over a small address space (64 MiB
// in 4 KiB pages), five bytes an event, so that the fuzzer reaches every
// kind of event, overlapping and out-of-range ones included.
func fuzzEvents(data []byte) []trace.Event {
	const pages = 1 << 14
	var out []trace.Event
	for len(data) >= 5 {
		op, a, b := data[0], binary.LittleEndian.Uint16(data[1:]), binary.LittleEndian.Uint16(data[3:])
		data = data[5:]
		gpa := uint64(a%pages) * trace.PageSize
		size := uint64(1+b%512) * trace.PageSize
		if a&0x8000 != 0 {
			// A bad request: misaligned, empty or wrapping.
			switch b % 4 {
			case 0:
				gpa += 0x800
			case 1:
				size = 0
			case 2:
				size += 0x800
			default:
				size = -gpa
			}
		}
		dev := "dev" + strconv.Itoa(int(b%3))
		switch op % 10 {
		case 0:
			// RAM blocks at 16 MiB boundaries, some hot-pluggable.
			block := uint64(0)
			if b%2 == 1 {
				block = 64 << 10 << (b % 4)
			}
			mode := trace.Split
			if b%4 >= 2 {
				mode = trace.InPlace
			}
			base := uint64(a%4) << 24
			out = append(out, trace.RAM{Name: "ram" + strconv.Itoa(int(a%4)), GPA: base, Size: 16 << 20, Mode: mode, Block: block})
		case 1:
			out = append(out, trace.MMIO{GPA: gpa, Size: size})
		case 2:
			at := trace.Attach{Dev: dev, IOMMU: trace.Type1, Limit: uint64(a % 700)}
			if a%5 == 0 {
				at = trace.Attach{Dev: dev, IOMMU: trace.IOMMUFD}
			}
			out = append(out, at)
		case 3:
			out = append(out, trace.Detach{Dev: dev})
		case 4:
			// Plug and unplug in whole 64 KiB multiples so that most are
			// aligned to the block sizes above.
			out = append(out, trace.Plug{GPA: gpa &^ (64<<10 - 1), Size: (size + 64<<10 - 1) &^ (64<<10 - 1)})
		case 5:
			out = append(out, trace.Unplug{GPA: gpa &^ (64<<10 - 1), Size: (size + 64<<10 - 1) &^ (64<<10 - 1)})
		default:
			to := trace.Shared
			if op%2 == 1 {
				to = trace.Private
			}
			out = append(out, trace.Convert{GPA: gpa, Size: size, To: to})
		}
	}
	// The machine comes first and is backed one way; an event that breaks
	// that is an input error, which the fuzzer reaches anyway through the
	// other rules.
	var machine, rest []trace.Event
	mode := trace.Mode(0)
	for _, e := range out {
		switch x := e.(type) {
		case trace.RAM:
			if mode == 0 {
				mode = x.Mode
			}
			x.Mode = mode
			machine = append(machine, x)
		case trace.MMIO:
			machine = append(machine, x)
		default:
			rest = append(rest, e)
		}
	}
	out = append(machine, rest...)
	return out
}

// fuzzOptions decodes the replay options of FuzzReplay: the gmem run's
// policy (auto, extent or cut) and whether iommufd IOASes keep huge pages.
func fuzzOptions(b byte) Options {
	o := Options{Limits: true, IOMMUFDHugePages: b&4 != 0}
	switch b % 4 {
	case 1:
		o.Policy = dma.Extent
	case 2:
		o.Policy = dma.Cut
	}
	return o
}

// FuzzReplay replays arbitrary event sequences, with each policy of the
// gmem run: whatever the events, the replay must not panic and must find no
// violation (refusals are fine), and a run whose every device cuts must
// have no window and re-pin nothing.
func FuzzReplay(f *testing.F) {
	f.Add([]byte{
		0, 0, 0, 0, 0, // ram0
		2, 0, 0, 0, 0, // attach dev0, type1 limit 0 (default)
		6, 0x00, 0x02, 0xff, 0x01, // convert 2 MiB shared
		7, 0x01, 0x02, 0x00, 0x00, // convert 4 KiB private
	}, byte(0))
	f.Add([]byte{
		0, 1, 0, 1, 0, // ram1, hot-pluggable
		2, 5, 0, 1, 0, // attach dev1, iommufd
		4, 0x00, 0x10, 0x3f, 0x00, // plug
		6, 0x00, 0x10, 0x20, 0x00, // convert shared
		5, 0x00, 0x10, 0x0f, 0x00, // unplug
		3, 0, 0, 1, 0, // detach dev1
	}, byte(0))
	f.Add([]byte{
		0, 0, 0, 0, 0, 0, 1, 0, 2, 0, // ram0 (split), ram1 (inplace)
		2, 7, 0, 2, 0, // attach dev2 type1 limit 7
		6, 0xf0, 0x0f, 0x1f, 0x00, // convert across both blocks
		1, 0, 0x20, 0x10, 0, // mmio
		6, 0, 0x20, 0x10, 0, // convert the hole to shared
		7, 0, 0x20, 0x10, 0, // and to private (invalid)
	}, byte(0))
	f.Add([]byte{
		0, 0, 0, 0, 0, // ram0
		2, 5, 0, 0, 0, // attach dev0, iommufd
		2, 1, 0, 1, 0, // attach dev1, type1 limit 1
		6, 0x00, 0x02, 0xff, 0x01, // convert 2 MiB shared
		7, 0x01, 0x02, 0x00, 0x00, // convert 4 KiB private
	}, byte(2))
	f.Add([]byte{
		0, 0, 0, 0, 0, // ram0
		2, 5, 0, 0, 0, // attach dev0, iommufd
		6, 0x00, 0x02, 0xff, 0x01, // convert 2 MiB shared
		7, 0x01, 0x02, 0x00, 0x00, // convert 4 KiB private
		3, 0, 0, 0, 0, // detach dev0
	}, byte(5))
	f.Fuzz(func(t *testing.T, data []byte, optByte byte) {
		events := fuzzEvents(data)
		if len(events) > 200 {
			events = events[:200]
		}
		opts := fuzzOptions(optByte)
		if err := opts.Validate(); err != nil {
			if opts.Policy != dma.Cut || !opts.IOMMUFDHugePages {
				t.Fatalf("Validate(%+v): %v", opts, err)
			}
			return
		}
		rp := New(opts)
		type1 := false
		for i, e := range events {
			var ie *InputError
			var re *RunError
			err := rp.Apply(e, i+1)
			if a, ok := e.(trace.Attach); ok && a.IOMMU == trace.Type1 && !errors.As(err, &ie) {
				type1 = true
			}
			switch {
			case errors.As(err, &re):
				// The only attaches a run may fail: too much shared
				// already for the device's type1 limit, and a type1 device
				// in a gmem run told to cut.
				cutOnType1 := opts.Policy == dma.Cut && re.Run == "gmem" && errors.Is(err, dma.ErrOptions) && e.(trace.Attach).IOMMU == trace.Type1
				if !errors.Is(err, unix.ENOSPC) && !cutOnType1 {
					t.Fatalf("event %d (%#v): %v", i+1, e, err)
				}
			case err != nil && !errors.As(err, &ie):
				t.Fatalf("event %d (%#v): %v", i+1, e, err)
			}
		}
		if err := rp.Finish(); err != nil {
			t.Fatal(err)
		}
		res := rp.Result()
		if res.Violations != 0 || res.Events != uint64(len(events)) {
			t.Fatalf("%d violations, %d events: %v", res.Violations, res.Events, res.ViolationDetails)
		}
		if res.SharedBytes+res.PrivateBytes+res.UnpluggedBytes != res.RAMBytes {
			t.Fatalf("shared %d + private %d + unplugged %d != RAM %d", res.SharedBytes, res.PrivateBytes, res.UnpluggedBytes, res.RAMBytes)
		}
		// What the trace needs with no limit: where the limit refused
		// nothing and every device is type1, exactly what the run held.
		onlyType1 := true
		for _, e := range events {
			if a, ok := e.(trace.Attach); ok && a.IOMMU != trace.Type1 {
				onlyType1 = false
			}
		}
		// Where every device of the gmem run cut, nothing it kept shared
		// was hidden from a device or pinned again.
		g := res.Gmem
		cutting := !type1 && !opts.IOMMUFDHugePages && opts.Policy != dma.Extent
		if cutting && (g.WindowBytes != 0 || g.RepinnedBytes != 0 || g.MaxWindow != 0) {
			t.Fatalf("every device cut, yet window %d (largest %d), re-pinned %d", g.WindowBytes, g.MaxWindow, g.RepinnedBytes)
		}
		// Each device has the policy its space and the options give it.
		for _, d := range g.DevicePolicies {
			cuts := d.IOMMU == trace.IOMMUFD.String() && !opts.IOMMUFDHugePages
			want := "extent"
			if cuts && opts.Policy != dma.Extent {
				want = "cut"
			}
			if d.Cut != cuts || d.Policy != want {
				t.Fatalf("options %+v: gmem device %+v, want cut %v, policy %s", opts, d, cuts, want)
			}
		}
		for _, d := range res.Baseline.DevicePolicies {
			if d.Cut || d.Policy != "granule" {
				t.Fatalf("baseline device %+v", d)
			}
		}
		if l := res.Limits; l != nil {
			for i, n := range []EntryNeed{l.Baseline, l.Gmem} {
				// A gmem run told to cut cannot attach type1 devices,
				// with a limit or without.
				unknownOK := i == 1 && opts.Policy == dma.Cut
				if n.Limit < n.Peak || (n.FirstRefusal != nil) != (n.Refusals > 0) || (n.Unknown != "" && !unknownOK) || n.Advice == "" {
					t.Fatalf("run %d: %+v", i, n)
				}
				if unknownOK {
					continue
				}
				if n.Refusals == 0 && onlyType1 && n.Peak != rp.runs[i].devicePeak {
					t.Fatalf("run %d refused nothing for want of entries, held %d at most, but needs %d with no limit", i, rp.runs[i].devicePeak, n.Peak)
				}
			}
		}
	})
}
