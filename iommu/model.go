package iommu

import (
	"errors"
	"fmt"
	"math"
	"sync"

	"github.com/google/btree"
	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/span"
)

// Model is an in-process IOMMU address space that answers Map and Unmap as
// the Linux kernel does under its Rules (measured in the TCG rig and read in
// the kernel source), and has a DMA engine that moves bytes only through the
// current mappings. It is the default Space for tests, benchmarks and replay.
//
// The answers it reproduces, for a request that is otherwise valid:
//
//	                                  Type1v2              IOMMUFD
//	map overlapping a mapping         EEXIST               EEXIST
//	map past the entry limit          ENOSPC               (no limit)
//	map outside the IOVA windows      EINVAL               EINVAL
//	unmap cutting a mapping           EINVAL, no change    ENOENT, whole areas
//	                                                       before the cut removed
//	unmap covering no mapping         success, 0 bytes     ENOENT
//	unmap covering whole mappings     success, their size  success, their size
//
// A Model is safe for concurrent use.
type Model struct {
	caps Caps

	mu       sync.Mutex
	maps     *btree.BTreeG[mapping]
	fault    func(Call) error
	mapCalls uint64
	unmaps   uint64
	pins     Pins
	// op measures the window of the operation between BeginOp and EndOp.
	op     Window
	inOp   bool
	window uint64 // window bytes of the operations ended so far
}

// Pins counts the IOMMU pages a Model's successful calls pinned (map) and
// unpinned (unmap), as the kernel pins and unpins the memory behind them.
type Pins struct {
	Pinned, Unpinned uint64
}

// mapping is one entry of the model: [iova, iova+size) reaching host.
type mapping struct {
	iova, size uint64
	host       []byte
}

// last is the mapping's last IOVA; unlike iova+size it does not wrap for a
// mapping that reaches the top of the IOVA space.
func (m mapping) last() uint64 { return m.iova + m.size - 1 }

// Mapping describes one entry of a Model.
type Mapping struct {
	IOVA, Size uint64
}

// Range returns the mapping's IOVA range.
func (m Mapping) Range() span.Range { return span.Range{Start: m.IOVA, End: m.IOVA + m.Size} }

// Op names a Model operation, for fault injection.
type Op int

// The operations a fault hook sees.
const (
	OpMap Op = iota + 1
	OpUnmap
)

// String returns "map" or "unmap".
func (o Op) String() string {
	if o == OpMap {
		return "map"
	}
	return "unmap"
}

// Call describes an operation about to run, for fault injection.
type Call struct {
	Op         Op
	IOVA, Size uint64
}

// ErrFault is returned (wrapped in a *DMAFault) by the DMA engine when a
// transfer touches an IOVA with no mapping.
var ErrFault = errors.New("iommu: DMA fault")

// DMAFault reports the first IOVA a device transfer could not reach.
type DMAFault struct {
	IOVA  uint64
	Write bool
}

// Error implements error.
func (f *DMAFault) Error() string {
	dir := "read"
	if f.Write {
		dir = "write"
	}
	return fmt.Sprintf("iommu: DMA %s fault at IOVA %#x: not mapped", dir, f.IOVA)
}

// Unwrap returns ErrFault.
func (f *DMAFault) Unwrap() error { return ErrFault }

// NewModel returns an empty Model. caps.Rules must be set; a zero PageSize
// means 4 KiB. A Type1v2 model with a zero EntryLimit gets the kernel's
// default of 65,535; an IOMMUFD model has no limit.
func NewModel(caps Caps) *Model {
	if caps.PageSize == 0 {
		caps.PageSize = 4096
	}
	switch caps.Rules {
	case Type1v2:
		if caps.EntryLimit == 0 {
			caps.EntryLimit = 65535
		}
	case IOMMUFD:
		caps.EntryLimit = 0
	default:
		panic("iommu: NewModel needs Rules")
	}
	caps.Ranges = append([]span.Range(nil), caps.Ranges...)
	return &Model{
		caps: caps,
		maps: btree.NewG(32, func(a, b mapping) bool { return a.iova < b.iova }),
	}
}

// Caps implements Space.
func (m *Model) Caps() Caps {
	c := m.caps
	c.Ranges = append([]span.Range(nil), c.Ranges...)
	return c
}

