package discard

import (
	"errors"
	"fmt"
	"sync"

	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/span"
)

// StateSource is a Source whose state is a page map with one entry per unit
// (1 populated, 0 discarded; all discarded at creation), changed only by
// Change, a transaction that also runs the steps outside gmem's bookkeeping in
// the order the memory needs. memattr and virtiomem are built on it.
//
// The map may be kept in parts (NewPartedStateSource), each a contiguous
// range of units with its own lock and its own map, made when first
// written, so conversions in different parts do not contend for the map.
// A read or write locks the parts it meets in ascending order, so it sees
// or changes them as one. Locks are held only around map reads and writes,
// never across kernel or listener calls.
type StateSource struct {
	m    *Manager
	unit uint64

	shift  uint   // a part holds 1<<shift units (64: one part)
	total  uint64 // units in the region
	parts  []statePart
	newMap func(pages uint64) (pagemap.Map, error)
}

// statePart is the map of one part; nil means every unit of it is
// discarded (nothing written yet).
type statePart struct {
	mu sync.RWMutex
	pm pagemap.Map
	_  [64]byte // keeps neighbouring parts' locks off one cache line
}

// Parts of a parted source: at most maxParts, each at least 2^16 units (a
// chunk of pagemap.Runs, 256 MiB of 4 KiB pages).
const (
	maxParts      = 16
	minPartShift  = 16
	singlePartLog = 64
)

// Steps are the parts of a change outside the source's bookkeeping, each
// given the runs (region byte offsets) that change. The slice is valid only
// during the call: a step that keeps the runs copies them.
type Steps struct {
	// Kernel changes the state where the kernel keeps it (KVM memory
	// attributes, guest_memfd); it must be all or nothing. It is undone by
	// calling it again with the opposite direction.
	Kernel func(changed []span.Range, populate bool) error
	// KernelAfterDiscard runs Kernel after the listeners when discarding:
	// for in-place memory the kernel refuses to make a page private while a
	// device still pins it. Otherwise Kernel runs first in both directions.
	KernelAfterDiscard bool
	// Release frees what the change left unused (the old backing), after
	// everything else succeeded. If it fails, the change is undone; what it
	// freed stays freed.
	Release func(changed []span.Range, populate bool) error
}

// NewStateSource returns a source over the manager's region with unit-sized
// entries stored in pm, which must have exactly size/unit pages. It does not
// add itself to the manager: call m.AddSource when it is ready.
func NewStateSource(m *Manager, unit uint64, pm pagemap.Map) (*StateSource, error) {
	if !span.IsPowerOfTwo(unit) {
		return nil, fmt.Errorf("discard: unit %#x is not a power of two", unit)
	}
	if m.Size()%unit != 0 {
		return nil, fmt.Errorf("discard: region size %#x is not a multiple of the unit %#x", m.Size(), unit)
	}
	if pm.Pages() != m.Size()/unit {
		return nil, fmt.Errorf("discard: page map of %d entries for %d units", pm.Pages(), m.Size()/unit)
	}
	s := &StateSource{m: m, unit: unit, shift: singlePartLog, total: pm.Pages(), parts: make([]statePart, 1)}
	s.parts[0].pm = pm
	return s, nil
}

// NewPartedStateSource is NewStateSource with the map kept in parts of the
// region (at most 16, each at least 2^16 units), each made by newMap with
// the number of units it holds when it is first written, so conversions in
// different parts take different locks. newMap must return a map of that
// many pages, 1 bit a page, all 0.
func NewPartedStateSource(m *Manager, unit uint64, newMap func(pages uint64) (pagemap.Map, error)) (*StateSource, error) {
	if !span.IsPowerOfTwo(unit) {
		return nil, fmt.Errorf("discard: unit %#x is not a power of two", unit)
	}
	if m.Size()%unit != 0 {
		return nil, fmt.Errorf("discard: region size %#x is not a multiple of the unit %#x", m.Size(), unit)
	}
	units := m.Size() / unit
	shift := span.PieceShift(units, maxParts, minPartShift)
	n := 1
	if units > 0 {
		n = int((units-1)>>shift) + 1
	}
	s := &StateSource{m: m, unit: unit, shift: shift, total: units, parts: make([]statePart, n), newMap: newMap}
	// The first part is made now, so a map that does not fit is an error
	// here rather than at the first conversion.
	pm, err := newMap(s.partLen(0))
	if err != nil {
		return nil, err
	}
	if pm.Pages() != s.partLen(0) || pm.Bits() != 1 {
		return nil, fmt.Errorf("discard: page map of %d entries, %d bits, for a part of %d units", pm.Pages(), pm.Bits(), s.partLen(0))
	}
	s.parts[0].pm = pm
	return s, nil
}

