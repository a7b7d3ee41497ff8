// Package span defines Range, a half-open interval of uint64 addresses, offsets
// or page indexes, with overflow-checked construction and alignment helpers.
//
// Every gmem package that takes ranges takes a Range (or an offset and a size
// that it turns into one with [FromSize]) so that wrap-around and alignment are
// checked in one place.
package span

import (
	"errors"
	"fmt"
	"math/bits"
)

// Range is the half-open interval [Start, End). A Range with End <= Start is
// empty. Ranges that reach the very last uint64 value cannot be expressed; no
// caller needs them (addresses and page counts stay far below 2^64).
type Range struct {
	Start, End uint64
}

// Errors returned by the constructors. They are wrapped with detail; test with
// errors.Is.
var (
	// ErrOverflow means start+size does not fit in a uint64.
	ErrOverflow = errors.New("range overflows uint64")
	// ErrEmpty means the size is zero where a non-empty range is required.
	ErrEmpty = errors.New("empty range")
	// ErrAlign means a start or size is not a multiple of the required alignment.
	ErrAlign = errors.New("range not aligned")
	// ErrBounds means the range does not lie inside the permitted bounds.
	ErrBounds = errors.New("range out of bounds")
)

// FromSize returns [start, start+size), or ErrOverflow if that wraps.
func FromSize(start, size uint64) (Range, error) {
	end, carry := bits.Add64(start, size, 0)
	if carry != 0 {
		return Range{}, fmt.Errorf("%w: start %#x size %#x", ErrOverflow, start, size)
	}
	return Range{start, end}, nil
}

// Checked validates start and size against the usual rules for a request:
// non-zero size, no overflow, start and size multiples of align (a power of
// two), and the result inside [0, limit). It returns the range or an error
// wrapping one of ErrEmpty, ErrOverflow, ErrAlign or ErrBounds.
func Checked(start, size, align, limit uint64) (Range, error) {
	if size == 0 {
		return Range{}, fmt.Errorf("%w: start %#x size 0", ErrEmpty, start)
	}
	r, err := FromSize(start, size)
	if err != nil {
		return Range{}, err
	}
	if align > 1 && (start|size)&(align-1) != 0 {
		return Range{}, fmt.Errorf("%w: start %#x size %#x, alignment %#x", ErrAlign, start, size, align)
	}
	if r.End > limit {
		return Range{}, fmt.Errorf("%w: [%#x, %#x) beyond %#x", ErrBounds, r.Start, r.End, limit)
	}
	return r, nil
}

// Len returns the number of units in r (0 if r is empty).
func (r Range) Len() uint64 {
	if r.End <= r.Start {
		return 0
	}
	return r.End - r.Start
}

// Empty reports whether r contains nothing.
func (r Range) Empty() bool { return r.End <= r.Start }

// Contains reports whether x lies in r.
func (r Range) Contains(x uint64) bool { return x >= r.Start && x < r.End }

// ContainsRange reports whether o lies entirely inside r. An empty o is
// contained in any r.
func (r Range) ContainsRange(o Range) bool {
	return o.Empty() || (o.Start >= r.Start && o.End <= r.End)
}

// Overlaps reports whether r and o share at least one unit.
func (r Range) Overlaps(o Range) bool {
	return !r.Empty() && !o.Empty() && r.Start < o.End && o.Start < r.End
}

// Intersect returns the common part of r and o; it is empty (and zero) if
// they do not overlap.
func (r Range) Intersect(o Range) Range {
	x := Range{max(r.Start, o.Start), min(r.End, o.End)}
	if x.Empty() {
		return Range{}
	}
	return x
}

// Shift returns r moved by delta units up. It reports false if that wraps.
func (r Range) Shift(delta uint64) (Range, bool) {
	s, c1 := bits.Add64(r.Start, delta, 0)
	e, c2 := bits.Add64(r.End, delta, 0)
	return Range{s, e}, c1 == 0 && c2 == 0
}

// Scale returns r with both ends multiplied by unit (e.g. pages to bytes). It
// reports false if that overflows.
func (r Range) Scale(unit uint64) (Range, bool) {
	hs, s := bits.Mul64(r.Start, unit)
	he, e := bits.Mul64(r.End, unit)
	return Range{s, e}, hs == 0 && he == 0
}

// Outward returns r with Start rounded down and End rounded up to multiples
// of align (a power of two). It reports false if End would wrap.
func (r Range) Outward(align uint64) (Range, bool) {
	if align <= 1 {
		return r, true
	}
	m := align - 1
	end, carry := bits.Add64(r.End, m, 0)
	return Range{r.Start &^ m, end &^ m}, carry == 0
}

// Inward returns r with Start rounded up and End rounded down to multiples of
// align (a power of two); the result may be empty.
func (r Range) Inward(align uint64) Range {
	if align <= 1 {
		return r
	}
	m := align - 1
	start, carry := bits.Add64(r.Start, m, 0)
	if carry != 0 {
		return Range{}
	}
	x := Range{start &^ m, r.End &^ m}
	if x.Empty() {
		return Range{}
	}
	return x
}

// Aligned reports whether both ends of r are multiples of align (a power of
// two).
func (r Range) Aligned(align uint64) bool {
	return align <= 1 || (r.Start|r.End)&(align-1) == 0
}

// String formats r as [start, end) in hexadecimal.
func (r Range) String() string { return fmt.Sprintf("[%#x, %#x)", r.Start, r.End) }

// PieceShift returns the smallest shift of at least minShift for which size
// (bytes or units) cut into pieces of 1<<shift makes at most n pieces (n at
// least 1): how a region is cut into a bounded number of contiguous parts,
// each a lock stripe or shard. A size of 0 is one piece at minShift.
func PieceShift(size, n uint64, minShift uint) uint {
	shift := minShift
	for shift < 63 && size > 0 && (size-1)>>shift >= n {
		shift++
	}
	return shift
}

// IsPowerOfTwo reports whether x is a power of two (x > 0).
func IsPowerOfTwo(x uint64) bool { return x != 0 && x&(x-1) == 0 }
