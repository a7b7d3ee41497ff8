package iommu

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"sync"
	"sync/atomic"

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
// An IOMMUFD model made with Caps.Cut is also a Cutter: Cut answers as
// iommufd's VFIO-compatible unmap on a compat IOAS with huge pages disabled
// (iommufd_vfio_unmap_dma, measured in the rig on 6.12 and 7.3). It splits
// the area holding the range's last byte after that byte, then the one
// holding the byte before the range (not for IOVA 0), as iopt_area_split
// does, and then removes every area inside the range:
//
//	cut inside one area                 split at both ends; the range's pages
//	                                    unmapped and unpinned, its size returned
//	cut at an area's first or last IOVA no split at that end
//	cut over several areas, or partly   every page inside unmapped, nothing
//	  mapped                            outside; the bytes unmapped returned
//	cut of nothing mapped               success, 0 bytes
//	end not page aligned inside an area EINVAL; a split already made at the
//	                                    other end stays, nothing is unmapped
//	size 0                              EINVAL, after splitting at iova
//	range wrapping past 2^64            EOVERFLOW, after the splits
//	unaligned ends in no area           areas wholly inside go, as for an
//	                                    aligned range (the kernel checks
//	                                    alignment only where it splits)
//
// The kernel's other refusals need state the model does not have: EINVAL
// for an area with in-kernel accesses, EBUSY for one being mapped or
// unmapped. A model without Caps.Cut answers Cut with EOPNOTSUPP and
// changes nothing.
//
// What an area costs: each is a struct iopt_area (136 bytes on x86-64, from
// the kmalloc-192 cache: two interval-tree nodes of 48 bytes, one in the
// IOAS's area tree and one in its pages' domain tree, three pointers, the
// page offset, protection and access count); the halves of a split area
// share one iopt_pages, so the pinned pages, and their accounting, are not
// duplicated. With huge pages disabled the domain maps with 4 KiB IOPTEs
// only, the same IOTLB reach as QEMU's 4 KiB mappings (QEMU pays one area
// and one map call per 4 KiB page; a cut pays one area per cut end).
//
// It also counts what the kernel would pin and unpin (Pins: every page of a
// successful map is pinned, of a successful unmap or cut unpinned; a split
// pins nothing) and measures the window of an operation between BeginOp and
// EndOp (see Window): a cut only unmaps, so it adds no window.
//
// A Model is safe for concurrent use, and calls on IOVA ranges far enough
// apart run in parallel: the table is kept in windows of 64 MiB of IOVA,
// spread over a fixed set of shards, each with its own lock. A mapping that
// spans windows is stored as one piece in each, and a call locks the shards
// of the windows its range meets, in ascending order, so it sees and changes
// those windows as one. The entry limit is checked and taken with one atomic
// step, so concurrent maps never exceed it.
type Model struct {
	caps Caps
	// shift gives the bytes of a window: 1<<shift.
	shift uint

	// The padding keeps the first shard's lock off the line of the fields
	// above, which every call reads.
	_      [64]byte
	shards [modelShards]modelShard
	// total counts the mappings of a limited model (the entry limit is
	// checked against it); an unlimited one counts per shard only.
	total atomic.Uint64
	// large holds, ascending, the mappings that meet every shard (at least
	// modelShards windows), whole rather than as pieces: a call that
	// changes them holds every shard lock, so holding any one is enough to
	// read them.
	large []mapping

	// fault is the hook; faultMu serialises its calls, so a hook needs no
	// locking of its own.
	fault   atomic.Pointer[func(Call) error]
	faultMu sync.Mutex

	// inOp says an operation is being measured; opMu guards op and window
	// and is taken after shard locks.
	inOp   atomic.Bool
	opMu   sync.Mutex
	op     Window
	window uint64 // window bytes of the operations ended so far
}

const (
	// modelShards is the number of lock shards; a multiple of 64 so a
	// shard set is a bit mask.
	modelShards = 64
	// modelWindowShift gives the IOVA window of a shard: 64 MiB, so a
	// mapping of a bounded extent (2 MiB by default) is mostly one piece
	// and a 1 GiB mapping 16.
	modelWindowShift = 26
)

