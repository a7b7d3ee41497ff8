// Package discard is gmem's RamDiscardManager: for one region of guest
// memory it combines the state of several sources (shared/private from
// memattr, plugged/unplugged from virtiomem) into one populated set, and keeps
// listeners (DMA mappers) told of every change to it.
//
// The populated set is the AND of all sources: a byte is populated when every
// source says so, and with no source everything is populated. It is computed
// by merging the sources' runs, so every operation costs O(runs), never
// O(pages).
//
// Every change is a transaction. A source changes its state inside
// Manager.Transact; the Tx notifies listeners once per changed run, clipped to
// each listener's section, and when any listener refuses, every listener
// already told (the refusing one included) is told the opposite before the
// error is returned, so the source can undo its own change and leave
// everything as it was. The same holds for registering a listener and for
// adding or removing a source with listeners present.
//
// # Concurrency
//
// All methods are safe for concurrent use. Transactions on disjoint ranges of
// a region run in parallel; overlapping ones take turns (a range lock), and
// queries (IsPopulated, Replay*, Walk) wait for transactions on their range.
// Registering or unregistering a listener and adding or removing a source
// wait for every transaction to finish and hold off new ones. Listener
// callbacks run with the range locked and must not call back into the
// manager.
package discard

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"

	"github.com/gmemproject/gmem/span"
)

// DefaultGranularity is the granularity of a manager with no source: the
// host page size.
const DefaultGranularity = 4096

// Source says which parts of a region it considers populated.
type Source interface {
	// Granularity returns the unit, in bytes (a power of two), in which the
	// source's state changes.
	Granularity() uint64
	// AppendPopulated appends to dst the populated runs of r (region byte
	// offsets) in ascending order, each clipped to r, and returns the result.
	AppendPopulated(dst []span.Range, r span.Range) []span.Range
}

// Listener is told when parts of its section become populated or discarded.
//
// Populate is called after the part became populated in every source (for
// the source that changes it may be just before its bookkeeping flips), and
// may refuse by returning an error. Discard is called before the part stops
// being populated in the source that changes it. A listener must accept a
// Discard of ranges it never saw populated. A Discard may fail only when the
// listener cannot carry it out (an IOMMU out of entries to split a mapping);
// it must then leave its state exactly as before the call.
type Listener interface {
	Populate(s Section) error
	Discard(s Section) error
}

// Journal is implemented by listeners that can take back a notification
// exactly, restoring the state they had before it (a DMA mapper restores the
// very entries it had, where the opposite notification could shape them
// differently and need IOMMU entries the failed operation used up). When an
// operation fails, the manager reverts what it told Journal listeners with
// Revert and tells other listeners the opposite.
type Journal interface {
	// Revert takes back the most recent notification of exactly s.
	Revert(s Section) error
	// Settle says the notifications of s made so far will not be reverted:
	// the operation that made them has ended.
	Settle(s Section)
}

// Errors returned by the manager. They are wrapped with detail.
var (
	ErrSourceExists   = errors.New("discard: source already added")
	ErrNoSource       = errors.New("discard: source not added")
	ErrListenerExists = errors.New("discard: listener already registered")
	ErrNoListener     = errors.New("discard: listener not registered")
	ErrTooManySources = errors.New("discard: too many sources")
)

// maxSources bounds the sources of one region so Walk can name them in a
// 64-bit set.
const maxSources = 64

// Manager combines the sources of one region and notifies its listeners.
type Manager struct {
	size  uint64
	log   *slog.Logger
	locks *rangeLock

	// mu is held for writing to change sources or listeners and for reading
	// by transactions and queries. The padding keeps its first stripe off
	// the line of the fields above, which every transaction reads.
	_         [64]byte
	mu        gate
	sources   []Source
	listeners []*registration

	// txs recycles transactions: a Tx and its inline log would otherwise
	// be an allocation per conversion.
	txs sync.Pool
}

type registration struct {
	l   Listener
	sec Section
}

// New returns a Manager for a region of size bytes. log may be nil.
func New(size uint64, log *slog.Logger) *Manager {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Manager{size: size, log: log, locks: newRangeLock(size)}
}

// Size returns the size of the region in bytes.
func (m *Manager) Size() uint64 { return m.size }

// Granularity returns the smallest granularity of the sources (QEMU's
// get_min_granularity), or DefaultGranularity when there is none.
func (m *Manager) Granularity() uint64 {
	defer m.mu.runlock(m.mu.rlock(0))
	return m.granularity()
}

func (m *Manager) granularity() uint64 {
	g := uint64(0)
	for _, s := range m.sources {
		if sg := s.Granularity(); g == 0 || sg < g {
			g = sg
		}
	}
	if g == 0 {
		g = DefaultGranularity
	}
	return g
}

