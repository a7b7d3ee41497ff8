package iommu_test

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

const pg = 4096

// mk is a mapping literal in pages: mk(1, 2) is [0x1000, 0x3000).
func mk(page, pages uint64) iommu.Mapping { return iommu.Mapping{IOVA: page * pg, Size: pages * pg} }

// newModel returns a model of rules holding setup, failing the test if a setup
// map is refused.
func newModel(t *testing.T, caps iommu.Caps, setup []iommu.Mapping) *iommu.Model {
	t.Helper()
	m := iommu.NewModel(caps)
	for _, x := range setup {
		if err := m.Map(x.IOVA, x.Size, nil); err != nil {
			t.Fatalf("setup map %#x+%#x: %v", x.IOVA, x.Size, err)
		}
	}
	return m
}

// errString names an errno (or nil) so table failures read well.
func errString(err error) string {
	if err == nil {
		return "nil"
	}
	var e unix.Errno
	if errors.As(err, &e) {
		return unix.ErrnoName(e)
	}
	return err.Error()
}

// TestMapRules checks every Map answer of the rules table, for both rule sets.
// A refused map must leave the mappings as they were.
func TestMapRules(t *testing.T) {
	window := []span.Range{{Start: 0x10 * pg, End: 0x20 * pg}}
	type tc struct {
		name       string
		windows    []span.Range
		setup      []iommu.Mapping
		iova, size uint64
		host       []byte
		want       map[iommu.Rules]error
	}
	both := func(err error) map[iommu.Rules]error {
		return map[iommu.Rules]error{iommu.Type1v2: err, iommu.IOMMUFD: err}
	}
	cases := []tc{
		{name: "fresh", iova: 1 * pg, size: 2 * pg, want: both(nil)},
		{name: "adjacent below and above", setup: []iommu.Mapping{mk(1, 1), mk(4, 1)}, iova: 2 * pg, size: 2 * pg, want: both(nil)},
		{name: "overlap inside", setup: []iommu.Mapping{mk(1, 4)}, iova: 2 * pg, size: pg, want: both(unix.EEXIST)},
		{name: "overlap head", setup: []iommu.Mapping{mk(2, 2)}, iova: 1 * pg, size: 2 * pg, want: both(unix.EEXIST)},
		{name: "overlap tail", setup: []iommu.Mapping{mk(2, 2)}, iova: 3 * pg, size: 2 * pg, want: both(unix.EEXIST)},
		{name: "superset of a mapping", setup: []iommu.Mapping{mk(2, 1)}, iova: 1 * pg, size: 3 * pg, want: both(unix.EEXIST)},
		{name: "size 0", iova: pg, size: 0, want: both(unix.EINVAL)},
		{name: "unaligned iova", iova: pg + 512, size: pg, want: both(unix.EINVAL)},
		{name: "unaligned size", iova: pg, size: pg + 1, want: both(unix.EINVAL)},
		// A wrapping range: type1 answers EINVAL (measured on 6.12; the 7.3
		// source says EOVERFLOW), iommufd EOVERFLOW.
		{name: "overflow", iova: math.MaxUint64 - pg + 1, size: 2 * pg, want: map[iommu.Rules]error{iommu.Type1v2: unix.EINVAL, iommu.IOMMUFD: unix.EOVERFLOW}},
		{name: "host shorter than size", iova: pg, size: 2 * pg, host: make([]byte, pg), want: both(unix.EINVAL)},
		{name: "inside window", windows: window, iova: 0x10 * pg, size: 0x10 * pg, want: both(nil)},
		{name: "below window", windows: window, iova: 0xf * pg, size: pg, want: both(unix.EINVAL)},
		{name: "straddling window end", windows: window, iova: 0x1f * pg, size: 2 * pg, want: both(unix.EINVAL)},
		{name: "above window", windows: window, iova: 0x20 * pg, size: pg, want: both(unix.EINVAL)},
	}
	for _, rules := range []iommu.Rules{iommu.Type1v2, iommu.IOMMUFD} {
		for _, c := range cases {
			t.Run(fmt.Sprintf("%v/%s", rules, c.name), func(t *testing.T) {
				m := newModel(t, iommu.Caps{Rules: rules, Ranges: c.windows}, c.setup)
				err := m.Map(c.iova, c.size, c.host)
				if want := c.want[rules]; !errors.Is(err, want) || (want == nil) != (err == nil) {
					t.Fatalf("Map(%#x, %#x) = %s, want %s", c.iova, c.size, errString(err), errString(want))
				}
				want := append([]iommu.Mapping{}, c.setup...)
				if err == nil {
					want = append(want, iommu.Mapping{IOVA: c.iova, Size: c.size})
					sortMappings(want)
				}
				if diff := cmp.Diff(want, m.Mappings()); diff != "" {
					t.Fatalf("mappings (-want +got):\n%s", diff)
				}
			})
		}
	}
}

