package virtiomem_test

import (
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/virtiomem"
)

const (
	pg     = 4096
	block  = 4 * pg
	pages  = 32
	gpa    = 0x1_0000_0000
	blocks = pages * pg / block
)

func br(first, n uint64) span.Range {
	return span.Range{Start: first * block, End: (first + n) * block}
}

var errBoom = errors.New("boom")

// world is a region with both sources and a DMA mapper over all of it.
type world struct {
	t      *testing.T
	m      *discard.Manager
	attrs  *memattr.Attributes
	dev    *virtiomem.Device
	model  *iommu.Model
	mapper *dma.Mapper
	host   []byte

	released []span.Range
	failRel  bool
}

func newWorld(t *testing.T, caps iommu.Caps, opts dma.Options) *world {
	t.Helper()
	w := &world{t: t, host: make([]byte, pages*pg)}
	w.m = discard.New(pages*pg, nil)
	var err error
	w.attrs, err = memattr.New(w.m, memattr.Config{})
	if err != nil {
		t.Fatal(err)
	}
	w.dev, err = virtiomem.New(w.m, virtiomem.Config{BlockSize: block, Release: func(runs []span.Range) error {
		if w.failRel {
			return errBoom
		}
		w.released = append(w.released, runs...)
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	w.model = iommu.NewModel(caps)
	w.mapper, err = dma.New(w.model, w.host, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.m.Register(w.mapper, discard.Section{Size: pages * pg, GPA: gpa}); err != nil {
		t.Fatal(err)
	}
	return w
}

// sees checks, page by page, that the device reaches exactly the pages that
// are shared and plugged, by DMA.
func (w *world) sees() {
	w.t.Helper()
	for p := range uint64(pages) {
		r := span.Range{Start: p * pg, End: (p + 1) * pg}
		want := w.attrs.IsShared(r) && w.dev.IsPlugged(r)
		if want != w.m.IsPopulated(r) {
			w.t.Fatalf("page %d: manager says populated=%v, sources say %v", p, !want, want)
		}
		err := w.model.DMAWrite(gpa+p*pg+8, []byte{byte(p), 0xaa})
		if (err == nil) != want {
			w.t.Fatalf("page %d: DMA err=%v, want reachable=%v (shared=%v plugged=%v)", p, err, want, w.attrs.IsShared(r), w.dev.IsPlugged(r))
		}
		if want && w.host[p*pg+8] != byte(p) {
			w.t.Fatalf("page %d: DMA did not reach the host page", p)
		}
	}
}

func TestNew(t *testing.T) {
	m := discard.New(8<<20, nil)
	d, err := virtiomem.New(m, virtiomem.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if d.BlockSize() != virtiomem.DefaultBlockSize || d.PluggedBytes() != 0 || !d.IsUnplugged(span.Range{End: 8 << 20}) {
		t.Fatal("a new device must be all unplugged with 2 MiB blocks")
	}
	if s := m.Sources(); len(s) != 1 || s[0] != d.Source() {
		t.Fatal("the device did not add itself as a source")
	}
	if _, err := virtiomem.New(discard.New(3<<20, nil), virtiomem.Config{}); err == nil {
		t.Fatal("a region not a multiple of the block size was accepted")
	}
	if _, err := virtiomem.New(m, virtiomem.Config{BlockSize: 3 * pg}); err == nil {
		t.Fatal("a block size not a power of two was accepted")
	}
	if d.StateBytes() == 0 {
		t.Fatal("StateBytes = 0")
	}
}

func TestPlugUnplug(t *testing.T) {
	for _, bitmap := range []bool{false, true} {
		t.Run(fmt.Sprintf("bitmap=%v", bitmap), func(t *testing.T) {
			m := discard.New(pages*pg, nil)
			var released []span.Range
			d, err := virtiomem.New(m, virtiomem.Config{BlockSize: block, Bitmap: bitmap, Release: func(r []span.Range) error {
				released = append(released, r...)
				return nil
			}})
			if err != nil {
				t.Fatal(err)
			}
			if err := d.Plug(block, 3*block); err != nil {
				t.Fatal(err)
			}
			if !d.IsPlugged(br(1, 3)) || d.IsPlugged(br(0, 2)) || d.IsUnplugged(br(0, 2)) || d.PluggedBytes() != 3*block {
				t.Fatal("plug state wrong")
			}
			if err := d.Unplug(2*block, block); err != nil {
				t.Fatal(err)
			}
			type run struct {
				R span.Range
				P bool
			}
			var runs []run
			d.Runs(br(0, blocks), func(r span.Range, p bool) { runs = append(runs, run{r, p}) })
			want := []run{{br(0, 1), false}, {br(1, 1), true}, {br(2, 1), false}, {br(3, 1), true}, {br(4, blocks-4), false}}
			if diff := cmp.Diff(want, runs); diff != "" {
				t.Fatalf("Runs (-want +got):\n%s", diff)
			}
			if err := d.UnplugAll(); err != nil {
				t.Fatal(err)
			}
			if d.PluggedBytes() != 0 {
				t.Fatal("UnplugAll left blocks plugged")
			}
			// Only what changed is released: block 2, then blocks 1 and 3.
			if diff := cmp.Diff([]span.Range{br(2, 1), br(1, 1), br(3, 1)}, released); diff != "" {
				t.Fatalf("released (-want +got):\n%s", diff)
			}
			for _, c := range []struct {
				off, size uint64
				want      error
			}{
				{0, 0, span.ErrEmpty},
				{pg, block, span.ErrAlign},
				{0, block + pg, span.ErrAlign},
				{(blocks - 1) * block, 2 * block, span.ErrBounds},
				{block, math.MaxUint64 - block + 1, span.ErrOverflow},
			} {
				if err := d.Plug(c.off, c.size); !errors.Is(err, c.want) {
					t.Errorf("Plug(%#x, %#x) = %v, want %v", c.off, c.size, err, c.want)
				}
				if err := d.Unplug(c.off, c.size); !errors.Is(err, c.want) {
					t.Errorf("Unplug(%#x, %#x) = %v, want %v", c.off, c.size, err, c.want)
				}
			}
			if d.PluggedBytes() != 0 {
				t.Fatal("an invalid request plugged something")
			}
			plugs, unplugs, failures := d.Stats()
			if plugs != 1 || unplugs != 2 || failures != 10 {
				t.Fatalf("Stats = %d, %d, %d", plugs, unplugs, failures)
			}
		})
	}
}

// TestSharedAndPlugged checks that a device reaches exactly the pages that
// are shared AND plugged, whatever order the two sources change in.
func TestSharedAndPlugged(t *testing.T) {
	w := newWorld(t, iommu.Caps{Rules: iommu.IOMMUFD}, dma.Options{})
	w.sees()
	steps := []func() error{
		func() error { return w.attrs.Convert(0, 12*pg, memattr.Shared) },    // shared, nothing plugged
		func() error { return w.dev.Plug(block, 2*block) },                   // plugged [4,12): pages 4..11 reachable
		func() error { return w.attrs.Convert(6*pg, 2*pg, memattr.Private) }, // hole at 6,7
		func() error { return w.dev.Plug(5*block, block) },                   // plugged but private
		func() error { return w.attrs.Convert(18*pg, 6*pg, memattr.Shared) }, // 20..23 now reachable
		func() error { return w.dev.Unplug(block, block) },                   // 4..7 gone
		func() error { return w.attrs.Convert(0, pages*pg, memattr.Shared) }, // all plugged reachable
		func() error { return w.dev.UnplugAll() },
		func() error { return w.dev.Plug(0, blocks*block) },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		w.sees()
	}
	if w.model.Len() == 0 || w.mapper.Stats().Entries != uint64(w.model.Len()) {
		t.Fatalf("mapper entries %d, IOMMU %d", w.mapper.Stats().Entries, w.model.Len())
	}
}

// TestPlugRefused checks that a plug a listener refuses (an IOMMU out of
// entries) is undone completely.
func TestPlugRefused(t *testing.T) {
	w := newWorld(t, iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 6}, dma.Options{Policy: dma.Granule})
	if err := w.attrs.Convert(0, pages*pg, memattr.Shared); err != nil {
		t.Fatal(err)
	}
	if err := w.dev.Plug(0, block); err != nil { // 4 granules
		t.Fatal(err)
	}
	before := w.model.Mappings()
	err := w.dev.Plug(2*block, block) // 4 more: only 2 left
	if !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("Plug over the entry budget = %v, want ENOSPC", err)
	}
	if w.dev.IsPlugged(br(2, 1)) || w.dev.PluggedBytes() != block {
		t.Fatal("a refused plug left blocks plugged")
	}
	if diff := cmp.Diff(before, w.model.Mappings()); diff != "" {
		t.Fatalf("a refused plug changed the mappings (-before +after):\n%s", diff)
	}
	w.sees()
	if _, _, failures := w.dev.Stats(); failures != 1 {
		t.Fatalf("failures = %d", failures)
	}
}

// TestPlugRefusedSecondListener checks the rollback across listeners: the
// first listener is told to discard what it was given when the second one
// refuses.
func TestPlugRefusedSecondListener(t *testing.T) {
	w := newWorld(t, iommu.Caps{Rules: iommu.IOMMUFD}, dma.Options{})
	if err := w.attrs.Convert(0, pages*pg, memattr.Shared); err != nil {
		t.Fatal(err)
	}
	refusing := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
	second, err := dma.New(refusing, w.host, dma.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.m.Register(second, discard.Section{Size: pages * pg, GPA: gpa}); err != nil {
		t.Fatal(err)
	}
	refusing.SetFault(func(c iommu.Call) error {
		if c.Op == iommu.OpMap {
			return errBoom
		}
		return nil
	})
	if err := w.dev.Plug(block, 2*block); !errors.Is(err, errBoom) {
		t.Fatalf("Plug = %v, want the second listener's refusal", err)
	}
	if w.model.Len() != 0 || refusing.Len() != 0 {
		t.Fatalf("mappings left after a refused plug: %v %v", w.model.Mappings(), refusing.Mappings())
	}
	if w.dev.PluggedBytes() != 0 {
		t.Fatal("a refused plug left blocks plugged")
	}
	w.sees()
}

// TestUnplugFailures checks that an unplug that cannot be carried out (a
// split with no IOMMU entry left) or whose release fails changes nothing.
func TestUnplugFailures(t *testing.T) {
	w := newWorld(t, iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 1}, dma.Options{})
	if err := w.dev.Plug(0, blocks*block); err != nil {
		t.Fatal(err)
	}
	if err := w.attrs.Convert(0, 12*pg, memattr.Shared); err != nil { // one entry over blocks 0-2
		t.Fatal(err)
	}
	before := w.model.Mappings()
	err := w.dev.Unplug(block, block) // splits the entry in two: needs one more
	if !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("Unplug needing a split at the limit = %v, want ENOSPC", err)
	}
	if !w.dev.IsPlugged(br(1, 1)) {
		t.Fatal("the failed unplug unplugged the block")
	}
	if diff := cmp.Diff(before, w.model.Mappings()); diff != "" {
		t.Fatalf("mappings changed (-before +after):\n%s", diff)
	}
	w.sees()

	// An unplug at the edge of the entry needs no extra entry.
	if err := w.dev.Unplug(2*block, block); err != nil {
		t.Fatal(err)
	}
	w.sees()
	if diff := cmp.Diff([]span.Range{br(2, 1)}, w.released); diff != "" {
		t.Fatalf("released (-want +got):\n%s", diff)
	}
	// A failing release undoes the unplug, mappings included.
	before = w.model.Mappings()
	w.failRel = true
	if err := w.dev.Unplug(0, block); !errors.Is(err, errBoom) {
		t.Fatalf("Unplug with a failing release = %v", err)
	}
	if !w.dev.IsPlugged(br(0, 1)) {
		t.Fatal("failed unplug left the block unplugged")
	}
	if diff := cmp.Diff(before, w.model.Mappings()); diff != "" {
		t.Fatalf("mappings changed (-before +after):\n%s", diff)
	}
	w.sees()
}
