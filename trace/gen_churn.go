package trace

import (
	"fmt"
	"iter"
)

// Defaults of the churn generator.
const (
	DefaultChurnLive  = 1024
	DefaultChurnLarge = 25
)

// ChurnOptions sizes the churn generator.
type ChurnOptions struct {
	Common
	// Live is the most buffers outstanding at once; 0 means
	// DefaultChurnLive.
	Live int
	// Large is the percentage of 16 KiB buffers among the allocations, the
	// rest being 4 KiB; 0 means DefaultChurnLarge, and a negative value
	// means none. At most 100.
	Large int
}

// Churn generates steady allocate-convert-free churn of small DMA buffers,
// as a network or storage driver of a confidential guest does with its page
// pool once the guest runs: a buffer of 4 KiB or 16 KiB (naturally aligned,
// anywhere in RAM) is allocated and converted to shared, and some time later
// freed and converted back to private, exactly as it was shared. With fewer
// than Live buffers outstanding, allocating and freeing are equally likely.
// Common.Events counts the conversions.
func Churn(o ChurnOptions) (iter.Seq[Event], error) {
	c, err := o.Common.normalize(DefaultEvents)
	if err != nil {
		return nil, err
	}
	live, err := checkLive("live", o.Live, DefaultChurnLive)
	if err != nil {
		return nil, err
	}
	large := o.Large
	switch {
	case large == 0:
		large = DefaultChurnLarge
	case large < 0:
		large = 0
	case large > 100:
		return nil, fmt.Errorf("%w: large %d%% is above 100%%", ErrValue, large)
	}
	return func(yield func(Event) bool) {
		rng := newRand(c.Seed)
		e := &emitter{yield: yield, left: c.Events}
		if !e.setup(c.setup()...) {
			return
		}
		a := &arena{blocks: c.blocks()}
		sizeOf := func() uint64 {
			if rng.IntN(100) < large {
				return 16 << 10
			}
			return 4 << 10
		}
		for churn(rng, a, live, sizeOf, e, c.Platform) {
		}
	}, nil
}
