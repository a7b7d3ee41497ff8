package discard

import (
	"sync"

	"github.com/gmemproject/gmem/span"
)

// rangeLock serialises holders of overlapping ranges and lets holders of
// disjoint ranges run at once: conversions of different parts of a region
// proceed in parallel, while two that touch the same page take turns.
//
// The region is cut into at most maxStripes stripes, each with its own
// mutex and list of held ranges. A range is taken in every stripe it meets,
// in ascending order, so two overlapping ranges meet in the stripe of any
// byte they share, and conversions in different stripes touch no common
// lock. Taking stripes in ascending order keeps waiting acyclic.
type rangeLock struct {
	shift   uint // a stripe is 1<<shift bytes
	stripes []stripe
}

// maxStripes bounds the stripes of a region, so a range over all of it
// takes a bounded number of locks.
const maxStripes = 64

// minStripeShift is the log2 of the smallest stripe: 2 MiB.
const minStripeShift = 21

type stripe struct {
	mu      sync.Mutex
	cond    sync.Cond
	held    []span.Range
	waiters int
	_       [64]byte // keeps neighbouring stripes' locks off one cache line
}

func newRangeLock(size uint64) *rangeLock {
	shift := span.PieceShift(size, maxStripes, minStripeShift)
	n := 1
	if size > 0 {
		n = int((size-1)>>shift) + 1
	}
	l := &rangeLock{shift: shift, stripes: make([]stripe, n)}
	for i := range l.stripes {
		l.stripes[i].cond.L = &l.stripes[i].mu
	}
	return l
}

// span returns the stripes r meets.
func (l *rangeLock) span(r span.Range) (first, last int) {
	last = len(l.stripes) - 1
	return min(int(r.Start>>l.shift), last), min(int((r.End-1)>>l.shift), last)
}

// stripeOf returns the stripe of region offset a.
func (l *rangeLock) stripeOf(a uint64) int { return min(int(a>>l.shift), len(l.stripes)-1) }

// lock waits until no held range overlaps r and takes r.
func (l *rangeLock) lock(r span.Range) {
	if r.Empty() {
		return
	}
	first, last := l.span(r)
	for i := first; i <= last; i++ {
		st := &l.stripes[i]
		st.mu.Lock()
		for st.overlaps(r) {
			st.waiters++
			st.cond.Wait()
			st.waiters--
		}
		st.held = append(st.held, r)
		st.mu.Unlock()
	}
}

// unlock releases r, taken by lock.
func (l *rangeLock) unlock(r span.Range) {
	if r.Empty() {
		return
	}
	first, last := l.span(r)
	for i := first; i <= last; i++ {
		st := &l.stripes[i]
		st.mu.Lock()
		for j, h := range st.held {
			if h == r {
				st.held[j] = st.held[len(st.held)-1]
				st.held = st.held[:len(st.held)-1]
				break
			}
		}
		wake := st.waiters > 0
		st.mu.Unlock()
		if wake {
			st.cond.Broadcast()
		}
	}
}

func (st *stripe) overlaps(r span.Range) bool {
	for _, h := range st.held {
		if h.Overlaps(r) {
			return true
		}
	}
	return false
}

// gate is a reader-writer lock for many readers on several cores: readers
// take one of its stripes (any; a transaction the one of its range, so
// vCPUs converting distant pages do not write one cache line), a writer
// takes all of them in ascending order. A reader must not take a second
// stripe while it holds one.
type gate struct {
	stripes [maxStripes]struct {
		mu sync.RWMutex
		_  [64]byte
	}
}

// rlock read-locks stripe i (modulo the stripes) and returns what runlock
// needs.
func (g *gate) rlock(i int) int {
	i %= maxStripes
	g.stripes[i].mu.RLock()
	return i
}

func (g *gate) runlock(i int) { g.stripes[i].mu.RUnlock() }

func (g *gate) lock() {
	for i := range g.stripes {
		g.stripes[i].mu.Lock()
	}
}

func (g *gate) unlock() {
	for i := range g.stripes {
		g.stripes[i].mu.Unlock()
	}
}
