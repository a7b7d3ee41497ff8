//go:build linux

package kvm_test

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/kvm"
)

// A VMM that created its VM itself hands gmem a duplicate of the VM fd:
// VMFromFile dups it, so the VMM's file and gmem's VM close independently
// and the kernel keeps the VM until both are closed. NewVM would take the
// fd itself instead. It needs /dev/kvm; TestAdoptKVM runs the same calls.
func ExampleSystem_VMFromFile() {
	sys, err := kvm.Open()
	if err != nil {
		fmt.Println(err)
		return
	}
	defer sys.Close()
	vmmVM, err := sys.CreateVM(kvm.VMTypeDefault) // stands for the VMM's own VM
	if err != nil {
		fmt.Println(err)
		return
	}
	defer vmmVM.Close()
	// The VMM keeps its VM as an *os.File, which owns its descriptor.
	fd, err := unix.Dup(vmmVM.Fd())
	if err != nil {
		fmt.Println(err)
		return
	}
	f := os.NewFile(uintptr(fd), "vm")
	defer f.Close()
	vm, err := sys.VMFromFile(f)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer vm.Close()
	caps, err := vm.ProbeCapabilities()
	fmt.Println(caps.GuestMemfd, err)
}
