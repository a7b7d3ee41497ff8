// Package memattr tracks whether each page of a guest memory region is shared
// with the host or private to a confidential guest (QEMU's
// RamBlockAttributes), and converts pages between the two as transactions.
//
// Attributes is a source of a discard.Manager: shared pages are populated,
// private ones discarded, so a DMA mapper listening on the manager maps
// exactly the shared pages. Every page is private at creation.
//
// A conversion validates its request before touching anything, changes only
// the runs that differ from the requested state (a same-state request is a
// no-op), notifies each listener once per changed run, and either completes
// every step or undoes the finished ones and returns the error. The order of
// the steps follows the memory's backing; see Config.InPlace.
//
// Conversions are safe from many goroutines at once; those on disjoint ranges
// run in parallel.
package memattr

import (
	"fmt"
	"sync/atomic"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/span"
)

// State is the state of a page.
type State uint8

const (
	// Private pages belong to the confidential guest: no device may reach
	// them and the host must not read them.
	Private State = iota
	// Shared pages are shared with the host and assigned devices.
	Shared
)

// String returns "private" or "shared".
func (s State) String() string {
	if s == Shared {
		return "shared"
	}
	return "private"
}

// Backend is the part of a conversion outside gmem's bookkeeping. The runs
// a method is given are valid only during the call.
type Backend interface {
	// SetAttributes makes runs (region byte offsets) private or shared where
	// the kernel keeps the state (KVM_SET_MEMORY_ATTRIBUTES, or a guest_memfd
	// conversion), all or nothing. A conversion undoes it by calling it again
	// with the opposite state.
	SetAttributes(runs []span.Range, to State) error
	// Release frees the backing the runs no longer use once the conversion
	// has succeeded: the shared memory of runs made private, the private
	// pages of runs made shared (nothing, for in-place memory).
	Release(runs []span.Range, to State) error
}

// Config configures Attributes. The zero Config is bookkeeping only, with
// 4 KiB pages and separate shared and private backings.
type Config struct {
	// PageSize is the conversion granularity in bytes (default 4096).
	PageSize uint64
	// Backend, if not nil, carries each conversion to the kernel.
	Backend Backend
	// InPlace says shared and private are the same physical page (one
	// mmap-able guest_memfd): to make pages private the listeners (DMA
	// unmap, unpin) are told before the kernel converts them, since the
	// kernel refuses to convert pinned pages. With separate backings the
	// kernel attributes change first in both directions.
	InPlace bool
	// Bitmap keeps the state in a dense bitmap, QEMU's representation,
	// instead of runs: the baseline for comparisons.
	Bitmap bool
}

// Stats counts conversions.
type Stats struct {
	Conversions  uint64 // Convert calls that changed something
	NoOps        uint64 // Convert calls with nothing to change
	Failures     uint64 // Convert calls that failed (nothing changed)
	ChangedRuns  uint64 // runs changed, i.e. listener notifications per listener
	ChangedBytes uint64 // bytes changed
}

// Attributes is the shared/private state of one region.
type Attributes struct {
	src   *discard.StateSource
	cfg   Config
	steps discard.Steps // what a conversion does outside the bookkeeping

	// countShift sizes the counter stripes: a conversion at offset counts
	// in stripe offset>>countShift, so each stripe covers one contiguous
	// sixteenth (or less) of the region.
	countShift uint
	// counts are the counters in stripes by offset, summed by Stats, so
	// that vCPUs converting distant pages do not write one cache line. The
	// padding before them keeps the first stripe off the line of the
	// fields above, which every conversion reads.
	_      [64]byte
	counts [countStripes]counters
}

// countStripes is the number of counter stripes. A stripe is a contiguous
// part of the region, not offsets modulo a size: vCPUs working in different
// parts of the region then never share a stripe, where a modulo would make
// every part meet every stripe.
const countStripes = 16

type counters struct {
	conversions, noops, failures, runs, bytes atomic.Uint64
	_                                         [64]byte // one stripe a cache line
}

// counters returns the stripe for a conversion at offset.
func (a *Attributes) counters(offset uint64) *counters {
	return &a.counts[min(offset>>a.countShift, countStripes-1)]
}

