package trace

import (
	"fmt"
	"math"
	"math/big"
	"strconv"
	"strings"
)

// maxNumberLen bounds the text of one number so that parsing costs a small
// constant whatever the input.
const maxNumberLen = 64

// unitMultiplier returns the multiplier of a lower-cased unit suffix. The
// units are binary: the IEC names (KiB, MiB, ...) and QEMU's single letters
// (K, M, G, as in -m 16G) mean powers of 1024. ambiguous reports suffixes
// refused because readers disagree on whether they mean powers of 1000 or
// of 1024.
func unitMultiplier(u string) (mult uint64, ambiguous bool) {
	switch u {
	case "", "b":
		return 1, false
	case "k", "kib":
		return 1 << 10, false
	case "m", "mib":
		return 1 << 20, false
	case "g", "gib":
		return 1 << 30, false
	case "t", "tib":
		return 1 << 40, false
	case "p", "pib":
		return 1 << 50, false
	case "e", "eib":
		return 1 << 60, false
	case "kb", "mb", "gb", "tb", "pb", "eb":
		return 0, true
	}
	return 0, false
}

// ParseSize parses a byte count or address as written in traces and on the
// command line:
//
//   - a decimal integer: "4096";
//   - a hexadecimal integer with a 0x prefix: "0x80000000" (no unit);
//   - a decimal number with a binary unit, optionally separated by spaces:
//     "16GiB", "2 MiB", "4K", "1.5GiB". Units are B, KiB, MiB, GiB, TiB, PiB,
//     EiB, or the single letters K, M, G, T, P, E with the same meaning, in
//     any case. KB, MB, GB... are refused as ambiguous.
//
// A fraction is accepted only where the result is a whole number of bytes
// ("1.5KiB" is 1536, "0.1KiB" is an error). Signs, negative numbers, values
// above 2^64-1 and texts longer than 64 bytes are errors wrapping ErrValue.
// Surrounding spaces are ignored.
func ParseSize(s string) (uint64, error) {
	t := strings.Trim(s, " \t")
	if t == "" {
		return 0, fmt.Errorf("%w: empty number", ErrValue)
	}
	if len(t) > maxNumberLen {
		return 0, fmt.Errorf("%w: number longer than %d bytes", ErrValue, maxNumberLen)
	}
	switch t[0] {
	case '-':
		return 0, fmt.Errorf("%w: %q is negative", ErrValue, t)
	case '+':
		return 0, fmt.Errorf("%w: %q: no sign allowed", ErrValue, t)
	}
	if len(t) > 1 && t[0] == '0' && (t[1] == 'x' || t[1] == 'X') {
		return parseHex(t)
	}
	i := 0
	for i < len(t) && isDigit(t[i]) {
		i++
	}
	intPart := t[:i]
	if intPart == "" {
		return 0, fmt.Errorf("%w: %q does not start with a digit", ErrValue, t)
	}
	var frac string
	if i < len(t) && t[i] == '.' {
		j := i + 1
		for j < len(t) && isDigit(t[j]) {
			j++
		}
		frac = t[i+1 : j]
		if frac == "" {
			return 0, fmt.Errorf("%w: %q: no digits after the point", ErrValue, t)
		}
		i = j
	}
	rest := strings.TrimLeft(t[i:], " \t")
	unit := strings.ToLower(rest)
	mult, amb := unitMultiplier(unit)
	if mult == 0 {
		if amb {
			return 0, fmt.Errorf("%w: %q: unit %q is ambiguous, write %siB for powers of 1024", ErrValue, t, rest, strings.ToUpper(rest[:1]))
		}
		return 0, fmt.Errorf("%w: %q: unknown unit %q (want B, KiB, MiB, GiB, TiB, PiB, EiB)", ErrValue, t, rest)
	}
	return exact(t, intPart+frac, -len(frac), mult)
}

// parseHex parses "0x" followed by hexadecimal digits and nothing else.
func parseHex(t string) (uint64, error) {
	digits := t[2:]
	if digits == "" {
		return 0, fmt.Errorf("%w: %q: no digits after 0x", ErrValue, t)
	}
	for i := 0; i < len(digits); i++ {
		if !isHexDigit(digits[i]) {
			return 0, fmt.Errorf("%w: %q: hexadecimal numbers take no fraction or unit", ErrValue, t)
		}
	}
	v, err := strconv.ParseUint(digits, 16, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: %q overflows 64 bits", ErrValue, t)
	}
	return v, nil
}

