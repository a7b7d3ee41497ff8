package pagemap

import (
	"fmt"
	"iter"
	"math/bits"

	"github.com/gmemproject/gmem/span"
)

// Bitmap is a dense Map: Bits() bits per page in a flat array, as QEMU keeps
// its RamBlockAttributes (one bit per 4 KiB page, 32 MiB per TiB). Runs scans
// the array word by word.
type Bitmap struct {
	pages uint64
	bits  uint
	words []uint64
}

var _ Map = (*Bitmap)(nil)

// NewBitmap returns a Bitmap of the given number of pages, every page 0, with
// bits (1 or 2) bits per page. It allocates BitmapBytes(pages, bits) at once,
// and refuses with a *SizeError (ErrTooLarge) a bitmap larger than
// BitmapLimit: the machine's physical memory. A bitmap is written wherever
// its pages change, so one larger than the memory cannot be held; and an
// allocation the kernel refuses is a fatal error in Go, not one a caller
// could handle.
func NewBitmap(pages uint64, bits uint) (*Bitmap, error) {
	if err := checkBits(bits); err != nil {
		return nil, err
	}
	n := BitmapBytes(pages, bits)
	if limit, name := BitmapLimit(); n > limit {
		return nil, &SizeError{What: fmt.Sprintf("a bitmap of %d pages, %d bits each,", pages, bits), Bytes: n, Limit: limit, LimitName: name}
	}
	return &Bitmap{pages: pages, bits: bits, words: make([]uint64, n/8)}, nil
}

// Pages implements Map.
func (b *Bitmap) Pages() uint64 { return b.pages }

// Bits implements Map.
func (b *Bitmap) Bits() uint { return b.bits }

// Bytes implements Map.
func (b *Bitmap) Bytes() uint64 { return uint64(cap(b.words)) * 8 }

// Get implements Map.
func (b *Bitmap) Get(p uint64) uint8 {
	if p >= b.pages {
		panic("pagemap: page out of range")
	}
	bit := p * uint64(b.bits)
	return uint8(b.words[bit/64]>>(bit%64)) & (1<<b.bits - 1)
}

// Set implements Map. A 1-bit map sets whole words where it can; a 2-bit map
// writes page by page.
func (b *Bitmap) Set(r span.Range, v uint8) error {
	if err := checkSet(r, v, b.pages, b.bits); err != nil {
		return err
	}
	if b.bits == 1 {
		fill := uint64(0)
		if v != 0 {
			fill = ^uint64(0)
		}
		for p := r.Start; p < r.End; {
			w, off := p/64, p%64
			n := min(64-off, r.End-p)
			mask := ^uint64(0)
			if n < 64 {
				mask = (uint64(1)<<n - 1) << off
			}
			b.words[w] = b.words[w]&^mask | fill&mask
			p += n
		}
		return nil
	}
	for p := r.Start; p < r.End; p++ {
		bit := p * 2
		w, off := bit/64, bit%64
		b.words[w] = b.words[w]&^(3<<off) | uint64(v)<<off
	}
	return nil
}

// Runs implements Map.
func (b *Bitmap) Runs(r span.Range) iter.Seq[Run] {
	return func(yield func(Run) bool) {
		r := r.Intersect(span.Range{End: b.pages})
		for p := r.Start; p < r.End; {
			v := b.Get(p)
			// Scan no further than r: a short r in a long uniform stretch
			// must not cost the whole stretch.
			end, ok := b.scan(p, r.End, v, false)
			if !ok {
				end = r.End
			}
			if !yield(Run{span.Range{Start: p, End: end}, v}) {
				return
			}
			p = end
		}
	}
}

// Count implements Map. It counts a word at a time.
func (b *Bitmap) Count(r span.Range, v uint8) uint64 {
	r = r.Intersect(span.Range{End: b.pages})
	if r.Empty() || v >= 1<<b.bits {
		return 0
	}
	per := 64 / uint64(b.bits)
	pattern := fillPattern(v, b.bits)
	var n uint64
	for p := r.Start; p < r.End; {
		w, s := p/per, p%per
		e := min(per, s+r.End-p)
		eq := ^laneMarks(b.words[w]^pattern, b.bits) & allMarks(b.bits)
		n += uint64(bits.OnesCount64(eq & laneRange(int(s), int(e), b.bits)))
		p += e - s
	}
	return n
}

// Next implements Map.
func (b *Bitmap) Next(from uint64, v uint8) (uint64, bool) { return b.scan(from, b.pages, v, true) }

// NextNot implements Map.
func (b *Bitmap) NextNot(from uint64, v uint8) (uint64, bool) {
	return b.scan(from, b.pages, v, false)
}

// scan finds the first page p, from <= p < limit <= Pages(), whose value
// equals v (want) or differs from v (!want), a word at a time.
func (b *Bitmap) scan(from, limit uint64, v uint8, want bool) (uint64, bool) {
	if from >= limit {
		return 0, false
	}
	if v >= 1<<b.bits {
		// No page holds v (and v would not fit in the lane pattern below).
		if want {
			return 0, false
		}
		return from, true
	}
	per := 64 / uint64(b.bits)
	pattern := fillPattern(v, b.bits)     // every lane holds v
	lowMask := uint64(0x5555555555555555) // low bit of each 2-bit lane
	for w := from / per; w <= (limit-1)/per; w++ {
		x := b.words[w] ^ pattern // lanes equal to v are 0
		var hits uint64
		if b.bits == 1 {
			hits = x
		} else {
			hits = (x | x>>1) & lowMask // one bit per differing lane
		}
		if want {
			if b.bits == 1 {
				hits = ^hits
			} else {
				hits = ^hits & lowMask
			}
		}
		if w == from/per {
			hits &= ^uint64(0) << ((from % per) * uint64(b.bits))
		}
		if hits != 0 {
			p := w*per + uint64(bits.TrailingZeros64(hits))/uint64(b.bits)
			if p >= limit {
				return 0, false
			}
			return p, true
		}
	}
	return 0, false
}