// partLen returns the units of part i.
func (s *StateSource) partLen(i int) uint64 {
	if s.shift == singlePartLog {
		return s.total
	}
	first := uint64(i) << s.shift
	return min(s.total-first, uint64(1)<<s.shift)
}

// partsOf returns the parts that unit range u meets (u not empty).
func (s *StateSource) partsOf(u span.Range) (first, last int) {
	return int(u.Start >> s.shift), int((u.End - 1) >> s.shift)
}

func (s *StateSource) rlock(first, last int) {
	for i := first; i <= last; i++ {
		s.parts[i].mu.RLock()
	}
}

func (s *StateSource) runlock(first, last int) {
	for i := first; i <= last; i++ {
		s.parts[i].mu.RUnlock()
	}
}

// runs calls fn for each maximal run of unit range u with its value, with
// the parts u meets read-locked.
func (s *StateSource) runs(u span.Range, fn func(run span.Range, v uint8)) {
	if u.Empty() {
		return
	}
	first, last := s.partsOf(u)
	s.rlock(first, last)
	defer s.runlock(first, last)
	var cur span.Range
	var cv uint8
	emit := func(r span.Range, v uint8) {
		if !cur.Empty() && cur.End == r.Start && cv == v {
			cur.End = r.End
			return
		}
		if !cur.Empty() {
			fn(cur, cv)
		}
		cur, cv = r, v
	}
	for i := first; i <= last; i++ {
		base := uint64(0)
		if s.shift != singlePartLog {
			base = uint64(i) << s.shift
		}
		local := span.Range{Start: max(u.Start, base) - base, End: min(u.End, base+s.partLen(i)) - base}
		pm := s.parts[i].pm
		if pm == nil {
			emit(span.Range{Start: base + local.Start, End: base + local.End}, 0)
			continue
		}
		for run := range pm.Runs(local) {
			emit(span.Range{Start: base + run.Start, End: base + run.End}, run.Value)
		}
	}
	if !cur.Empty() {
		fn(cur, cv)
	}
}

// Granularity implements Source.
func (s *StateSource) Granularity() uint64 { return s.unit }

// Size returns the size of the region in bytes.
func (s *StateSource) Size() uint64 { return s.m.Size() }

// Unit returns the bytes per entry.
func (s *StateSource) Unit() uint64 { return s.unit }

// units converts a byte range (unit aligned) to entry indexes.
func (s *StateSource) units(r span.Range) span.Range {
	return span.Range{Start: r.Start / s.unit, End: r.End / s.unit}
}

// bytes converts entry indexes to a byte range.
func (s *StateSource) bytes(r span.Range) span.Range {
	return span.Range{Start: r.Start * s.unit, End: r.End * s.unit}
}

// AppendPopulated implements Source.
func (s *StateSource) AppendPopulated(dst []span.Range, r span.Range) []span.Range {
	r = r.Intersect(span.Range{End: s.m.Size()})
	if r.Empty() {
		return dst
	}
	u, _ := r.Outward(s.unit)
	s.runs(s.units(u), func(run span.Range, v uint8) {
		if v == 1 {
			dst = append(dst, s.bytes(run).Intersect(r))
		}
	})
	return dst
}

// Runs calls fn for each maximal run of r (rounded out to units) with its
// state, in ascending order, from one consistent snapshot taken under the
// source's lock. fn must not call the source.
func (s *StateSource) Runs(r span.Range, fn func(run span.Range, populated bool)) {
	r = r.Intersect(span.Range{End: s.m.Size()})
	u, _ := r.Outward(s.unit)
	s.runs(s.units(u), func(run span.Range, v uint8) { fn(s.bytes(run), v == 1) })
}

