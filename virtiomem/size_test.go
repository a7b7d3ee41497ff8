package virtiomem_test

import (
	"errors"
	"testing"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/virtiomem"
)

// TestBitmapTooLarge: a bitmap of 4 KiB plug blocks over 1 PiB (32 GiB) is
// refused with a *pagemap.SizeError where the machine has less memory,
// rather than killing the process.
func TestBitmapTooLarge(t *testing.T) {
	if limit, _ := pagemap.BitmapLimit(); limit >= 32<<30 {
		t.Skipf("needs a machine with less than 32 GiB: this one has %s", pagemap.FormatBytes(limit))
	}
	_, err := virtiomem.New(discard.New(1<<50, nil), virtiomem.Config{BlockSize: 4096, Bitmap: true})
	var se *pagemap.SizeError
	if !errors.As(err, &se) || se.Bytes != 32<<30 {
		t.Errorf("1 PiB bitmap of 4 KiB blocks: %v, want a *pagemap.SizeError of 32 GiB", err)
	}
}
