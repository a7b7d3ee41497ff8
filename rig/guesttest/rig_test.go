package guesttest

import (
	"os"
	"testing"
)

// TestRig runs every in-guest check, type1 first, then iommufd, then kvm
// (which opens the device both ways in turn): the group and the cdev cannot
// own the device at once, so each run closes all its file descriptors
// before the next opens the device.
func TestRig(t *testing.T) {
	requireGuest(t)
	bdf := findEdu(t)
	if wantBackend("type1") {
		t.Run("type1", func(t *testing.T) { runType1(t, bdf) })
	}
	if wantBackend("iommufd") {
		t.Run("iommufd", func(t *testing.T) { runIOMMUFD(t, bdf) })
	}
	if wantBackend("kvm") {
		t.Run("kvm", func(t *testing.T) { runKVM(t, bdf) })
	}
	// The in-place checks need a kernel with mmap-able guest_memfd (the
	// rig's 7.3), so "all" (6.12's) does not run them.
	if os.Getenv("GMEM_RIG_BACKEND") == "inplace" {
		t.Run("inplace", func(t *testing.T) { runInPlace(t, bdf) })
	}
}
