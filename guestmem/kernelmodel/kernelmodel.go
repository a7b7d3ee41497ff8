//go:build linux

// Package kernelmodel is the kernel's side of in-place conversion as a model:
// a VM with private memory and guest_memfd files that keep their pages'
// attributes (KVM_SET_MEMORY_ATTRIBUTES2 on the file), with the rules of
// the guest_memfd in-place conversion series queued for Linux 7.4
// (reference/kernel-frontier.md §1). It stands in for a kernel that has
// them, which no machine gmem runs on has yet, in the randomized oracle
// tests, the fuzzers and replay.
//
// The rules it keeps:
//
//   - To private: refused whole, before any attribute changes, with
//     EAGAIN and error_offset = the first page still in use (a
//     *kvm.PinnedError), if any page of the range is pinned. Pins come from
//     Pinners: an IOMMU mapping the file's shared view (IOMMUPins, the pins
//     VFIO type1 and iommufd take for a mapping by address) and foreign pins
//     (Pin: io_uring fixed buffers, O_DIRECT in flight, a mapping gmem does
//     not manage).
//   - To shared: never refused.
//   - Contents: neither zeroed nor copied (as on KVM_X86_SW_PROTECTED_VM).
//   - EINVAL: flags other than 0, attributes other than 0 and PRIVATE, and
//     a size that is 0, unaligned, overflowing or past the end of the file.
//   - Host access: a file made with memory is a real shared mapping of a
//     memfd whose private pages are PROT_NONE, so a host access to one
//     faults as the kernel's SIGBUS would; Catch turns that fault into a
//     *HostFault. Pin refuses private pages (EFAULT), as the kernel's
//     get_user_pages does.
//   - The VM answers KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES with PRIVATE,
//     KVM_CAP_GUEST_MEMFD_FLAGS with MMAP|INIT_SHARED, and has no VM-wide
//     attributes (KVM_CAP_MEMORY_ATTRIBUTES 0, KVM_SET_MEMORY_ATTRIBUTES
//     ENOTTY), as a kernel with kvm.gmem_in_place_conversion=1.
//
// A GuestMemfd is an in-place guestmem.Backing and guestmem.AttributeBacking
// of its own (block offset = file offset), and a VM a guestmem.VM: a Memory
// made of them runs every in-place conversion through these rules.
package kernelmodel

import (
	"fmt"
	"slices"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/span"
)

const page = kvm.PageSize

// VM is a KVM_X86_SW_PROTECTED_VM on a kernel with in-place conversion on.
// It is safe for concurrent use.
type VM struct{}

// NewVM returns a model VM.
func NewVM() *VM { return &VM{} }

var _ guestmem.VM = (*VM)(nil)

// CheckExtension answers as a SW-protected VM of a kernel with in-place
// conversion: guest_memfd with MMAP|INIT_SHARED, per-guest_memfd PRIVATE,
// no VM-wide attributes. Other capabilities answer 0.
func (*VM) CheckExtension(c kvm.Cap) (int, error) {
	switch c {
	case kvm.CapGuestMemfd, kvm.CapUserMemory2, kvm.CapMemoryFaultInfo:
		return 1, nil
	case kvm.CapGuestMemfdFlags:
		return kvm.InPlaceFlags, nil
	case kvm.CapGuestMemfdMemoryAttributes:
		return kvm.MemoryAttributePrivate, nil
	case kvm.CapVMTypes:
		return 1<<kvm.VMTypeDefault | 1<<kvm.VMTypeSWProtected, nil
	}
	return 0, nil
}

// SetMemoryAttributes answers ENOTTY: with in-place conversion on, the
// VM-wide KVM_SET_MEMORY_ATTRIBUTES is gone.
func (*VM) SetMemoryAttributes(kvm.MemoryAttributes) error {
	return fmt.Errorf("kernelmodel: KVM_SET_MEMORY_ATTRIBUTES: %w", unix.ENOTTY)
}

// Stats counts what a GuestMemfd's KVM_SET_MEMORY_ATTRIBUTES2 answered.
type Stats struct {
	// Converted counts accepted calls, ToPrivate and ToShared the pages
	// whose attribute they changed.
	Converted, ToPrivate, ToShared uint64
	// Refused counts EAGAIN answers (a page in use), Invalid EINVAL ones.
	Refused, Invalid uint64
}

