//go:build linux

// Package backingtest checks a guestmem.Backing against the contract
// guestmem relies on, the way testing/fstest checks an fs.FS: a VMM runs it
// against its own backing, gmem runs it against its own.
package backingtest

import (
	"bytes"
	"sync"
	"testing"

	"github.com/gmemproject/gmem/guestmem"
)

// New returns a fresh backing of size bytes laid out for mode; the test
// releases it in t.Cleanup if it needs releasing.
type New func(t *testing.T, size uint64, mode guestmem.Mode) guestmem.Backing

// Run checks backings made by newBacking in both modes:
//
//   - Size is the size asked for and InPlace matches the mode;
//   - Host is nil or exactly Size bytes, and the same mapping every call;
//   - Discard of the shared side zeroes that range of Host and nothing else;
//   - Discard of the private side leaves Host alone when split, and zeroes
//     it in place (one file);
//   - Discards of disjoint ranges may run concurrently;
//   - a GuestMemfdBacking names a descriptor and a page-aligned offset.
func Run(t *testing.T, newBacking New) {
	const page = guestmem.PageSize
	const size = 64 * page
	for _, mode := range []guestmem.Mode{guestmem.Split, guestmem.InPlace} {
		t.Run(mode.String(), func(t *testing.T) {
			b := newBacking(t, size, mode)
			if b.Size() != size {
				t.Fatalf("Size = %#x, want %#x", b.Size(), size)
			}
			if b.InPlace() != (mode == guestmem.InPlace) {
				t.Errorf("InPlace = %v in mode %v", b.InPlace(), mode)
			}
			if g, ok := b.(guestmem.GuestMemfdBacking); ok {
				if fd, off := g.GuestMemfd(); fd < 0 || off%page != 0 {
					t.Errorf("GuestMemfd = %d, %#x: want a descriptor and a page-aligned offset", fd, off)
				}
			}
			h := b.Host()
			if h == nil {
				// No host view: discards must still accept every page.
				for off := uint64(0); off < size; off += 8 * page {
					for _, s := range []guestmem.Side{guestmem.SharedSide, guestmem.PrivateSide} {
						if err := b.Discard(s, off, 8*page); err != nil {
							t.Errorf("Discard(%v, %#x) = %v", s, off, err)
						}
					}
				}
				return
			}
			if uint64(len(h)) != size {
				t.Fatalf("Host is %#x bytes, want %#x", len(h), size)
			}
			if h2 := b.Host(); &h2[0] != &h[0] || len(h2) != len(h) {
				t.Error("Host changed between calls")
			}
			fill := func() {
				for i := range h {
					h[i] = byte(i/page) + 1
				}
			}
			want := func(zero ...[2]uint64) []byte {
				w := make([]byte, size)
				for i := range w {
					w[i] = byte(uint64(i)/page) + 1
				}
				for _, z := range zero {
					clear(w[z[0]:z[1]])
				}
				return w
			}
			fill()
			if err := b.Discard(guestmem.SharedSide, 4*page, 2*page); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(h, want([2]uint64{4 * page, 6 * page})) {
				t.Error("Discard(shared, 4 pages, 2 pages) did not zero exactly that range of Host")
			}
			fill()
			if err := b.Discard(guestmem.PrivateSide, 8*page, page); err != nil {
				t.Fatal(err)
			}
			w := want()
			if mode == guestmem.InPlace {
				w = want([2]uint64{8 * page, 9 * page})
			}
			if !bytes.Equal(h, w) {
				if mode == guestmem.InPlace {
					t.Error("in place, Discard(private) did not zero the page in Host")
				} else {
					t.Error("split, Discard(private) changed Host")
				}
			}
			fill()
			var wg sync.WaitGroup
			for i := range uint64(8) {
				wg.Go(func() {
					if err := b.Discard(guestmem.SharedSide, (16+2*i)*page, page); err != nil {
						t.Error(err)
					}
				})
			}
			wg.Wait()
			var zs [][2]uint64
			for i := range uint64(8) {
				zs = append(zs, [2]uint64{(16 + 2*i) * page, (17 + 2*i) * page})
			}
			if !bytes.Equal(h, want(zs...)) {
				t.Error("concurrent discards of disjoint pages did not zero exactly those pages")
			}
		})
	}
}
