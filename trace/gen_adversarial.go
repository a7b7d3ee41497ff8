package trace

import (
	"fmt"
	"iter"

	"github.com/gmemproject/gmem/span"
)

// DefaultAdversarialWindow is the default window of the adversarial
// generator: 131,072 pages, whose every other page alone is more mappings
// than type1's default limit of 65,535.
const DefaultAdversarialWindow = 512 << 20

// AdversarialOptions sizes the adversarial generator.
type AdversarialOptions struct {
	Common
	// Window is the size of the attacked range: a multiple of 8 KiB no
	// larger than the largest boot RAM block. 0 means
	// DefaultAdversarialWindow, or the largest block if smaller.
	Window uint64
}

// Adversarial generates the worst case for run-based state and extent
// mappings: a hostile or pathological guest converting alternating pages of
// a window (placed at a random 2 MiB boundary in the largest boot RAM
// block). Each cycle has five phases:
//
//  1. every other page to shared, one 4 KiB request each: the most runs and
//     the most DMA mappings the window can have;
//  2. the same pages back to private, one by one;
//  3. the whole window to shared (in the platform's pieces): a few large
//     mappings;
//  4. every other page to private, one by one: each request cuts a large
//     mapping, forcing a split (unmap, remap the remainder);
//  5. the whole window back to private.
//
// The next cycle uses the other parity. Common.Events counts the
// conversions; 0 means exactly one cycle.
func Adversarial(o AdversarialOptions) (iter.Seq[Event], error) {
	c, err := o.Common.normalize(1) // events fixed below
	if err != nil {
		return nil, err
	}
	var largest span.Range
	for _, b := range c.blocks() {
		if b.Len() > largest.Len() {
			largest = b
		}
	}
	w := o.Window
	if w == 0 {
		w = min(DefaultAdversarialWindow, largest.Len())
	}
	if w == 0 || w%(2*PageSize) != 0 || w > largest.Len() {
		return nil, fmt.Errorf("%w: window %s: want a multiple of 8KiB up to %s", ErrValue, FormatSize(w), FormatSize(largest.Len()))
	}
	if o.Events == 0 {
		pieces := 0
		requests(c.Platform, span.Range{Start: 0, End: w}, func(span.Range) bool { pieces++; return true })
		c.Events = 3*int(w/PageSize/2) + 2*pieces
	}
	return func(yield func(Event) bool) {
		rng := newRand(c.Seed)
		e := &emitter{yield: yield, left: c.Events}
		if !e.setup(c.setup()...) {
			return
		}
		// Place the window at a random 2 MiB boundary (or the block start
		// when it does not fit that way).
		start := largest.Start
		if slots := (largest.Len() - w) / hugePage2M; slots > 0 {
			start += rng.Uint64N(slots+1) * hugePage2M
		}
		win := span.Range{Start: start, End: start + w}
		alternate := func(parity uint64, to State) bool {
			for p := win.Start + parity*PageSize; p < win.End; p += 2 * PageSize {
				if !e.event(Convert{GPA: p, Size: PageSize, To: to}) {
					return false
				}
			}
			return true
		}
		for parity := uint64(0); ; parity ^= 1 {
			if !alternate(parity, Shared) ||
				!alternate(parity, Private) ||
				!e.convert(c.Platform, win, Shared, true) ||
				!alternate(parity, Private) ||
				!e.convert(c.Platform, win, Private, true) {
				return
			}
		}
	}, nil
}