func sortMappings(ms []iommu.Mapping) {
	for i := 1; i < len(ms); i++ {
		for j := i; j > 0 && ms[j].IOVA < ms[j-1].IOVA; j-- {
			ms[j], ms[j-1] = ms[j-1], ms[j]
		}
	}
}

// TestEntryLimit checks type1's dma_entry_limit (ENOSPC at the limit, Avail
// counting down and back up) and that iommufd has no limit even when one is
// asked for.
func TestEntryLimit(t *testing.T) {
	t.Run("type1", func(t *testing.T) {
		m := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 3})
		for i := range uint64(3) {
			if avail, limited, err := m.Avail(); err != nil || !limited || avail != 3-i {
				t.Fatalf("Avail before map %d = %d, %v, %v; want %d, true, nil", i, avail, limited, err, 3-i)
			}
			if err := m.Map((2*i+1)*pg, pg, nil); err != nil {
				t.Fatalf("map %d: %v", i, err)
			}
		}
		if err := m.Map(0x100*pg, pg, nil); !errors.Is(err, unix.ENOSPC) {
			t.Fatalf("fourth map = %s, want ENOSPC", errString(err))
		}
		if avail, _, _ := m.Avail(); avail != 0 {
			t.Fatalf("Avail at the limit = %d, want 0", avail)
		}
		if n, err := m.Unmap(pg, pg); err != nil || n != pg {
			t.Fatalf("unmap = %d, %v", n, err)
		}
		if avail, _, _ := m.Avail(); avail != 1 {
			t.Fatalf("Avail after one unmap = %d, want 1", avail)
		}
		if err := m.Map(0x100*pg, pg, nil); err != nil {
			t.Fatalf("map after an unmap: %v", err)
		}
	})
	t.Run("type1 default", func(t *testing.T) {
		m := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
		if got := m.Caps().EntryLimit; got != 65535 {
			t.Fatalf("default EntryLimit = %d, want 65535", got)
		}
		if got := m.Caps().PageSize; got != pg {
			t.Fatalf("default PageSize = %d, want 4096", got)
		}
	})
	t.Run("iommufd", func(t *testing.T) {
		m := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD, EntryLimit: 2})
		for i := range uint64(5) {
			if err := m.Map((2*i+1)*pg, pg, nil); err != nil {
				t.Fatalf("map %d: %v", i, err)
			}
		}
		avail, limited, err := m.Avail()
		if err != nil || limited || avail != math.MaxUint64 {
			t.Fatalf("Avail = %d, %v, %v; want MaxUint64, false, nil", avail, limited, err)
		}
		if m.Caps().EntryLimit != 0 {
			t.Fatalf("iommufd EntryLimit = %d, want 0", m.Caps().EntryLimit)
		}
	})
}

