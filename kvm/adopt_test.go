//go:build linux

package kvm

import (
	"errors"
	"io/fs"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// stillOpen fails the test if fd was closed.
func stillOpen(t *testing.T, what string, fd int) {
	t.Helper()
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		t.Errorf("%s: fd %d was closed by a refused adoption: %v", what, fd, err)
	}
}

func TestAdoptWrongKind(t *testing.T) {
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	nfd := int(null.Fd())
	var fe *FdError
	if _, err := NewSystem(nfd); !errors.As(err, &fe) || !errors.Is(err, unix.ENOTTY) || fe.Fd != nfd {
		t.Errorf("NewSystem(/dev/null) = %v, want an *FdError wrapping ENOTTY", err)
	}
	stillOpen(t, "NewSystem", nfd)
	if _, err := SystemFromFile(null); !errors.As(err, &fe) {
		t.Errorf("SystemFromFile(/dev/null) = %v, want an *FdError", err)
	}
	stillOpen(t, "SystemFromFile", nfd)

	mfd, err := unix.MemfdCreate("not-gmem", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(mfd), "memfd") // owns mfd
	defer f.Close()
	if _, err := NewGuestMemfd(mfd, 0); !errors.As(err, &fe) {
		t.Errorf("NewGuestMemfd(empty file) = %v, want an *FdError", err)
	}
	stillOpen(t, "NewGuestMemfd", mfd)
	if err := unix.Ftruncate(mfd, 3*PageSize); err != nil {
		t.Fatal(err)
	}
	g, err := GuestMemfdFromFile(f, GuestMemfdFlagMmap)
	if err != nil {
		t.Fatal(err)
	}
	if g.Size() != 3*PageSize || g.Flags() != GuestMemfdFlagMmap || g.Fd() == mfd {
		t.Errorf("adopted size %#x flags %#x fd %d (original %d)", g.Size(), g.Flags(), g.Fd(), mfd)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	stillOpen(t, "GuestMemfd.Close of a duplicate", mfd)
	if err := g.Close(); !errors.Is(err, ErrClosed) || !errors.Is(err, fs.ErrClosed) {
		t.Errorf("second Close = %v, want ErrClosed matching fs.ErrClosed", err)
	}
}

// TestAdoptKVM adopts a dup of a VM fd the "VMM" created, uses and closes
// it, and checks that the original still works; the wrong kinds of KVM fd
// are refused.
func TestAdoptKVM(t *testing.T) {
	kf, err := os.OpenFile(DevicePath, os.O_RDWR, 0)
	if err != nil {
		t.Skipf("needs %s: %v", DevicePath, err)
	}
	defer kf.Close()
	s, err := SystemFromFile(kf)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	vmmVM, err := s.CreateVM(VMTypeDefault)
	if err != nil {
		t.Fatal(err)
	}
	defer vmmVM.Close()
	dup, err := unix.Dup(vmmVM.Fd())
	if err != nil {
		t.Fatal(err)
	}
	vm, err := s.NewVM(dup)
	if err != nil {
		unix.Close(dup)
		t.Fatal(err)
	}
	if _, err := vm.CheckExtension(CapUserMemory2); err != nil {
		t.Error(err)
	}
	if err := vm.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := vmmVM.CheckExtension(CapUserMemory2); err != nil {
		t.Errorf("the VMM's VM fd broke when the adopted dup was closed: %v", err)
	}
	var fe *FdError
	if _, err := s.NewVM(s.Fd()); !errors.As(err, &fe) {
		t.Errorf("NewVM(/dev/kvm fd) = %v, want an *FdError", err)
	}
	vcpu, err := vmmVM.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	defer vcpu.Close()
	if _, err := s.NewVM(vcpu.Fd()); !errors.As(err, &fe) {
		t.Errorf("NewVM(vCPU fd) = %v, want an *FdError", err)
	}
	if _, err := NewSystem(vmmVM.Fd()); !errors.As(err, &fe) {
		t.Errorf("NewSystem(VM fd) = %v, want an *FdError", err)
	}
	// An *os.File owns its descriptor (and closes it when collected), so
	// the VMM's file is a dup of its own fd.
	vfd, err := unix.Dup(vmmVM.Fd())
	if err != nil {
		t.Fatal(err)
	}
	vf := os.NewFile(uintptr(vfd), "vm")
	defer vf.Close()
	vm2, err := s.VMFromFile(vf)
	if err != nil {
		t.Fatal(err)
	}
	if err := vm2.Close(); err != nil {
		t.Fatal(err)
	}
	stillOpen(t, "VMFromFile", vfd)
}
