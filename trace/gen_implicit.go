package trace

import (
	"fmt"
	"iter"

	"github.com/gmemproject/gmem/span"
)

// Defaults of the implicit generator.
const (
	DefaultImplicitRun  = 8
	DefaultImplicitLive = 4096
	maxImplicitRun      = 512 // pages: a 2 MiB buffer
)

// ImplicitOptions sizes the implicit generator.
type ImplicitOptions struct {
	Common
	// Run is the mean number of pages of a buffer, touched one page at a
	// time; at most 256. 0 means DefaultImplicitRun.
	Run int
	// Live is the most pages shared at once; 0 means DefaultImplicitLive.
	Live int
}

// Implicit generates implicit conversions, one 4 KiB page each, as KVM
// reports them with KVM_EXIT_MEMORY_FAULT (QEMU's kvm_memory_fault): the
// guest does not ask for a conversion but accesses a page with the other
// attribute (a shared access to a private page, or the reverse), and the VMM
// converts exactly the faulting page. Guests that rely on this (firmware, and
// guests of KVM_X86_SW_PROTECTED_VM) touch a buffer page after page, so the
// faults come in runs of adjacent pages: a buffer of 1 to 2*Run-1 pages
// (mean Run) at a random page of RAM faults to shared page by page, and when
// the guest later uses it as private again it faults back page by page, in
// the same order. At most Live pages are shared at once. Common.Events counts
// the conversions.
func Implicit(o ImplicitOptions) (iter.Seq[Event], error) {
	c, err := o.Common.normalize(DefaultEvents)
	if err != nil {
		return nil, err
	}
	run := o.Run
	switch {
	case run == 0:
		run = DefaultImplicitRun
	case run < 0 || run > maxImplicitRun/2:
		return nil, fmt.Errorf("%w: run %d not in [1, %d]", ErrValue, run, maxImplicitRun/2)
	}
	live, err := checkLive("live", o.Live, DefaultImplicitLive)
	if err != nil {
		return nil, err
	}
	return func(yield func(Event) bool) {
		rng := newRand(c.Seed)
		e := &emitter{yield: yield, left: c.Events}
		if !e.setup(c.setup()...) {
			return
		}
		a := &arena{blocks: c.blocks()}
		pages := 0 // shared now
		fault := func(r span.Range, to State) bool {
			for p := r.Start; p < r.End; p += PageSize {
				if !e.event(Convert{GPA: p, Size: PageSize, To: to}) {
					return false
				}
			}
			return true
		}
		for {
			n := 1 + rng.IntN(2*run-1)
			if len(a.live) == 0 || (pages+n <= live && rng.IntN(2) == 0) {
				if r, ok := a.pick(rng, uint64(n)*PageSize, PageSize, true); ok {
					pages += n
					if !fault(r, Shared) {
						return
					}
					continue
				}
				if len(a.live) == 0 {
					return
				}
			}
			r := a.freeRandom(rng)
			pages -= int(r.Len() / PageSize)
			if !fault(r, Private) {
				return
			}
		}
	}, nil
}