// New returns the attributes of the manager's region, every page private,
// and adds them to the manager as a source.
func New(m *discard.Manager, cfg Config) (*Attributes, error) {
	if cfg.PageSize == 0 {
		cfg.PageSize = 4096
	}
	if !span.IsPowerOfTwo(cfg.PageSize) {
		return nil, fmt.Errorf("memattr: page size %#x is not a power of two", cfg.PageSize)
	}
	if m.Size()%cfg.PageSize != 0 {
		return nil, fmt.Errorf("memattr: region size %#x is not a multiple of the page size %#x", m.Size(), cfg.PageSize)
	}
	var src *discard.StateSource
	if cfg.Bitmap {
		// The baseline: QEMU's one bitmap for the region.
		pm, err := pagemap.NewBitmap(m.Size()/cfg.PageSize, 1)
		if err != nil {
			return nil, err
		}
		if src, err = discard.NewStateSource(m, cfg.PageSize, pm); err != nil {
			return nil, err
		}
	} else {
		// Runs in parts, so conversions of distant pages (different vCPUs)
		// do not take turns at one map's lock.
		var err error
		src, err = discard.NewPartedStateSource(m, cfg.PageSize, func(pages uint64) (pagemap.Map, error) {
			return pagemap.NewRuns(pages, 1)
		})
		if err != nil {
			return nil, err
		}
	}
	if err := m.AddSource(src); err != nil {
		return nil, fmt.Errorf("memattr: %w", err)
	}
	a := &Attributes{src: src, cfg: cfg}
	// The steps are made once: closures made per conversion would each be
	// an allocation.
	a.steps.KernelAfterDiscard = cfg.InPlace
	if b := cfg.Backend; b != nil {
		a.steps.Kernel = func(runs []span.Range, populate bool) error {
			return b.SetAttributes(runs, stateOf(populate))
		}
		a.steps.Release = func(runs []span.Range, populate bool) error {
			return b.Release(runs, stateOf(populate))
		}
	}
	a.countShift = span.PieceShift(m.Size(), countStripes, 0)
	return a, nil
}

// Source returns the discard.Source the attributes added to the manager.
func (a *Attributes) Source() discard.Source { return a.src }

// PageSize returns the conversion granularity.
func (a *Attributes) PageSize() uint64 { return a.cfg.PageSize }

// Convert makes [offset, offset+size) of the region `to`. See the package
// documentation for the guarantees. Invalid requests (size 0, overflow,
// unaligned to the page size, outside the region) fail before anything is
// touched with errors wrapping span.ErrEmpty, span.ErrOverflow, span.ErrAlign
// or span.ErrBounds.
func (a *Attributes) Convert(offset, size uint64, to State) error {
	_, err := a.convert(offset, size, to, false)
	return err
}

// ConvertRuns is Convert, returning the runs that changed.
func (a *Attributes) ConvertRuns(offset, size uint64, to State) ([]span.Range, error) {
	return a.convert(offset, size, to, true)
}

// convert is Convert; with keep it returns the runs that changed (which
// costs their copy), without it nil.
func (a *Attributes) convert(offset, size uint64, to State, keep bool) ([]span.Range, error) {
	c := a.counters(offset)
	r, err := a.src.Check(offset, size)
	if err != nil {
		c.failures.Add(1)
		return nil, fmt.Errorf("memattr: convert to %v: %w", to, err)
	}
	var changed []span.Range
	var runs int
	var n uint64
	if keep {
		changed, err = a.src.Change(r, to == Shared, a.steps)
		runs = len(changed)
		for _, run := range changed {
			n += run.Len()
		}
	} else {
		runs, n, err = a.src.ChangeCount(r, to == Shared, a.steps)
	}
	if err != nil {
		c.failures.Add(1)
		return nil, fmt.Errorf("memattr: convert offset %v to %v: %w", r, to, err)
	}
	if runs == 0 {
		c.noops.Add(1)
		return nil, nil
	}
	c.conversions.Add(1)
	c.runs.Add(uint64(runs))
	c.bytes.Add(n)
	return changed, nil
}

func stateOf(populate bool) State {
	if populate {
		return Shared
	}
	return Private
}

// Get returns the state of the page holding byte offset off.
func (a *Attributes) Get(off uint64) State {
	return stateOf(a.src.Populated(span.Range{Start: off, End: off + 1}))
}

// IsShared reports whether every page r touches is shared. Host code checks
// this before it touches guest memory.
func (a *Attributes) IsShared(r span.Range) bool { return a.src.Populated(r) }

// IsPrivate reports whether every page r touches is private.
func (a *Attributes) IsPrivate(r span.Range) bool { return a.src.Discarded(r) }

// Runs calls fn for each maximal run of r (rounded out to pages) with its
// state, from one consistent snapshot. fn must not call a.
func (a *Attributes) Runs(r span.Range, fn func(run span.Range, s State)) {
	a.src.Runs(r, func(run span.Range, p bool) { fn(run, stateOf(p)) })
}

// SharedBytes returns how many bytes of the region are shared.
func (a *Attributes) SharedBytes() uint64 {
	return a.src.Count(span.Range{End: a.src.Size()})
}

// StateBytes returns the memory the state map holds.
func (a *Attributes) StateBytes() uint64 { return a.src.Bytes() }

// Stats returns the conversion counters.
func (a *Attributes) Stats() Stats {
	var s Stats
	for i := range a.counts {
		c := &a.counts[i]
		s.Conversions += c.conversions.Load()
		s.NoOps += c.noops.Load()
		s.Failures += c.failures.Load()
		s.ChangedRuns += c.runs.Load()
		s.ChangedBytes += c.bytes.Load()
	}
	return s
}
