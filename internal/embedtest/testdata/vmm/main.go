// Command vmm is a VMM outside the gmem module that owns its fds: its own
// KVM (a fake that keeps attributes), its own guest memory (memfds it
// creates and maps; both in ../shared) and its own IOMMU (gmem's model).
// It embeds gmem's executor through exported API only and prints what
// happened.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
)

const (
	page    = guestmem.PageSize
	ramGPA  = 0
	ramSize = 2 << 20
	hotGPA  = 1 << 32
	hotSize = 8 << 20
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "vmm:", err)
		os.Exit(1)
	}
}

func run() error {
	vm := newFakeKVM()
	ram, err := newSplitRAM("vmm-ram", ramSize)
	if err != nil {
		return err
	}
	hot, err := guestmem.NewMemfdBacking("hot", hotSize, guestmem.Split)
	if err != nil {
		return err
	}
	mem, err := guestmem.New(guestmem.Config{
		VM: vm,
		Blocks: []guestmem.BlockConfig{
			{Name: "ram", GPA: ramGPA, Size: ramSize, Backing: ram},
			{Name: "hot", GPA: hotGPA, Size: hotSize, Backing: hot, Hotplug: 2 << 20},
		},
		MMIO: []guestmem.Hole{{Name: "pci", GPA: 3 << 30, Size: 1 << 30}},
	})
	if err != nil {
		return err
	}
	fmt.Println("enforcement:", mem.Enforcement())

	// Device 1, attached at boot.
	dev1 := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
	att1, err := mem.AttachIOMMU(dev1, dma.Options{})
	if err != nil {
		return err
	}
	// The guest's MAP_GPA_RANGE: share 16 pages.
	_, err = mem.Convert(guestmem.Request{GPA: ramGPA + 16*page, Size: 16 * page, To: memattr.Shared})
	fmt.Println("MAP_GPA_RANGE shared, ret", guestmem.HypercallRet(err), "kvm private:", vm.private[16*page])
	if err := dev1.DMAWrite(16*page, []byte("from dev1")); err != nil {
		return err
	}
	buf := make([]byte, 9)
	if _, err := mem.ReadAt(buf, 16*page); err != nil {
		return err
	}
	fmt.Printf("host reads %q\n", buf)
	// A memory fault on a private page: the VMM converts and resumes.
	_, err = mem.Convert(guestmem.Request{GPA: 64 * page, Size: page, To: memattr.Shared})
	fmt.Println("memory fault converted, err", err)
	// A bad request goes back to the guest as EINVAL.
	_, err = mem.Convert(guestmem.Request{GPA: 3 << 30, Size: page, To: memattr.Private})
	fmt.Println("MAP_GPA_RANGE on MMIO, ret", guestmem.HypercallRet(err))

	// Hot-plug memory, and a second device.
	if err := mem.Plug(hotGPA, 2<<20); err != nil {
		return err
	}
	if _, err := mem.Convert(guestmem.Request{GPA: hotGPA, Size: 4 * page, To: memattr.Shared}); err != nil {
		return err
	}
	dev2 := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
	att2, err := mem.AttachIOMMU(dev2, dma.Options{})
	if err != nil {
		return err
	}
	fmt.Println("dev2 entries:", len(dev2.Mappings()), "dev1 entries:", len(dev1.Mappings()))
	for _, a := range []*guestmem.Attachment{att1, att2} {
		if err := a.Check(); err != nil {
			return err
		}
	}
	ss := mem.StateStats()
	fmt.Printf("shared %d KiB, unplugged %d KiB\n", ss.SharedBytes>>10, ss.UnpluggedBytes>>10)

	// Shut down with devices still attached: Close detaches them.
	if err := mem.Close(); err != nil {
		return err
	}
	_, err = mem.ReadAt(buf, 16*page)
	fmt.Println("after Close:", errors.Is(err, guestmem.ErrClosed), "dev1 DMA faults:", dev1.DMAWrite(16*page, buf) != nil)
	// The VMM's memory is still its own; it closes it now.
	ram.host[0] = 1
	if err := errors.Join(ram.Close(), hot.Close()); err != nil {
		return err
	}
	fmt.Println("vmm closed its own fds")
	return nil
}