// TestUnmapRules checks every Unmap answer of the rules table: returned size,
// error, and the mappings left.
func TestUnmapRules(t *testing.T) {
	type result struct {
		n    uint64
		err  error
		left []iommu.Mapping
	}
	type tc struct {
		name       string
		setup      []iommu.Mapping
		iova, size uint64
		want       map[iommu.Rules]result
	}
	A, B := mk(1, 1), mk(3, 2) // [0x1000,0x2000) and [0x3000,0x5000)
	big := mk(1, 4)            // [0x1000,0x5000)
	same := func(r result) map[iommu.Rules]result {
		return map[iommu.Rules]result{iommu.Type1v2: r, iommu.IOMMUFD: r}
	}
	split := func(setup ...iommu.Mapping) map[iommu.Rules]result {
		return map[iommu.Rules]result{
			iommu.Type1v2: {0, unix.EINVAL, setup},
			iommu.IOMMUFD: {0, unix.ENOENT, setup},
		}
	}
	cases := []tc{
		{name: "exact", setup: []iommu.Mapping{A, B}, iova: B.IOVA, size: B.Size, want: same(result{B.Size, nil, []iommu.Mapping{A}})},
		{name: "interior page", setup: []iommu.Mapping{big}, iova: 2 * pg, size: pg, want: split(big)},
		{name: "head page", setup: []iommu.Mapping{big}, iova: 1 * pg, size: pg, want: split(big)},
		{name: "tail page", setup: []iommu.Mapping{big}, iova: 4 * pg, size: pg, want: split(big)},
		{name: "tail straddling", setup: []iommu.Mapping{big}, iova: 4 * pg, size: 2 * pg, want: split(big)},
		{name: "head straddling", setup: []iommu.Mapping{big}, iova: 0, size: 2 * pg, want: split(big)},
		{
			name: "empty range", setup: []iommu.Mapping{A, B}, iova: 0x10 * pg, size: 4 * pg,
			want: map[iommu.Rules]result{
				iommu.Type1v2: {0, nil, []iommu.Mapping{A, B}},
				iommu.IOMMUFD: {0, unix.ENOENT, []iommu.Mapping{A, B}},
			},
		},
		{
			name: "gap between mappings", setup: []iommu.Mapping{A, B}, iova: 2 * pg, size: pg,
			want: map[iommu.Rules]result{
				iommu.Type1v2: {0, nil, []iommu.Mapping{A, B}},
				iommu.IOMMUFD: {0, unix.ENOENT, []iommu.Mapping{A, B}},
			},
		},
		{name: "superset sums sizes", setup: []iommu.Mapping{A, B, mk(0x10, 1)}, iova: 0, size: 8 * pg, want: same(result{A.Size + B.Size, nil, []iommu.Mapping{mk(0x10, 1)}})},
		{name: "two adjacent whole", setup: []iommu.Mapping{mk(1, 1), mk(2, 1)}, iova: pg, size: 2 * pg, want: same(result{2 * pg, nil, nil})},
		{
			// iommufd removes whole areas in order and stops at the first one
			// sticking out: A goes, B (cut at 0x4000) stays, and the answer is
			// ENOENT. type1 checks both ends first and changes nothing.
			name: "straddler after a whole mapping", setup: []iommu.Mapping{A, B}, iova: A.IOVA, size: 3 * pg,
			want: map[iommu.Rules]result{
				iommu.Type1v2: {0, unix.EINVAL, []iommu.Mapping{A, B}},
				iommu.IOMMUFD: {A.Size, unix.ENOENT, []iommu.Mapping{B}},
			},
		},
		{name: "size 0", setup: []iommu.Mapping{A}, iova: A.IOVA, size: 0, want: same(result{0, unix.EINVAL, []iommu.Mapping{A}})},
		{
			name: "overflow", setup: []iommu.Mapping{A}, iova: math.MaxUint64 - pg + 1, size: 2 * pg,
			want: map[iommu.Rules]result{
				iommu.Type1v2: {0, unix.EINVAL, []iommu.Mapping{A}},
				iommu.IOMMUFD: {0, unix.EOVERFLOW, []iommu.Mapping{A}},
			},
		},
		{
			name: "unmap all", setup: []iommu.Mapping{A, B}, iova: 0, size: math.MaxUint64,
			want: map[iommu.Rules]result{
				// type1 has no such request without VFIO_DMA_UNMAP_FLAG_ALL:
				// the size is not page aligned.
				iommu.Type1v2: {0, unix.EINVAL, []iommu.Mapping{A, B}},
				iommu.IOMMUFD: {A.Size + B.Size, nil, nil},
			},
		},
		{
			name: "unmap all on empty", iova: 0, size: math.MaxUint64,
			want: map[iommu.Rules]result{
				iommu.Type1v2: {0, unix.EINVAL, nil},
				iommu.IOMMUFD: {0, nil, nil},
			},
		},
	}
	// type1 only: an unaligned request is refused outright.
	t1 := []tc{
		{name: "unaligned iova", setup: []iommu.Mapping{A}, iova: A.IOVA + 1, size: pg, want: map[iommu.Rules]result{iommu.Type1v2: {0, unix.EINVAL, []iommu.Mapping{A}}}},
		{name: "unaligned size", setup: []iommu.Mapping{A}, iova: A.IOVA, size: pg + 1, want: map[iommu.Rules]result{iommu.Type1v2: {0, unix.EINVAL, []iommu.Mapping{A}}}},
	}
	cases = append(cases, t1...)
	for _, rules := range []iommu.Rules{iommu.Type1v2, iommu.IOMMUFD} {
		for _, c := range cases {
			want, ok := c.want[rules]
			if !ok {
				continue
			}
			t.Run(fmt.Sprintf("%v/%s", rules, c.name), func(t *testing.T) {
				m := newModel(t, iommu.Caps{Rules: rules}, c.setup)
				n, err := m.Unmap(c.iova, c.size)
				if !errors.Is(err, want.err) || (want.err == nil) != (err == nil) || n != want.n {
					t.Fatalf("Unmap(%#x, %#x) = %#x, %s; want %#x, %s", c.iova, c.size, n, errString(err), want.n, errString(want.err))
				}
				if diff := cmp.Diff(want.left, m.Mappings(), cmpEmpty); diff != "" {
					t.Fatalf("mappings left (-want +got):\n%s", diff)
				}
				if got := m.Len(); got != len(want.left) {
					t.Fatalf("Len = %d, want %d", got, len(want.left))
				}
			})
		}
	}
}