// whole is the region as a range.
func (m *Manager) whole() span.Range { return span.Range{End: m.size} }

// populated returns the runs of r populated in every source but skip (nil:
// every source).
func (m *Manager) populated(r span.Range, skip Source) []span.Range {
	var acc []span.Range
	first := true
	for _, s := range m.sources {
		if s == skip {
			continue
		}
		runs := s.AppendPopulated(nil, r)
		if first {
			// A source need not return maximal runs; merging them keeps
			// replay coalesced and IsPopulated exact with one source.
			for _, x := range runs {
				if !x.Empty() {
					acc = appendRun(acc, x)
				}
			}
			first = false
		} else {
			acc = intersectRuns(acc, runs)
		}
		if len(acc) == 0 {
			return nil
		}
	}
	if first && !r.Empty() {
		return []span.Range{r}
	}
	return acc
}

func (m *Manager) checkRange(r span.Range) error {
	if r.End < r.Start || r.End > m.size {
		return fmt.Errorf("%w: %v in a region of %#x bytes", span.ErrBounds, r, m.size)
	}
	return nil
}

// AddSource adds a source. Parts that were populated and that the new source
// says are discarded are discarded for every listener first; if a listener
// fails, the others are restored and the source is not added.
func (m *Manager) AddSource(s Source) error {
	m.mu.lock()
	defer m.mu.unlock()
	if slices.Contains(m.sources, s) {
		return ErrSourceExists
	}
	if len(m.sources) == maxSources {
		return ErrTooManySources
	}
	g := s.Granularity()
	if !span.IsPowerOfTwo(g) {
		return fmt.Errorf("discard: source granularity %#x is not a power of two", g)
	}
	if len(m.listeners) > 0 {
		before := m.populated(m.whole(), nil)
		lost := intersectRuns(before, complementRuns(m.whole(), s.AppendPopulated(nil, m.whole())))
		var log txlog
		defer func() { log.settle() }() // the log as it is at return, not now
		if err := m.notifyTo(m.listeners, &log, lost, false); err != nil {
			return fmt.Errorf("discard: adding source: %w", err)
		}
	}
	m.sources = append(m.sources, s)
	return nil
}

// RemoveSource removes a source. Parts that only it kept discarded become
// populated for every listener first; if a listener refuses, the others are
// restored and the source stays.
func (m *Manager) RemoveSource(s Source) error {
	m.mu.lock()
	defer m.mu.unlock()
	i := slices.Index(m.sources, s)
	if i < 0 {
		return ErrNoSource
	}
	if len(m.listeners) > 0 {
		others := m.populated(m.whole(), s)
		gained := intersectRuns(others, complementRuns(m.whole(), s.AppendPopulated(nil, m.whole())))
		var log txlog
		defer func() { log.settle() }() // the log as it is at return, not now
		if err := m.notifyTo(m.listeners, &log, gained, true); err != nil {
			return fmt.Errorf("discard: removing source: %w", err)
		}
	}
	m.sources = slices.Delete(m.sources, i, i+1)
	return nil
}

// Register registers l for section s and replays the populated parts of s to
// it. If l refuses one, what it was given is discarded again and the error is
// returned; l is then not registered. A section of size 0 is accepted and
// never notified.
func (m *Manager) Register(l Listener, s Section) error {
	if err := s.valid(); err != nil {
		return err
	}
	if err := m.checkRange(s.Range()); err != nil {
		return err
	}
	if !s.Range().Aligned(DefaultGranularity) {
		return fmt.Errorf("discard: section %v: %w to %#x", s, span.ErrAlign, DefaultGranularity)
	}
	m.mu.lock()
	defer m.mu.unlock()
	if slices.ContainsFunc(m.listeners, func(r *registration) bool { return r.l == l }) {
		return ErrListenerExists
	}
	reg := &registration{l: l, sec: s}
	var log txlog
	defer func() { log.settle() }() // the log as it is at return, not now
	if err := m.notifyTo([]*registration{reg}, &log, m.populated(s.Range(), nil), true); err != nil {
		return fmt.Errorf("discard: register: %w", err)
	}
	m.listeners = append(m.listeners, reg)
	return nil
}

