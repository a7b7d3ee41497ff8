//go:build linux

package kvm

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
	"github.com/gmemproject/gmem/span"
)

// GuestMemfd is a guest_memfd file: guest memory that belongs to one VM,
// unevictable, with a size fixed at creation. It is used through mmap,
// fallocate and memslots; from Linux 7.4, with in-place conversion on, it
// also keeps its pages' attributes (SetMemoryAttributes2). Its methods are
// safe for concurrent use, Close included; after Close they return
// ErrClosed.
type GuestMemfd struct {
	fd    *fdio.FD
	size  uint64
	flags uint64
	// attrs is the VM's CapGuestMemfdMemoryAttributes when the file was
	// created; attrsKnown is false for an adopted file.
	attrs      uint64
	attrsKnown bool
}

// Fd returns the file descriptor, or -1 after Close; memslots take it in
// [UserspaceMemoryRegion2].GuestMemfd. The number is lent, not given:
// Close and the garbage collector (once the GuestMemfd is unreachable)
// close it, and it may then name another file. A memslot holds its own
// reference to the file once bound, so the number only has to stay valid
// during KVM_SET_USER_MEMORY_REGION2; where Close may race, bind inside
// Control.
func (g *GuestMemfd) Fd() int { return g.fd.Fd() }

// Control runs fn with the descriptor, which stays open until fn returns
// even if Close runs meanwhile (Close waits for fn); after Close it returns
// ErrClosed without running fn. fn must not Close the GuestMemfd.
func (g *GuestMemfd) Control(fn func(fd uintptr)) error { return g.fd.Control(fn) }

// Size returns the file's size in bytes.
func (g *GuestMemfd) Size() uint64 { return g.size }

// Flags returns the flags it was created with.
func (g *GuestMemfd) Flags() uint64 { return g.flags }

// Close closes the file, after waiting for the calls in flight. Memslots
// bound to it keep the memory alive; its mmaps stay valid until unmapped.
// A second Close returns ErrClosed.
func (g *GuestMemfd) Close() error { return closeFd(g.fd) }

// Mmap maps [offset, offset+length) of the file shared and read-write.
// It needs GuestMemfdFlagMmap (otherwise the kernel answers ENODEV). Without
// GuestMemfdFlagInitShared the pages are private and touching the mapping
// raises SIGBUS. offset and length must be multiples of [PageSize] inside the
// file. Release the mapping with [GuestMemfd.Munmap] or unix.Munmap.
func (g *GuestMemfd) Mmap(offset, length uint64) ([]byte, error) {
	if _, err := span.Checked(offset, length, PageSize, g.size); err != nil {
		return nil, fmt.Errorf("kvm: guest_memfd mmap: %w", err)
	}
	b, err := fdio.Call(g.fd, func(fd int) ([]byte, error) {
		return unix.Mmap(fd, int64(offset), int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	})
	if err == ErrClosed {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("kvm: guest_memfd mmap [%#x, +%#x): %w", offset, length, err)
	}
	return b, nil
}

// Munmap releases a mapping returned by Mmap.
func (g *GuestMemfd) Munmap(b []byte) error {
	if err := unix.Munmap(b); err != nil {
		return fmt.Errorf("kvm: guest_memfd munmap: %w", err)
	}
	return nil
}

// Punch discards [offset, offset+length) (fallocate with
// FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE): KVM unmaps the pages from every
// VM using them, the host mappings are zapped, and the next access from
// either side gets a fresh zeroed page. The kernel does not refuse pinned
// pages: a device that still has one mapped keeps writing to the orphaned
// page, so DMA mappings must be removed first. offset and length must be
// multiples of [PageSize] inside the file.
func (g *GuestMemfd) Punch(offset, length uint64) error {
	return g.fallocate("punch", unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, offset, length)
}

// Allocate allocates the pages of [offset, offset+length) ahead of use
// (fallocate with FALLOC_FL_KEEP_SIZE). Pages are zeroed on first use, not
// here. offset and length must be multiples of [PageSize] inside the file.
func (g *GuestMemfd) Allocate(offset, length uint64) error {
	return g.fallocate("allocate", unix.FALLOC_FL_KEEP_SIZE, offset, length)
}

func (g *GuestMemfd) fallocate(what string, mode uint32, offset, length uint64) error {
	if _, err := span.Checked(offset, length, PageSize, g.size); err != nil {
		return fmt.Errorf("kvm: guest_memfd %s: %w", what, err)
	}
	err := g.fd.Do(func(fd int) error { return unix.Fallocate(fd, mode, int64(offset), int64(length)) })
	if err == ErrClosed {
		return err
	}
	if err != nil {
		return fmt.Errorf("kvm: guest_memfd %s [%#x, +%#x): %w", what, offset, length, err)
	}
	return nil
}