// GuestMemfd is a model guest_memfd created with MMAP|INIT_SHARED: every
// page starts shared. It is safe for concurrent use. Pinners are asked
// with the file's lock held and must not call back into it.
type GuestMemfd struct {
	size uint64

	mu      sync.Mutex
	private pagemap.Map // 1 = private, per page
	foreign map[uint64]int
	pinners []Pinner
	stats   Stats
	closed  bool

	memfd int    // -1 without memory
	mem   []byte // the shared mapping; nil without memory
}

var (
	_ guestmem.AttributeBacking = (*GuestMemfd)(nil)
	_ guestmem.AttributeFile    = (*GuestMemfd)(nil)
)

// NewGuestMemfd returns a model guest_memfd of size bytes (a positive
// multiple of the page size), every page shared. With memory it is backed by
// a memfd mapped shared (Host), at most a few GiB; without, it keeps only
// attributes and pins, at any size (for replays of 1 to 64 TiB guests), and
// Host is nil.
func NewGuestMemfd(size uint64, memory bool) (*GuestMemfd, error) {
	if _, err := span.Checked(0, size, page, ^uint64(0)); err != nil {
		return nil, fmt.Errorf("kernelmodel: guest_memfd size %#x: %w", size, err)
	}
	pm, err := pagemap.NewRuns(size/page, 1)
	if err != nil {
		return nil, err
	}
	g := &GuestMemfd{size: size, private: pm, foreign: map[uint64]int{}, memfd: -1}
	if !memory {
		return g, nil
	}
	if size > uint64(int(^uint(0)>>1)) {
		return nil, fmt.Errorf("kernelmodel: guest_memfd of %#x bytes is too large to map", size)
	}
	fd, err := unix.MemfdCreate("kernelmodel-gmem", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("kernelmodel: memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("kernelmodel: ftruncate: %w", err)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("kernelmodel: mmap: %w", err)
	}
	g.memfd, g.mem = fd, mem
	return g, nil
}

// Close unmaps the memory and closes the memfd.
func (g *GuestMemfd) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return fmt.Errorf("kernelmodel: guest_memfd: %w", guestmem.ErrClosed)
	}
	g.closed = true
	var err error
	if g.mem != nil {
		err = unix.Munmap(g.mem)
		g.mem = nil
		if cerr := unix.Close(g.memfd); err == nil {
			err = cerr
		}
	}
	return err
}

// Size returns the file's size.
func (g *GuestMemfd) Size() uint64 { return g.size }

// InPlace returns true: shared and private are states of the same page.
func (g *GuestMemfd) InPlace() bool { return true }

// Host returns the shared mapping (private pages fault), nil without
// memory.
func (g *GuestMemfd) Host() []byte { return g.mem }

// AttributeFile returns the file itself at offset 0.
func (g *GuestMemfd) AttributeFile() (guestmem.AttributeFile, uint64) { return g, 0 }

// Discard punches [off, off+n): the next access reads zeros. Attributes do
// not change, as for the kernel's punch.
func (g *GuestMemfd) Discard(_ guestmem.Side, off, n uint64) error {
	if _, err := span.Checked(off, n, page, g.size); err != nil {
		return fmt.Errorf("kernelmodel: punch: %w", err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return fmt.Errorf("kernelmodel: punch: %w", guestmem.ErrClosed)
	}
	if g.mem == nil {
		return nil
	}
	if err := unix.Fallocate(g.memfd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n)); err != nil {
		return fmt.Errorf("kernelmodel: punch [%#x, +%#x): %w", off, n, err)
	}
	return nil
}

// AddPinner adds a source of pins.
func (g *GuestMemfd) AddPinner(p Pinner) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.pinners = append(g.pinners, p)
}

