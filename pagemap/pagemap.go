// Package pagemap maps page indexes to small values (0..3) and answers
// questions about runs of equal values.
//
// Two implementations share the Map interface:
//
//   - Runs (the one gmem uses) stores the state as runs, switching a chunk of
//     pages to a dense 1- or 2-bit array only where runs would cost more: its
//     memory and the cost of iterating grow with the number of runs, not the
//     number of pages, and its worst case stays within the dense bound.
//   - Bitmap is the plain dense array QEMU uses (one bit per page for two
//     states). It is the baseline for benchmarks and an oracle for tests.
//
// A Map is not safe for concurrent use; its owner serialises access.
//
// # How Runs is laid out
//
// Pages are grouped in aligned chunks of 2^16 pages (the last chunk may be
// shorter). A chunk is the unit of representation, so that an offset inside
// it fits in 16 bits and its dense form is a fixed 8 KiB (1 bit) or 16 KiB
// (2 bits).
//
// The top level is an ordered index of segments whose boundaries fall on
// chunk boundaries. A segment is either uniform (one value over one or more
// whole chunks: no allocation beyond the index entry) or a chunk segment
// (exactly one chunk with its own representation). Adjacent uniform segments
// of equal value are always merged, and a chunk that becomes uniform is
// turned back into a uniform segment, so a region in a few states costs a
// few segments whatever its size. The one exception is the chunk a map last
// left uniform in runs form: it stays until another chunk is left so, because
// a page converted and converted back (the commonest edit) would otherwise
// cut and rejoin the index twice a round trip. The index is a treap with per-map random
// priorities: expected O(log S) search, insertion and removal for S
// segments, O(log S + k) range replacement by split and merge, and exactly
// one 48-byte node per segment, which keeps Bytes exact. (A B-tree would be
// shallower, but its nodes' capacities are not visible from outside, so its
// memory could only be estimated.)
//
// A chunk segment holds a chunk in one of two forms:
//
//   - runs: the start offset of every run (uint16) and, for 2-bit maps, each
//     run's value (uint8); a 1-bit map stores no values, since adjacent runs
//     differ and values therefore alternate. 2 or 3 bytes per run.
//   - dense: bits per page in []uint64, with the run count kept up to date.
//
// A chunk turns dense when its runs would allocate more than an eighth of the
// dense form (about 500 runs: past that an edit's search and slice
// move cost many times a dense write), and back to runs when they
// would take less than half of that; the gap keeps
// a pattern hovering near the limit from converting on every Set. Run slices
// shrink when a quarter full, so memory follows the number of runs down as
// well as up.
//
// # Costs of Runs
//
// With R runs, S <= 2R+1 segments and k the runs (or segments) an operation
// touches, Get, Set, Runs, Count, Next and NextNot cost O(log S + k), plus,
// inside one chunk, a search of its runs and a move of its run slices (at
// most 8 or 16 KiB) or a scan of its dense words (at most 1024 or 2048, and
// only where the chunk holds thousands of runs). The search starts at the
// run the offset would fall in if the chunk's runs were spread evenly and
// gallops from there: for scattered runs it reads one or two cache lines of
// starts, and it never costs more than about twice a binary search.
//
// Memory is a 128-byte header and a cache of recently edited chunks, which
// spares Get and Set the index search and, since an entry also holds the
// chunk's starts, a cold Get the wait for the chunk header before the starts
// (40 bytes an entry: 64 entries, or one per chunk for a map of fewer chunks,
// growing to at most two per chunk segment and at most 4,096), plus 48 bytes
// per segment, plus per chunk segment an 80-byte header and its slices, every
// capacity counted (Bytes is checked against the heap by a test). The worst
// case, every page its own run, is every chunk dense: bits per page plus 168
// bytes per chunk of 2^16 pages (its header, segment and hot cache entry),
// 2.1% over the bitmap.
//
// Measured with BenchmarkStateMemory for 1 TiB of 4 KiB pages, one bit per
// page (bitmap: 32 MiB): 1 GiB shared plus 50,000 scattered shared pages
// costs about 0.94 MiB (1/34 of the bitmap); alternating pages cost the
// bitmap's size plus 2.1%.
package pagemap

import (
	"errors"
	"iter"

	"github.com/gmemproject/gmem/span"
)

// Run is a maximal range of pages that all hold Value, clipped to the range
// that was asked about.
type Run struct {
	span.Range
	Value uint8
}

// ErrValue means a value does not fit in the map's bits per page.
var ErrValue = errors.New("pagemap: value out of range")

// Map is a page-state map over pages [0, Pages()). Every page starts at 0.
type Map interface {
	// Pages returns the number of pages the map covers.
	Pages() uint64
	// Bits returns the number of bits a value may use (1 or 2).
	Bits() uint
	// Get returns the value of page p. It panics if p >= Pages().
	Get(p uint64) uint8
	// Set gives every page of r the value v. It fails, changing nothing, if r
	// is empty, wraps or reaches past Pages() (errors wrapping span.ErrEmpty or
	// span.ErrBounds) or if v does not fit in Bits() (ErrValue).
	Set(r span.Range, v uint8) error
	// Runs yields the maximal runs of equal value inside r ∩ [0, Pages()), in
	// ascending order, each clipped to r. Adjacent yielded runs differ in value.
	// The map must not be changed during the iteration.
	Runs(r span.Range) iter.Seq[Run]
	// Count returns how many pages of r ∩ [0, Pages()) hold v.
	Count(r span.Range, v uint8) uint64
	// Next returns the first page p >= from, p < Pages(), whose value is v.
	Next(from uint64, v uint8) (uint64, bool)
	// NextNot returns the first page p >= from, p < Pages(), whose value is not v.
	NextNot(from uint64, v uint8) (uint64, bool)
	// Bytes returns the memory the map holds, in bytes, counting the capacity
	// of every allocation it owns.
	Bytes() uint64
}

// checkSet validates the arguments of Set for a map of the given size and
// value width.
func checkSet(r span.Range, v uint8, pages uint64, bits uint) error {
	if r.Empty() {
		return span.ErrEmpty
	}
	if r.End > pages {
		return span.ErrBounds
	}
	if v >= 1<<bits {
		return ErrValue
	}
	return nil
}

// checkBits validates a bits-per-page argument.
func checkBits(bits uint) error {
	if bits != 1 && bits != 2 {
		return errors.New("pagemap: bits per page must be 1 or 2")
	}
	return nil
}
