package discard

import (
	"sync"

	"github.com/gmemproject/gmem/span"
)

// rangeLock serialises holders of overlapping ranges and lets holders of
// disjoint ranges run at once: conversions of different parts of a region
// proceed in parallel, while two that touch the same page take turns.
type rangeLock struct {
	mu   sync.Mutex
	cond *sync.Cond
	held []span.Range
}

func newRangeLock() *rangeLock {
	l := &rangeLock{}
	l.cond = sync.NewCond(&l.mu)
	return l
}

// lock waits until no held range overlaps r and takes r.
func (l *rangeLock) lock(r span.Range) {
	if r.Empty() {
		return
	}
	l.mu.Lock()
	for l.overlaps(r) {
		l.cond.Wait()
	}
	l.held = append(l.held, r)
	l.mu.Unlock()
}

// unlock releases r, taken by lock.
func (l *rangeLock) unlock(r span.Range) {
	if r.Empty() {
		return
	}
	l.mu.Lock()
	for i, h := range l.held {
		if h == r {
			l.held[i] = l.held[len(l.held)-1]
			l.held = l.held[:len(l.held)-1]
			break
		}
	}
	l.mu.Unlock()
	l.cond.Broadcast()
}

func (l *rangeLock) overlaps(r span.Range) bool {
	for _, h := range l.held {
		if h.Overlaps(r) {
			return true
		}
	}
	return false
}
