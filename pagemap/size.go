package pagemap

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
)

// ErrTooLarge is a map the machine cannot hold: NewBitmap refuses to
// allocate it, rather than letting the allocation kill the process (Go's
// runtime answers an allocation the kernel refuses with a fatal error that
// no caller can recover from). Errors matching it are *SizeError.
var ErrTooLarge = errors.New("pagemap: too large for this machine")

// SizeError is a refused allocation: what it would need and the limit it
// exceeds. It matches ErrTooLarge.
type SizeError struct {
	// What names the allocation ("a bitmap of 268435456 pages").
	What string
	// Bytes is what it would need.
	Bytes uint64
	// Limit is what may be allocated, and LimitName where that comes from
	// ("physical memory", or a caller's cap).
	Limit     uint64
	LimitName string
}

// Error implements error.
func (e *SizeError) Error() string {
	return fmt.Sprintf("%v: %s needs %s, more than the %s of %s", ErrTooLarge, e.What, FormatBytes(e.Bytes), FormatBytes(e.Limit), e.LimitName)
}

// Unwrap returns ErrTooLarge.
func (e *SizeError) Unwrap() error { return ErrTooLarge }

// BitmapBytes returns the bytes a Bitmap of pages with bits (1 or 2) per
// page allocates: its words, 8 bytes each. It never overflows (at most
// 2^62 bytes).
func BitmapBytes(pages uint64, bitsPerPage uint) uint64 {
	hi, lo := bits.Mul64(pages, uint64(bitsPerPage))
	words := hi<<58 | lo>>6 // hi is at most 1
	if lo&63 != 0 {
		words++
	}
	return words * 8
}

// BitmapLimit returns the most bytes NewBitmap allocates for one bitmap:
// the machine's physical memory (PhysicalMemory), or, where that is not
// known, what a slice can address.
func BitmapLimit() (limit uint64, name string) {
	if m := PhysicalMemory(); m != 0 {
		return m, "physical memory"
	}
	return math.MaxInt &^ 7, "address space"
}

// FormatBytes formats n in binary units with up to two decimals ("32 GiB",
// "1.5 MiB", "512 B").
func FormatBytes(n uint64) string {
	const units = "KMGTPE"
	if n < 1<<10 {
		return fmt.Sprintf("%d B", n)
	}
	i, v := -1, float64(n)
	for v >= 1<<10 && i < len(units)-1 {
		v /= 1 << 10
		i++
	}
	s := fmt.Sprintf("%.2f", v)
	for s[len(s)-1] == '0' {
		s = s[:len(s)-1]
	}
	if s[len(s)-1] == '.' {
		s = s[:len(s)-1]
	}
	return s + " " + units[i:i+1] + "iB"
}