// cmpEmpty treats nil and empty slices alike.
var cmpEmpty = cmp.Comparer(func(a, b []iommu.Mapping) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
})

// TestRulesString checks the names used in logs and reports.
func TestRulesString(t *testing.T) {
	for r, want := range map[iommu.Rules]string{iommu.Type1v2: "type1", iommu.IOMMUFD: "iommufd", 0: "unknown"} {
		if got := r.String(); got != want {
			t.Errorf("%d.String() = %q, want %q", int(r), got, want)
		}
	}
	if iommu.OpMap.String() != "map" || iommu.OpUnmap.String() != "unmap" || iommu.OpCut.String() != "cut" {
		t.Errorf("Op names: %q %q %q", iommu.OpMap, iommu.OpUnmap, iommu.OpCut)
	}
}

// TestNewModelNeedsRules checks that a model without rules is refused.
func TestNewModelNeedsRules(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("NewModel without Rules did not panic")
		}
	}()
	iommu.NewModel(iommu.Caps{})
}

// TestCapsCopy checks that Caps hands out a copy of the windows.
func TestCapsCopy(t *testing.T) {
	w := []span.Range{{Start: 0, End: 0x10000}}
	m := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD, Ranges: w})
	w[0].End = 0x1000 // the caller's slice must not reach the model
	c := m.Caps()
	c.Ranges[0].End = 0x2000
	if got := m.Caps().Ranges[0]; got != (span.Range{Start: 0, End: 0x10000}) {
		t.Fatalf("window changed to %v through a caller's slice", got)
	}
}

