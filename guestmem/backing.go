//go:build linux

package guestmem

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/span"
)

// ErrNoHostMemory is a host access to a block whose backing has no host
// mapping (a ModelBacking).
var ErrNoHostMemory = errors.New("backing has no host memory")

// memfd is an anonymous shared-memory file (memfd_create): the shared side
// of a split block, and the stand-in for guest_memfd where there is no KVM.
type memfd struct {
	fd   int
	size uint64
}

// newMemfd creates a memfd of size bytes, close-on-exec.
func newMemfd(name string, size uint64) (*memfd, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("guestmem: memfd_create %s: %w", name, err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("guestmem: ftruncate memfd %s to %#x: %w", name, size, err)
	}
	return &memfd{fd: fd, size: size}, nil
}

// mmap maps the whole file shared and read-write.
func (f *memfd) mmap() ([]byte, error) {
	b, err := unix.Mmap(f.fd, 0, int(f.size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("guestmem: mmap memfd: %w", err)
	}
	return b, nil
}

// Punch frees [offset, offset+length). A mapping of the file then reads
// zeros there; punching a hole is what frees shmem pages (madvise
// MADV_DONTNEED on a shared mapping would only drop the mapping's PTEs).
func (f *memfd) Punch(offset, length uint64) error {
	if f.fd < 0 {
		return fmt.Errorf("guestmem: punch memfd: %w", ErrClosed)
	}
	if _, err := span.Checked(offset, length, PageSize, f.size); err != nil {
		return fmt.Errorf("guestmem: punch memfd at offset %#x: %w", offset, err)
	}
	if err := unix.Fallocate(f.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(offset), int64(length)); err != nil {
		return fmt.Errorf("guestmem: punch memfd at offset [%#x, +%#x): %w", offset, length, err)
	}
	return nil
}

// Close closes the file; mappings stay valid until unmapped.
func (f *memfd) Close() error {
	if f.fd < 0 {
		return nil
	}
	err := unix.Close(f.fd)
	f.fd = -1
	if err != nil {
		return fmt.Errorf("guestmem: close memfd: %w", err)
	}
	return nil
}

// puncher is a backing file: a guest_memfd or a memfd.
type puncher interface {
	Punch(offset, length uint64) error
	Close() error
}

var _ puncher = (*kvm.GuestMemfd)(nil)

// files is what the file-based backings share: the host mapping, the file
// behind it and, split, the private file. Close is safe to call twice and
// concurrently with Discard.
type files struct {
	size    uint64
	inPlace bool
	host    []byte
	shared  puncher
	private puncher // nil in place

	mu     sync.RWMutex
	closed bool
}

func (f *files) Size() uint64  { return f.size }
func (f *files) InPlace() bool { return f.inPlace }

// Discard punches [off, off+n) out of the side's file. An unknown side is
// ErrInvalid; a backing that is closed, or a zero value never made by its
// constructor, ErrClosed.
func (f *files) Discard(s Side, off, n uint64) error {
	if err := checkSide(s); err != nil {
		return err
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.closed || f.shared == nil {
		return fmt.Errorf("guestmem: discard %v side at offset %#x: %w", s, off, ErrClosed)
	}
	file := f.shared
	if s == PrivateSide && f.private != nil {
		file = f.private
	}
	return file.Punch(off, n)
}

// close unmaps the memory and closes the files, once.
func (f *files) close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return ErrClosed
	}
	f.closed = true
	var errs []error
	if f.host != nil {
		if err := unix.Munmap(f.host); err != nil {
			errs = append(errs, fmt.Errorf("guestmem: munmap: %w", err))
		}
		f.host = nil
	}
	for _, p := range []puncher{f.shared, f.private} {
		if p == nil {
			continue
		}
		if err := p.Close(); err != nil && !errors.Is(err, kvm.ErrClosed) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// MemfdBacking is memory in memfds only, for hosts without private memory
// (no /dev/kvm, or a VM type without guest_memfd): in place one memfd, split
// a memfd per side. The attributes then live in user space
// (EnforceUserSpace). It owns its files and mapping; Close releases them.
// Its methods are safe for concurrent use.
type MemfdBacking struct{ files }

// NewMemfdBacking creates a MemfdBacking of size bytes (a positive
// multiple of PageSize) laid out for mode; name labels the memfds in
// /proc/self/fd.
func NewMemfdBacking(name string, size uint64, mode Mode) (*MemfdBacking, error) {
	if err := checkBackingSize(size); err != nil {
		return nil, err
	}
	if err := checkMode(mode); err != nil {
		return nil, err
	}
	b := &MemfdBacking{files{size: size, inPlace: mode == InPlace}}
	ok := false
	defer func() {
		if !ok {
			b.close()
		}
	}()
	sh, err := newMemfd("gmem-"+name, size)
	if err != nil {
		return nil, err
	}
	b.shared = sh
	if b.host, err = sh.mmap(); err != nil {
		return nil, err
	}
	if mode == Split {
		pr, err := newMemfd("gmem-private-"+name, size)
		if err != nil {
			return nil, err
		}
		b.private = pr
	}
	ok = true
	return b, nil
}

// Host returns the shared memfd's mapping, nil after Close.
func (b *MemfdBacking) Host() []byte {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.host
}

// Close unmaps the memory and closes the memfds. A second Close returns
// ErrClosed.
func (b *MemfdBacking) Close() error { return b.close() }

// KVMBacking is memory for a VM with guest_memfd: in place one guest_memfd
// created with GUEST_MEMFD_FLAG_MMAP|GUEST_MEMFD_FLAG_INIT_SHARED whose
// mapping is the host view, split a guest_memfd for the private side and a
// memfd for the shared side. It owns its files and mapping (not the VM);
// Close releases them. Its methods are safe for concurrent use.
type KVMBacking struct {
	files
	gmem *kvm.GuestMemfd
}

var _ GuestMemfdBacking = (*KVMBacking)(nil)

// NewKVMBacking creates a KVMBacking of size bytes on vm (it does not bind
// a memslot: guestmem.New does, or the VMM); name labels the memfd.
func NewKVMBacking(vm MemslotBinder, name string, size uint64, mode Mode) (*KVMBacking, error) {
	if err := checkBackingSize(size); err != nil {
		return nil, err
	}
	if err := checkMode(mode); err != nil {
		return nil, err
	}
	if isNil(vm) {
		return nil, fmt.Errorf("%w: no VM to create a guest_memfd on", ErrLayout)
	}
	b := &KVMBacking{files: files{size: size, inPlace: mode == InPlace}}
	ok := false
	defer func() {
		if !ok {
			b.close()
		}
	}()
	var err error
	switch mode {
	case InPlace:
		flags := uint64(kvm.InPlaceFlags)
		if b.gmem, err = vm.CreateGuestMemfd(size, flags); err != nil {
			return nil, fmt.Errorf("guestmem: in-place memory needs an mmap-able, initially shared guest_memfd: %w", err)
		}
		b.shared = b.gmem
		if b.host, err = b.gmem.Mmap(0, size); err != nil {
			return nil, fmt.Errorf("guestmem: %w", err)
		}
	case Split:
		if b.gmem, err = vm.CreateGuestMemfd(size, 0); err != nil {
			return nil, fmt.Errorf("guestmem: %w", err)
		}
		b.private = b.gmem
		sh, err := newMemfd("gmem-"+name, size)
		if err != nil {
			return nil, err
		}
		b.shared = sh
		if b.host, err = sh.mmap(); err != nil {
			return nil, err
		}
	}
	ok = true
	return b, nil
}

// Host returns the host mapping (in place the guest_memfd's, split the
// memfd's), nil after Close.
func (b *KVMBacking) Host() []byte {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.host
}

// GuestMemfd returns the guest_memfd's descriptor (-1 after Close, and for
// a zero KVMBacking) and the block's offset in it (0).
func (b *KVMBacking) GuestMemfd() (int, uint64) {
	if b.gmem == nil {
		return -1, 0
	}
	return b.gmem.Fd(), 0
}

// Close unmaps the memory and closes the files. Memslots bound to the
// guest_memfd keep its memory alive until deleted. A second Close returns
// ErrClosed.
func (b *KVMBacking) Close() error { return b.close() }

// ModelBacking is a backing with no memory at all: for replaying the
// conversions of guests of any size (1 TiB to 64 TiB) where only the state,
// the attributes and the IOMMU mappings matter. Host is nil, so the host
// accessors answer ErrNoHostMemory and devices are attached without host
// memory (an iommu.Model then faults every DMA). Discard only counts. Its
// cost is independent of Size. Its methods are safe for concurrent use.
type ModelBacking struct {
	size                uint64
	inPlace             bool
	discards, discBytes atomic.Uint64
}

// NewModelBacking returns a ModelBacking of size bytes (a positive
// multiple of PageSize) laid out for mode.
func NewModelBacking(size uint64, mode Mode) (*ModelBacking, error) {
	if _, err := span.Checked(0, size, PageSize, ^uint64(0)); err != nil {
		return nil, fmt.Errorf("%w: model backing size %#x: %w", ErrLayout, size, err)
	}
	if err := checkMode(mode); err != nil {
		return nil, err
	}
	return &ModelBacking{size: size, inPlace: mode == InPlace}, nil
}

// Size returns the size in bytes.
func (b *ModelBacking) Size() uint64 { return b.size }

// InPlace reports whether it was made for InPlace.
func (b *ModelBacking) InPlace() bool { return b.inPlace }

// Host returns nil: there is no host memory.
func (b *ModelBacking) Host() []byte { return nil }

// Discard checks the side and the range and counts it.
func (b *ModelBacking) Discard(s Side, off, n uint64) error {
	if err := checkSide(s); err != nil {
		return err
	}
	if _, err := span.Checked(off, n, PageSize, b.size); err != nil {
		return fmt.Errorf("guestmem: discard %v side at offset %#x: %w", s, off, err)
	}
	b.discards.Add(1)
	b.discBytes.Add(n)
	return nil
}

// Discards returns the number of Discard calls and the bytes they named.
func (b *ModelBacking) Discards() (calls, bytes uint64) {
	return b.discards.Load(), b.discBytes.Load()
}

// checkBackingSize accepts sizes that can be mapped.
func checkBackingSize(size uint64) error {
	if _, err := span.Checked(0, size, PageSize, ^uint64(0)); err != nil {
		return fmt.Errorf("%w: backing size %#x: %w", ErrLayout, size, err)
	}
	if size > uint64(int(^uint(0)>>1)) {
		return fmt.Errorf("%w: backing size %#x too large to map", ErrLayout, size)
	}
	return nil
}

// checkMode accepts the two modes.
func checkMode(mode Mode) error {
	if mode != InPlace && mode != Split {
		return fmt.Errorf("%w: unknown mode %d", ErrLayout, mode)
	}
	return nil
}

// checkSide accepts the two sides.
func checkSide(s Side) error {
	if s != SharedSide && s != PrivateSide {
		return fmt.Errorf("guestmem: discard: %w: unknown side %d", ErrInvalid, s)
	}
	return nil
}

var _ AttributeBacking = (*KVMBacking)(nil)

// AttributeFile returns the guest_memfd, which keeps its own attributes on
// kernels with in-place conversion, and the block's offset in it (0); nil
// for a KVMBacking that NewKVMBacking did not make.
func (b *KVMBacking) AttributeFile() (AttributeFile, uint64) {
	if b.gmem == nil {
		return nil, 0
	}
	return b.gmem, 0
}
