package guestmem_test

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/guestmem/backingtest"
	"github.com/gmemproject/gmem/internal/kvmtest"
)

func TestMemfdBackingConformance(t *testing.T) {
	backingtest.Run(t, func(t *testing.T, size uint64, mode guestmem.Mode) guestmem.Backing {
		b, err := guestmem.NewMemfdBacking("conformance", size, mode)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		return b
	})
}

func TestModelBackingConformance(t *testing.T) {
	backingtest.Run(t, func(t *testing.T, size uint64, mode guestmem.Mode) guestmem.Backing {
		b, err := guestmem.NewModelBacking(size, mode)
		if err != nil {
			t.Fatal(err)
		}
		return b
	})
}

// inPlaceVMM is vmmBacking's in-place form: one memfd for both sides.
type inPlaceVMM struct{ *vmmBacking }

func (b inPlaceVMM) InPlace() bool { return true }
func (b inPlaceVMM) Discard(_ guestmem.Side, off, n uint64) error {
	return unix.Fallocate(b.shared, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
}

// TestVMMBackingConformance runs the suite on the VMM-style backing the
// other tests use, as a VMM would on its own.
func TestVMMBackingConformance(t *testing.T) {
	backingtest.Run(t, func(t *testing.T, size uint64, mode guestmem.Mode) guestmem.Backing {
		b := newVMMBacking(t, size)
		if mode == guestmem.InPlace {
			return inPlaceVMM{b}
		}
		return b
	})
}

// TestKVMBackingConformance runs the suite on guest_memfd backings where
// the host has /dev/kvm with guest_memfd (in place needs MMAP|INIT_SHARED).
func TestKVMBackingConformance(t *testing.T) {
	vm, caps := kvmtest.GuestMemfdVM(t, false)
	backingtest.Run(t, func(t *testing.T, size uint64, mode guestmem.Mode) guestmem.Backing {
		kvmtest.SkipWithoutGuestMemfd(t, caps, mode == guestmem.InPlace)
		b, err := guestmem.NewKVMBacking(vm, "conformance", size, mode)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		return b
	})
}
