package memattr_test

import (
	"errors"
	"testing"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/pagemap"
)

// TestBitmapTooLarge: the baseline's bitmap of a 1 PiB region (32 GiB) is
// refused with a *pagemap.SizeError where the machine has less memory,
// rather than killing the process; runs take it.
func TestBitmapTooLarge(t *testing.T) {
	m := discard.New(1<<50, nil)
	if _, err := memattr.New(m, memattr.Config{}); err != nil {
		t.Fatalf("1 PiB in runs: %v", err)
	}
	if limit, _ := pagemap.BitmapLimit(); limit >= 32<<30 {
		t.Skipf("needs a machine with less than 32 GiB: this one has %s", pagemap.FormatBytes(limit))
	}
	_, err := memattr.New(discard.New(1<<50, nil), memattr.Config{Bitmap: true})
	var se *pagemap.SizeError
	if !errors.As(err, &se) || se.Bytes != 32<<30 {
		t.Errorf("1 PiB bitmap: %v, want a *pagemap.SizeError of 32 GiB", err)
	}
}