// Unregister discards l's whole section with one notification and removes
// l. If the discard fails, l stays registered and the error is returned.
func (m *Manager) Unregister(l Listener) error {
	m.mu.lock()
	defer m.mu.unlock()
	i := slices.IndexFunc(m.listeners, func(r *registration) bool { return r.l == l })
	if i < 0 {
		return ErrNoListener
	}
	if sec := m.listeners[i].sec; sec.Size > 0 {
		if err := l.Discard(sec); err != nil {
			return fmt.Errorf("discard: unregister: discard %v: %w", sec, err)
		}
		// Unregistering is an operation of its own: it will not be reverted.
		if j, ok := l.(Journal); ok {
			j.Settle(sec)
		}
	}
	m.listeners = slices.Delete(m.listeners, i, i+1)
	return nil
}

// Listeners returns the registered listeners and their sections, in
// registration order.
func (m *Manager) Listeners() ([]Listener, []Section) {
	defer m.mu.runlock(m.mu.rlock(0))
	ls := make([]Listener, len(m.listeners))
	ss := make([]Section, len(m.listeners))
	for i, r := range m.listeners {
		ls[i], ss[i] = r.l, r.sec
	}
	return ls, ss
}

// notification is one call made to a listener, kept so a failed operation
// can take it back.
type notification struct {
	reg      *registration
	sec      Section
	populate bool
}

// txlog is the notifications of one operation, in the order they were made.
type txlog []notification

// rollback takes back the notifications after mark, newest first: Revert for
// a Journal listener, the opposite notification for others.
func (log *txlog) rollback(mark int) error {
	var errs []error
	for i := len(*log) - 1; i >= mark; i-- {
		n := (*log)[i]
		var err error
		switch j, ok := n.reg.l.(Journal); {
		case ok:
			err = j.Revert(n.sec)
		case n.populate:
			err = n.reg.l.Discard(n.sec)
		default:
			err = n.reg.l.Populate(n.sec)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("undo on %v: %w", n.sec, err))
		}
	}
	*log = (*log)[:mark]
	return errors.Join(errs...)
}

// settle tells Journal listeners that the logged notifications stand.
func (log txlog) settle() {
	for _, n := range log {
		if j, ok := n.reg.l.(Journal); ok {
			j.Settle(n.sec)
		}
	}
}

// notifyTo tells each of regs that runs became populated (populate) or are
// about to be discarded, clipped to its section, logging each call. On the
// first failure it takes back every call this notifyTo made (and tells a
// failing listener that keeps no journal the opposite of the failed call),
// and returns the error.
func (m *Manager) notifyTo(regs []*registration, log *txlog, runs []span.Range, populate bool) error {
	mark := len(*log)
	for _, reg := range regs {
		for _, run := range runs {
			sec, ok := reg.sec.Intersect(run)
			if !ok {
				continue
			}
			var err error
			if populate {
				err = reg.l.Populate(sec)
			} else {
				err = reg.l.Discard(sec)
			}
			if err == nil {
				*log = append(*log, notification{reg, sec, populate})
				continue
			}
			if _, ok := reg.l.(Journal); !ok {
				// A listener without a journal may have done part of it.
				*log = append(*log, notification{reg, sec, populate})
			}
			undo := log.rollback(mark)
			if undo != nil {
				m.log.Error("listener rollback failed", "err", undo)
			}
			verb := "discard"
			if populate {
				verb = "populate"
			}
			return errors.Join(fmt.Errorf("%s %v: %w", verb, sec, err), undo)
		}
	}
	return nil
}

// Tx is a transaction on a locked range of a region, in which a source
// changes its state and notifies the listeners. It is valid only inside the
// function given to Transact.
type Tx struct {
	m    *Manager
	r    span.Range
	gate int // the stripe of m.mu it holds
	log  txlog
	buf  [4]notification // the log's first notifications, without allocating
	one  [1]span.Range   // the changed run of a single-unit change
}

// Transact locks r (region byte offsets) against other transactions and
// queries that overlap it and runs fn. Whatever fn returns is returned.
func (m *Manager) Transact(r span.Range, fn func(*Tx) error) error {
	tx, err := m.begin(r)
	if err != nil {
		return err
	}
	defer m.end(tx)
	return fn(tx)
}

// begin locks r for a new transaction; end releases it. Sources of this
// package use them directly, without the closure Transact takes.
func (m *Manager) begin(r span.Range) (*Tx, error) {
	if err := m.checkRange(r); err != nil {
		return nil, err
	}
	g := m.mu.rlock(m.locks.stripeOf(r.Start))
	m.locks.lock(r)
	tx, _ := m.txs.Get().(*Tx)
	if tx == nil {
		tx = new(Tx)
	}
	tx.m, tx.r, tx.gate = m, r, g
	tx.log = tx.buf[:0]
	return tx, nil
}

