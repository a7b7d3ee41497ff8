package guesttest

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/iommufd"
	"github.com/gmemproject/gmem/span"
)

// The cut checks work on one extent of cutExtent bytes of a memfd, mapped
// at cutIOVA on the cutting path and at boundIOVA on the bounded-extent
// path beside it.
const (
	cutExtent = 4 << 20
	cutPages  = cutExtent / pageSize
	cutChunk  = 2 << 20 // the bounded path's chunk: dma.DefaultMaxExtent
	cutIOVA   = 0x0C000000
	boundIOVA = 0x0C800000
	setupIOVA = 0x0D000000 // cut-setup's mappings

	// A stream goes on until it has made cutMinCuts cuts and the device
	// has written cutMinWrites times.
	cutMinCuts   = 1024
	cutMinWrites = 64
	// cutProbes device writes are made right after the call that made a
	// page unreachable, to a still-shared page of the same area.
	cutProbes = 8
)

// cutChecks registers the checks of the cutting space on real iommufd: how
// a space that cuts is set up and when it is not; the hitless stream of
// cuts and, beside it, the same stream of bounded-extent splits; and the
// undo of a cut.
func cutChecks(t *testing.T, b string, f *iommufd.IOMMUFD, sp *iommufd.Space, edu *Edu) {
	check(t, b, "cut-setup", func(t *testing.T) { cutSetup(t, f, sp, edu) })
	for _, pat := range []cutPattern{spreadPattern, sequentialPattern} {
		check(t, b, "cut-hitless-"+pat.name, func(t *testing.T) {
			r := cutStream(t, &cutPath{sp: sp, iova: cutIOVA}, pat, edu, cutIOVA)
			r.print("cut", pat.name)
			if r.lost != 0 || r.probesLanded != r.probes || r.blockedReached != 0 || r.pinMismatch != 0 || r.amid == 0 {
				t.Errorf("cutting: %d of %d device writes to still-shared pages lost (%d in flight during cuts), %d of %d writes right after a cut landed, %d of %d cut pages reached by the device, %d VmPin mismatches; want 0 (and some), all, 0, 0",
					r.lost, r.writes, r.amid, r.probesLanded, r.probes, r.blockedReached, r.blockedChecked, r.pinMismatch)
			}
		})
		check(t, b, "cut-bounded-"+pat.name, func(t *testing.T) {
			r := cutStream(t, &boundPath{sp: sp, iova: boundIOVA}, pat, edu, boundIOVA)
			r.print("extent", pat.name)
			// The window is real: every write made between a split's unmap
			// and its map, to a page of the unmapped entry, is blocked. How
			// many of the stream's writes meet a window is timing, logged,
			// not asserted.
			if r.probesLanded != 0 || r.window == 0 || r.blockedReached != 0 || r.pinMismatch != 0 {
				t.Errorf("bounded extent: %d of %d writes inside a split's window landed, window %d bytes, %d of %d removed pages reached, %d VmPin mismatches; want 0, > 0, 0, 0",
					r.probesLanded, r.probes, r.window, r.blockedReached, r.blockedChecked, r.pinMismatch)
			}
		})
	}
	check(t, b, "cut-undo", func(t *testing.T) { cutUndo(t, sp, edu) })
}

// splitter removes single pages from an extent of cutPages pages mapped
// for the device, each a conversion to private inside a shared extent.
type splitter interface {
	// reset maps the whole extent afresh, nothing else mapped.
	reset(t *testing.T, host []byte)
	// split removes page; probe, if not nil, runs right after the call that
	// made the page unreachable, before any other call.
	split(t *testing.T, page int, probe func())
	// cost returns the bytes of still-shared memory the device could not
	// reach during the splits so far (window), the bytes pinned again, and
	// how long, in all, some still-shared memory was unreachable.
	cost() (window, repinned uint64, open time.Duration)
	// clear unmaps everything.
	clear(t *testing.T)
}

// cutPath splits by cutting: Space.Cut of the page.
type cutPath struct {
	sp     *iommufd.Space
	iova   uint64
	mapped bool
}

