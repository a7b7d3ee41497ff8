// The parts of a VMM that every program outside the module shares: its own
// KVM layer and its own split guest memory. runOutside copies this file
// next to each program's main.go, into the same package.
package main

import (
	"errors"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/kvm"
)

// fakeKVM is the VMM's own KVM layer: a fake with private memory that
// keeps the attributes, by page GPA.
type fakeKVM struct {
	mu      sync.Mutex
	private map[uint64]bool
}

func newFakeKVM() *fakeKVM { return &fakeKVM{private: map[uint64]bool{}} }

func (k *fakeKVM) CheckExtension(c kvm.Cap) (int, error) {
	if c == kvm.CapMemoryAttributes {
		return int(kvm.MemoryAttributePrivate), nil
	}
	return 0, nil
}

func (k *fakeKVM) SetMemoryAttributes(a kvm.MemoryAttributes) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	for g := a.Address; g < a.Address+a.Size; g += guestmem.PageSize {
		k.private[g] = a.Attributes&kvm.MemoryAttributePrivate != 0
	}
	return nil
}

// splitRAM is the VMM's own split memory for one block: two memfds, the
// shared one mapped.
type splitRAM struct {
	shared, private int
	host            []byte
}

// newSplitRAM creates the memfds name and name-private of size bytes and
// maps the first.
func newSplitRAM(name string, size int) (*splitRAM, error) {
	r := &splitRAM{shared: -1, private: -1}
	var err error
	if r.shared, err = unix.MemfdCreate(name, unix.MFD_CLOEXEC); err != nil {
		return nil, err
	}
	if r.private, err = unix.MemfdCreate(name+"-private", unix.MFD_CLOEXEC); err != nil {
		return nil, err
	}
	for _, fd := range []int{r.shared, r.private} {
		if err := unix.Ftruncate(fd, int64(size)); err != nil {
			return nil, err
		}
	}
	r.host, err = unix.Mmap(r.shared, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	return r, err
}

func (r *splitRAM) Size() uint64  { return uint64(len(r.host)) }
func (r *splitRAM) InPlace() bool { return false }
func (r *splitRAM) Host() []byte  { return r.host }
func (r *splitRAM) Discard(s guestmem.Side, off, n uint64) error {
	fd := r.shared
	if s == guestmem.PrivateSide {
		fd = r.private
	}
	return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
}

func (r *splitRAM) Close() error {
	return errors.Join(unix.Munmap(r.host), unix.Close(r.shared), unix.Close(r.private))
}
