//go:build linux

// Package kvmtest is the KVM set-up the tests of the packages above kvm
// share: open /dev/kvm or skip where the host has none, make a VM, and skip
// where the host's KVM lacks the guest_memfd a test needs, each skip naming
// what is missing. kvm's own tests keep theirs (they cannot import a
// package that imports kvm).
package kvmtest

import (
	"errors"
	"io/fs"
	"testing"

	"github.com/gmemproject/gmem/kvm"
)

// open opens /dev/kvm, skipping the test where it is missing or not
// usable; any other failure fails the test. The caller closes it.
func open(t testing.TB) *kvm.System {
	t.Helper()
	sys, err := kvm.Open()
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission) {
		t.Skipf("needs %s: %v", kvm.DevicePath, err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return sys
}

// Open opens /dev/kvm, closed at the end of the test, skipping the test
// where it is missing or not usable; any other failure fails the test.
func Open(t testing.TB) *kvm.System {
	t.Helper()
	sys := open(t)
	t.Cleanup(func() { sys.Close() })
	return sys
}

// NewVM creates a VM of vmType, closed at the end of the test.
func NewVM(t testing.TB, sys *kvm.System, vmType uint64) *kvm.VM {
	t.Helper()
	vm, err := sys.CreateVM(vmType)
	if err != nil {
		t.Fatalf("CreateVM(%d): %v", vmType, err)
	}
	t.Cleanup(func() { vm.Close() })
	return vm
}

// SkipWithoutGuestMemfd skips the test unless caps (a VM's) offer
// guest_memfd (Linux 6.8) and, for memory in place, one that can be
// mmapped and starts shared (kvm.InPlaceFlags, Linux 6.18). The rig's
// Linux 7.3 guest has both.
func SkipWithoutGuestMemfd(t testing.TB, caps kvm.Capabilities, inPlace bool) {
	t.Helper()
	if !caps.GuestMemfd {
		t.Skip("needs guest_memfd (KVM_CAP_GUEST_MEMFD, Linux 6.8 with KVM_PRIVATE_MEM or KVM_GUEST_MEMFD): this host's KVM has none; scripts/rig --kernel-source linux-source-7.3 runs these tests")
	}
	if inPlace && caps.GuestMemfdFlags&kvm.InPlaceFlags != kvm.InPlaceFlags {
		t.Skipf("needs an mmap-able, initially shared guest_memfd (KVM_CAP_GUEST_MEMFD_FLAGS with MMAP|INIT_SHARED, Linux 6.18): this host answers %#x; scripts/rig --kernel-source linux-source-7.3 runs these tests", caps.GuestMemfdFlags)
	}
}

// probe asks vm its capabilities and skips as SkipWithoutGuestMemfd does.
func probe(t testing.TB, vm *kvm.VM, inPlace bool) kvm.Capabilities {
	t.Helper()
	caps, err := vm.ProbeCapabilities()
	if err != nil {
		t.Fatal(err)
	}
	SkipWithoutGuestMemfd(t, caps, inPlace)
	return caps
}

// GuestMemfdVM opens /dev/kvm and creates a default-type VM, both closed
// at the end of the test, and answers the VM and its capabilities. It
// skips as Open does, and as SkipWithoutGuestMemfd does for memory in
// place (inPlace) or split.
func GuestMemfdVM(t testing.TB, inPlace bool) (*kvm.VM, kvm.Capabilities) {
	t.Helper()
	vm := NewVM(t, Open(t), kvm.VMTypeDefault)
	return vm, probe(t, vm, inPlace)
}

// NeedGuestMemfd is GuestMemfdVM for a test that makes its own VM (a
// VMM): it probes a default-type VM and closes it and /dev/kvm at once.
func NeedGuestMemfd(t testing.TB, inPlace bool) {
	t.Helper()
	sys := open(t)
	defer sys.Close()
	vm, err := sys.CreateVM(kvm.VMTypeDefault)
	if err != nil {
		t.Fatalf("CreateVM(%d): %v", kvm.VMTypeDefault, err)
	}
	defer vm.Close()
	probe(t, vm, inPlace)
}
