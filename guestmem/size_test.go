package guestmem_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/pagemap"
)

// modelBlock is a block of size bytes on a ModelBacking (no memory).
func modelBlock(t *testing.T, name string, gpa, size, hotplug uint64) guestmem.BlockConfig {
	t.Helper()
	bk, err := guestmem.NewModelBacking(size, guestmem.Split)
	if err != nil {
		t.Fatal(err)
	}
	return guestmem.BlockConfig{Name: name, GPA: gpa, Size: size, Backing: bk, Hotplug: hotplug}
}

// TestBitmapTooLarge: with Config.Bitmap, a memory whose bitmaps exceed
// the cap (or the machine's memory) is refused with a *pagemap.SizeError
// giving the bytes, by Validate and New, before anything is allocated.
// Without the check New of a 1 PiB block dies with "fatal error: runtime:
// out of memory" on a machine with less than 32 GiB.
func TestBitmapTooLarge(t *testing.T) {
	const tib = 1 << 40
	blocks := []guestmem.BlockConfig{
		modelBlock(t, "lo", 0, 2*tib, 0),
		modelBlock(t, "hot", 4*tib, 1*tib, 2*mib),
	}
	// 3 TiB of 4 KiB pages: 96 MiB; 512 Ki plug blocks: 64 KiB.
	need := uint64(96*mib + 64*kib)
	if got := guestmem.BitmapBytes(blocks); got != need {
		t.Fatalf("BitmapBytes = %d, want %d", got, need)
	}
	cfg := guestmem.Config{Blocks: blocks, Bitmap: true, MaxBitmapBytes: need - 1}
	for name, err := range map[string]error{"Validate": cfg.Validate(), "New": newErr(cfg)} {
		var se *pagemap.SizeError
		if !errors.Is(err, guestmem.ErrTooLarge) || !errors.As(err, &se) {
			t.Errorf("%s: %v, want a *pagemap.SizeError", name, err)
			continue
		}
		if se.Bytes != need || se.Limit != need-1 || se.LimitName != "Config.MaxBitmapBytes" {
			t.Errorf("%s: %+v", name, se)
		}
		if msg := err.Error(); !strings.Contains(msg, "3 TiB of RAM") || !strings.Contains(msg, "96.06 MiB") {
			t.Errorf("%s: message %q does not say what and how much", name, msg)
		}
		if errors.Is(err, guestmem.ErrLayout) {
			t.Errorf("%s: %v is a layout error; the layout is fine", name, err)
		}
	}
	// At the cap it fits; runs need no cap at all.
	cfg.MaxBitmapBytes = need
	for _, c := range []guestmem.Config{cfg, {Blocks: blocks}} {
		mem, err := guestmem.New(c)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := mem.Convert(guestmem.Request{GPA: 4 * tib, Size: page, To: memattr.Shared}); !errors.Is(err, guestmem.ErrUnplugged) {
			t.Errorf("convert unplugged: %v", err)
		}
		mem.Close()
	}
}

func newErr(cfg guestmem.Config) error {
	mem, err := guestmem.New(cfg)
	if err == nil {
		mem.Close()
	}
	return err
}

// TestBitmapPebibyte is the trial's case: a 1 PiB block with Config.Bitmap
// and no cap. Its bitmap is 32 GiB: refused where the machine has less.
// Without a bitmap, 1 PiB is fine.
func TestBitmapPebibyte(t *testing.T) {
	blocks := []guestmem.BlockConfig{modelBlock(t, "ram", 0, 1<<50, 0)}
	mem, err := guestmem.New(guestmem.Config{Blocks: blocks})
	if err != nil {
		t.Fatalf("1 PiB in runs: %v", err)
	}
	mem.Close()
	if limit, _ := pagemap.BitmapLimit(); limit >= 32<<30 {
		t.Skipf("needs a machine with less than 32 GiB: this one has %s and can hold the bitmap", pagemap.FormatBytes(limit))
	}
	_, err = guestmem.New(guestmem.Config{Blocks: blocks, Bitmap: true})
	var se *pagemap.SizeError
	if !errors.As(err, &se) || se.Bytes != 32<<30 || se.LimitName != "physical memory" {
		t.Errorf("1 PiB with a bitmap: %v, want a *pagemap.SizeError of 32 GiB against physical memory", err)
	}
	t.Log(err)
}