// TestDMA checks the DMA engine: transfers go through mappings only, a
// transfer may span adjacent mappings, and a blocked transfer moves nothing.
func TestDMA(t *testing.T) {
	mem := make([]byte, 8*pg)
	for i := range mem {
		mem[i] = byte(i * 7)
	}
	orig := bytes.Clone(mem)
	for _, rules := range []iommu.Rules{iommu.Type1v2, iommu.IOMMUFD} {
		t.Run(rules.String(), func(t *testing.T) {
			copy(mem, orig)
			m := iommu.NewModel(iommu.Caps{Rules: rules})
			// IOVA 0x100000.. maps host pages 2..3 and 4..5 as two adjacent
			// entries; IOVA 0x200000 maps page 7; page 6 is not mapped.
			const base = 0x100000
			if err := m.Map(base, 2*pg, mem[2*pg:4*pg]); err != nil {
				t.Fatal(err)
			}
			if err := m.Map(base+2*pg, 2*pg, mem[4*pg:6*pg]); err != nil {
				t.Fatal(err)
			}
			if err := m.Map(0x200000, pg, mem[7*pg:8*pg]); err != nil {
				t.Fatal(err)
			}
			// A model entry without host memory is not reachable either.
			if err := m.Map(0x300000, pg, nil); err != nil {
				t.Fatal(err)
			}

			// Write spanning the two adjacent mappings.
			msg := bytes.Repeat([]byte("gmem"), 64)
			at := uint64(base + 2*pg - 100)
			if err := m.DMAWrite(at, msg); err != nil {
				t.Fatalf("write across adjacent mappings: %v", err)
			}
			hostAt := 4*pg - 100
			if !bytes.Equal(mem[hostAt:hostAt+len(msg)], msg) {
				t.Fatal("write did not land in host memory behind the mappings")
			}
			buf := make([]byte, len(msg))
			if err := m.DMARead(at, buf); err != nil || !bytes.Equal(buf, msg) {
				t.Fatalf("read back = %q, %v", buf[:8], err)
			}
			if !m.Reaches(base) || !m.Reaches(base+4*pg-1) || m.Reaches(base+4*pg) || m.Reaches(0x300000-1) {
				t.Fatal("Reaches disagrees with the mappings")
			}

			// A write that runs off the end of the mapped range faults at the
			// first unmapped IOVA and writes nothing, not even the mapped part.
			before := bytes.Clone(mem)
			err := m.DMAWrite(base+4*pg-8, msg)
			var f *iommu.DMAFault
			if !errors.As(err, &f) || !errors.Is(err, iommu.ErrFault) {
				t.Fatalf("write past the end = %v, want a *DMAFault", err)
			}
			if f.IOVA != base+4*pg || !f.Write {
				t.Fatalf("fault = %+v, want IOVA %#x write", f, base+4*pg)
			}
			if !bytes.Equal(mem, before) {
				t.Fatal("a blocked write changed memory")
			}

			// A blocked read zeroes the caller's buffer.
			for i := range buf {
				buf[i] = 0xff
			}
			err = m.DMARead(base+4*pg-8, buf)
			if !errors.As(err, &f) || f.Write || f.IOVA != base+4*pg {
				t.Fatalf("read past the end = %v", err)
			}
			if !bytes.Equal(buf, make([]byte, len(buf))) {
				t.Fatal("a blocked read left data in the buffer")
			}

			// Unmapped IOVA and an entry without host memory both fault.
			for _, iova := range []uint64{0, base - 1, 0x200000 + pg, 0x300000} {
				if err := m.DMAWrite(iova, []byte{1}); !errors.Is(err, iommu.ErrFault) {
					t.Fatalf("write at %#x = %v, want a fault", iova, err)
				}
			}
			// After an unmap the device no longer reaches the page.
			if _, err := m.Unmap(0x200000, pg); err != nil {
				t.Fatal(err)
			}
			if err := m.DMAWrite(0x200000, []byte{1}); !errors.Is(err, iommu.ErrFault) {
				t.Fatalf("write after unmap = %v, want a fault", err)
			}
			if mem[7*pg] != orig[7*pg] {
				t.Fatal("write after unmap reached memory")
			}
			// A transfer wrapping past the top of the IOVA space faults.
			if err := m.DMARead(math.MaxUint64-1, make([]byte, 4)); !errors.Is(err, iommu.ErrFault) {
				t.Fatalf("wrapping read = %v, want a fault", err)
			}
		})
	}
}

