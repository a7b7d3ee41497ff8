package replay

import (
	"encoding/binary"
	"errors"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

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

// FuzzReplay replays arbitrary event sequences: whatever the events, the
// replay must not panic and must find no violation (refusals are fine).
func FuzzReplay(f *testing.F) {
	f.Add([]byte{
		0, 0, 0, 0, 0, // ram0
		2, 0, 0, 0, 0, // attach dev0, type1 limit 0 (default)
		6, 0x00, 0x02, 0xff, 0x01, // convert 2 MiB shared
		7, 0x01, 0x02, 0x00, 0x00, // convert 4 KiB private
	})
	f.Add([]byte{
		0, 1, 0, 1, 0, // ram1, hot-pluggable
		2, 5, 0, 1, 0, // attach dev1, iommufd
		4, 0x00, 0x10, 0x3f, 0x00, // plug
		6, 0x00, 0x10, 0x20, 0x00, // convert shared
		5, 0x00, 0x10, 0x0f, 0x00, // unplug
		3, 0, 0, 1, 0, // detach dev1
	})
	f.Add([]byte{
		0, 0, 0, 0, 0, 0, 1, 0, 2, 0, // ram0 (split), ram1 (inplace)
		2, 7, 0, 2, 0, // attach dev2 type1 limit 7
		6, 0xf0, 0x0f, 0x1f, 0x00, // convert across both blocks
		1, 0, 0x20, 0x10, 0, // mmio
		6, 0, 0x20, 0x10, 0, // convert the hole to shared
		7, 0, 0x20, 0x10, 0, // and to private (invalid)
	})
	f.Fuzz(func(t *testing.T, data []byte) {
		events := fuzzEvents(data)
		if len(events) > 200 {
			events = events[:200]
		}
		rp := New(Options{Limits: true})
		for i, e := range events {
			var ie *InputError
			var re *RunError
			err := rp.Apply(e, i+1)
			switch {
			case errors.As(err, &re):
				// The only attach a run may fail: too much shared already
				// for the device's type1 limit.
				if !errors.Is(err, unix.ENOSPC) {
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
		if l := res.Limits; l != nil {
			for i, n := range []EntryNeed{l.Baseline, l.Gmem} {
				if n.Limit < n.Peak || (n.FirstRefusal != nil) != (n.Refusals > 0) || n.Unknown != "" || n.Advice == "" {
					t.Fatalf("run %d: %+v", i, n)
				}
				if n.Refusals == 0 && onlyType1 && n.Peak != rp.runs[i].devicePeak {
					t.Fatalf("run %d refused nothing for want of entries, held %d at most, but needs %d with no limit", i, rp.runs[i].devicePeak, n.Peak)
				}
			}
		}
	})
}