// Avail implements Space.
func (m *Model) Avail() (uint64, bool, error) {
	if m.caps.EntryLimit == 0 {
		return math.MaxUint64, false, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.caps.EntryLimit - uint64(m.maps.Len()), true, nil
}

// SetFault installs a hook called before every Map and Unmap; when it returns
// an error, the call fails with that error and changes nothing. nil removes
// the hook. The hook runs with the model locked and must not call the model.
func (m *Model) SetFault(f func(Call) error) {
	m.mu.Lock()
	m.fault = f
	m.mu.Unlock()
}

// Map implements Space.
func (m *Model) Map(iova, size uint64, host []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mapCalls++
	if m.fault != nil {
		if err := m.fault(Call{OpMap, iova, size}); err != nil {
			return err
		}
	}
	if host != nil && uint64(len(host)) != size {
		return fmt.Errorf("iommu: host memory of %d bytes for a mapping of %d: %w", len(host), size, unix.EINVAL)
	}
	ps := m.caps.PageSize
	if size == 0 || (iova|size)&(ps-1) != 0 {
		return unix.EINVAL
	}
	last := iova + size - 1
	if last < iova {
		return m.wrapErrno()
	}
	if m.caps.Rules == IOMMUFD && !m.inWindows(iova, last) {
		return unix.EINVAL
	}
	if _, ok := m.firstOverlap(iova, last); ok {
		return unix.EEXIST
	}
	if m.caps.EntryLimit != 0 && uint64(m.maps.Len()) >= m.caps.EntryLimit {
		return unix.ENOSPC
	}
	if m.caps.Rules == Type1v2 && !m.inWindows(iova, last) {
		return unix.EINVAL
	}
	m.maps.ReplaceOrInsert(mapping{iova: iova, size: size, host: host})
	m.pins.Pinned += size / ps
	if m.inOp && iova+size > iova {
		m.op.Mapped(span.Range{Start: iova, End: iova + size})
	}
	return nil
}

// removed accounts for mapping x leaving the table.
func (m *Model) removed(x mapping) {
	m.pins.Unpinned += x.size / m.caps.PageSize
	if m.inOp && x.iova+x.size > x.iova {
		m.op.Unmapped(span.Range{Start: x.iova, End: x.iova + x.size})
	}
}

// Unmap implements Space.
func (m *Model) Unmap(iova, size uint64) (uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.unmaps++
	if m.fault != nil {
		if err := m.fault(Call{OpUnmap, iova, size}); err != nil {
			return 0, err
		}
	}
	if m.caps.Rules == IOMMUFD && iova == 0 && size == math.MaxUint64 {
		var n uint64
		m.maps.Ascend(func(x mapping) bool { n += x.size; m.removed(x); return true })
		m.maps.Clear(false)
		return n, nil
	}
	if size == 0 {
		return 0, unix.EINVAL
	}
	last := iova + size - 1
	if last < iova {
		return 0, m.wrapErrno()
	}
	switch m.caps.Rules {
	case Type1v2:
		if (iova|size)&(m.caps.PageSize-1) != 0 {
			return 0, unix.EINVAL
		}
		// Neither end may bisect a mapping; then every mapping inside goes.
		if x, ok := m.containing(iova); ok && x.iova != iova {
			return 0, unix.EINVAL
		}
		if x, ok := m.containing(last); ok && x.last() != last {
			return 0, unix.EINVAL
		}
		var n uint64
		for _, x := range m.inside(iova, last) {
			m.maps.Delete(x)
			m.removed(x)
			n += x.size
		}
		return n, nil
	default:
		// Areas are removed in ascending order until one sticks out of the
		// request; that one, or finding none, is ENOENT.
		var n uint64
		for {
			x, ok := m.firstOverlap(iova, last)
			if !ok {
				break
			}
			if x.iova < iova || x.last() > last {
				return n, unix.ENOENT
			}
			m.maps.Delete(x)
			m.removed(x)
			n += x.size
		}
		if n == 0 {
			return 0, unix.ENOENT
		}
		return n, nil
	}
}

// wrapErrno is the answer to a request whose range wraps past 2^64: type1
// refuses it as invalid (measured on 6.12 in the rig; the 7.3 source answers
// EOVERFLOW instead), iommufd as an overflow.
func (m *Model) wrapErrno() unix.Errno {
	if m.caps.Rules == Type1v2 {
		return unix.EINVAL
	}
	return unix.EOVERFLOW
}

// inWindows reports whether [iova, last] lies inside one IOVA window.
func (m *Model) inWindows(iova, last uint64) bool {
	if m.caps.Ranges == nil {
		return true
	}
	for _, w := range m.caps.Ranges {
		if iova >= w.Start && last < w.End {
			return true
		}
	}
	return false
}

// containing returns the mapping that holds IOVA a.
func (m *Model) containing(a uint64) (mapping, bool) {
	var hit mapping
	found := false
	m.maps.DescendLessOrEqual(mapping{iova: a}, func(x mapping) bool {
		if a <= x.last() {
			hit, found = x, true
		}
		return false
	})
	return hit, found
}

// firstOverlap returns the lowest mapping that meets [iova, last].
func (m *Model) firstOverlap(iova, last uint64) (mapping, bool) {
	if x, ok := m.containing(iova); ok {
		return x, true
	}
	var hit mapping
	found := false
	m.maps.AscendGreaterOrEqual(mapping{iova: iova}, func(x mapping) bool {
		if x.iova <= last {
			hit, found = x, true
		}
		return false
	})
	return hit, found
}

// inside returns the mappings whose first IOVA lies in [iova, last].
func (m *Model) inside(iova, last uint64) []mapping {
	var xs []mapping
	m.maps.AscendGreaterOrEqual(mapping{iova: iova}, func(x mapping) bool {
		if x.iova > last {
			return false
		}
		xs = append(xs, x)
		return true
	})
	return xs
}

// MappingsIn returns the entries that meet r, ascending.
func (m *Model) MappingsIn(r span.Range) []Mapping {
	if r.Empty() {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Mapping
	if x, ok := m.containing(r.Start); ok {
		out = append(out, Mapping{x.iova, x.size})
	}
	m.maps.AscendGreaterOrEqual(mapping{iova: r.Start}, func(x mapping) bool {
		if x.iova >= r.End {
			return false
		}
		if len(out) == 0 || out[0].IOVA != x.iova {
			out = append(out, Mapping{x.iova, x.size})
		}
		return true
	})
	return out
}

// Mappings returns the current entries in ascending IOVA order.
func (m *Model) Mappings() []Mapping {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Mapping, 0, m.maps.Len())
	m.maps.Ascend(func(x mapping) bool {
		out = append(out, Mapping{x.iova, x.size})
		return true
	})
	return out
}

// Len returns the number of entries.
func (m *Model) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.maps.Len()
}