// TestFaultHook checks that the hook sees every call, that its error fails
// the call with no change, and that removing it restores normal service.
func TestFaultHook(t *testing.T) {
	m := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 10})
	var seen []iommu.Call
	boom := errors.New("boom")
	m.SetFault(func(c iommu.Call) error {
		seen = append(seen, c)
		if c.IOVA == 0x5000 {
			return boom
		}
		return nil
	})
	if err := m.Map(0x1000, pg, nil); err != nil {
		t.Fatal(err)
	}
	if err := m.Map(0x5000, pg, nil); !errors.Is(err, boom) {
		t.Fatalf("hooked map = %v, want boom", err)
	}
	if err := m.Map(0x5000, 0, nil); !errors.Is(err, boom) {
		t.Fatalf("the hook must run before validation; got %v", err)
	}
	if n, err := m.Unmap(0x5000, pg); !errors.Is(err, boom) || n != 0 {
		t.Fatalf("hooked unmap = %d, %v", n, err)
	}
	if n, err := m.Unmap(0x1000, pg); err != nil || n != pg {
		t.Fatalf("unmap = %d, %v", n, err)
	}
	want := []iommu.Call{
		{Op: iommu.OpMap, IOVA: 0x1000, Size: pg},
		{Op: iommu.OpMap, IOVA: 0x5000, Size: pg},
		{Op: iommu.OpMap, IOVA: 0x5000, Size: 0},
		{Op: iommu.OpUnmap, IOVA: 0x5000, Size: pg},
		{Op: iommu.OpUnmap, IOVA: 0x1000, Size: pg},
	}
	if diff := cmp.Diff(want, seen); diff != "" {
		t.Fatalf("calls seen (-want +got):\n%s", diff)
	}
	if m.Len() != 0 {
		t.Fatalf("failed calls left %d entries", m.Len())
	}
	maps, unmaps := m.Calls()
	if maps != 3 || unmaps != 2 {
		t.Fatalf("Calls = %d, %d; want 3, 2 (failed ones included)", maps, unmaps)
	}
	m.SetFault(nil)
	if err := m.Map(0x5000, pg, nil); err != nil {
		t.Fatalf("map after removing the hook: %v", err)
	}
}

// TestTopOfIOVASpace checks a mapping that reaches the very last IOVA, whose
// end does not fit in a uint64: it is found, cannot be cut, and is reachable.
func TestTopOfIOVASpace(t *testing.T) {
	const size = 0x30000
	top := uint64(math.MaxUint64 - size + 1)
	for _, rules := range []iommu.Rules{iommu.Type1v2, iommu.IOMMUFD} {
		t.Run(rules.String(), func(t *testing.T) {
			m := iommu.NewModel(iommu.Caps{Rules: rules})
			if err := m.Map(top, size, make([]byte, size)); err != nil {
				t.Fatal(err)
			}
			if err := m.Map(math.MaxUint64-pg+1, pg, nil); !errors.Is(err, unix.EEXIST) {
				t.Fatalf("map of the last page = %v, want EEXIST", err)
			}
			want := unix.EINVAL
			if rules == iommu.IOMMUFD {
				want = unix.ENOENT
			}
			if n, err := m.Unmap(top-pg, size); !errors.Is(err, want) || n != 0 {
				t.Fatalf("unmap straddling its start = %#x, %v; want %v", n, err, want)
			}
			if n, err := m.Unmap(top+pg, size-2*pg); !errors.Is(err, want) || n != 0 {
				t.Fatalf("unmap of its middle = %#x, %v; want %v", n, err, want)
			}
			if m.Len() != 1 || !m.Reaches(math.MaxUint64) {
				t.Fatal("the mapping was lost")
			}
			if err := m.DMAWrite(math.MaxUint64-3, []byte{1, 2, 3, 4}); err != nil {
				t.Fatalf("DMA to the last bytes: %v", err)
			}
			if n, err := m.Unmap(top, size); err != nil || n != size {
				t.Fatalf("exact unmap = %#x, %v", n, err)
			}
		})
	}
}
