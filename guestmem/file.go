//go:build linux

package guestmem

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/span"
)

// file is a backing file of a block: a guest_memfd or a memfd. Both free
// pages with fallocate(PUNCH_HOLE|KEEP_SIZE); the next access gets a fresh
// zeroed page.
type file interface {
	Punch(offset, length uint64) error
	Close() error
}

var _ file = (*kvm.GuestMemfd)(nil)

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

// Mmap maps the whole file shared and read-write.
func (f *memfd) Mmap() ([]byte, error) {
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
		return fmt.Errorf("guestmem: punch memfd: %w", unix.EBADF)
	}
	if _, err := span.Checked(offset, length, PageSize, f.size); err != nil {
		return fmt.Errorf("guestmem: punch memfd: %w", err)
	}
	if err := unix.Fallocate(f.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(offset), int64(length)); err != nil {
		return fmt.Errorf("guestmem: punch memfd [%#x, +%#x): %w", offset, length, err)
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
