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
package pagemap

import (
	"errors"
	"iter"

	"gmem/span"
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
