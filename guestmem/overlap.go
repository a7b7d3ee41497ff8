//go:build linux

package guestmem

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"reflect"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/span"
)

// A backing shared by two blocks is a layout error: punching a page of one
// block (a conversion's Release, an unplug) would destroy the other's. What
// validate can tell, and how:
//
//   - one Backing value in two blocks (the same pointer);
//   - host mappings (Backing.Host) that overlap in the address space;
//   - host mappings of overlapping ranges of one file, through different
//     mappings: the file and offset of each mapping, from /proc/self/maps
//     (skipped if it cannot be read);
//   - guest_memfd ranges (GuestMemfdBacking.GuestMemfd) that overlap in one
//     file, by fstat, and a block's guest_memfd range that another block
//     maps as its host memory.
//
// What it cannot tell: the private side of a backing that is no
// GuestMemfdBacking (its Discard names a file guestmem never sees), and
// anonymous memory shared through other means than one mapping.

// fileView is a range of one file that a block's memory uses.
type fileView struct {
	block    string
	what     string // "host mapping" or "guest_memfd"
	dev, ino uint64 // the file: device (major<<32 | minor) and inode
	r        span.Range
}

// checkShared refuses blocks whose backings share memory, as far as it can
// tell (see above).
func checkShared(blocks []BlockConfig) error {
	type hostRange struct {
		block string
		r     span.Range
	}
	var hosts []hostRange
	var views []fileView
	for i, b := range blocks {
		bk := b.Backing
		if bk == nil {
			continue
		}
		if reflect.TypeOf(bk).Comparable() {
			for _, o := range blocks[:i] {
				if o.Backing != nil && reflect.TypeOf(o.Backing) == reflect.TypeOf(bk) && o.Backing == bk {
					return fmt.Errorf("%w: blocks %s and %s are given one backing (%T): punching a page of one would destroy the other's", ErrLayout, o.Name, b.Name, bk)
				}
			}
		}
		if h := bk.Host(); len(h) > 0 {
			a := kvm.HostAddr(h)
			hosts = append(hosts, hostRange{b.Name, span.Range{Start: a, End: a + uint64(len(h))}})
		}
		if gb, ok := bk.(GuestMemfdBacking); ok {
			fd, off := gb.GuestMemfd()
			var st unix.Stat_t
			if fd >= 0 && unix.Fstat(fd, &st) == nil {
				views = append(views, fileView{b.Name, "guest_memfd", devOf(uint64(unix.Major(st.Dev)), uint64(unix.Minor(st.Dev))), st.Ino, span.Range{Start: off, End: off + b.Size}})
			}
		}
	}
	for i, x := range hosts {
		for _, y := range hosts[:i] {
			if x.r.Overlaps(y.r) {
				return fmt.Errorf("%w: blocks %s and %s have overlapping host mappings %v and %v", ErrLayout, y.block, x.block, y.r, x.r)
			}
		}
	}
	if len(hosts) > 0 {
		if maps, err := os.ReadFile("/proc/self/maps"); err == nil {
			for _, h := range hosts {
				views = append(views, mappedFiles(maps, h.block, h.r)...)
			}
		}
	}
	for i, x := range views {
		for _, y := range views[:i] {
			if x.block != y.block && x.dev == y.dev && x.ino == y.ino && x.r.Overlaps(y.r) {
				return fmt.Errorf("%w: blocks %s and %s use one file (inode %d) at overlapping offsets: %s %v and %s %v", ErrLayout, y.block, x.block, x.ino, y.what, y.r, x.what, x.r)
			}
		}
	}
	return nil
}

func devOf(major, minor uint64) uint64 { return major<<32 | minor }

// mappedFiles returns the file ranges behind the address range r, from the
// text of /proc/self/maps ("start-end perms offset major:minor inode
// path", numbers in hex but the inode). Anonymous memory (inode 0) has no
// file and is left out.
func mappedFiles(maps []byte, block string, r span.Range) []fileView {
	var out []fileView
	sc := bufio.NewScanner(bytes.NewReader(maps))
	for sc.Scan() {
		f := bytes.Fields(sc.Bytes())
		if len(f) < 5 {
			continue
		}
		lo, hi, ok := bytes.Cut(f[0], []byte("-"))
		maj, min, ok2 := bytes.Cut(f[3], []byte(":"))
		if !ok || !ok2 {
			continue
		}
		start, err1 := strconv.ParseUint(string(lo), 16, 64)
		end, err2 := strconv.ParseUint(string(hi), 16, 64)
		off, err3 := strconv.ParseUint(string(f[2]), 16, 64)
		major, err4 := strconv.ParseUint(string(maj), 16, 64)
		minor, err5 := strconv.ParseUint(string(min), 16, 64)
		ino, err6 := strconv.ParseUint(string(f[4]), 10, 64)
		if err1 != nil || err2 != nil || err3 != nil || err4 != nil || err5 != nil || err6 != nil || ino == 0 {
			continue
		}
		x := span.Range{Start: start, End: end}.Intersect(r)
		if x.Empty() {
			continue
		}
		fr := span.Range{Start: off + (x.Start - start), End: off + (x.End - start)}
		out = append(out, fileView{block, "host mapping", devOf(major, minor), ino, fr})
	}
	return out
}