// exact returns digits × 10^exp × mult if that is a whole number that fits in
// a uint64. digits is a non-empty string of decimal digits, at most
// maxNumberLen long; text is the original number for messages.
func exact(text, digits string, exp int, mult uint64) (uint64, error) {
	digits = strings.TrimLeft(digits, "0")
	if digits == "" {
		return 0, nil
	}
	// Trailing zeros of the mantissa move into the exponent, so a value is
	// whole exactly when the remaining negative power of ten divides
	// mantissa × mult.
	n := len(digits)
	digits = strings.TrimRight(digits, "0")
	exp += n - len(digits)
	switch {
	case exp > 20:
		// digits is at least 1, so the value is at least 10^21 > 2^64.
		return 0, fmt.Errorf("%w: %q overflows 64 bits", ErrValue, text)
	case exp < -(maxNumberLen + 20):
		// mantissa × mult < 10^(maxNumberLen+19): no power of ten that large
		// divides it.
		return 0, fmt.Errorf("%w: %q is not a whole number of bytes", ErrValue, text)
	}
	m, ok := new(big.Int).SetString(digits, 10)
	if !ok {
		return 0, fmt.Errorf("%w: %q is not a number", ErrValue, text)
	}
	m.Mul(m, new(big.Int).SetUint64(mult))
	ten := big.NewInt(10)
	if exp >= 0 {
		m.Mul(m, new(big.Int).Exp(ten, big.NewInt(int64(exp)), nil))
	} else {
		var rem big.Int
		m.QuoRem(m, new(big.Int).Exp(ten, big.NewInt(int64(-exp)), nil), &rem)
		if rem.Sign() != 0 {
			return 0, fmt.Errorf("%w: %q is not a whole number of bytes", ErrValue, text)
		}
	}
	if !m.IsUint64() {
		return 0, fmt.Errorf("%w: %q overflows 64 bits", ErrValue, text)
	}
	return m.Uint64(), nil
}

// parseJSONNumber converts the text of a JSON number (grammar already checked
// by the scanner) to a uint64 if it is a whole, non-negative value that fits:
// 4096, 4.096e3 and 0.5e1 are accepted, 1.5 and -1 are not.
func parseJSONNumber(t string) (uint64, error) {
	if len(t) > maxNumberLen {
		return 0, fmt.Errorf("%w: number longer than %d bytes", ErrValue, maxNumberLen)
	}
	if strings.HasPrefix(t, "-") {
		return 0, fmt.Errorf("%w: %s is negative", ErrValue, t)
	}
	mant, expText, _ := strings.Cut(strings.ToLower(t), "e")
	intPart, frac, _ := strings.Cut(mant, ".")
	exp := 0
	if expText != "" {
		e, err := strconv.Atoi(expText)
		if err != nil {
			// Only a huge exponent fails here: the grammar is already valid.
			if strings.HasPrefix(expText, "-") {
				e = math.MinInt32
			} else {
				e = math.MaxInt32
			}
		}
		exp = max(min(e, math.MaxInt32), math.MinInt32)
	}
	return exact(t, intPart+frac, exp-len(frac), 1)
}

// parseCount parses a plain count (no unit) given as a JSON number or as a
// decimal or 0x-hexadecimal string.
func parseCount(v value) (uint64, error) {
	if v.kind == kindNumber {
		return parseJSONNumber(v.text)
	}
	t := strings.Trim(v.text, " \t")
	if len(t) > 1 && t[0] == '0' && (t[1] == 'x' || t[1] == 'X') {
		return parseHex(t)
	}
	for i := 0; i < len(t); i++ {
		if !isDigit(t[i]) {
			return 0, fmt.Errorf("%w: %q is not a whole decimal or 0x-hexadecimal count", ErrValue, v.text)
		}
	}
	if t == "" {
		return 0, fmt.Errorf("%w: empty number", ErrValue)
	}
	if len(t) > maxNumberLen {
		return 0, fmt.Errorf("%w: number longer than %d bytes", ErrValue, maxNumberLen)
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: %q overflows 64 bits", ErrValue, t)
	}
	return n, nil
}

// FormatSize writes n with the largest binary unit that divides it exactly
// ("16GiB", "4KiB", "1536", "0"); ParseSize reads it back.
func FormatSize(n uint64) string {
	for _, u := range [...]struct {
		shift uint
		name  string
	}{{60, "EiB"}, {50, "PiB"}, {40, "TiB"}, {30, "GiB"}, {20, "MiB"}, {10, "KiB"}} {
		if n != 0 && n&(1<<u.shift-1) == 0 {
			return strconv.FormatUint(n>>u.shift, 10) + u.name
		}
	}
	return strconv.FormatUint(n, 10)
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isHexDigit(c byte) bool {
	return isDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}