func (c *cutPath) reset(t *testing.T, host []byte) {
	t.Helper()
	c.clear(t)
	if err := c.sp.Map(c.iova, cutExtent, host); err != nil {
		t.Fatal(err)
	}
	c.mapped = true
}

func (c *cutPath) split(t *testing.T, page int, probe func()) {
	t.Helper()
	n, err := c.sp.Cut(c.iova+uint64(page)*pageSize, pageSize)
	if err != nil || n != pageSize {
		t.Fatalf("cut of page %d = %#x, %v; want %#x", page, n, err, pageSize)
	}
	if probe != nil {
		probe()
	}
}

// cost is nothing: no call unmaps a page that stays shared.
func (c *cutPath) cost() (uint64, uint64, time.Duration) { return 0, 0, 0 }

func (c *cutPath) clear(t *testing.T) {
	t.Helper()
	if !c.mapped {
		return
	}
	if _, err := c.sp.Unmap(c.iova, cutExtent); err != nil {
		t.Fatal(err)
	}
	c.mapped = false
}

// boundPath splits as dma's bounded Extent policy does: the extent is
// mapped as 2 MiB chunks, and a split unmaps the entry the page falls in
// and maps what is left of it on either side as entries of their own.
type boundPath struct {
	sp       *iommufd.Space
	iova     uint64
	host     []byte
	entries  []span.Range // extent offsets, ascending
	window   uint64
	repinned uint64
	open     time.Duration
}

func (p *boundPath) reset(t *testing.T, host []byte) {
	t.Helper()
	p.clear(t)
	p.host = host
	for off := uint64(0); off < cutExtent; off += cutChunk {
		p.mapEntry(t, span.Range{Start: off, End: off + cutChunk})
	}
}

func (p *boundPath) mapEntry(t *testing.T, r span.Range) {
	t.Helper()
	if err := p.sp.Map(p.iova+r.Start, r.Len(), p.host[r.Start:r.End]); err != nil {
		t.Fatal(err)
	}
	i, _ := slices.BinarySearchFunc(p.entries, r.Start, func(e span.Range, x uint64) int { return cmpU64(e.Start, x) })
	p.entries = slices.Insert(p.entries, i, r)
}

func (p *boundPath) split(t *testing.T, page int, probe func()) {
	t.Helper()
	off := uint64(page) * pageSize
	i := slices.IndexFunc(p.entries, func(e span.Range) bool { return e.Contains(off) })
	if i < 0 {
		t.Fatalf("page %d is in no entry", page)
	}
	e := p.entries[i]
	if n, err := p.sp.Unmap(p.iova+e.Start, e.Len()); err != nil || n != e.Len() {
		t.Fatalf("unmap of entry %v = %#x, %v", e, n, err)
	}
	unmapped := time.Now()
	p.entries = slices.Delete(p.entries, i, i+1)
	if probe != nil {
		probe()
	}
	for _, r := range []span.Range{{Start: e.Start, End: off}, {Start: off + pageSize, End: e.End}} {
		if r.Len() > 0 {
			p.mapEntry(t, r)
		}
	}
	if probe == nil && e.Len() > pageSize {
		p.open += time.Since(unmapped)
	}
	p.window += e.Len() - pageSize
	p.repinned += e.Len() - pageSize
}

func (p *boundPath) cost() (uint64, uint64, time.Duration) { return p.window, p.repinned, p.open }

