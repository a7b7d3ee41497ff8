package trace

import (
	"errors"
	"math"
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	good := []struct {
		in   string
		want uint64
	}{
		{"0", 0},
		{"4096", 4096},
		{"007", 7},
		{"0x0", 0},
		{"0x80000000", 0x80000000},
		{"0XFFFFFFFFFFFFFFFF", math.MaxUint64},
		{"0x00000000000000000001", 1},
		{"16GiB", 16 << 30},
		{"16gib", 16 << 30},
		{"16G", 16 << 30},
		{"2 MiB", 2 << 20},
		{"2\tMiB", 2 << 20},
		{"  4K  ", 4096},
		{"4kib", 4096},
		{"1B", 1},
		{"3TiB", 3 << 40},
		{"1PiB", 1 << 50},
		{"15EiB", 15 << 60},
		{"1.5KiB", 1536},
		{"0.5MiB", 512 << 10},
		{"1.0", 1},
		{"2.25GiB", 9 << 28},
		{"0.000", 0},
		{"18446744073709551615", math.MaxUint64},
		{"1.5EiB", 3 << 59},
		{"0.0009765625KiB", 1}, // 2^-10 KiB
	}
	for _, c := range good {
		got, err := ParseSize(c.in)
		if err != nil || got != c.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", c.in, got, err, c.want)
		}
	}
	bad := []struct {
		in, why string
	}{
		{"", "empty"},
		{"   ", "empty"},
		{"-1", "negative"},
		{"+1", "sign"},
		{"1.5", "whole number"},
		{"0.1KiB", "whole number"},
		{"1.", "after the point"},
		{".5GiB", "start with a digit"},
		{"16GB", "ambiguous"},
		{"16 kb", "ambiguous"},
		{"16 XiB", "unknown unit"},
		{"16GiBs", "unknown unit"},
		{"0x", "no digits"},
		{"0x1G", "no fraction or unit"},
		{"0x1.8", "no fraction or unit"},
		{"0x10000000000000000", "overflows"},
		{"18446744073709551616", "overflows"},
		{"16EiB", "overflows"},
		{"1e3", "unknown unit"}, // e means EiB in a size; 1e3 is not a size
		{"1_000", "unknown unit"},
		{strings.Repeat("1", 65), "longer than"},
	}
	for _, c := range bad {
		got, err := ParseSize(c.in)
		if err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error (%s)", c.in, got, c.why)
			continue
		}
		if !errors.Is(err, ErrValue) || !strings.Contains(err.Error(), c.why) {
			t.Errorf("ParseSize(%q) error %q: want ErrValue mentioning %q", c.in, err, c.why)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for _, c := range []struct {
		in   uint64
		want string
	}{
		{0, "0"},
		{1, "1"},
		{1536, "1536"},
		{4096, "4KiB"},
		{2 << 20, "2MiB"},
		{3 << 30, "3GiB"},
		{1 << 40, "1TiB"},
		{1 << 50, "1PiB"},
		{8 << 60, "8EiB"},
		{(1 << 30) + 4096, "1048580KiB"},
		{math.MaxUint64, "18446744073709551615"},
	} {
		if got := FormatSize(c.in); got != c.want {
			t.Errorf("FormatSize(%d) = %q, want %q", c.in, got, c.want)
		}
		if back, err := ParseSize(FormatSize(c.in)); err != nil || back != c.in {
			t.Errorf("ParseSize(FormatSize(%d)) = %d, %v", c.in, back, err)
		}
	}
}

func TestParseJSONNumber(t *testing.T) {
	for _, c := range []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"0", 0, true},
		{"4096", 4096, true},
		{"4.096e3", 4096, true},
		{"0.5E1", 5, true},
		{"1E+2", 100, true},
		{"100e-2", 1, true},
		{"0e999999999999999999999", 0, true},
		{"18446744073709551615", math.MaxUint64, true},
		{"1.5", 0, false},
		{"-1", 0, false},
		{"-0", 0, false},
		{"1e20", 0, false},
		{"18446744073709551616", 0, false},
		{"1e-1", 0, false},
		{"1e999999999999999999999", 0, false},
		{"1e-999999999999999999999", 0, false},
	} {
		got, err := parseJSONNumber(c.in)
		if c.ok != (err == nil) || got != c.want {
			t.Errorf("parseJSONNumber(%q) = %d, %v; want %d, ok %v", c.in, got, err, c.want, c.ok)
		}
	}
}

