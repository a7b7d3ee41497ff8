package pagemap

import (
	"errors"
	"math"
	"strings"
	"testing"
)

func TestBitmapBytes(t *testing.T) {
	for _, c := range []struct {
		pages uint64
		bits  uint
		want  uint64
	}{
		{0, 1, 0},
		{1, 1, 8},
		{64, 1, 8},
		{65, 1, 16},
		{32, 2, 8},
		{33, 2, 16},
		{1 << 28, 1, 32 << 20},               // 1 TiB of 4 KiB pages: 32 MiB
		{1 << 38, 1, 32 << 30},               // 1 PiB: 32 GiB
		{math.MaxUint64, 1, 1 << 61},         // 2^58 words
		{math.MaxUint64, 2, 1 << 62},         // 2^59 words
		{math.MaxUint64 / 2, 2, 1 << 61},     // no wrap of pages*bits
		{math.MaxUint64/2 + 1, 2, 1 << 61},   // 2^64 bits
		{math.MaxUint64/2 + 2, 2, 1<<61 + 8}, // one bit more
	} {
		if got := BitmapBytes(c.pages, c.bits); got != c.want {
			t.Errorf("BitmapBytes(%#x, %d) = %#x, want %#x", c.pages, c.bits, got, c.want)
		}
	}
}

// TestNewBitmapTooLarge: a bitmap larger than the machine's memory is a
// *SizeError matching ErrTooLarge, before anything is allocated (a 1 PiB
// guest's bitmap is 32 GiB; 2^62 pages need 2^59 bytes, which no machine
// has and which make would panic on). Without the check the first dies
// with "fatal error: runtime: out of memory" where the machine has less
// than 32 GiB, and the second panics.
func TestNewBitmapTooLarge(t *testing.T) {
	limit, name := BitmapLimit()
	if limit == 0 || name == "" {
		t.Fatalf("BitmapLimit() = %d, %q", limit, name)
	}
	cases := []uint64{1 << 62, math.MaxUint64}
	if limit < 32<<30 {
		cases = append(cases, 1<<38) // 1 PiB of 4 KiB pages
	} else {
		t.Logf("physical memory %s holds a 1 PiB bitmap: that case is left out", FormatBytes(limit))
	}
	for _, pages := range cases {
		for _, bits := range []uint{1, 2} {
			_, err := NewBitmap(pages, bits)
			var se *SizeError
			if !errors.Is(err, ErrTooLarge) || !errors.As(err, &se) {
				t.Errorf("NewBitmap(%#x, %d) = %v, want a *SizeError", pages, bits, err)
				continue
			}
			if se.Bytes != BitmapBytes(pages, bits) || se.Limit != limit || se.LimitName != name {
				t.Errorf("NewBitmap(%#x, %d): %+v", pages, bits, se)
			}
			if !strings.Contains(err.Error(), FormatBytes(se.Bytes)) {
				t.Errorf("message %q does not give the bytes", err)
			}
		}
	}
	if _, err := NewBitmap(1<<20, 1); err != nil {
		t.Errorf("a 128 KiB bitmap: %v", err)
	}
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[uint64]string{
		0:                 "0 B",
		1023:              "1023 B",
		1 << 10:           "1 KiB",
		3 << 19:           "1.5 MiB",
		32 << 30:          "32 GiB",
		1 << 50:           "1 PiB",
		math.MaxUint64:    "16 EiB",
		1<<30 + 1<<30/100: "1.01 GiB",
	} {
		if got := FormatBytes(n); got != want {
			t.Errorf("FormatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}
