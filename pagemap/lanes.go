package pagemap

import "math/bits"

// Helpers for dense arrays of 1- or 2-bit lanes: page i of a dense array
// lives in lane i%per of word i/per (per = 64/width), lane 0 in the low bits.
// They work a word at a time so that scanning, counting and filling cost one
// operation per 64 (or 32) pages. Values passed to them must fit in width.

// lowLanes2 holds the low bit of every 2-bit lane.
const lowLanes2 = 0x5555555555555555

// fillPattern returns a word whose every lane holds v.
func fillPattern(v uint8, width uint) uint64 {
	if width == 1 {
		return -uint64(v & 1)
	}
	return uint64(v) * lowLanes2
}

// laneMarks returns a word with the low bit of each non-zero lane of x set
// and every other bit clear.
func laneMarks(x uint64, width uint) uint64 {
	if width == 1 {
		return x
	}
	return (x | x>>1) & lowLanes2
}

// allMarks returns the mark bits (see laneMarks) of every lane.
func allMarks(width uint) uint64 {
	if width == 1 {
		return ^uint64(0)
	}
	return lowLanes2
}

// laneRange returns the bits of lanes [s, e) of a word, 0 <= s < e <= per.
func laneRange(s, e int, width uint) uint64 {
	m := ^uint64(0) << (uint(s) * width)
	if hi := uint(e) * width; hi < 64 {
		m &= 1<<hi - 1
	}
	return m
}

// denseWords returns the number of words a dense array of size lanes needs.
func denseWords(size int, width uint) int { return (size*int(width) + 63) / 64 }

// denseGet returns lane i.
func denseGet(w []uint64, width uint, i int) uint8 {
	bit := uint(i) * width
	return uint8(w[bit/64]>>(bit%64)) & (1<<width - 1)
}

// denseFill gives lanes [a, b) the value v.
func denseFill(w []uint64, width uint, a, b int, v uint8) {
	per := 64 / int(width)
	pat := fillPattern(v, width)
	for a < b {
		wi, s := a/per, a%per
		e := min(per, s+b-a)
		m := laneRange(s, e, width)
		w[wi] = w[wi]&^m | pat&m
		a += e - s
	}
}

// denseFind returns the first lane p in [from, to) whose value equals v
// (want) or differs from v (!want), or to if there is none.
func denseFind(w []uint64, width uint, from, to int, v uint8, want bool) int {
	per := 64 / int(width)
	pat := fillPattern(v, width)
	for from < to {
		wi, s := from/per, from%per
		e := min(per, s+to-from)
		hits := laneMarks(w[wi]^pat, width)
		if want {
			hits = ^hits & allMarks(width)
		}
		if hits &= laneRange(s, e, width); hits != 0 {
			return wi*per + bits.TrailingZeros64(hits)/int(width)
		}
		from += e - s
	}
	return to
}

// denseCount returns how many lanes of [a, b) hold v.
func denseCount(w []uint64, width uint, a, b int, v uint8) int {
	per := 64 / int(width)
	pat := fillPattern(v, width)
	n := 0
	for a < b {
		wi, s := a/per, a%per
		e := min(per, s+b-a)
		eq := ^laneMarks(w[wi]^pat, width) & allMarks(width)
		n += bits.OnesCount64(eq & laneRange(s, e, width))
		a += e - s
	}
	return n
}

// denseBoundaries returns how many lanes p in [a, b), a >= 1, differ from
// lane p-1: the number of runs of the array is that count over [1, size)
// plus one.
func denseBoundaries(w []uint64, width uint, a, b int) int {
	per := 64 / int(width)
	n := 0
	for a < b {
		wi, s := a/per, a%per
		e := min(per, s+b-a)
		x := w[wi]
		var prev uint64 // the last lane of the previous word, shifted into lane 0
		if wi > 0 {
			prev = w[wi-1] >> (64 - width)
		}
		d := x ^ (x<<width | prev)
		n += bits.OnesCount64(laneMarks(d, width) & laneRange(s, e, width))
		a += e - s
	}
	return n
}
