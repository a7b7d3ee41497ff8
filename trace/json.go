package trace

import (
	"fmt"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"
)

// The JSON Lines events are flat objects whose values are strings or numbers,
// so a small scanner reads them: it keeps keys exactly as written (the
// standard decoder matches field names case-insensitively and lets a repeated
// key win silently, both of which would hide mistakes in a hand-written
// trace), and it costs far less per line.

type valueKind uint8

const (
	kindString valueKind = iota + 1
	kindNumber
)

// value is a field's value: the decoded text of a string, or the literal
// text of a number.
type value struct {
	kind valueKind
	text string
}

type field struct {
	key string
	val value
}

// scanner walks one line.
type scanner struct {
	b   []byte
	pos int
}

// parseObject parses one JSON object whose values are strings or numbers.
// Anything else, including trailing text, is an error wrapping ErrSyntax or
// (for a value of another JSON type) ErrSchema.
func parseObject(b []byte) ([]field, error) {
	s := &scanner{b: b}
	s.space()
	if !s.eat('{') {
		return nil, s.errorf("want '{'")
	}
	var fields []field
	s.space()
	if s.eat('}') {
		return fields, s.end()
	}
	for {
		s.space()
		if s.peek() != '"' {
			return nil, s.errorf("want a field name in double quotes")
		}
		key, err := s.str()
		if err != nil {
			return nil, err
		}
		s.space()
		if !s.eat(':') {
			return nil, s.errorf("want ':' after field name %q", key)
		}
		s.space()
		var v value
		switch c := s.peek(); {
		case c == '"':
			text, err := s.str()
			if err != nil {
				return nil, err
			}
			v = value{kindString, text}
		case c == '-' || isDigit(c):
			text, err := s.number()
			if err != nil {
				return nil, err
			}
			v = value{kindNumber, text}
		case c == '{' || c == '[' || c == 't' || c == 'f' || c == 'n':
			return nil, fmt.Errorf("%w: field %q: want a string or a number", ErrSchema, key)
		default:
			return nil, s.errorf("want a value for field %q", key)
		}
		fields = append(fields, field{key, v})
		s.space()
		if s.eat(',') {
			continue
		}
		if s.eat('}') {
			return fields, s.end()
		}
		return nil, s.errorf("want ',' or '}'")
	}
}

func (s *scanner) end() error {
	s.space()
	if s.pos != len(s.b) {
		return s.errorf("text after the object")
	}
	return nil
}

func (s *scanner) errorf(format string, args ...any) error {
	what := "end of line"
	if s.pos < len(s.b) {
		r, _ := utf8.DecodeRune(s.b[s.pos:])
		what = strconv.QuoteRune(r)
	}
	return fmt.Errorf("%w: column %d (at %s): %s", ErrSyntax, s.pos+1, what, fmt.Sprintf(format, args...))
}

func (s *scanner) peek() byte {
	if s.pos < len(s.b) {
		return s.b[s.pos]
	}
	return 0
}

func (s *scanner) eat(c byte) bool {
	if s.peek() == c && s.pos < len(s.b) {
		s.pos++
		return true
	}
	return false
}

// space skips JSON whitespace.
func (s *scanner) space() {
	for s.pos < len(s.b) {
		switch s.b[s.pos] {
		case ' ', '\t', '\r', '\n':
			s.pos++
		default:
			return
		}
	}
}

// str reads a JSON string starting at the opening quote and returns its
// decoded text. Invalid UTF-8 and unescaped control characters are errors.
func (s *scanner) str() (string, error) {
	s.pos++ // opening quote
	start := s.pos
	// Fast path: no escapes.
	for s.pos < len(s.b) {
		c := s.b[s.pos]
		if c == '"' {
			raw := s.b[start:s.pos]
			if !utf8.Valid(raw) {
				return "", s.errorf("string is not valid UTF-8")
			}
			s.pos++
			return string(raw), nil
		}
		if c == '\\' {
			break
		}
		if c < 0x20 {
			return "", s.errorf("control character in string")
		}
		s.pos++
	}
	out := append([]byte(nil), s.b[start:s.pos]...)
	for {
		if s.pos >= len(s.b) {
			return "", s.errorf("unterminated string")
		}
		c := s.b[s.pos]
		switch {
		case c == '"':
			s.pos++
			if !utf8.Valid(out) {
				return "", s.errorf("string is not valid UTF-8")
			}
			return string(out), nil
		case c < 0x20:
			return "", s.errorf("control character in string")
		case c != '\\':
			out = append(out, c)
			s.pos++
			continue
		}
		s.pos++ // backslash
		if s.pos >= len(s.b) {
			return "", s.errorf("unterminated escape")
		}
		e := s.b[s.pos]
		s.pos++
		switch e {
		case '"', '\\', '/':
			out = append(out, e)
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			r, ok := s.hex4()
			if !ok {
				return "", s.errorf("bad \\u escape")
			}
			if utf16.IsSurrogate(r) {
				// A pair is two escapes; a lone half becomes U+FFFD, as the
				// standard decoder does.
				save := s.pos
				if s.eat('\\') && s.eat('u') {
					if r2, ok := s.hex4(); ok {
						if d := utf16.DecodeRune(r, r2); d != utf8.RuneError {
							out = utf8.AppendRune(out, d)
							continue
						}
					}
				}
				s.pos = save
				r = utf8.RuneError
			}
			out = utf8.AppendRune(out, r)
		default:
			s.pos--
			return "", s.errorf("unknown escape")
		}
	}
}

func (s *scanner) hex4() (rune, bool) {
	if s.pos+4 > len(s.b) {
		return 0, false
	}
	var r rune
	for _, c := range s.b[s.pos : s.pos+4] {
		var d byte
		switch {
		case isDigit(c):
			d = c - '0'
		case c >= 'a' && c <= 'f':
			d = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			d = c - 'A' + 10
		default:
			return 0, false
		}
		r = r<<4 | rune(d)
	}
	s.pos += 4
	return r, true
}

// number reads a JSON number and returns its text.
func (s *scanner) number() (string, error) {
	start := s.pos
	s.eat('-')
	switch c := s.peek(); {
	case c == '0':
		s.pos++
	case isDigit(c):
		for isDigit(s.peek()) {
			s.pos++
		}
	default:
		return "", s.errorf("bad number")
	}
	if s.eat('.') {
		if !isDigit(s.peek()) {
			return "", s.errorf("bad number: want digits after '.'")
		}
		for isDigit(s.peek()) {
			s.pos++
		}
	}
	if c := s.peek(); c == 'e' || c == 'E' {
		s.pos++
		if c := s.peek(); c == '+' || c == '-' {
			s.pos++
		}
		if !isDigit(s.peek()) {
			return "", s.errorf("bad number: want digits in the exponent")
		}
		for isDigit(s.peek()) {
			s.pos++
		}
	}
	return string(s.b[start:s.pos]), nil
}

// appendString appends s as a JSON string. Names are valid UTF-8 without
// control characters (Check ensures it), so only quote and backslash need
// escaping; the rest is escaped anyway to stay valid for any input.
func appendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			dst = append(dst, '\\', c)
			i++
		case c < 0x20 || c == 0x7f:
			dst = fmt.Appendf(dst, `\u%04x`, c)
			i++
		case c < utf8.RuneSelf:
			dst = append(dst, c)
			i++
		default:
			r, n := utf8.DecodeRuneInString(s[i:])
			if r == utf8.RuneError && n == 1 {
				dst = append(dst, `\ufffd`...)
			} else {
				dst = append(dst, s[i:i+n]...)
			}
			i += n
		}
	}
	return append(dst, '"')
}
