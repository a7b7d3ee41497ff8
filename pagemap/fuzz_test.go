package pagemap

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/gmemproject/gmem/span"
)

// fuzzOps decodes data into a map size, a width and up to 32 operations.
// Header: 3 bytes of size (up to 3 chunks, so that chunk boundaries and a
// partial last chunk occur), 1 byte of width. Then 8 bytes per operation:
// kind, 3 bytes of position, 3 bytes of length, value.
func fuzzOps(data []byte) (pages uint64, bits uint, ops []op, ok bool) {
	if len(data) < 4 {
		return 0, 0, nil, false
	}
	u24 := func(b []byte) uint64 { return uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 }
	pages = u24(data) % (3*chunkPages + 1)
	bits = 1 + uint(data[3]&1)
	data = data[4:]
	for len(data) >= 8 && len(ops) < 32 {
		kind, pos, n, v := data[0], u24(data[1:]), u24(data[4:]), data[7]
		data = data[8:]
		val := v & (1<<bits - 1)
		// Lengths are mostly short; the top bits of the kind byte scale them.
		n >>= (kind >> 3) % 24
		var x op
		switch kind % 8 {
		case 0, 1: // any range, valid or not
			x = op{kind: "range", r: span.Range{Start: pos, End: pos + n}, v: val}
		case 2:
			x = op{kind: "single", r: span.Range{Start: pos, End: pos + 1}, v: val}
		case 3:
			x = op{kind: "whole", r: span.Range{End: pages}, v: val}
		case 4: // around a chunk boundary
			b := (pos%3 + 1) * chunkPages
			x = op{kind: "straddle", r: span.Range{Start: b - min(b, n%512), End: b + (n>>9)%512}, v: val}
		case 5: // a stripe long enough to make a chunk dense
			if pages == 0 {
				continue
			}
			s := pos % pages
			fill := (val + 1) & (1<<bits - 1)
			x = op{kind: "stripe", r: span.Range{Start: s, End: min(pages, s+n%12000+1)}, v: val, stride: 2 + uint64(v>>6), fill: fill}
		case 6: // the raw value, which may not fit
			x = op{kind: "value", r: span.Range{Start: pos, End: pos + n%8 + 1}, v: v % 8}
		default: // the tail of the map
			s := pages - min(pages, n)
			x = op{kind: "tail", r: span.Range{Start: s, End: pages}, v: val}
		}
		ops = append(ops, x)
	}
	return pages, bits, ops, true
}

// FuzzPagemap applies decoded operations to a Runs and a Bitmap and checks
// both against the oracle after every operation.
func FuzzPagemap(f *testing.F) {
	seed := func(pages uint32, bits byte, ops ...[8]byte) []byte {
		b := []byte{byte(pages), byte(pages >> 8), byte(pages >> 16), bits - 1}
		for _, o := range ops {
			b = append(b, o[:]...)
		}
		return b
	}
	opb := func(kind byte, pos, n uint32, v byte) [8]byte {
		var b [8]byte
		b[0] = kind
		binary.LittleEndian.PutUint32(b[1:5], pos)
		b[4] = byte(n)
		b[5], b[6] = byte(n>>8), byte(n>>16)
		b[7] = v
		return b
	}
	f.Add(seed(3*chunkPages, 1, opb(4, 0, 100|100<<9, 1), opb(2, chunkPages, 0, 0), opb(3, 0, 0, 0)))
	f.Add(seed(3*chunkPages-7, 2, opb(5, chunkPages-300, 9000, 2), opb(0, chunkPages, 20000, 3), opb(7, 0, chunkPages+5, 1)))
	f.Add(seed(2*chunkPages+1, 1, opb(5, 10, 11000, 1), opb(1, 0, 2*chunkPages+1, 0), opb(5, chunkPages, 9000, 0)))
	f.Add(seed(100, 2, opb(6, 5, 3, 7), opb(0, 99, 2, 1), opb(0, 50, 0, 1), opb(2, 99, 0, 3)))
	f.Add(seed(0, 1, opb(0, 0, 1, 1), opb(3, 0, 0, 1)))
	f.Add(seed(chunkPages, 2, opb(5, 0, 11999, 1), opb(0, 100, 30000, 0), opb(0, 40000, 20000, 2)))
	f.Fuzz(func(t *testing.T, data []byte) {
		pages, bits, ops, ok := fuzzOps(data)
		if !ok {
			return
		}
		rm, err := NewRuns(pages, bits)
		if err != nil {
			t.Fatal(err)
		}
		bm, err := NewBitmap(pages, bits)
		if err != nil {
			t.Fatal(err)
		}
		// One model per map, so that each is compared with what was applied
		// to it; both models see the same operations.
		ro, bo := newOracle(pages, bits), newOracle(pages, bits)
		rng := rand.New(rand.NewPCG(uint64(len(data)), pages))
		for i, x := range ops {
			if err := apply(rm, ro, x); err != nil {
				t.Fatalf("op %d: runs: %v", i, err)
			}
			if err := apply(bm, bo, x); err != nil {
				t.Fatalf("op %d: bitmap: %v", i, err)
			}
			// Around the operation after each one; everything every few
			// operations and at the end, which keeps an input fast.
			points := []uint64{x.r.Start, x.r.End, x.r.Start - 1, x.r.End - 1}
			for _, mo := range []struct {
				m Map
				o *oracle
			}{{rm, ro}, {bm, bo}} {
				var err error
				if i%8 == 7 || i == len(ops)-1 {
					err = check(mo.m, mo.o, rng, points)
				} else {
					err = checkAround(mo.m, mo.o, points)
				}
				if err != nil {
					t.Fatalf("op %d (%v): %T: %v", i, x, mo.m, err)
				}
			}
		}
	})
}

// checkAround compares Get at the points and Runs over a window around each
// with the oracle.
func checkAround(m Map, o *oracle, points []uint64) error {
	for _, p := range points {
		if p < o.pages() {
			if got, want := m.Get(p), o.v[p]; got != want {
				return fmt.Errorf("Get(%#x) = %d, want %d", p, got, want)
			}
		}
		r := span.Range{Start: p - min(p, 70), End: p + 70}
		if got, want := collect(m, r), o.runs(r); !runsEqual(got, want) {
			return fmt.Errorf("Runs(%v) = %v, want %v", r, shorten(got), shorten(want))
		}
	}
	return nil
}