func (m *Manager) end(tx *Tx) {
	tx.log.settle()
	m.locks.unlock(tx.r)
	m.mu.runlock(tx.gate)
	*tx = Tx{} // drops the registrations its log refers to
	m.txs.Put(tx)
}

// Mark returns a point in the transaction's notifications to roll back to.
func (tx *Tx) Mark() int { return len(tx.log) }

// Rollback takes back, newest first, every notification made since mark:
// what a source calls when a later step of its change fails.
func (tx *Tx) Rollback(mark int) error {
	if err := tx.log.rollback(mark); err != nil {
		return fmt.Errorf("discard: %w", err)
	}
	return nil
}

// Range returns the range the transaction holds.
func (tx *Tx) Range() span.Range { return tx.r }

// NotifyPopulate tells the listeners that src has made runs (inside the
// transaction's range) populated: the parts of them that every other source
// also has populated become populated. A src that is not one of the
// manager's sources notifies nothing. src's own bookkeeping may or may not
// have flipped yet. If a listener refuses, every notification of this call is
// undone and the error returned.
func (tx *Tx) NotifyPopulate(src Source, runs []span.Range) error {
	return tx.change(src, runs, true)
}

// NotifyDiscard tells the listeners that src is about to discard runs (inside
// the transaction's range): the parts of them that every other source has
// populated stop being populated. If a listener cannot carry it out, every
// notification of this call is undone and the error returned.
func (tx *Tx) NotifyDiscard(src Source, runs []span.Range) error {
	return tx.change(src, runs, false)
}

func (tx *Tx) change(src Source, runs []span.Range, populate bool) error {
	m := tx.m
	if !slices.Contains(m.sources, src) {
		// A source outside the manager changes nothing that listeners see;
		// AddSource accounts for its state when it joins.
		return nil
	}
	// With src the only source, no other source holds anything back: the
	// parts to notify are the runs themselves, and the conversion allocates
	// no copy of them (the common case: memattr alone on a region).
	alone := len(m.sources) == 1
	for _, run := range runs {
		if !tx.r.ContainsRange(run) {
			return fmt.Errorf("discard: run %v outside the transaction's %v: %w", run, tx.r, span.ErrBounds)
		}
		alone = alone && !run.Empty()
	}
	parts := runs
	if !alone {
		parts = nil
		for _, run := range runs {
			parts = append(parts, m.populated(run, src)...)
		}
	}
	if err := m.notifyTo(m.listeners, &tx.log, parts, populate); err != nil {
		return fmt.Errorf("discard: %w", err)
	}
	return nil
}

// IsPopulated reports whether every granule r touches is populated: r is
// rounded out to the granularity first, so an unaligned or sub-page range is
// answered for the pages that hold it. An empty r is populated.
func (m *Manager) IsPopulated(r span.Range) bool {
	if r.Empty() {
		return true
	}
	if m.checkRange(r) != nil {
		return false
	}
	defer m.mu.runlock(m.mu.rlock(m.locks.stripeOf(r.Start)))
	out, ok := r.Outward(m.granularity())
	if !ok {
		return false
	}
	out = out.Intersect(m.whole())
	m.locks.lock(out)
	defer m.locks.unlock(out)
	runs := m.populated(out, nil)
	return len(runs) == 1 && runs[0] == out
}

// PopulatedRuns returns the populated runs of r, maximal and ascending.
func (m *Manager) PopulatedRuns(r span.Range) ([]span.Range, error) {
	if err := m.checkRange(r); err != nil {
		return nil, err
	}
	defer m.mu.runlock(m.mu.rlock(m.locks.stripeOf(r.Start)))
	m.locks.lock(r)
	defer m.locks.unlock(r)
	return m.populated(r, nil), nil
}

// ReplayPopulated calls fn for each populated part of s, in ascending order,
// as a Section clipped to s, and stops at the first error, which it returns.
// The parts are taken as one snapshot; fn runs with nothing locked.
func (m *Manager) ReplayPopulated(s Section, fn func(Section) error) error {
	return m.replay(s, true, fn)
}

// ReplayDiscarded is ReplayPopulated for the parts that are not populated in
// at least one source.
func (m *Manager) ReplayDiscarded(s Section, fn func(Section) error) error {
	return m.replay(s, false, fn)
}

func (m *Manager) replay(s Section, populated bool, fn func(Section) error) error {
	if err := s.valid(); err != nil {
		return err
	}
	runs, err := m.PopulatedRuns(s.Range())
	if err != nil {
		return err
	}
	if !populated {
		runs = complementRuns(s.Range(), runs)
	}
	for _, run := range runs {
		sec, _ := s.Intersect(run)
		if err := fn(sec); err != nil {
			return err
		}
	}
	return nil
}