// Populated reports whether every unit that r touches is populated in this
// source (an empty r is).
func (s *StateSource) Populated(r span.Range) bool {
	all := true
	s.Runs(r, func(_ span.Range, p bool) { all = all && p })
	return all
}

// Discarded reports whether every unit that r touches is discarded in this
// source (an empty r is).
func (s *StateSource) Discarded(r span.Range) bool {
	none := true
	s.Runs(r, func(_ span.Range, p bool) { none = none && !p })
	return none
}

// Count returns the populated bytes in r (rounded out to units).
func (s *StateSource) Count(r span.Range) uint64 {
	r = r.Intersect(span.Range{End: s.m.Size()})
	u, _ := r.Outward(s.unit)
	var n uint64
	s.runs(s.units(u), func(run span.Range, v uint8) {
		if v == 1 {
			n += run.Len()
		}
	})
	return n * s.unit
}

// Bytes returns the memory the state map holds.
func (s *StateSource) Bytes() uint64 {
	var n uint64
	for i := range s.parts {
		p := &s.parts[i]
		p.mu.RLock()
		if p.pm != nil {
			n += p.pm.Bytes()
		}
		p.mu.RUnlock()
	}
	return n
}

// Check validates a request for Change: size not zero, no overflow, offset
// and size multiples of the unit, inside the region. Errors wrap
// span.ErrEmpty, span.ErrOverflow, span.ErrAlign or span.ErrBounds.
func (s *StateSource) Check(offset, size uint64) (span.Range, error) {
	return span.Checked(offset, size, s.unit, s.m.Size())
}

// Change makes r (region byte offsets, unit aligned) populated or discarded
// as one transaction and returns the runs that changed. Units already in the
// requested state are left alone; if none changes, nothing is notified.
//
// Populating runs Kernel, flips the bookkeeping, tells the listeners, then
// Release. Discarding runs Kernel (unless KernelAfterDiscard), tells the
// listeners, runs Kernel (if KernelAfterDiscard), flips the bookkeeping, then
// Release. A device mapping therefore never covers a unit this source calls
// discarded, not even between steps. If any step fails, the finished steps are
// undone in reverse order and the error is returned.
func (s *StateSource) Change(r span.Range, populate bool, steps Steps) ([]span.Range, error) {
	changed, _, err := s.change(r, populate, steps, true)
	return changed, err
}

// ChangeCount is Change returning only how many runs and bytes changed: the
// runs themselves are not copied out, so a single-unit change allocates
// nothing.
func (s *StateSource) ChangeCount(r span.Range, populate bool, steps Steps) (runs int, bytes uint64, err error) {
	changed, bytes, err := s.change(r, populate, steps, false)
	return len(changed), bytes, err
}

// change is Change, also returning the bytes changed. With keep false the
// runs it returns may be the transaction's own buffer, which another change
// reuses once this one ends: the caller may take their number only.
func (s *StateSource) change(r span.Range, populate bool, steps Steps, keep bool) ([]span.Range, uint64, error) {
	if _, err := s.Check(r.Start, r.Len()); err != nil {
		return nil, 0, err
	}
	tx, err := s.m.begin(r)
	if err != nil {
		return nil, 0, err
	}
	defer s.m.end(tx)
	want := uint8(0)
	if populate {
		want = 1
	}
	var changed []span.Range
	u := s.units(r)
	if u.Len() == 1 { // the most common request: one page
		if s.get(u.Start) != want {
			// The transaction's buffer, not a new slice: the steps see
			// the runs only during their calls.
			tx.one[0] = r
			changed = tx.one[:]
		}
	} else {
		changed = s.differing(u, want)
	}
	if len(changed) == 0 {
		return nil, 0, nil
	}
	if err := s.apply(tx, changed, populate, steps); err != nil {
		return nil, 0, err
	}
	var n uint64
	for _, c := range changed {
		n += c.Len()
	}
	if keep && len(changed) == 1 {
		changed = []span.Range{changed[0]}
	}
	return changed, n, nil
}