func (p *boundPath) clear(t *testing.T) {
	t.Helper()
	if len(p.entries) == 0 {
		return
	}
	if _, err := p.sp.Unmap(p.iova, cutExtent); err != nil {
		t.Fatal(err)
	}
	p.entries = nil
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// cutPattern is the order in which a stream removes pages and where the
// device writes meanwhile.
type cutPattern struct {
	name string
	// life returns the pages to remove from a freshly mapped extent, in
	// order. Page 0 is never among them: the device's buffer is loaded
	// from it.
	life func(rng *rand.Rand) []int
	// targets returns two pages that no life removes: one next to or near
	// page next, the next page to be removed, and one far from it in the
	// same bounded chunk or, where none is left there, half the extent away.
	targets func(next int) (near, far int)
}

// spreadPattern removes every page but those 0 mod 8, in seven rounds
// (pages 1 mod 8, then 2 mod 8, ..., each round shuffled), so every removal
// splits its area at one end at least and the first round at both. The
// device writes to the page 0 mod 8 nearest the next removal and to the one
// half the extent away.
var spreadPattern = cutPattern{
	name: "spread",
	life: func(rng *rand.Rand) []int {
		var q []int
		for off := 1; off < 8; off++ {
			var round []int
			for pg := off; pg < cutPages; pg += 8 {
				round = append(round, pg)
			}
			rng.Shuffle(len(round), func(i, j int) { round[i], round[j] = round[j], round[i] })
			q = append(q, round...)
		}
		return q
	},
	targets: func(next int) (int, int) {
		near := next &^ 7
		if next%8 > 4 && near+8 < cutPages {
			near += 8
		}
		if near == 0 {
			near = 8
		}
		far := (near + cutPages/2) % cutPages
		if far == 0 {
			far = 8
		}
		return near, far
	},
}

// sequentialPattern removes the first half of each 2 MiB chunk page by page
// in ascending order (page 0 excepted), as a guest converting a buffer
// from its start does; the second half stays. The device writes to the
// first page of the chunk's second half (next to the last removal) and to
// the chunk's last page: both in what is left of the chunk, the entry a
// bounded split unmaps and maps again at every removal.
var sequentialPattern = cutPattern{
	name: "sequential",
	life: func(*rand.Rand) []int {
		var q []int
		for base := 0; base < cutPages; base += cutChunk / pageSize {
			for pg := base + 1; pg < base+cutChunk/pageSize/2; pg++ {
				q = append(q, pg)
			}
		}
		return q
	},
	targets: func(next int) (int, int) {
		const chunk = cutChunk / pageSize
		base := next / chunk * chunk
		return base + chunk/2, base + chunk - 1
	},
}

// streamResult is what a stream of splits did and what the device saw.
type streamResult struct {
	cuts, lives    int
	writes, lost   int // device writes to still-shared pages, and those that did not land whole
	partial        int // of the lost, those that landed in part
	amid           int // writes in flight while at least one split was made
	probes         int // writes right after a page was made unreachable
	probesLanded   int
	blockedChecked int // removed pages the device wrote to
	blockedReached int // of those, pages whose memfd contents changed
	pinMismatch    int // splits after which VmPin was not down by exactly the pages removed
	window         uint64
	repinned       uint64
	windowTime     time.Duration // how long still-shared memory was unreachable
	elapsed        time.Duration
}

// print writes the stream's line to the console, in one write:
//
//	GMEM-RIG split iommufd <cut|extent> <spread|sequential> cuts=N writes=N lost=N ...
func (r streamResult) print(path, pattern string) {
	line := fmt.Sprintf("GMEM-RIG split iommufd %s %s cuts=%d lives=%d writes=%d writes_amid_splits=%d lost=%d partial=%d probes=%d probes_landed=%d blocked_checked=%d blocked_reached=%d vmpin_mismatch=%d window_bytes=%d repinned_bytes=%d window_us=%d ms=%d\n",
		path, pattern, r.cuts, r.lives, r.writes, r.amid, r.lost, r.partial, r.probes, r.probesLanded, r.blockedChecked, r.blockedReached, r.pinMismatch,
		r.window, r.repinned, r.windowTime.Microseconds(), r.elapsed.Milliseconds())
	os.Stdout.WriteString(line)
}

// cutStream removes single pages from a shared extent at iova with s, in
// the order of pat, while the edu device writes again and again to pages
// that stay shared (pat's targets, alternately near and far), and counts
// the writes that do not land. Once a life's pages are all removed, with
// no write in flight, the extent is mapped afresh and a new life starts.
// The splits run back to back while a write is in flight, so a write lands
// at a random moment among them. After every split VmPin must be down by
// exactly the pages removed in the life.
//
// Before the stream it makes cutProbes device writes right after the call
// that made a page unreachable, to the page next to it. After each life the
// device writes to removed pages (the first 32 of the first life, the first
// and last of each later one): their memfd pages must stay as they are.
func cutStream(t *testing.T, s splitter, pat cutPattern, edu *Edu, iova uint64) streamResult {
	const n = EduMaxCount
	var r streamResult
	host := memfdShared(t, cutExtent)
	t.Cleanup(func() { s.clear(t) })
	start := time.Now()
	s.reset(t, host)
	// The device's buffer holds the pattern from page 0, which is never
	// removed.
	pattern(host[:n], 0x4d)
	p := slices.Clone(host[:n])
	if err := edu.ToDevice(iova, n); err != nil {
		t.Fatal(err)
	}
	page := func(i int) []byte { return host[i*pageSize : i*pageSize+n] }
	// landed reports how a device write to target came out; a byte that
	// is neither as written nor untouched fails the test.
	landed := func(target int) (whole, partial bool) {
		t.Helper()
		got := page(target)
		switch {
		case slices.Equal(got, p):
			return true, false
		case allZero(got):
			return false, false
		}
		for i := range got {
			if got[i] != p[i] && got[i] != 0 {
				t.Fatalf("byte %d of the device write to page %d is %#x, neither as written nor untouched", i, target, got[i])
			}
		}
		return false, true
	}

	for i := range cutProbes {
		c := i*(cutPages/cutProbes) + 1
		target := c + 1
		clear(page(target))
		s.split(t, c, func() {
			if err := edu.ToRAM(iova+uint64(target)*pageSize, n); err != nil {
				t.Fatal(err)
			}
		})
		r.probes++
		if whole, _ := landed(target); whole {
			r.probesLanded++
		}
	}

	rng := rand.New(rand.NewPCG(19, 1))
	pin := func() uint64 { return statusKiB(t, "VmPin") }
	var queue, removed []int
	var pin0 uint64
	blocked := func(pages []int) {
		for _, c := range pages {
			b := host[c*pageSize : (c+1)*pageSize]
			pattern(b, 0x77)
			sentinel := slices.Clone(b)
			if err := edu.ToRAM(iova+uint64(c)*pageSize, n); err != nil {
				t.Fatal(err)
			}
			r.blockedChecked++
			if !slices.Equal(b, sentinel) {
				if r.blockedReached == 0 {
					t.Errorf("life %d: the device wrote to removed page %d", r.lives, c)
				}
				r.blockedReached++
			}
		}
	}
	for r.cuts < cutMinCuts || r.writes < cutMinWrites {
		if len(queue) == 0 {
			// A new life: the removed pages are out of the device's reach;
			// then the extent is mapped afresh.
			switch {
			case r.lives == 1:
				blocked(removed[:min(32, len(removed))])
			case r.lives > 1:
				blocked([]int{removed[0], removed[len(removed)-1]})
			}
			s.reset(t, host)
			r.lives++
			removed = removed[:0]
			queue = pat.life(rng)
			pin0 = pin()
		}
		near, far := pat.targets(queue[0])
		target := near
		if r.writes%2 == 1 {
			target = far
		}
		clear(page(target))
		if err := edu.StartToRAM(iova+uint64(target)*pageSize, n); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(edu.DMATimeout)
		during := 0
		for edu.Busy() {
			if time.Now().After(deadline) {
				t.Fatal(ErrDMATimeout)
			}
			if len(queue) == 0 {
				time.Sleep(time.Millisecond)
				continue
			}
			c := queue[0]
			queue = queue[1:]
			s.split(t, c, nil)
			removed = append(removed, c)
			r.cuts++
			during++
			if got, want := pin(), pin0-uint64(len(removed))*pageSize/1024; got != want {
				if r.pinMismatch == 0 {
					t.Errorf("life %d: VmPin %d kB after %d pages removed, want %d kB", r.lives, got, len(removed), want)
				}
				r.pinMismatch++
			}
		}
		r.writes++
		// A write is amid splits when the device was writing while a
		// split was made: how many splits fit in one write depends on how
		// fast the machine runs the two, not on the path.
		if during > 0 {
			r.amid++
		}
		if whole, partial := landed(target); !whole {
			r.lost++
			if partial {
				r.partial++
			}
		}
	}
	if len(removed) > 0 {
		blocked([]int{removed[0], removed[len(removed)-1]})
	}
	r.window, r.repinned, r.windowTime = s.cost()
	r.elapsed = time.Since(start)
	t.Logf("%d splits in %d lives, %d device writes (%d in flight during splits; %d lost, %d in part), %d of %d writes right after a split landed, %d removed pages checked (%d reached), window %d bytes open for %v, re-pinned %d bytes, %v",
		r.cuts, r.lives, r.writes, r.amid, r.lost, r.partial, r.probesLanded, r.probes, r.blockedChecked, r.blockedReached,
		r.window, r.windowTime, r.repinned, r.elapsed.Round(time.Millisecond))
	if r.cuts < cutMinCuts || r.writes < cutMinWrites {
		t.Errorf("%d splits and %d writes, want at least %d and %d", r.cuts, r.writes, cutMinCuts, cutMinWrites)
	}
	return r
}

// cutSetup checks how a space comes to cut and when it does not: the space
// of the device's IOAS cuts (large pages off, the compat IOAS is it); a
// second cutting space on the same iommufd takes the compat IOAS and the
// first takes it back at its next cut, each cutting only its own IOAS; the
// HugePages opt-out leaves the IOAS alone and does not cut; and on an IOAS
// with large pages allowed, a device attached and a page mapped, the
// kernel refuses to turn large pages off and the space says why. Native
// IOMMU_IOAS_UNMAP still refuses a partial unmap throughout.
func cutSetup(t *testing.T, f *iommufd.IOMMUFD, sp *iommufd.Space, edu *Edu) {
	const n = EduMaxCount
	ioas := sp.IOAS()
	if !sp.Caps().Cut || sp.CutReason() != "" {
		t.Fatalf("the device's space does not cut: %q", sp.CutReason())
	}
	if on, err := f.HugePages(ioas); err != nil || on {
		t.Errorf("IOMMU_OPTION_HUGE_PAGES of a cutting space = %v, %v; want false", on, err)
	}
	mem := memfdShared(t, 16*pageSize)
	if err := sp.Map(setupIOVA, 16*pageSize, mem); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if _, err := sp.Unmap(setupIOVA, 16*pageSize); err != nil {
			t.Error(err)
		}
	}()
	if _, err := sp.Unmap(setupIOVA+4*pageSize, pageSize); !errors.Is(err, unix.ENOENT) {
		t.Errorf("native unmap of one page of an area = %v, want ENOENT", err)
	}

	// A second cutting space on the same iommufd, with no device: its
	// areas split the same way (nothing is pinned without a device).
	other, err := f.IOASAlloc()
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := f.Destroy(other); err != nil {
			t.Error(err)
		}
	}()
	sp2, err := iommufd.NewSpace(f, other)
	if err != nil {
		t.Fatal(err)
	}
	if !sp2.Caps().Cut {
		t.Fatalf("a second IOAS on the iommufd does not cut: %s", sp2.CutReason())
	}
	if got, err := f.VFIOIOASGet(); err != nil || got != other {
		t.Errorf("compat IOAS after the second space = %d, %v; want %d", got, err, other)
	}
	if err := sp2.Map(setupIOVA, 16*pageSize, mem); err != nil {
		t.Fatal(err)
	}
	pin0 := statusKiB(t, "VmPin")
	// Alternate: each cut must act on its own IOAS only.
	for i, c := range []struct {
		sp   *iommufd.Space
		page uint64
	}{{sp, 3}, {sp2, 5}, {sp, 7}, {sp2, 3}, {sp, 5}} {
		if got, err := c.sp.Cut(setupIOVA+c.page*pageSize, pageSize); err != nil || got != pageSize {
			t.Fatalf("cut %d (IOAS %d page %d) = %#x, %v", i, c.sp.IOAS(), c.page, got, err)
		}
		if got, err := f.VFIOIOASGet(); err != nil || got != c.sp.IOAS() {
			t.Errorf("compat IOAS after cut %d = %d, %v; want %d", i, got, err, c.sp.IOAS())
		}
	}
	if got, want := statusKiB(t, "VmPin"), pin0-3*pageSize/1024; got != want {
		t.Errorf("VmPin after three cuts of the device's IOAS = %d kB, want %d", got, want)
	}
	// The device's IOAS lost pages 3, 5 and 7, not 3 and 5 of the other.
	pattern(mem[:n], 0x61)
	p := slices.Clone(mem[:n])
	if err := edu.ToDevice(setupIOVA, n); err != nil {
		t.Fatal(err)
	}
	for pg := uint64(1); pg < 10; pg++ {
		b := mem[pg*pageSize : pg*pageSize+n]
		clear(b)
		if err := edu.ToRAM(setupIOVA+pg*pageSize, n); err != nil {
			t.Fatal(err)
		}
		cut := pg == 3 || pg == 5 || pg == 7
		if landed := slices.Equal(b, p); landed == cut || !landed && !allZero(b) {
			t.Errorf("device write to page %d (cut: %v) landed: %v", pg, cut, landed)
		}
	}
	if n, err := sp2.Unmap(setupIOVA, 16*pageSize); err != nil || n != 14*pageSize {
		t.Errorf("unmap of the second IOAS's rest = %#x, %v; want %#x", n, err, 14*pageSize)
	}
	for _, pg := range []uint64{3, 5, 7} {
		if err := sp.Map(setupIOVA+pg*pageSize, pageSize, mem[pg*pageSize:(pg+1)*pageSize]); err != nil {
			t.Fatal(err)
		}
	}

	// The opt-out keeps large pages and does not cut.
	sp3, err := iommufd.NewSpaceOptions(f, other, iommufd.SpaceOptions{HugePages: true})
	if err != nil {
		t.Fatal(err)
	}
	if sp3.Caps().Cut || sp3.CutReason() == "" {
		t.Errorf("a HugePages space cuts (%v) or gives no reason (%q)", sp3.Caps().Cut, sp3.CutReason())
	}
	if _, err := sp3.Cut(setupIOVA, pageSize); !errors.Is(err, iommufd.ErrNoCut) {
		t.Errorf("Cut on a HugePages space = %v, want ErrNoCut", err)
	}

	// Large pages allowed, a device attached and a page mapped: the kernel
	// will not turn them off, and the space says so and does not cut.
	if err := f.SetHugePages(ioas, true); err != nil {
		t.Fatal(err)
	}
	fallback, err := iommufd.NewSpace(f, ioas)
	if err != nil {
		t.Fatal(err)
	}
	if on, err := f.HugePages(ioas); err != nil || !on {
		t.Errorf("a refused space changed the IOAS: large pages %v, %v", on, err)
	}
	t.Logf("the space of an IOAS that maps pages for a device with large pages allowed: cut %v: %s", fallback.Caps().Cut, fallback.CutReason())
	if fallback.Caps().Cut || !strings.Contains(fallback.CutReason(), "EINVAL") {
		t.Errorf("fallback space: cut %v, reason %q; want no cut, EINVAL", fallback.Caps().Cut, fallback.CutReason())
	}
	// With large pages allowed the compat unmap does not cut: a range that
	// cuts an area is refused (ENOENT, as IOMMU_IOAS_UNMAP) and unmaps
	// nothing.
	// Page 10 is inside the area [8, 16) (3, 5 and 7 are areas of their own now).
	if got, err := sp.Cut(setupIOVA+10*pageSize, pageSize); !errors.Is(err, unix.ENOENT) {
		t.Errorf("cut with large pages allowed = %#x, %v; want ENOENT", got, err)
	}
	b := mem[10*pageSize : 10*pageSize+n]
	clear(b)
	if err := edu.ToRAM(setupIOVA+10*pageSize, n); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(b, p) {
		t.Error("after a refused cut the device does not reach the page")
	}
	// Back to how the device's space needs it: with nothing mapped the
	// kernel turns large pages off again.
	if _, err := sp.Unmap(setupIOVA, 16*pageSize); err != nil {
		t.Fatal(err)
	}
	if err := f.SetHugePages(ioas, false); err != nil {
		t.Fatal(err)
	}
	if err := sp.Map(setupIOVA, 16*pageSize, mem); err != nil {
		t.Fatal(err)
	}
}

