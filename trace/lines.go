package trace

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
)

// MaxLineLen is the longest line read in full. A longer JSON Lines line is an
// error; a longer QEMU log line is skipped unless it starts like a conversion
// event, in which case it is an error too.
const MaxLineLen = 64 << 10

// ParseError says what is wrong with one input line. It wraps one of
// ErrSyntax, ErrSchema or ErrValue.
type ParseError struct {
	Line int   // 1-based line number
	Err  error // what is wrong
}

// Error returns "line N: what is wrong".
func (e *ParseError) Error() string { return fmt.Sprintf("line %d: %v", e.Line, e.Err) }

// Unwrap returns the underlying error.
func (e *ParseError) Unwrap() error { return e.Err }

// ParseErrors is every error found in one input when Options.KeepGoing is
// set.
type ParseErrors []*ParseError

// Error lists the first few errors and how many there are.
func (es ParseErrors) Error() string {
	const show = 5
	var b bytes.Buffer
	for i, e := range es {
		if i == show {
			fmt.Fprintf(&b, "; and %d more", len(es)-show)
			break
		}
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(e.Error())
	}
	return b.String()
}

// Unwrap returns the errors, so that errors.Is and errors.As see each.
func (es ParseErrors) Unwrap() []error {
	out := make([]error, len(es))
	for i, e := range es {
		out[i] = e
	}
	return out
}

// lineReader splits input into lines of at most MaxLineLen bytes, counting
// them. Line terminators (\n, \r\n) are removed, and a UTF-8 byte order mark
// at the start of the input is ignored.
type lineReader struct {
	r    *bufio.Reader
	line int
}

func newLineReader(r io.Reader) *lineReader {
	return &lineReader{r: bufio.NewReaderSize(r, MaxLineLen)}
}

// next returns the next line. If the line is longer than MaxLineLen, long is
// true and text holds its first MaxLineLen bytes. text is valid until the
// next call. At the end of the input err is io.EOF.
func (lr *lineReader) next() (text []byte, long bool, err error) {
	b, err := lr.r.ReadSlice('\n')
	switch {
	case err == nil, errors.Is(err, io.EOF) && len(b) > 0:
		err = nil
	case errors.Is(err, bufio.ErrBufferFull):
		// Keep the head for the caller, drop the rest of the line.
		b = append([]byte(nil), b...)
		for {
			_, err = lr.r.ReadSlice('\n')
			if !errors.Is(err, bufio.ErrBufferFull) {
				break
			}
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, false, err
		}
		err = nil
		long = true
	default:
		return nil, false, err
	}
	lr.line++
	b = bytes.TrimSuffix(b, []byte("\n"))
	b = bytes.TrimSuffix(b, []byte("\r"))
	if lr.line == 1 {
		b = bytes.TrimPrefix(b, []byte("\xef\xbb\xbf"))
	}
	return b, long, nil
}

// comment reports whether b's first non-blank character is '#'.
func comment(b []byte) bool {
	return bytes.HasPrefix(bytes.TrimLeft(b, " \t"), []byte("#"))
}

// blank reports whether b holds only spaces and tabs.
func blank(b []byte) bool {
	return len(bytes.Trim(b, " \t")) == 0
}