// modelShard is one lock shard: the pieces of the windows it holds and the
// counters of the calls that started in them.
type modelShard struct {
	mu       sync.Mutex
	pieces   *btree.BTreeG[piece]
	n        uint64 // mappings whose first piece is here
	mapCalls uint64
	unmaps   uint64
	cuts     uint64
	pins     Pins
	_        [64]byte // keeps neighbouring shards' locks off one cache line
}

// piece is the part of mapping x inside one window.
type piece struct {
	iova, last uint64
	x          mapping
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
	// OpCut is a Cut (Cutter).
	OpCut
)

// String returns "map", "unmap" or "cut".
func (o Op) String() string {
	switch o {
	case OpMap:
		return "map"
	case OpCut:
		return "cut"
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
// default of 65,535; an IOMMUFD model has no limit. caps.Cut makes the
// model a working Cutter and needs IOMMUFD rules: a Type1v2 model that cuts
// would answer as no kernel does, so NewModel panics on it, as it does
// without Rules.
func NewModel(caps Caps) *Model { return NewModelSpan(caps, 0) }

// NewModelSpan is NewModel for a space whose mappings lie mostly in [0,
// size), a region mapped at IOVA 0 on: its windows are then at least a 64th
// of size, so each lock shard holds one contiguous part of the region and
// calls on distant parts of it touch no common lock or table. (With 64 MiB
// windows, a region of more than 64 of them meets every shard from each of
// its parts.) A size of 0 is NewModel. The size spreads the locks only:
// mappings anywhere else work as before.
func NewModelSpan(caps Caps, size uint64) *Model {
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
	if caps.Cut && caps.Rules != IOMMUFD {
		panic("iommu: NewModel: only an iommufd IOAS can cut a mapping (VFIO type1 cannot)")
	}
	caps.Ranges = append([]span.Range(nil), caps.Ranges...)
	m := &Model{caps: caps, shift: span.PieceShift(size, modelShards, modelWindowShift)}
	for i := range m.shards {
		m.shards[i].pieces = btree.NewG(16, func(a, b piece) bool { return a.iova < b.iova })
	}
	return m
}

// win returns the window of IOVA a.
func (m *Model) win(a uint64) uint64 { return a >> m.shift }

// winFirst and winLast return the bounds of window w.
func (m *Model) winFirst(w uint64) uint64 { return w << m.shift }
func (m *Model) winLast(w uint64) uint64  { return m.winFirst(w) + (uint64(1)<<m.shift - 1) }

func (m *Model) shardOf(w uint64) *modelShard { return &m.shards[w%modelShards] }

// shardMask returns the shards of the windows that [iova, last] meets.
func (m *Model) shardMask(iova, last uint64) uint64 {
	if last < iova {
		return ^uint64(0)
	}
	w0, w1 := m.win(iova), m.win(last)
	if w1-w0 >= modelShards-1 {
		return ^uint64(0)
	}
	var mask uint64
	for w := w0; ; w++ {
		mask |= 1 << (w % modelShards)
		if w == w1 {
			return mask
		}
	}
}

// callMask returns the shards a map or unmap call of [iova, iova+size)
// locks: those of the windows it covers, and for size 0 (refused, but
// counted) the window of iova.
func (m *Model) callMask(iova, size uint64) uint64 {
	mask := uint64(1) << (m.win(iova) % modelShards)
	if size != 0 {
		mask |= m.shardMask(iova, iova+size-1)
	}
	return mask
}

// lock locks the shards of mask in ascending order; unlock releases them.
func (m *Model) lock(mask uint64) {
	for b := mask; b != 0; b &= b - 1 {
		m.shards[bits.TrailingZeros64(b)].mu.Lock()
	}
}

func (m *Model) unlock(mask uint64) {
	for b := mask; b != 0; b &= b - 1 {
		m.shards[bits.TrailingZeros64(b)].mu.Unlock()
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
	return m.caps.EntryLimit - m.total.Load(), true, nil
}

// SetFault installs a hook called before every Map, Unmap and Cut; when it returns
// an error, the call fails with that error and changes nothing. nil removes
// the hook. The hook runs with the model locked and must not call the model;
// its calls are serialised.
func (m *Model) SetFault(f func(Call) error) {
	if f == nil {
		m.fault.Store(nil)
		return
	}
	m.fault.Store(&f)
}

// injected runs the fault hook, if any, for c.
func (m *Model) injected(c Call) error {
	f := m.fault.Load()
	if f == nil {
		return nil
	}
	m.faultMu.Lock()
	defer m.faultMu.Unlock()
	return (*f)(c)
}

// Map implements Space.
func (m *Model) Map(iova, size uint64, host []byte) error {
	last := iova + size - 1
	mask := m.callMask(iova, size)
	m.lock(mask)
	defer m.unlock(mask)
	m.shardOf(m.win(iova)).mapCalls++
	if err := m.injected(Call{OpMap, iova, size}); err != nil {
		return err
	}
	if host != nil && uint64(len(host)) != size {
		return fmt.Errorf("iommu: host memory of %d bytes for a mapping of %d: %w", len(host), size, unix.EINVAL)
	}
	ps := m.caps.PageSize
	if size == 0 || (iova|size)&(ps-1) != 0 {
		return unix.EINVAL
	}
	if last < iova {
		return m.wrapErrno()
	}
	if m.caps.Rules == IOMMUFD && !m.inWindows(iova, last) {
		return unix.EINVAL
	}
	if _, ok := m.firstOverlap(iova, last); ok {
		return unix.EEXIST
	}
	outside := m.caps.Rules == Type1v2 && !m.inWindows(iova, last)
	if limit := m.caps.EntryLimit; limit != 0 {
		// Check and take the entry in one step, so that maps in other
		// shards cannot take it in between.
		for {
			n := m.total.Load()
			if n >= limit {
				return unix.ENOSPC
			}
			if outside {
				return unix.EINVAL
			}
			if m.total.CompareAndSwap(n, n+1) {
				break
			}
		}
	}
	if outside {
		return unix.EINVAL
	}
	x := mapping{iova: iova, size: size, host: host}
	m.store(x)
	sh := m.shardOf(m.win(iova))
	sh.n++
	sh.pins.Pinned += size / ps
	if m.inOp.Load() && iova+size > iova {
		m.opMu.Lock()
		m.op.Mapped(span.Range{Start: iova, End: iova + size})
		m.opMu.Unlock()
	}
	return nil
}

// store puts mapping x in the table, with its shards locked: whole in
// large if it meets every shard, else as one piece in each window it meets.
func (m *Model) store(x mapping) {
	if m.isLarge(x) {
		i, _ := slices.BinarySearchFunc(m.large, x.iova, func(y mapping, a uint64) int { return cmp.Compare(y.iova, a) })
		m.large = slices.Insert(m.large, i, x)
		return
	}
	for w := m.win(x.iova); ; w++ {
		m.shardOf(w).pieces.ReplaceOrInsert(piece{iova: max(x.iova, m.winFirst(w)), last: min(x.last(), m.winLast(w)), x: x})
		if w == m.win(x.last()) {
			return
		}
	}
}

// unstore takes mapping x out of the table, with its shards locked.
func (m *Model) unstore(x mapping) {
	if m.isLarge(x) {
		m.large = slices.DeleteFunc(m.large, func(y mapping) bool { return y.iova == x.iova })
		return
	}
	for w := m.win(x.iova); ; w++ {
		m.shardOf(w).pieces.Delete(piece{iova: max(x.iova, m.winFirst(w))})
		if w == m.win(x.last()) {
			return
		}
	}
}

// remove takes mapping x out of the table and counts it unmapped, with its
// shards locked.
func (m *Model) remove(x mapping) {
	m.unstore(x)
	sh := m.shardOf(m.win(x.iova))
	sh.n--
	if m.caps.EntryLimit != 0 {
		m.total.Add(^uint64(0))
	}
	sh.pins.Unpinned += x.size / m.caps.PageSize
	if m.inOp.Load() && x.iova+x.size > x.iova {
		m.opMu.Lock()
		m.op.Unmapped(span.Range{Start: x.iova, End: x.iova + x.size})
		m.opMu.Unlock()
	}
}

// Unmap implements Space.
func (m *Model) Unmap(iova, size uint64) (uint64, error) {
	last := iova + size - 1
	mask := m.callMask(iova, size)
	m.lock(mask)
	defer m.unlock(mask)
	m.shardOf(m.win(iova)).unmaps++
	if err := m.injected(Call{OpUnmap, iova, size}); err != nil {
		return 0, err
	}
	if m.caps.Rules == IOMMUFD && iova == 0 && size == math.MaxUint64 {
		var n uint64
		for _, x := range m.starting(nil, 0, math.MaxUint64) {
			n += x.size
			m.remove(x)
		}
		return n, nil
	}
	if size == 0 {
		return 0, unix.EINVAL
	}
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
		var buf [2]mapping
		for _, x := range m.starting(buf[:0], iova, last) {
			m.remove(x)
			n += x.size
		}
		return n, nil
	default:
		// Areas are removed in ascending order until one sticks out of the
		// request; that one, or finding none, is ENOENT.
		n, err := m.removeInside(iova, last)
		if err == nil && n == 0 {
			return 0, unix.ENOENT
		}
		return n, err
	}
}

// removeInside removes the areas inside [iova, last] in ascending order,
// as iommufd's unmap does, and answers the bytes removed. An area that
// sticks out of the range is ENOENT: at its start before anything goes, at
// its end after the areas before it went.
func (m *Model) removeInside(iova, last uint64) (uint64, error) {
	if x, ok := m.containing(iova); ok && x.iova < iova {
		return 0, unix.ENOENT
	}
	var n uint64
	var buf [2]mapping
	for _, x := range m.starting(buf[:0], iova, last) {
		if x.last() > last {
			return n, unix.ENOENT
		}
		m.remove(x)
		n += x.size
	}
	return n, nil
}

// Cut implements Cutter as iommufd's VFIO-compatible unmap does on a compat
// IOAS with huge pages disabled (see the table of Model): split at the
// range's last byte, then before its first, then remove every area inside.
//
// The areas it splits may reach far outside the range, into windows the
// range does not meet; it locks their shards too, growing the set and
// locking again until the areas holding the split points lie inside it.
func (m *Model) Cut(iova, size uint64) (uint64, error) {
	last := iova + size - 1
	// The kernel's split points: after the last byte, and before the first
	// unless the range starts at 0. For size 0 both are iova-1.
	points := [2]uint64{last, iova - 1}
	np := 2
	if iova == 0 {
		np = 1
	}
	mask := m.callMask(iova, size)
	for _, p := range points[:np] {
		mask |= 1 << (m.win(p) % modelShards)
	}
	for {
		m.lock(mask)
		need := mask
		for _, p := range points[:np] {
			if x, ok := m.containing(p); ok {
				need |= m.shardMask(x.iova, x.last())
			}
		}
		if need == mask {
			break
		}
		m.unlock(mask)
		mask = need
	}
	defer m.unlock(mask)
	m.shardOf(m.win(iova)).cuts++
	if err := m.injected(Call{OpCut, iova, size}); err != nil {
		return 0, err
	}
	if !m.caps.Cut {
		return 0, unix.EOPNOTSUPP
	}
	if size != 0 && last >= iova && (iova|size)&(m.caps.PageSize-1) == 0 {
		if x, ok := m.containing(iova); ok && last <= x.last() {
			// The commonest cut, an aligned range inside one area: both
			// splits and the removal of the middle in one step.
			m.carve(x, iova, last)
			return size, nil
		}
	}
	for _, p := range points[:np] {
		if err := m.split(p); err != nil {
			return 0, err
		}
	}
	if size == 0 {
		return 0, unix.EINVAL
	}
	if last < iova {
		return 0, unix.EOVERFLOW
	}
	// The compat unmap: an area that still sticks out is one whose end no
	// split could cut.
	return m.removeInside(iova, last)
}

// carve removes [iova, last], page aligned, from inside area x: what
// splitting x after last and before iova and removing the middle does, with
// the table changed once. (Only an iommufd model cuts, so there is no
// entry limit to count against, here or in split.)
func (m *Model) carve(x mapping, iova, last uint64) {
	m.unstore(x)
	m.shardOf(m.win(x.iova)).n--
	m.shardOf(m.win(iova)).pins.Unpinned += (last - iova + 1) / m.caps.PageSize
	if m.inOp.Load() && last+1 > iova {
		m.opMu.Lock()
		m.op.Unmapped(span.Range{Start: iova, End: last + 1})
		m.opMu.Unlock()
	}
	if iova > x.iova {
		n := iova - x.iova
		lo := mapping{iova: x.iova, size: n}
		if x.host != nil {
			lo.host = x.host[:n:n]
		}
		m.store(lo)
		m.shardOf(m.win(lo.iova)).n++
	}
	if last < x.last() {
		off := last + 1 - x.iova
		hi := mapping{iova: last + 1, size: x.size - off}
		if x.host != nil {
			hi.host = x.host[off:]
		}
		m.store(hi)
		m.shardOf(m.win(hi.iova)).n++
	}
}

// split cuts the area holding IOVA p into two after p, as iopt_area_split
// does: nothing when no area holds p or p is the area's first or last IOVA,
// EINVAL when the second half would not start on a page. The halves share
// the first's host memory and pins; the area count grows by one.
func (m *Model) split(p uint64) error {
	x, ok := m.containing(p)
	if !ok || p == x.iova || p == x.last() {
		return nil
	}
	if (p+1)&(m.caps.PageSize-1) != 0 {
		return unix.EINVAL
	}
	n := p + 1 - x.iova
	lo := mapping{iova: x.iova, size: n}
	hi := mapping{iova: p + 1, size: x.size - n}
	if x.host != nil {
		lo.host, hi.host = x.host[:n:n], x.host[n:]
	}
	m.unstore(x)
	m.store(lo)
	m.store(hi)
	m.shardOf(m.win(hi.iova)).n++
	return nil
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

// isLarge reports whether x meets every shard, so it is kept in Model.large.
func (m *Model) isLarge(x mapping) bool { return m.win(x.last())-m.win(x.iova) >= modelShards-1 }

// The lookups below need the shards of the windows they look at locked.

// containing returns the mapping that holds IOVA a.
func (m *Model) containing(a uint64) (mapping, bool) {
	var hit mapping
	found := false
	m.shardOf(m.win(a)).pieces.DescendLessOrEqual(piece{iova: a}, func(p piece) bool {
		if a <= p.last {
			hit, found = p.x, true
		}
		return false
	})
	if !found && len(m.large) > 0 {
		i, ok := slices.BinarySearchFunc(m.large, a, func(y mapping, a uint64) int { return cmp.Compare(y.iova, a) })
		if !ok {
			i--
		}
		if i >= 0 && a <= m.large[i].last() {
			return m.large[i], true
		}
	}
	return hit, found
}

// ascendPieces calls fn for each piece whose first IOVA lies in [lo, hi],
// ascending, until fn returns false.
func (m *Model) ascendPieces(lo, hi uint64, fn func(piece) bool) {
	if hi < lo {
		return
	}
	w0, w1 := m.win(lo), m.win(hi)
	if w1-w0 < modelShards {
		// Window by window: each window's pieces are in one shard.
		for w := w0; ; w++ {
			from, to := max(lo, m.winFirst(w)), min(hi, m.winLast(w))
			more := true
			m.shardOf(w).pieces.AscendGreaterOrEqual(piece{iova: from}, func(p piece) bool {
				if p.iova > to {
					return false
				}
				more = fn(p)
				return more
			})
			if !more || w == w1 {
				return
			}
		}
	}
	// More windows than shards: every shard, merged.
	var all []piece
	for i := range m.shards {
		m.shards[i].pieces.AscendGreaterOrEqual(piece{iova: lo}, func(p piece) bool {
			if p.iova > hi {
				return false
			}
			all = append(all, p)
			return true
		})
	}
	slices.SortFunc(all, func(a, b piece) int { return cmp.Compare(a.iova, b.iova) })
	for _, p := range all {
		if !fn(p) {
			return
		}
	}
}

// starting appends to xs the mappings whose first IOVA lies in [iova,
// last], ascending, and returns the extended slice. (A caller passes a
// buffer of its own, so that an unmap of one mapping allocates nothing.)
func (m *Model) starting(xs []mapping, iova, last uint64) []mapping {
	n := len(xs)
	m.ascendPieces(iova, last, func(p piece) bool {
		if p.iova == p.x.iova {
			xs = append(xs, p.x)
		}
		return true
	})
	if large := m.largeIn(iova, last); len(large) > 0 {
		xs = append(xs, large...)
		slices.SortFunc(xs[n:], func(a, b mapping) int { return cmp.Compare(a.iova, b.iova) })
	}
	return xs
}

// largeIn returns the large mappings whose first IOVA lies in [iova, last].
func (m *Model) largeIn(iova, last uint64) []mapping {
	if len(m.large) == 0 || last < iova {
		return nil
	}
	i, _ := slices.BinarySearchFunc(m.large, iova, func(y mapping, a uint64) int { return cmp.Compare(y.iova, a) })
	j := i
	for j < len(m.large) && m.large[j].iova <= last {
		j++
	}
	return m.large[i:j]
}

// firstOverlap returns the lowest mapping that meets [iova, last].
func (m *Model) firstOverlap(iova, last uint64) (mapping, bool) {
	if x, ok := m.containing(iova); ok {
		return x, true
	}
	var hit mapping
	found := false
	m.ascendPieces(iova, last, func(p piece) bool {
		hit, found = p.x, true
		return false
	})
	if large := m.largeIn(iova, last); len(large) > 0 && (!found || large[0].iova < hit.iova) {
		return large[0], true
	}
	return hit, found
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
	for _, x := range m.starting(nil, r.Start, r.End-1) {
		if !ok || x.iova != first.iova {
			fn(x)
		}
	}
}

// MappingsIn returns the entries that meet r, ascending.
func (m *Model) MappingsIn(r span.Range) []Mapping {
	if r.Empty() {
		return nil
	}
	mask := m.shardMask(r.Start, r.End-1)
	m.lock(mask)
	defer m.unlock(mask)
	var out []Mapping
	m.visitIn(r, func(x mapping) { out = append(out, Mapping{x.iova, x.size}) })
	return out
}

// Mappings returns the current entries in ascending IOVA order.
func (m *Model) Mappings() []Mapping {
	m.lock(^uint64(0))
	defer m.unlock(^uint64(0))
	var out []Mapping
	for _, x := range m.starting(nil, 0, math.MaxUint64) {
		out = append(out, Mapping{x.iova, x.size})
	}
	if out == nil {
		out = []Mapping{}
	}
	return out
}

// Len returns the number of entries.
func (m *Model) Len() int {
	if m.caps.EntryLimit != 0 {
		return int(m.total.Load())
	}
	m.lock(^uint64(0))
	defer m.unlock(^uint64(0))
	n := 0
	for i := range m.shards {
		n += int(m.shards[i].n)
	}
	return n
}

// Calls returns how many Map and Unmap calls the model has answered,
// failed ones included.
func (m *Model) Calls() (maps, unmaps uint64) {
	m.lock(^uint64(0))
	defer m.unlock(^uint64(0))
	for i := range m.shards {
		maps += m.shards[i].mapCalls
		unmaps += m.shards[i].unmaps
	}
	return maps, unmaps
}

// CutCalls returns how many Cut calls the model has answered, failed ones
// included.
func (m *Model) CutCalls() uint64 {
	m.lock(^uint64(0))
	defer m.unlock(^uint64(0))
	var n uint64
	for i := range m.shards {
		n += m.shards[i].cuts
	}
	return n
}

// Pins returns the pages pinned and unpinned so far.
func (m *Model) Pins() Pins {
	m.lock(^uint64(0))
	defer m.unlock(^uint64(0))
	var p Pins
	for i := range m.shards {
		p.Pinned += m.shards[i].pins.Pinned
		p.Unpinned += m.shards[i].pins.Unpinned
	}
	return p
}

// BeginOp starts measuring one operation (see Window): from now until EndOp,
// the model records what its calls unmap and map. The measurement is the
// model's, not a caller's: calls of concurrent operations are recorded too.
func (m *Model) BeginOp() {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	m.op.Reset()
	m.inOp.Store(true)
}

// EndOp ends the operation BeginOp started and returns its window, as the
// IOVA ranges that were hidden from the device for a moment and are mapped
// again, and the bytes it re-pinned. The window's bytes are added to
// WindowBytes.
func (m *Model) EndOp() (window []span.Range, repinned uint64) {
	m.lock(^uint64(0))
	defer m.unlock(^uint64(0))
	m.opMu.Lock()
	defer m.opMu.Unlock()
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
	m.inOp.Store(false)
	return window, repinned
}

// WindowBytes returns the sum of the windows of the operations measured.
func (m *Model) WindowBytes() uint64 {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	return m.window
}

// Reaches reports whether a device could touch IOVA a now.
func (m *Model) Reaches(a uint64) bool {
	mask := uint64(1) << (m.win(a) % modelShards)
	m.lock(mask)
	defer m.unlock(mask)
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
	if len(buf) == 0 {
		return nil
	}
	mask := m.shardMask(iova, iova+uint64(len(buf))-1)
	m.lock(mask)
	defer m.unlock(mask)
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
