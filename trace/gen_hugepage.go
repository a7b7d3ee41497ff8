package trace

import (
	"fmt"
	"iter"
	"math/bits"

	"github.com/gmemproject/gmem/span"
)

// Defaults of the hugepage generator.
const (
	DefaultHugepageSize = 2 << 20
	DefaultHugepageLive = 64
)

// HugepageOptions sizes the hugepage generator.
type HugepageOptions struct {
	Common
	// Huge is the huge page size: a power of two from 2 MiB to 1 GiB; 0
	// means DefaultHugepageSize.
	Huge uint64
	// Live is the most huge ranges shared at once; 0 means
	// DefaultHugepageLive.
	Live int
}

// Hugepage generates partial conversions inside huge ranges. The guest
// shares a whole naturally aligned 2 MiB or 1 GiB range at once (an
// application's huge-page I/O buffer, a GPU driver's staging area), then
// hands pieces of it back to private and shares them again: a piece is 4 KiB
// to a quarter of the range, a power of two, naturally aligned. Eventually it
// returns the whole range to private. Each partial conversion to private cuts
// a mapping that covered more than the piece; each one to shared adds a small
// one next to big ones.
//
// A step shares a new range (weight 1, while fewer than Live are shared),
// converts a piece to private (weight 4) or to shared (weight 4), or returns
// a whole range (weight 1). Whole-range conversions reach the VMM in the
// platform's pieces. Common.Events counts the conversions.
func Hugepage(o HugepageOptions) (iter.Seq[Event], error) {
	c, err := o.Common.normalize(DefaultEvents)
	if err != nil {
		return nil, err
	}
	huge := o.Huge
	if huge == 0 {
		huge = DefaultHugepageSize
	}
	if !span.IsPowerOfTwo(huge) || huge < 2<<20 || huge > 1<<30 {
		return nil, fmt.Errorf("%w: huge page %s: want a power of two from 2MiB to 1GiB", ErrValue, FormatSize(huge))
	}
	fits := false
	for _, b := range c.blocks() {
		fits = fits || b.Inward(huge).Len() >= huge
	}
	if !fits {
		return nil, fmt.Errorf("%w: no %s-aligned %s range in %s of RAM", ErrValue, FormatSize(huge), FormatSize(huge), FormatSize(c.RAM))
	}
	live, err := checkLive("live", o.Live, DefaultHugepageLive)
	if err != nil {
		return nil, err
	}
	// Pieces are 4 KiB << k for k in [0, maxShift].
	maxShift := bits.TrailingZeros64(huge) - bits.TrailingZeros64(PageSize) - 2
	return func(yield func(Event) bool) {
		rng := newRand(c.Seed)
		e := &emitter{yield: yield, left: c.Events}
		if !e.setup(c.setup()...) {
			return
		}
		a := &arena{blocks: c.blocks()}
		for {
			n := len(a.live)
			w := rng.IntN(10)
			switch {
			case n == 0 || (w == 0 && n < live):
				r, ok := a.pick(rng, huge, huge, true)
				if !ok {
					if n == 0 {
						return
					}
					continue
				}
				if !e.convert(c.Platform, r, Shared, true) {
					return
				}
			case w <= 8:
				h := a.live[rng.IntN(n)]
				piece := uint64(PageSize) << rng.IntN(maxShift+1)
				start := h.Start + rng.Uint64N(huge/piece)*piece
				to := Private
				if w > 4 {
					to = Shared
				}
				if !e.event(Convert{GPA: start, Size: piece, To: to}) {
					return
				}
			default:
				if !e.convert(c.Platform, a.freeRandom(rng), Private, true) {
					return
				}
			}
		}
	}, nil
}
