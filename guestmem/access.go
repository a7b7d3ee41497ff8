//go:build linux

package guestmem

import (
	"errors"
	"fmt"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// Errors of the accessors, wrapped in an *AccessError.
var (
	// ErrPrivate is a host access to a private page.
	ErrPrivate = errors.New("page is private")
	// ErrNoRAM is an access that reaches an MMIO hole or unbacked GPA.
	ErrNoRAM = errors.New("no RAM at address")
	// ErrAddress is an access whose address is negative or wraps.
	ErrAddress = errors.New("bad address")
)

// AccessError is a refused access. Nothing was read or written.
type AccessError struct {
	GPA   uint64 // first refused address
	Size  uint64 // bytes asked for
	Write bool
	Err   error
}

// Error implements error.
func (e *AccessError) Error() string {
	op := "read"
	if e.Write {
		op = "write"
	}
	return fmt.Sprintf("guestmem: %s of %#x bytes at GPA %#x: %v", op, e.Size, e.GPA, e.Err)
}

// Unwrap returns the reason.
func (e *AccessError) Unwrap() error { return e.Err }

// ReadAt reads len(p) bytes of guest memory at GPA off (io.ReaderAt). Every
// byte must be RAM in a plugged, shared page with host memory behind it;
// otherwise nothing is read and an *AccessError wrapping ErrPrivate,
// ErrUnplugged, ErrNoRAM, ErrNoHostMemory, ErrAddress or ErrClosed is
// returned. The pages cannot become private or unplugged while they are
// copied.
func (m *Memory) ReadAt(p []byte, off int64) (int, error) {
	return m.hostAccess(p, off, false)
}

// WriteAt writes p to guest memory at GPA off (io.WriterAt), under the same
// rules as ReadAt.
func (m *Memory) WriteAt(p []byte, off int64) (int, error) {
	return m.hostAccess(p, off, true)
}

// ramPieces returns the RAM pieces of [off, off+n), failing if any part is
// not RAM.
func (m *Memory) ramPieces(n int, off int64, write bool) ([]piece, error) {
	fail := func(gpa uint64, err error) ([]piece, error) {
		return nil, &AccessError{GPA: gpa, Size: uint64(n), Write: write, Err: err}
	}
	if off < 0 {
		return fail(uint64(off), fmt.Errorf("%w: negative offset %d", ErrAddress, off))
	}
	r, err := span.FromSize(uint64(off), uint64(n))
	if err != nil {
		return fail(uint64(off), fmt.Errorf("%w: %w", ErrAddress, err))
	}
	ps := m.split(r)
	for _, p := range ps {
		if p.b == nil {
			return fail(p.r.Start, fmt.Errorf("%w (%s)", ErrNoRAM, m.describe(p.r)))
		}
		if p.b.host == nil {
			return fail(p.r.Start, fmt.Errorf("%w (block %s)", ErrNoHostMemory, p.b.name))
		}
	}
	return ps, nil
}

func (m *Memory) hostAccess(p []byte, off int64, write bool) (int, error) {
	if err := m.enter(); err != nil {
		return 0, &AccessError{GPA: uint64(off), Size: uint64(len(p)), Write: write, Err: err}
	}
	defer m.exit()
	if len(p) == 0 {
		return 0, nil
	}
	ps, err := m.ramPieces(len(p), off, write)
	if err != nil {
		return 0, err
	}
	err = lockPieces(ps, true, func() {
		copyPieces(ps, p, uint64(off), write)
	})
	if err != nil {
		return 0, &AccessError{GPA: firstRefused(ps, err), Size: uint64(len(p)), Write: write, Err: err}
	}
	return len(p), nil
}

// lockPieces holds the pages of every piece against conversions and
// unplugs (a discard transaction on each, in ascending order), checks that
// they are all plugged and, if shared is set, shared, and runs fn with them
// held. Conversions take one block's range at a time, so holding several in
// ascending order cannot deadlock with them.
func lockPieces(ps []piece, shared bool, fn func()) error {
	if len(ps) == 0 {
		fn()
		return nil
	}
	p := ps[0]
	off := span.Range{Start: p.r.Start - p.b.gpa, End: p.r.End - p.b.gpa}
	lr, _ := off.Outward(PageSize) // inside the page-aligned block
	return p.b.mgr.Transact(lr, func(*discard.Tx) error {
		if p.b.unplugged(off) {
			return ErrUnplugged
		}
		if shared && !p.b.attrs.IsShared(off) {
			return ErrPrivate
		}
		return lockPieces(ps[1:], shared, fn)
	})
}

// firstRefused returns the first GPA of the pieces that err refers to: an
// unplugged page for ErrUnplugged, a private one otherwise.
func firstRefused(ps []piece, err error) uint64 {
	if errors.Is(err, ErrUnplugged) {
		for _, p := range ps {
			off := span.Range{Start: p.r.Start - p.b.gpa, End: p.r.End - p.b.gpa}
			for e := range p.b.extents(off) {
				if e.Kind == KindUnplugged {
					return max(e.GPA.Start, p.r.Start)
				}
			}
		}
		return ps[0].r.Start
	}
	for _, p := range ps {
		off := span.Range{Start: p.r.Start - p.b.gpa, End: p.r.End - p.b.gpa}
		at, found := uint64(0), false
		p.b.attrs.Runs(off, func(r span.Range, s memattr.State) {
			if !found && s == memattr.Private {
				at, found = max(r.Start, off.Start)+p.b.gpa, true
			}
		})
		if found {
			return at
		}
	}
	return ps[0].r.Start
}

// copyPieces copies between p (which starts at GPA base) and the blocks'
// memory.
func copyPieces(ps []piece, p []byte, base uint64, write bool) {
	for _, x := range ps {
		mem := x.b.host[x.r.Start-x.b.gpa : x.r.End-x.b.gpa]
		buf := p[x.r.Start-base : x.r.End-base]
		if write {
			copy(mem, buf)
		} else {
			copy(buf, mem)
		}
	}
}

// GuestView is guest memory as the guest itself reaches it: every RAM page,
// private ones included. It implements io.ReaderAt and io.WriterAt with GPA
// offsets. It is for writing the boot image before the guest runs and for
// software vCPUs that act for the guest; host code uses Memory.ReadAt and
// Memory.WriteAt. Where the kernel enforces the attributes (EnforceKVM,
// EnforceGuestMemfd) private pages are not reachable from the host (a split
// block's live in guest_memfd, an in-place block's mapping faults on them),
// so GuestView refuses them; it refuses unplugged pages always.
type GuestView struct{ m *Memory }

// Guest returns the guest's view of the memory.
func (m *Memory) Guest() GuestView { return GuestView{m} }

// ReadAt reads guest memory at GPA off.
func (g GuestView) ReadAt(p []byte, off int64) (int, error) { return g.access(p, off, false) }

// WriteAt writes guest memory at GPA off.
func (g GuestView) WriteAt(p []byte, off int64) (int, error) { return g.access(p, off, true) }

func (g GuestView) access(p []byte, off int64, write bool) (int, error) {
	if g.m == nil {
		// A zero GuestView, not made by Memory.Guest, has no memory.
		return 0, &AccessError{GPA: uint64(off), Size: uint64(len(p)), Write: write, Err: ErrClosed}
	}
	if err := g.m.enter(); err != nil {
		return 0, &AccessError{GPA: uint64(off), Size: uint64(len(p)), Write: write, Err: err}
	}
	defer g.m.exit()
	if len(p) == 0 {
		return 0, nil
	}
	ps, err := g.m.ramPieces(len(p), off, write)
	if err != nil {
		return 0, err
	}
	// With KVM's attributes a private page is not the host's to touch: a
	// split block's lives in guest_memfd, an in-place block's mapping faults.
	shared := g.m.enforcement.Kernel()
	if err := lockPieces(ps, shared, func() { copyPieces(ps, p, uint64(off), write) }); err != nil {
		return 0, &AccessError{GPA: firstRefused(ps, err), Size: uint64(len(p)), Write: write, Err: err}
	}
	return len(p), nil
}
