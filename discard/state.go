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
type StateSource struct {
	m    *Manager
	unit uint64

	mu sync.RWMutex // guards pm; held only around map reads and writes
	pm pagemap.Map
}

// Steps are the parts of a change outside the source's bookkeeping, each
// given the runs (region byte offsets) that change.
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
	return &StateSource{m: m, unit: unit, pm: pm}, nil
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
	s.mu.RLock()
	defer s.mu.RUnlock()
	for run := range s.pm.Runs(s.units(u)) {
		if run.Value == 1 {
			dst = append(dst, s.bytes(run.Range).Intersect(r))
		}
	}
	return dst
}

// Runs calls fn for each maximal run of r (rounded out to units) with its
// state, in ascending order, from one consistent snapshot taken under the
// source's lock. fn must not call the source.
func (s *StateSource) Runs(r span.Range, fn func(run span.Range, populated bool)) {
	r = r.Intersect(span.Range{End: s.m.Size()})
	u, _ := r.Outward(s.unit)
	s.mu.RLock()
	defer s.mu.RUnlock()
	for run := range s.pm.Runs(s.units(u)) {
		fn(s.bytes(run.Range), run.Value == 1)
	}
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
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.pm.Count(s.units(u), 1) * s.unit
}

// Bytes returns the memory the state map holds.
func (s *StateSource) Bytes() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.pm.Bytes()
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
	if _, err := s.Check(r.Start, r.Len()); err != nil {
		return nil, err
	}
	var tx Tx
	if err := s.m.begin(&tx, r); err != nil {
		return nil, err
	}
	defer s.m.end(&tx)
	want := uint8(0)
	if populate {
		want = 1
	}
	var changed []span.Range
	u := s.units(r)
	s.mu.RLock()
	if u.Len() == 1 { // the most common request: one page
		if s.pm.Get(u.Start) != want {
			changed = []span.Range{r}
		}
	} else {
		for run := range s.pm.Runs(u) {
			if run.Value != want {
				changed = append(changed, s.bytes(run.Range))
			}
		}
	}
	s.mu.RUnlock()
	if len(changed) == 0 {
		return nil, nil
	}
	if err := s.apply(&tx, changed, populate, steps); err != nil {
		return nil, err
	}
	return changed, nil
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
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range runs {
		if err := s.pm.Set(s.units(r), v); err != nil {
			panic(fmt.Sprintf("discard: state map rejected a checked range %v: %v", r, err))
		}
	}
}