// cutUndo cuts a page out of a mapped extent and undoes it as a failed
// conversion does (the step after the cut fails): the page is mapped again,
// VmPin is back and the device reaches the page and its neighbours. A cut
// the kernel refuses (an unaligned or empty range) changes nothing: the
// device still reaches the page and nothing is unpinned.
func cutUndo(t *testing.T, sp *iommufd.Space, edu *Edu) {
	const n = EduMaxCount
	s := &cutPath{sp: sp, iova: cutIOVA}
	host := memfdShared(t, cutExtent)
	s.reset(t, host)
	defer s.clear(t)
	pattern(host[:n], 0x3a)
	p := slices.Clone(host[:n])
	if err := edu.ToDevice(cutIOVA, n); err != nil {
		t.Fatal(err)
	}
	reaches := func(pg uint64) bool {
		t.Helper()
		b := host[pg*pageSize : pg*pageSize+n]
		clear(b)
		if err := edu.ToRAM(cutIOVA+pg*pageSize, n); err != nil {
			t.Fatal(err)
		}
		return slices.Equal(b, p)
	}
	const c = 700
	pin0 := statusKiB(t, "VmPin")
	injected := fmt.Errorf("injected failure after the cut: %w", unix.EIO)
	convert := func() error {
		if n, err := sp.Cut(cutIOVA+c*pageSize, pageSize); err != nil || n != pageSize {
			return fmt.Errorf("cut = %#x, %v", n, err)
		}
		if got := statusKiB(t, "VmPin"); got != pin0-pageSize/1024 {
			t.Errorf("VmPin after the cut = %d kB, want %d", got, pin0-pageSize/1024)
		}
		if reaches(c) {
			t.Error("the device reached the page just cut")
		}
		return injected
	}
	if err := convert(); !errors.Is(err, injected) {
		t.Fatal(err)
	}
	// The undo: map the page again.
	if err := sp.Map(cutIOVA+c*pageSize, pageSize, host[c*pageSize:(c+1)*pageSize]); err != nil {
		t.Fatalf("undo: %v", err)
	}
	if got := statusKiB(t, "VmPin"); got != pin0 {
		t.Errorf("VmPin after the undo = %d kB, want %d", got, pin0)
	}
	for _, pg := range []uint64{c - 1, c, c + 1} {
		if !reaches(pg) {
			t.Errorf("after the undo the device does not reach page %d", pg)
		}
	}
	// Refused cuts change nothing.
	for _, r := range []struct{ iova, size uint64 }{
		{cutIOVA + c*pageSize + 0x800, pageSize},
		{cutIOVA + (c+10)*pageSize, 0},
		{cutIOVA + (c+20)*pageSize, math.MaxUint64},
	} {
		if n, err := sp.Cut(r.iova, r.size); err == nil {
			t.Errorf("cut [%#x, +%#x) = %#x, want an error", r.iova, r.size, n)
		} else {
			t.Logf("cut [%#x, +%#x): %v", r.iova, r.size, err)
		}
	}
	if got := statusKiB(t, "VmPin"); got != pin0 {
		t.Errorf("VmPin after refused cuts = %d kB, want %d", got, pin0)
	}
	for _, pg := range []uint64{c, c + 10, c + 20, c + 21} {
		if !reaches(pg) {
			t.Errorf("after refused cuts the device does not reach page %d", pg)
		}
	}
}
