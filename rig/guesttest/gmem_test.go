package guesttest

import (
	"errors"
	"log/slog"
	"math"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

const (
	dmaPolicyExtent  = dma.Extent
	dmaPolicyGranule = dma.Granule

	// granuleEntryLimit is the type1 budget of the granule run: enough for
	// its conversions, and small enough to run out.
	granuleEntryLimit = 120

	gmemRegion = 1 << 20   // bytes of guest RAM
	gmemGPA    = 0x2000000 // where it sits; IOVA = GPA, below the 28-bit mask
)

// gmemStack is the gmem stack over real guest-RAM-like memory: a memfd
// mapping, a discard manager, memattr attributes (all private at first) and
// a dma.Mapper on the kernel Space, registered for the whole region at
// gmemGPA.
type gmemStack struct {
	host   []byte
	mgr    *discard.Manager
	attrs  *memattr.Attributes
	mapper *dma.Mapper
	space  iommu.Space
	// avail0 is the space's free entries before the stack mapped anything
	// (limited spaces only).
	avail0  uint64
	limited bool
}

func newGmemStack(t *testing.T, space iommu.Space, policy dma.Policy) *gmemStack {
	t.Helper()
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
	s := &gmemStack{host: memfdShared(t, gmemRegion), space: space}
	var err error
	if s.avail0, s.limited, err = space.Avail(); err != nil {
		t.Fatal(err)
	}
	s.mgr = discard.New(gmemRegion, log)
	if s.attrs, err = memattr.New(s.mgr, memattr.Config{}); err != nil {
		t.Fatal(err)
	}
	if s.mapper, err = dma.New(space, s.host, dma.Options{Policy: policy, Logger: log}); err != nil {
		t.Fatal(err)
	}
	if err := s.mgr.Register(s.mapper, discard.Section{Offset: 0, Size: gmemRegion, GPA: gmemGPA}); err != nil {
		t.Fatal(err)
	}
	return s
}

// convert converts and then checks the invariants.
func (s *gmemStack) convert(t *testing.T, off, size uint64, to memattr.State) {
	t.Helper()
	if err := s.attrs.Convert(off, size, to); err != nil {
		t.Fatalf("convert [%#x,+%#x) to %v: %v", off, size, to, err)
	}
	s.invariants(t)
}

// invariants checks I1 (the mapped IOVA pages are exactly the shared pages,
// at IOVA = GPA) and that the kernel holds as many entries as the mapper
// says.
func (s *gmemStack) invariants(t *testing.T) {
	t.Helper()
	var shared []span.Range
	s.attrs.Runs(span.Range{End: gmemRegion}, func(r span.Range, st memattr.State) {
		if st == memattr.Shared {
			shared = append(shared, span.Range{Start: r.Start + gmemGPA, End: r.End + gmemGPA})
		}
	})
	entries := s.mapper.Entries()
	var mapped []span.Range
	for _, e := range entries {
		r := e.Range()
		if n := len(mapped); n > 0 && mapped[n-1].End == r.Start {
			mapped[n-1].End = r.End
			continue
		}
		mapped = append(mapped, r)
	}
	if d := cmp.Diff(shared, mapped); d != "" {
		t.Errorf("I1: mapped IOVAs differ from shared GPAs (-shared +mapped):\n%s", d)
	}
	if s.limited {
		avail, _, err := s.space.Avail()
		if err != nil {
			t.Fatal(err)
		}
		if avail != s.avail0-uint64(len(entries)) {
			t.Errorf("kernel has %d entries free, want %d - %d mapper entries", avail, s.avail0, len(entries))
		}
	}
}

// close unregisters the mapper, which must unmap everything, and checks the
// kernel holds nothing.
func (s *gmemStack) close(t *testing.T) {
	t.Helper()
	if err := s.mgr.Unregister(s.mapper); err != nil {
		t.Fatal(err)
	}
	if e := s.mapper.Entries(); len(e) != 0 {
		t.Errorf("mapper still has %d entries after Unregister", len(e))
	}
	var n uint64
	var err error
	if s.space.Caps().Rules == iommu.IOMMUFD {
		n, err = s.space.Unmap(0, math.MaxUint64)
	} else {
		n, err = s.space.Unmap(0, 1<<47)
	}
	if err != nil || n != 0 {
		t.Errorf("kernel mappings left after Unregister: %#x bytes, %v", n, err)
	}
}

func (s *gmemStack) wantEntries(t *testing.T, want []iommu.Mapping) {
	t.Helper()
	if d := cmp.Diff(want, s.mapper.Entries()); d != "" {
		t.Errorf("mapper entries (-want +got):\n%s", d)
	}
}

// granules returns the one-page entries of [off, off+size) at gmemGPA.
func granules(off, size uint64) []iommu.Mapping {
	var out []iommu.Mapping
	for p := off; p < off+size; p += pageSize {
		out = append(out, iommu.Mapping{IOVA: gmemGPA + p, Size: pageSize})
	}
	return out
}

// entriesFor returns what the policy maps for the given extents (each one
// notification): the extent itself or its pages.
func entriesFor(policy dma.Policy, extents ...[2]uint64) []iommu.Mapping {
	var out []iommu.Mapping
	for _, e := range extents {
		if policy == dma.Granule {
			out = append(out, granules(e[0], e[1]-e[0])...)
		} else {
			out = append(out, iommu.Mapping{IOVA: gmemGPA + e[0], Size: e[1] - e[0]})
		}
	}
	return out
}

// gmemChecks drives conversions through the gmem stack on the real kernel
// Space and judges by memory contents what the edu device can reach.
func gmemChecks(t *testing.T, space iommu.Space, edu *Edu, policy dma.Policy) {
	const n = EduMaxCount
	s := newGmemStack(t, space, policy)
	gpa := func(off uint64) uint64 { return gmemGPA + off }
	h := s.host

	// Shared buffers: the device reads one and writes another.
	s.convert(t, 0, 0x10000, memattr.Shared)
	s.wantEntries(t, entriesFor(policy, [2]uint64{0, 0x10000}))
	pattern(h[:n], 0x41)
	p := slices.Clone(h[:n])
	if err := edu.ToDevice(gpa(0), n); err != nil {
		t.Fatal(err)
	}
	if err := edu.ToRAM(gpa(0x8000), n); err != nil {
		t.Fatal(err)
	}
	expectBytes(t, "shared round trip", h[0x8000:0x8000+n], p)

	// One page in the middle of the extent goes private: the extent policy
	// splits its entry, the granule policy drops one.
	s.convert(t, 0x4000, 0x1000, memattr.Private)
	s.wantEntries(t, entriesFor(policy, [2]uint64{0, 0x4000}, [2]uint64{0x5000, 0x10000}))
	if policy == dma.Extent && s.mapper.Stats().Splits != 1 {
		t.Errorf("splits = %d, want 1", s.mapper.Stats().Splits)
	}
	pattern(h[0x4000:0x5000], 0x5a)
	sentinel := slices.Clone(h[0x4000:0x5000])
	// The device buffer holds p: writing it to the private page must not
	// land.
	if err := edu.ToRAM(gpa(0x4000), n); err != nil {
		t.Fatal(err)
	}
	expectBytes(t, "private page after a device write", h[0x4000:0x5000], sentinel)
	// Reading the private page yields nothing of it.
	if err := edu.ToDevice(gpa(0x4000), n); err != nil {
		t.Fatal(err)
	}
	if err := edu.ToRAM(gpa(0x8000), n); err != nil {
		t.Fatal(err)
	}
	if !allZero(h[0x8000 : 0x8000+n]) {
		t.Errorf("device read of a private page did not yield zeros: % x", h[0x8000:0x8010])
	}
	// Both neighbours, in what was the same extent, still work.
	pattern(h[0x3000:0x3000+n], 0x17)
	q := slices.Clone(h[0x3000 : 0x3000+n])
	if err := edu.ToDevice(gpa(0x3000), n); err != nil {
		t.Fatal(err)
	}
	if err := edu.ToRAM(gpa(0x5000), n); err != nil {
		t.Fatal(err)
	}
	expectBytes(t, "left neighbour -> right neighbour of the private page", h[0x5000:0x5000+n], q)

	// Partial conversions inside a large extent: head, middle and tail.
	s.convert(t, 0x20000, 0x40000, memattr.Shared)
	s.convert(t, 0x30000, 0x2000, memattr.Private)
	s.convert(t, 0x5f000, 0x1000, memattr.Private)
	s.convert(t, 0x20000, 0x1000, memattr.Private)
	s.wantEntries(t, entriesFor(policy, [2]uint64{0, 0x4000}, [2]uint64{0x5000, 0x10000},
		[2]uint64{0x21000, 0x30000}, [2]uint64{0x32000, 0x5f000}))
	// A mixed request changes only what differs: the two private pages in
	// the middle come back as their own extent.
	s.convert(t, 0x2e000, 0x6000, memattr.Shared)
	s.wantEntries(t, entriesFor(policy, [2]uint64{0, 0x4000}, [2]uint64{0x5000, 0x10000},
		[2]uint64{0x21000, 0x30000}, [2]uint64{0x30000, 0x32000}, [2]uint64{0x32000, 0x5f000}))
	pattern(h[0x5f000:0x60000], 0x6b)
	sentinel = slices.Clone(h[0x5f000:0x60000])
	if err := edu.ToRAM(gpa(0x5f000), n); err != nil { // private tail page
		t.Fatal(err)
	}
	expectBytes(t, "private tail page of a split extent after a device write", h[0x5f000:0x60000], sentinel)
	clear(h[0x40000:0x41000])
	if err := edu.ToRAM(gpa(0x40000), n); err != nil { // inside the remainder
		t.Fatal(err)
	}
	expectBytes(t, "device write inside the remainder of a split extent", h[0x40000:0x40000+n], q)

	// The private page comes back: the device reaches it again.
	s.convert(t, 0x4000, 0x1000, memattr.Shared)
	if err := edu.ToRAM(gpa(0x4000), n); err != nil {
		t.Fatal(err)
	}
	expectBytes(t, "page converted back to shared after a device write", h[0x4000:0x4000+n], q)

	if s.limited {
		enospcChecks(t, s, edu, policy, q)
	}
	s.close(t)
	st := s.mapper.Stats()
	t.Logf("%v on %v: entries peak %d, map calls %d, unmap calls %d, splits %d",
		policy, space.Caps().Rules, st.PeakEntries, st.MapCalls, st.UnmapCalls, st.Splits)
}

// enospcChecks uses up the type1 entry budget for populates with one-page
// conversions and then checks that a conversion needing another entry fails
// with ENOSPC and changes nothing: not the page state, not the mapper's entries, not the
// kernel's mappings (the device still reaches what was shared).
func enospcChecks(t *testing.T, s *gmemStack, edu *Edu, policy dma.Policy, q []byte) {
	const n = EduMaxCount
	avail, _, err := s.space.Avail()
	if err != nil {
		t.Fatal(err)
	}
	// Every other page from 0x80000, each its own notification and entry,
	// up to where populates are refused: the extent policy keeps its split
	// reserve free (splitChecks tests what it is for).
	var reserve uint64
	if policy == dma.Extent {
		reserve = dma.DefaultSplitReserve(s.space.Caps().EntryLimit)
	}
	off := uint64(0x80000)
	for ; avail > reserve; avail-- {
		if off >= gmemRegion {
			t.Fatalf("region too small to use up %d more entries", avail)
		}
		s.convert(t, off, pageSize, memattr.Shared)
		off += 2 * pageSize
	}
	before := s.mapper.Entries()

	expectUnchanged := func(what string, err error, r span.Range, was memattr.State) {
		t.Helper()
		if !errors.Is(err, unix.ENOSPC) {
			t.Errorf("%s with no entry left = %v, want ENOSPC", what, err)
		}
		s.attrs.Runs(r, func(run span.Range, st memattr.State) {
			if st != was {
				t.Errorf("%s failed but left %v %v, want %v", what, run, st, was)
			}
		})
		if d := cmp.Diff(before, s.mapper.Entries()); d != "" {
			t.Errorf("%s failed but changed the mapper entries (-before +after):\n%s", what, d)
		}
		s.invariants(t)
	}

	// A private page (the one after the last filled) cannot become shared.
	err = s.attrs.Convert(off, pageSize, memattr.Shared)
	expectUnchanged("converting a page to shared", err, span.Range{Start: off, End: off + pageSize}, memattr.Private)
	pattern(h(s, off), 0x77)
	sentinel := slices.Clone(h(s, off))
	if err := edu.ToRAM(gmemGPA+off, n); err != nil {
		t.Fatal(err)
	}
	expectBytes(t, "page whose conversion failed, after a device write", h(s, off), sentinel)

	// Giving entries back makes the conversion possible again.
	s.convert(t, 0x80000, pageSize, memattr.Private)
	s.convert(t, off, pageSize, memattr.Shared)
}

// h returns the host page at region offset off.
func h(s *gmemStack, off uint64) []byte { return s.host[off : off+pageSize] }