// SetMemoryAttributes2 is KVM_SET_MEMORY_ATTRIBUTES2 under the rules of the
// package documentation.
func (g *GuestMemfd) SetMemoryAttributes2(a kvm.MemoryAttributes2) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	invalid := func(why string) error {
		g.stats.Invalid++
		return fmt.Errorf("kernelmodel: KVM_SET_MEMORY_ATTRIBUTES2(offset %#x, size %#x, attrs %#x): %s: %w",
			a.Offset, a.Size, a.Attributes, why, unix.EINVAL)
	}
	if g.closed {
		return fmt.Errorf("kernelmodel: KVM_SET_MEMORY_ATTRIBUTES2: %w", unix.EBADF)
	}
	if a.Flags != 0 {
		return invalid("flags")
	}
	if a.Attributes&^kvm.MemoryAttributePrivate != 0 {
		return invalid("attributes")
	}
	r, err := span.Checked(a.Offset, a.Size, page, g.size)
	if err != nil {
		return invalid(err.Error())
	}
	pages := span.Range{Start: r.Start / page, End: r.End / page}
	private := a.Attributes != 0
	from, to := uint8(1), uint8(0) // the attribute values, 1 private
	if private {
		// The kernel zaps the host's mappings first (so a plain mmap does
		// not count), then refuses if any page is still referenced.
		if off, ok := g.firstPinned(r); ok {
			g.stats.Refused++
			a.ErrorOffset = off
			return &kvm.PinnedError{Offset: off, Request: a}
		}
		from, to = 0, 1
	}
	n := g.private.Count(pages, from)
	if err := g.protect(pages, private); err != nil {
		return err
	}
	g.set(pages, to)
	g.stats.Converted++
	if private {
		g.stats.ToPrivate += n
	} else {
		g.stats.ToShared += n
	}
	return nil
}

// set writes the attribute of pages.
func (g *GuestMemfd) set(pages span.Range, v uint8) {
	if err := g.private.Set(pages, v); err != nil {
		panic(fmt.Sprintf("kernelmodel: attribute map rejected checked pages %v: %v", pages, err))
	}
}

// protect makes the host mapping of pages fault (private) or accessible.
func (g *GuestMemfd) protect(pages span.Range, private bool) error {
	if g.mem == nil {
		return nil
	}
	prot := unix.PROT_READ | unix.PROT_WRITE
	if private {
		prot = unix.PROT_NONE
	}
	if err := unix.Mprotect(g.mem[pages.Start*page:pages.End*page], prot); err != nil {
		return fmt.Errorf("kernelmodel: mprotect: %w", err)
	}
	return nil
}

// firstPinned returns the first page of r (file offsets) that a foreign
// pin or a Pinner holds.
func (g *GuestMemfd) firstPinned(r span.Range) (uint64, bool) {
	first, found := r.End, false
	for off := range g.foreign {
		if r.Contains(off) && off < first {
			first, found = off, true
		}
	}
	for _, p := range g.pinners {
		if off, ok := p.FirstPinned(span.Range{Start: r.Start, End: first}); ok && off < first {
			first, found = off, true
		}
	}
	return first, found
}

// Private reports whether every page r touches is private.
func (g *GuestMemfd) Private(r span.Range) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	pages := span.Range{Start: r.Start / page, End: (r.End + page - 1) / page}
	return g.private.Count(pages, 1) == pages.Len()
}

// PrivateRuns returns the private ranges (file offsets), ascending.
func (g *GuestMemfd) PrivateRuns() []span.Range {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []span.Range
	for run := range g.private.Runs(span.Range{End: g.private.Pages()}) {
		if run.Value == 1 {
			out = append(out, span.Range{Start: run.Start * page, End: run.End * page})
		}
	}
	return out
}

// Stats returns the counters.
func (g *GuestMemfd) Stats() Stats {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.stats
}

// Pin pins [off, off+n) as a foreign user would (io_uring fixed buffers,
// O_DIRECT, a DMA mapping gmem does not manage): each page stays pinned
// until unpin is called, and a conversion to private of a pinned page is
// refused. Like the kernel's get_user_pages on a private page, it fails
// with EFAULT (pinning nothing) if any page is private.
func (g *GuestMemfd) Pin(off, n uint64) (unpin func(), err error) {
	r, err := span.Checked(off, n, page, g.size)
	if err != nil {
		return nil, fmt.Errorf("kernelmodel: pin: %w", err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.private.Count(span.Range{Start: r.Start / page, End: r.End / page}, 1) != 0 {
		return nil, fmt.Errorf("kernelmodel: pin [%#x, +%#x): a page is private: %w", off, n, unix.EFAULT)
	}
	for o := r.Start; o < r.End; o += page {
		g.foreign[o]++
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			defer g.mu.Unlock()
			for o := r.Start; o < r.End; o += page {
				if g.foreign[o]--; g.foreign[o] == 0 {
					delete(g.foreign, o)
				}
			}
		})
	}, nil
}

// ForeignPins returns the pages (file offsets) a foreign user pins,
// ascending.
func (g *GuestMemfd) ForeignPins() []uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]uint64, 0, len(g.foreign))
	for off := range g.foreign {
		out = append(out, off)
	}
	slices.Sort(out)
	return out
}
