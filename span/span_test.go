package span

import (
	"errors"
	"math"
	"math/big"
	"testing"
)

func TestChecked(t *testing.T) {
	const max64 = math.MaxUint64
	tests := []struct {
		name                      string
		start, size, align, limit uint64
		want                      Range
		err                       error
	}{
		{"ok", 0x1000, 0x2000, 0x1000, 0x10000, Range{0x1000, 0x3000}, nil},
		{"up to the limit", 0xf000, 0x1000, 0x1000, 0x10000, Range{0xf000, 0x10000}, nil},
		{"no alignment", 3, 5, 1, 100, Range{3, 8}, nil},
		{"size 0", 0x1000, 0, 0x1000, 0x10000, Range{}, ErrEmpty},
		{"unaligned start", 0x1001, 0x1000, 0x1000, 0x10000, Range{}, ErrAlign},
		{"unaligned size", 0x1000, 0x800, 0x1000, 0x10000, Range{}, ErrAlign},
		{"past the limit", 0xf000, 0x2000, 0x1000, 0x10000, Range{}, ErrBounds},
		{"wraps", max64 - 0xfff, 0x2000, 0x1000, max64, Range{}, ErrOverflow},
		{"ends at 2^64", max64 - 0xfff, 0x1000, 0x1000, max64, Range{}, ErrOverflow},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Checked(tc.start, tc.size, tc.align, tc.limit)
			if !errors.Is(err, tc.err) || (tc.err == nil && err != nil) {
				t.Fatalf("Checked(%#x, %#x, %#x, %#x) error %v, want %v", tc.start, tc.size, tc.align, tc.limit, err, tc.err)
			}
			if got != tc.want {
				t.Fatalf("Checked = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestRangeOps(t *testing.T) {
	r := Range{0x1000, 0x3000}
	if r.Len() != 0x2000 || r.Empty() || !r.Contains(0x1000) || r.Contains(0x3000) {
		t.Fatalf("basic queries wrong for %v", r)
	}
	if (Range{5, 5}).Len() != 0 || !(Range{5, 5}).Empty() || (Range{6, 5}).Len() != 0 {
		t.Fatal("empty ranges misreported")
	}
	if got := r.Intersect(Range{0x2000, 0x4000}); got != (Range{0x2000, 0x3000}) {
		t.Fatalf("Intersect = %v", got)
	}
	if got := r.Intersect(Range{0x3000, 0x4000}); got != (Range{}) {
		t.Fatalf("Intersect of touching ranges = %v, want empty", got)
	}
	if r.Overlaps(Range{0x3000, 0x4000}) || !r.Overlaps(Range{0x2fff, 0x4000}) || r.Overlaps(Range{0x2000, 0x2000}) {
		t.Fatal("Overlaps wrong")
	}
	if !r.ContainsRange(Range{0x1000, 0x3000}) || r.ContainsRange(Range{0x1000, 0x3001}) || !r.ContainsRange(Range{9, 9}) {
		t.Fatal("ContainsRange wrong")
	}
	if got, ok := (Range{0x1001, 0x2001}).Outward(0x1000); !ok || got != (Range{0x1000, 0x3000}) {
		t.Fatalf("Outward = %v %v", got, ok)
	}
	if _, ok := (Range{0, math.MaxUint64}).Outward(0x1000); ok {
		t.Fatal("Outward past 2^64 reported ok")
	}
	if got := (Range{0x1001, 0x2fff}).Inward(0x1000); got != (Range{}) {
		t.Fatalf("Inward of a sub-page range = %v, want empty", got)
	}
	if got := (Range{0x1001, 0x4fff}).Inward(0x1000); got != (Range{0x2000, 0x4000}) {
		t.Fatalf("Inward = %v", got)
	}
	if got, ok := r.Shift(0x1000); !ok || got != (Range{0x2000, 0x4000}) {
		t.Fatalf("Shift = %v %v", got, ok)
	}
	if _, ok := r.Shift(math.MaxUint64); ok {
		t.Fatal("Shift that wraps reported ok")
	}
	if got, ok := (Range{1, 3}).Scale(4096); !ok || got != (Range{4096, 3 * 4096}) {
		t.Fatalf("Scale = %v %v", got, ok)
	}
	if _, ok := (Range{1, 1 << 60}).Scale(4096); ok {
		t.Fatal("Scale that overflows reported ok")
	}
	if !r.Aligned(0x1000) || (Range{0x1000, 0x1800}).Aligned(0x1000) {
		t.Fatal("Aligned wrong")
	}
	if IsPowerOfTwo(0) || !IsPowerOfTwo(1) || IsPowerOfTwo(6) || !IsPowerOfTwo(1<<63) {
		t.Fatal("IsPowerOfTwo wrong")
	}
	if r.String() != "[0x1000, 0x3000)" {
		t.Fatalf("String = %q", r.String())
	}
}

// FuzzChecked compares Checked, Outward and Inward with arbitrary-precision
// arithmetic.
func FuzzChecked(f *testing.F) {
	f.Add(uint64(0x1000), uint64(0x2000), uint8(12), uint64(0x10000))
	f.Add(uint64(math.MaxUint64-0xfff), uint64(0x1000), uint8(12), uint64(math.MaxUint64))
	f.Add(uint64(1), uint64(0), uint8(0), uint64(5))
	f.Fuzz(func(t *testing.T, start, size uint64, shift uint8, limit uint64) {
		align := uint64(1) << (shift % 64)
		r, err := Checked(start, size, align, limit)
		s, z, a, l := new(big.Int).SetUint64(start), new(big.Int).SetUint64(size), new(big.Int).SetUint64(align), new(big.Int).SetUint64(limit)
		end := new(big.Int).Add(s, z)
		var want error
		switch {
		case size == 0:
			want = ErrEmpty
		case !end.IsUint64():
			want = ErrOverflow
		case new(big.Int).Mod(s, a).Sign() != 0 || new(big.Int).Mod(z, a).Sign() != 0:
			want = ErrAlign
		case end.Cmp(l) > 0:
			want = ErrBounds
		}
		if !errors.Is(err, want) || (want == nil) != (err == nil) {
			t.Fatalf("Checked(%#x, %#x, %#x, %#x) = %v, want %v", start, size, align, limit, err, want)
		}
		if err == nil && (r.Start != start || r.Len() != size) {
			t.Fatalf("Checked returned %v", r)
		}
		x := Range{start, start + size}
		if !end.IsUint64() || x.Empty() {
			return
		}
		out, ok := x.Outward(align)
		upEnd := new(big.Int).Mul(new(big.Int).Div(new(big.Int).Add(end, new(big.Int).Sub(a, big.NewInt(1))), a), a)
		if ok != upEnd.IsUint64() {
			t.Fatalf("Outward(%v, %#x) ok=%v", x, align, ok)
		}
		if ok && (out.Start != start&^(align-1) || out.End != upEnd.Uint64() || !out.ContainsRange(x)) {
			t.Fatalf("Outward(%v, %#x) = %v", x, align, out)
		}
		in := x.Inward(align)
		if !in.Empty() && (!x.ContainsRange(in) || !in.Aligned(align)) {
			t.Fatalf("Inward(%v, %#x) = %v", x, align, in)
		}
	})
}

// TestPieceShift checks PieceShift against its definition: the smallest
// shift of at least the minimum whose pieces number at most n, found by
// counting pieces shift by shift.
func TestPieceShift(t *testing.T) {
	pieces := func(size uint64, shift uint) uint64 {
		if size == 0 {
			return 1
		}
		return (size-1)>>shift + 1
	}
	sizes := []uint64{0, 1, 4095, 4096, 4097, 1 << 30, 16 << 30, 16<<30 + 1, 64 << 40, 1<<63 + 5, ^uint64(0)}
	for _, size := range sizes {
		for _, n := range []uint64{1, 16, 64} {
			for _, minShift := range []uint{0, 16, 21, 26} {
				want := minShift
				for want < 63 && pieces(size, want) > n {
					want++
				}
				if got := PieceShift(size, n, minShift); got != want {
					t.Errorf("PieceShift(%#x, %d, %d) = %d, want %d", size, n, minShift, got, want)
				}
			}
		}
	}
	if got := PieceShift(16<<30, 64, 26); got != 28 {
		t.Errorf("a 16 GiB region in 64 pieces of at least 64 MiB: 2^%d, want 2^28", got)
	}
}