// differing returns the runs of u (entry indexes) whose value is not want,
// as byte ranges. (A function of its own: the closure's capture would move
// Change's result to the heap on every call, the single-page one included.)
func (s *StateSource) differing(u span.Range, want uint8) []span.Range {
	var out []span.Range
	s.runs(u, func(run span.Range, v uint8) {
		if v != want {
			out = append(out, s.bytes(run))
		}
	})
	return out
}

// step is one finished step of a change, kept so it can be undone.
type step uint8

const (
	stepKernel step = iota + 1
	stepFlip
	stepListeners
)

// apply runs the steps of a change in the order Change documents; if one
// fails it undoes the finished ones, newest first.
func (s *StateSource) apply(tx *Tx, changed []span.Range, populate bool, steps Steps) error {
	var done [3]step
	n := 0
	mark := tx.Mark()
	fail := func(err error) error {
		var errs []error
		for i := n - 1; i >= 0; i-- {
			var uerr error
			switch done[i] {
			case stepKernel:
				uerr = steps.Kernel(changed, !populate)
			case stepFlip:
				s.set(changed, !populate)
			case stepListeners:
				uerr = tx.Rollback(mark)
			}
			if uerr != nil {
				errs = append(errs, uerr)
			}
		}
		if len(errs) > 0 {
			s.m.log.Error("undo of a failed change failed", "err", errors.Join(errs...))
			return errors.Join(append([]error{err}, errs...)...)
		}
		return err
	}
	kernel := func() error {
		if steps.Kernel == nil {
			return nil
		}
		if err := steps.Kernel(changed, populate); err != nil {
			return fmt.Errorf("kernel: %w", err)
		}
		done[n] = stepKernel
		n++
		return nil
	}
	listeners := func() error {
		if err := tx.change(s, changed, populate); err != nil {
			return err
		}
		done[n] = stepListeners
		n++
		return nil
	}
	if populate {
		if err := kernel(); err != nil {
			return fail(err)
		}
		s.set(changed, true)
		done[n] = stepFlip
		n++
		if err := listeners(); err != nil {
			return fail(err)
		}
	} else {
		if !steps.KernelAfterDiscard {
			if err := kernel(); err != nil {
				return fail(err)
			}
		}
		if err := listeners(); err != nil {
			return fail(err)
		}
		if steps.KernelAfterDiscard {
			if err := kernel(); err != nil {
				return fail(err)
			}
		}
		s.set(changed, false)
		done[n] = stepFlip
		n++
	}
	if steps.Release != nil {
		if err := steps.Release(changed, populate); err != nil {
			return fail(fmt.Errorf("release: %w", err))
		}
	}
	return nil
}

// set writes the bookkeeping for runs.
func (s *StateSource) set(runs []span.Range, populate bool) {
	v := uint8(0)
	if populate {
		v = 1
	}
	if len(runs) == 0 {
		return
	}
	first, last := len(s.parts), -1
	for _, r := range runs {
		f, l := s.partsOf(s.units(r))
		first, last = min(first, f), max(last, l)
	}
	for i := first; i <= last; i++ {
		s.parts[i].mu.Lock()
	}
	defer func() {
		for i := first; i <= last; i++ {
			s.parts[i].mu.Unlock()
		}
	}()
	for _, r := range runs {
		u := s.units(r)
		f, l := s.partsOf(u)
		for i := f; i <= l; i++ {
			base := uint64(0)
			if s.shift != singlePartLog {
				base = uint64(i) << s.shift
			}
			local := span.Range{Start: max(u.Start, base) - base, End: min(u.End, base+s.partLen(i)) - base}
			p := &s.parts[i]
			if p.pm == nil {
				if v == 0 {
					continue // a part not made yet is all discarded
				}
				pm, err := s.newMap(s.partLen(i))
				if err != nil {
					panic(fmt.Sprintf("discard: making the state map of part %d: %v", i, err))
				}
				p.pm = pm
			}
			if err := p.pm.Set(local, v); err != nil {
				panic(fmt.Sprintf("discard: state map rejected a checked range %v: %v", r, err))
			}
		}
	}
}

// get returns the value of unit u.
func (s *StateSource) get(u uint64) uint8 {
	p := &s.parts[u>>s.shift]
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.pm == nil {
		return 0
	}
	return p.pm.Get(u - u>>s.shift<<s.shift)
}