// Calls returns how many Map and Unmap calls the model has answered,
// failed ones included.
func (m *Model) Calls() (maps, unmaps uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mapCalls, m.unmaps
}

// Pins returns the pages pinned and unpinned so far.
func (m *Model) Pins() Pins {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.pins
}

// BeginOp starts measuring one operation (see Window): from now until EndOp,
// the model records what its calls unmap and map.
func (m *Model) BeginOp() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.op.Reset()
	m.inOp = true
}

// EndOp ends the operation BeginOp started and returns its window, as the
// IOVA ranges that were hidden from the device for a moment and are mapped
// again, and the bytes it re-pinned. The window's bytes are added to
// WindowBytes.
func (m *Model) EndOp() (window []span.Range, repinned uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.op.Bytes(func(r span.Range) uint64 {
		var n uint64
		m.visitIn(r, func(x mapping) {
			lo, hi := max(x.iova, r.Start), min(x.last(), r.End-1)
			window = append(window, span.Range{Start: lo, End: hi + 1})
			n += hi - lo + 1
		})
		m.window += n
		return n
	})
	repinned = m.op.Repinned()
	m.op.Reset()
	m.inOp = false
	return window, repinned
}

// WindowBytes returns the sum of the windows of the operations measured.
func (m *Model) WindowBytes() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.window
}

// visitIn calls fn for each mapping that meets r, ascending.
func (m *Model) visitIn(r span.Range, fn func(mapping)) {
	if r.Empty() {
		return
	}
	first, ok := m.containing(r.Start)
	if ok {
		fn(first)
	}
	m.maps.AscendGreaterOrEqual(mapping{iova: r.Start}, func(x mapping) bool {
		if x.iova >= r.End {
			return false
		}
		if !ok || x.iova != first.iova {
			fn(x)
		}
		return true
	})
}

// Reaches reports whether a device could touch IOVA a now.
func (m *Model) Reaches(a uint64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.containing(a)
	return ok
}

// DMAWrite is a device writing data at iova. Every byte must be mapped with
// host memory behind it; otherwise nothing is written and a *DMAFault names
// the first unreachable IOVA, as a real IOMMU blocks the transaction.
func (m *Model) DMAWrite(iova uint64, data []byte) error {
	return m.dma(iova, data, true)
}

// DMARead is a device reading len(buf) bytes at iova into buf. On a fault buf
// is zeroed (a blocked read returns nothing of memory) and a *DMAFault is
// returned.
func (m *Model) DMARead(iova uint64, buf []byte) error {
	return m.dma(iova, buf, false)
}

func (m *Model) dma(iova uint64, buf []byte, write bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	type piece struct {
		dst []byte
		src []byte
	}
	var pieces []piece
	for done := uint64(0); done < uint64(len(buf)); {
		a := iova + done
		x, ok := m.containing(a)
		if !ok || x.host == nil || a < iova {
			if !write {
				clear(buf)
			}
			return &DMAFault{IOVA: a, Write: write}
		}
		off := a - x.iova
		n := min(x.size-off, uint64(len(buf))-done)
		pieces = append(pieces, piece{x.host[off : off+n], buf[done : done+n]})
		done += n
	}
	for _, p := range pieces {
		if write {
			copy(p.dst, p.src)
		} else {
			copy(p.src, p.dst)
		}
	}
	return nil
}