func TestParseEnums(t *testing.T) {
	for _, m := range []Mode{Split, InPlace} {
		if got, err := ParseMode(m.String()); err != nil || got != m {
			t.Errorf("ParseMode(%q) = %v, %v", m, got, err)
		}
	}
	for _, k := range []IOMMU{Type1, IOMMUFD} {
		if got, err := ParseIOMMU(k.String()); err != nil || got != k {
			t.Errorf("ParseIOMMU(%q) = %v, %v", k, got, err)
		}
	}
	for _, s := range []State{Shared, Private} {
		if got, err := ParseState(s.String()); err != nil || got != s {
			t.Errorf("ParseState(%q) = %v, %v", s, got, err)
		}
	}
	for _, p := range []Platform{TDX, SNP} {
		if got, err := ParsePlatform(p.String()); err != nil || got != p {
			t.Errorf("ParsePlatform(%q) = %v, %v", p, got, err)
		}
	}
	for _, s := range []string{"", "Split", "in-place", "TYPE1", "vfio", "SHARED", "tdx2"} {
		_, e1 := ParseMode(s)
		_, e2 := ParseIOMMU(s)
		_, e3 := ParseState(s)
		_, e4 := ParsePlatform(s)
		for _, err := range []error{e1, e2, e3, e4} {
			if !errors.Is(err, ErrValue) {
				t.Errorf("parsing %q: error %v, want ErrValue", s, err)
			}
		}
	}
}

// FuzzParseSize checks that ParseSize never panics, that what it accepts
// formats back to the same value, and that FormatSize output always parses.
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{
		"0", "4096", "0x80000000", "16GiB", "2 MiB", "1.5KiB", "0.1KiB", "-1", "16GB",
		"18446744073709551616", "1.5EiB", "0x", "1e3", " 4 k ",
	} {
		f.Add(s, uint64(0))
	}
	f.Add("", uint64(1<<30))
	f.Add("", uint64(math.MaxUint64))
	f.Fuzz(func(t *testing.T, s string, n uint64) {
		v, err := ParseSize(s)
		if err == nil {
			back, err := ParseSize(FormatSize(v))
			if err != nil || back != v {
				t.Fatalf("ParseSize(%q) = %d, but FormatSize gives %q which parses to %d, %v", s, v, FormatSize(v), back, err)
			}
		} else if !errors.Is(err, ErrValue) {
			t.Fatalf("ParseSize(%q) error %v does not wrap ErrValue", s, err)
		}
		back, err := ParseSize(FormatSize(n))
		if err != nil || back != n {
			t.Fatalf("FormatSize(%d) = %q parses to %d, %v", n, FormatSize(n), back, err)
		}
	})
}

// FuzzParseEnums checks that the enum parsers accept exactly their String
// forms.
func FuzzParseEnums(f *testing.F) {
	for _, s := range []string{"split", "inplace", "type1", "iommufd", "shared", "private", "tdx", "snp", "", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if m, err := ParseMode(s); err == nil && m.String() != s {
			t.Fatalf("ParseMode(%q) = %v", s, m)
		}
		if k, err := ParseIOMMU(s); err == nil && k.String() != s {
			t.Fatalf("ParseIOMMU(%q) = %v", s, k)
		}
		if st, err := ParseState(s); err == nil && st.String() != s {
			t.Fatalf("ParseState(%q) = %v", s, st)
		}
		if p, err := ParsePlatform(s); err == nil && p.String() != s {
			t.Fatalf("ParsePlatform(%q) = %v", s, p)
		}
	})
}
