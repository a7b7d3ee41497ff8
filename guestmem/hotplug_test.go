package guestmem_test

import (
	"errors"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// The hot-plug layout: ordinary RAM, a gap, hot-pluggable RAM in 64 KiB
// blocks.
const (
	hpRAM   = 1 * mib // [0, 1 MiB)
	hpGPA   = 2 * mib // [2 MiB, 3 MiB) hot-pluggable
	hpSize  = 1 * mib
	hpBlock = 64 * kib
	hpEnd   = 4 * mib // requests land in [0, 4 MiB)
)

// pageState is the oracle's view of one page.
type pageState struct{ unplugged, shared bool }

type hpOracle map[uint64]pageState // absent: plugged (or ordinary) and private

func hpIsRAM(gpa uint64) bool {
	return gpa < hpRAM || (gpa >= hpGPA && gpa < hpGPA+hpSize)
}

func newHPOracle() hpOracle {
	o := hpOracle{}
	for g := uint64(hpGPA); g < hpGPA+hpSize; g += page {
		o[g] = pageState{unplugged: true}
	}
	return o
}

func (o hpOracle) kind(gpa uint64) guestmem.Kind {
	s := o[gpa]
	switch {
	case s.unplugged:
		return guestmem.KindUnplugged
	case s.shared:
		return guestmem.KindShared
	}
	return guestmem.KindPrivate
}

// TestRandomizedHotplug drives conversions, plugs and unplugs, with
// injected punch failures, against a per-page oracle; after every step
// both devices' mappings equal the shared, plugged pages (I1, I2), Walk
// equals the oracle, and host reads answer by the oracle.
func TestRandomizedHotplug(t *testing.T) {
	steps := 3000
	if testing.Short() {
		steps = 400
	}
	for _, mode := range []guestmem.Mode{guestmem.Split, guestmem.InPlace} {
		t.Run(mode.String(), func(t *testing.T) {
			var fail atomic.Bool
			mem, err := guestmem.New(guestmem.Config{
				Mode: mode,
				Blocks: []guestmem.BlockConfig{
					{Name: "ram", GPA: 0, Size: hpRAM},
					{Name: "vmem", GPA: hpGPA, Size: hpSize, Hotplug: hpBlock},
				},
				Inject: func(f guestmem.Fault) error {
					if f.Op == guestmem.OpPunch && fail.Load() {
						return unix.EIO
					}
					return nil
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			defer mem.Close()
			_, type1 := attachModel(t, mem, iommu.Caps{Rules: iommu.Type1v2}, dma.Options{Policy: dma.Extent})
			_, iommufd := attachModel(t, mem, iommu.Caps{Rules: iommu.IOMMUFD}, dma.Options{Policy: dma.Granule})
			atts := []*guestmem.Attachment{type1, iommufd}
			rng := rand.New(rand.NewPCG(7, uint64(mode)))
			o := newHPOracle()
			var plugs, unplugs, convs, failed int
			for i := range steps {
				fail.Store(rng.IntN(8) == 0)
				op := rng.IntN(4)
				var err error
				switch op {
				case 0, 1: // convert
					gpa := rng.Uint64N(hpEnd/page) * page
					size := (1 + rng.Uint64N(48)) * page
					to := memattr.State(rng.IntN(2))
					_, err = mem.Convert(guestmem.Request{GPA: gpa, Size: size, To: to})
					// Not RAM is refused before plug state is looked at.
					var notRAM, unplugged bool
					for g := gpa; g < gpa+size; g += page {
						notRAM = notRAM || (!hpIsRAM(g) && to == memattr.Private)
						unplugged = unplugged || (hpIsRAM(g) && o[g].unplugged)
					}
					var wantErr error
					switch {
					case notRAM:
						wantErr = guestmem.ErrNotRAM
					case unplugged:
						wantErr = guestmem.ErrUnplugged
					}
					if wantErr != nil {
						if !errors.Is(err, wantErr) {
							t.Fatalf("step %d: convert %#x+%#x to %v: %v, want %v", i, gpa, size, to, err, wantErr)
						}
						break
					}
					if err != nil && !(fail.Load() && errors.Is(err, unix.EIO)) {
						t.Fatalf("step %d: convert: %v", i, err)
					}
					if err == nil {
						convs++
						for g := gpa; g < gpa+size; g += page {
							if hpIsRAM(g) {
								o[g] = pageState{shared: to == memattr.Shared}
							}
						}
					}
				case 2, 3: // plug or unplug whole blocks of the hot-pluggable RAM
					first := rng.Uint64N(hpSize / hpBlock)
					n := 1 + rng.Uint64N(hpSize/hpBlock-first)
					gpa, size := hpGPA+first*hpBlock, n*hpBlock
					if op == 2 {
						err = mem.Plug(gpa, size)
					} else {
						err = mem.Unplug(gpa, size)
					}
					// As virtio-mem: a plug needs all of its range
					// unplugged, an unplug all of it plugged.
					var wantErr error
					for g := gpa; g < gpa+size; g += page {
						if op == 2 && !o[g].unplugged {
							wantErr = guestmem.ErrPlugged
						}
						if op == 3 && o[g].unplugged {
							wantErr = guestmem.ErrUnplugged
						}
					}
					if wantErr != nil {
						if !errors.Is(err, wantErr) {
							t.Fatalf("step %d: plug %v %#x+%#x: %v, want %v", i, op == 2, gpa, size, err, wantErr)
						}
						break
					}
					if err != nil && !(fail.Load() && errors.Is(err, unix.EIO)) {
						t.Fatalf("step %d: plug %v %#x+%#x: %v", i, op == 2, gpa, size, err)
					}
					if err != nil {
						break
					}
					for g := gpa; g < gpa+size; g += page {
						if op == 2 {
							if o[g].unplugged {
								o[g] = pageState{}
							}
							plugs++
						} else {
							o[g] = pageState{unplugged: true}
							unplugs++
						}
					}
				}
				if err != nil {
					failed++
				}
				for _, att := range atts {
					if err := att.Check(); err != nil {
						t.Fatalf("step %d: %v", i, err)
					}
				}
				walk, err := mem.Walk(0, hpEnd)
				if err != nil {
					t.Fatal(err)
				}
				next := uint64(0)
				for e := range walk {
					if !hpIsRAM(e.GPA.Start) {
						t.Fatalf("step %d: Walk yields non-RAM %v", i, e.GPA)
					}
					for next < e.GPA.Start && !hpIsRAM(next) {
						next += page
					}
					if next != e.GPA.Start {
						t.Fatalf("step %d: Walk skipped RAM at %#x", i, next)
					}
					for g := e.GPA.Start; g < e.GPA.End; g += page {
						if k := o.kind(g); k != e.Kind {
							t.Fatalf("step %d: page %#x is %v, Walk says %v", i, g, k, e.Kind)
						}
					}
					next = e.GPA.End
				}
				probe := rng.Uint64N(hpEnd/page) * page
				_, err = mem.ReadAt(make([]byte, 8), int64(probe))
				var want error
				switch {
				case !hpIsRAM(probe):
					want = guestmem.ErrNoRAM
				case o[probe].unplugged:
					want = guestmem.ErrUnplugged
				case !o[probe].shared:
					want = guestmem.ErrPrivate
				}
				if (want == nil) != (err == nil) || (want != nil && !errors.Is(err, want)) {
					t.Fatalf("step %d: ReadAt %#x: %v, want %v", i, probe, err, want)
				}
			}
			t.Logf("%d steps: %d conversions, %d pages plugged, %d unplugged, %d refused or failed", steps, convs, plugs, unplugs, failed)
		})
	}
}

// FuzzPlug feeds arbitrary Plug, Unplug and Walk ranges: nothing panics,
// malformed ranges are ErrInvalid, and the mappings stay exact.
func FuzzPlug(f *testing.F) {
	f.Add(uint64(hpGPA), uint64(hpBlock), true, uint64(0), uint64(hpEnd))
	f.Add(uint64(hpGPA+page), uint64(hpBlock), false, uint64(1), uint64(0))
	f.Add(uint64(1<<64-page), uint64(2*page), true, uint64(1<<64-page), uint64(2*page))
	f.Add(uint64(0), uint64(hpRAM), false, uint64(hpGPA), uint64(1<<63))
	mem, err := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{
			{Name: "ram", GPA: 0, Size: hpRAM},
			{Name: "vmem", GPA: hpGPA, Size: hpSize, Hotplug: hpBlock},
		},
	})
	if err != nil {
		f.Fatal(err)
	}
	defer mem.Close()
	_, att := attachModel(f, mem, iommu.Caps{Rules: iommu.Type1v2}, dma.Options{})
	f.Fuzz(func(t *testing.T, gpa, size uint64, plug bool, wgpa, wsize uint64) {
		var err error
		if plug {
			err = mem.Plug(gpa, size)
		} else {
			err = mem.Unplug(gpa, size)
		}
		var pe *guestmem.PlugError
		if err != nil && !errors.As(err, &pe) {
			t.Fatalf("plug error %v is no *PlugError", err)
		}
		// The order of the checks (see Plug): the range, where it starts,
		// its fit to the block, the state.
		end := gpa + size
		switch {
		case size == 0 || end < gpa || gpa%page != 0 || size%page != 0 || end > guestmem.DefaultMaxGPA:
			if !errors.Is(err, guestmem.ErrInvalid) {
				t.Fatalf("malformed range %#x+%#x: %v, want ErrInvalid", gpa, size, err)
			}
		case gpa < hpGPA || gpa >= hpGPA+hpSize:
			if !errors.Is(err, guestmem.ErrUnplugged) || errors.Is(err, guestmem.ErrInvalid) {
				t.Fatalf("%#x+%#x starts outside the hot-pluggable block: %v, want ErrUnplugged", gpa, size, err)
			}
		case gpa%hpBlock != 0 || size%hpBlock != 0 || end > hpGPA+hpSize:
			if !errors.Is(err, guestmem.ErrInvalid) || errors.Is(err, guestmem.ErrPlugged) {
				t.Fatalf("%#x+%#x does not fit the plug blocks: %v, want ErrInvalid", gpa, size, err)
			}
		default:
			want := guestmem.ErrUnplugged
			if plug {
				want = guestmem.ErrPlugged
			}
			if err != nil && (!errors.Is(err, want) || errors.Is(err, guestmem.ErrInvalid)) {
				t.Fatalf("well-formed %#x+%#x: %v, want nil or %v", gpa, size, err, want)
			}
		}
		if _, err := mem.Convert(guestmem.Request{GPA: gpa, Size: size, To: memattr.Shared}); err != nil && !errors.As(err, new(*guestmem.ConvertError)) {
			t.Fatal(err)
		}
		if err := att.Check(); err != nil {
			t.Fatal(err)
		}
		walk, err := mem.Walk(wgpa, wsize)
		if err != nil {
			if !errors.Is(err, guestmem.ErrInvalid) {
				t.Fatalf("Walk error %v", err)
			}
			return
		}
		for e := range walk {
			if e.GPA.Start < wgpa || e.GPA.End > wgpa+wsize || e.GPA.Empty() {
				t.Fatalf("Walk(%#x, %#x) yields %v", wgpa, wsize, e.GPA)
			}
		}
	})
}

// TestPlugErrors: Plug and Unplug check the range, then where it starts,
// then its fit to the plug blocks, then the state; every malformed
// request is ErrInvalid with the span error that says why, whatever the
// state of the memory.
func TestPlugErrors(t *testing.T) {
	mem, err := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{
			{Name: "ram", GPA: 0, Size: hpRAM},
			{Name: "vmem", GPA: hpGPA, Size: hpSize, Hotplug: hpBlock},
		},
		MMIO: []guestmem.Hole{{Name: "dev", GPA: hpRAM, Size: 64 * kib}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	// The first two plug blocks are plugged.
	if err := mem.Plug(hpGPA, 2*hpBlock); err != nil {
		t.Fatal(err)
	}
	last := uint64(hpGPA + hpSize - hpBlock)
	for _, c := range []struct {
		name      string
		plug      bool
		gpa, size uint64
		want      []error // all must match; nil: success
	}{
		{"byte misaligned", true, hpGPA + 1, hpBlock, []error{guestmem.ErrInvalid, span.ErrAlign}},
		{"size 0", true, hpGPA, 0, []error{guestmem.ErrInvalid, span.ErrEmpty}},
		{"wraps", true, 1<<64 - page, 2 * page, []error{guestmem.ErrInvalid, span.ErrOverflow}},
		{"past MaxGPA", true, guestmem.DefaultMaxGPA, page, []error{guestmem.ErrInvalid, span.ErrBounds}},
		{"page aligned, not block aligned", true, last + page, hpBlock, []error{guestmem.ErrInvalid, span.ErrAlign}},
		{"part of a block, unplugged", true, last, page, []error{guestmem.ErrInvalid, span.ErrAlign}},
		{"part of a block, plugged", true, hpGPA, page, []error{guestmem.ErrInvalid, span.ErrAlign}},
		{"unplug part of a plugged block", false, hpGPA, page, []error{guestmem.ErrInvalid, span.ErrAlign}},
		{"unplug part of an unplugged block", false, last, page, []error{guestmem.ErrInvalid, span.ErrAlign}},
		{"past the block's end", true, last, 2 * hpBlock, []error{guestmem.ErrInvalid, span.ErrBounds}},
		{"unplug past the block's end", false, last, 2 * hpBlock, []error{guestmem.ErrInvalid, span.ErrBounds}},
		{"ordinary RAM", true, 0, hpBlock, []error{guestmem.ErrUnplugged}},
		{"MMIO hole", true, hpRAM, hpBlock, []error{guestmem.ErrUnplugged}},
		{"unbacked", false, 3 * mib, hpBlock, []error{guestmem.ErrUnplugged}},
		{"plugged already", true, hpGPA, hpBlock, []error{guestmem.ErrPlugged}},
		{"partly plugged", true, hpGPA + hpBlock, 2 * hpBlock, []error{guestmem.ErrPlugged}},
		{"unplug unplugged", false, last, hpBlock, []error{guestmem.ErrUnplugged}},
		{"unplug partly plugged", false, hpGPA + hpBlock, 2 * hpBlock, []error{guestmem.ErrUnplugged}},
		{"plug", true, last, hpBlock, nil},
		{"unplug", false, last, hpBlock, nil},
	} {
		var err error
		if c.plug {
			err = mem.Plug(c.gpa, c.size)
		} else {
			err = mem.Unplug(c.gpa, c.size)
		}
		if c.want == nil {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
			}
			continue
		}
		var pe *guestmem.PlugError
		if !errors.As(err, &pe) || pe.Plug != c.plug {
			t.Errorf("%s: %v, want a *PlugError", c.name, err)
		}
		for _, w := range c.want {
			if !errors.Is(err, w) {
				t.Errorf("%s: %v does not match %v", c.name, err, w)
			}
		}
		for _, state := range []error{guestmem.ErrPlugged, guestmem.ErrUnplugged} {
			if errors.Is(err, guestmem.ErrInvalid) && errors.Is(err, state) {
				t.Errorf("%s: %v is both ErrInvalid and %v", c.name, err, state)
			}
		}
	}
	if got := mem.Stats(); got.Plugs != 2 || got.Unplugs != 1 {
		t.Errorf("stats: %d plugs, %d unplugs; want 2, 1", got.Plugs, got.Unplugs)
	}
}
