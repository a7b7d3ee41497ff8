package guestmem_test

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/iommufd"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/vfio"
)

// A VMM's view: lay out guest RAM with an MMIO hole, attach a device's
// IOMMU, share a bounce buffer and watch the device reach it, then take it
// back. Without a VM the memory is memfds and the attributes live in user
// space; the executor is the same.
func Example() {
	mem, err := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{
			{Name: "low", GPA: 0, Size: 2 << 20},
			{Name: "high", GPA: 4 << 20, Size: 2 << 20},
		},
		MMIO: []guestmem.Hole{{Name: "pci", GPA: 2 << 20, Size: 2 << 20}},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer mem.Close()

	dev := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2}) // or vfio.NewSpace, iommufd.NewSpace
	if _, err := mem.AttachIOMMU(dev, dma.Options{}); err != nil {
		fmt.Println(err)
		return
	}
	buf := guestmem.Request{GPA: 0x10000, Size: 4 * guestmem.PageSize, To: memattr.Shared}
	if _, err := mem.Convert(buf); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("DMA to shared:", dev.DMAWrite(buf.GPA, []byte("packet")))
	got := make([]byte, 6)
	mem.ReadAt(got, int64(buf.GPA))
	fmt.Printf("host reads %q\n", got)

	buf.To = memattr.Private
	mem.Convert(buf)
	var fault *iommu.DMAFault
	err = dev.DMAWrite(buf.GPA, []byte("packet"))
	fmt.Println("DMA to private faults:", errors.As(err, &fault))
	_, err = mem.ReadAt(got, int64(buf.GPA))
	fmt.Println("host read of private:", errors.Is(err, guestmem.ErrPrivate))
	s := mem.Stats()
	fmt.Println("conversions:", s.Conversions, "pages to shared:", s.PagesToShared, "to private:", s.PagesToPrivate)
	// Output:
	// DMA to shared: <nil>
	// host reads "packet"
	// DMA to private faults: true
	// host read of private: true
	// conversions: 2 pages to shared: 4 to private: 4
}

// vmmMemory is a VMM's own guest RAM: a memfd it created and mapped, used
// as a block's shared side, with a second memfd standing in for the private
// side.
type vmmMemory struct {
	shared, private int
	host            []byte
}

func (v *vmmMemory) Size() uint64  { return uint64(len(v.host)) }
func (v *vmmMemory) InPlace() bool { return false }
func (v *vmmMemory) Host() []byte  { return v.host }
func (v *vmmMemory) Discard(s guestmem.Side, off, n uint64) error {
	fd := v.shared
	if s == guestmem.PrivateSide {
		fd = v.private
	}
	return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
}

// A VMM brings its own memory as a Backing. guestmem borrows it: Close
// leaves the memfds and the mapping to the VMM, which releases them after.
func ExampleNew_vmmBacking() {
	const size = 1 << 20
	shared, _ := unix.MemfdCreate("vmm-ram", unix.MFD_CLOEXEC)
	private, _ := unix.MemfdCreate("vmm-ram-private", unix.MFD_CLOEXEC)
	unix.Ftruncate(shared, size)
	unix.Ftruncate(private, size)
	host, err := unix.Mmap(shared, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		fmt.Println(err)
		return
	}
	ram := &vmmMemory{shared: shared, private: private, host: host}

	mem, err := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{{Name: "ram", GPA: 0, Size: size, Backing: ram}},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	mem.Convert(guestmem.Request{GPA: 0, Size: guestmem.PageSize, To: memattr.Shared})
	mem.WriteAt([]byte("hello"), 0)
	fmt.Printf("the VMM's mapping holds %q\n", host[:5])
	mem.Close()

	// Still the VMM's: it closes what it created.
	fmt.Printf("after Close: %q\n", host[:5])
	unix.Munmap(host)
	unix.Close(shared)
	unix.Close(private)
	// Output:
	// the VMM's mapping holds "hello"
	// after Close: "hello"
}

// A failed step undoes the whole conversion: here the punch of the shared
// side fails, and state, attributes and IOMMU entries are as before. The
// guest gets EINVAL, or EAGAIN when the failure is transient.
func ExampleMemory_Convert_rollback() {
	fail := unix.EIO
	mem, _ := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{{Name: "ram", GPA: 0, Size: 1 << 20}},
		Inject: func(f guestmem.Fault) error {
			if f.Op == guestmem.OpPunch && f.To == memattr.Private {
				return fail
			}
			return nil
		},
	})
	defer mem.Close()
	dev := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
	mem.AttachIOMMU(dev, dma.Options{})
	mem.Convert(guestmem.Request{GPA: 0, Size: 8 * guestmem.PageSize, To: memattr.Shared})

	_, err := mem.Convert(guestmem.Request{GPA: 0, Size: 8 * guestmem.PageSize, To: memattr.Private})
	fmt.Println("failed:", errors.Is(err, unix.EIO), "guest gets", guestmem.HypercallRet(err))
	fmt.Println("still shared:", mem.Blocks()[0].StateRuns()[0])
	fmt.Println("still mapped:", dev.Mappings())
	// Output:
	// failed: true guest gets 22
	// still shared: {[0x0, 0x8000) shared}
	// still mapped: [{0 32768}]
}

// Close with a device still attached detaches it (the device loses its
// mappings before the memory goes away); every later call answers
// ErrClosed, which also matches fs.ErrClosed.
func ExampleMemory_Close() {
	mem, _ := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{{Name: "ram", GPA: 0, Size: 1 << 20}},
	})
	dev := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
	mem.AttachIOMMU(dev, dma.Options{})
	mem.Convert(guestmem.Request{GPA: 0, Size: guestmem.PageSize, To: memattr.Shared})

	fmt.Println("close:", mem.Close())
	fmt.Println("device entries:", dev.Len())
	_, err := mem.Convert(guestmem.Request{GPA: 0, Size: guestmem.PageSize, To: memattr.Private})
	fmt.Println("convert after close:", errors.Is(err, guestmem.ErrClosed), errors.Is(err, os.ErrClosed))
	fmt.Println("close again:", mem.Close())
	// Output:
	// close: <nil>
	// device entries: 0
	// convert after close: true true
	// close again: guestmem: file already closed
}

// The three answers a guest's KVM_HC_MAP_GPA_RANGE can get.
func ExampleHypercallRet() {
	mem, _ := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{{Name: "ram", GPA: 0, Size: 1 << 20}},
	})
	defer mem.Close()
	dev := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 1})
	mem.AttachIOMMU(dev, dma.Options{})

	_, err := mem.Convert(guestmem.Request{GPA: 0, Size: guestmem.PageSize, To: memattr.Shared})
	fmt.Println("ok:", guestmem.HypercallRet(err))
	_, err = mem.Convert(guestmem.Request{GPA: 0x100, Size: guestmem.PageSize, To: memattr.Shared})
	fmt.Println("misaligned:", guestmem.HypercallRet(err))
	_, err = mem.Convert(guestmem.Request{GPA: 0x10000, Size: guestmem.PageSize, To: memattr.Shared})
	fmt.Println("IOMMU full:", guestmem.HypercallRet(err))
	// Output:
	// ok: 0
	// misaligned: 22
	// IOMMU full: 11
}

// A vCPU exit asking for a conversion, explicit (KVM_HC_MAP_GPA_RANGE) or
// implicit (KVM_EXIT_MEMORY_FAULT), goes to the same executor. Here the
// exits are built by hand as kvm.DecodeExit would return them.
func ExampleMemory_Convert_exits() {
	mem, _ := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{{Name: "ram", GPA: 0, Size: 1 << 20}},
	})
	defer mem.Close()

	handle := func(exit kvm.Exit) {
		var req guestmem.Request
		switch e := exit.(type) {
		case kvm.HypercallExit:
			m, err := e.MapGPARange()
			if err != nil {
				fmt.Println("bad hypercall, ret", kvm.HypercallRetEINVAL)
				return
			}
			req = guestmem.Request{GPA: m.GPA, Size: m.Size(), To: memattr.Shared}
			if m.ToPrivate {
				req.To = memattr.Private
			}
			_, err = mem.Convert(req)
			fmt.Println("MAP_GPA_RANGE", req, "ret", guestmem.HypercallRet(err)) // kvm.SetHypercallRet
		case kvm.MemoryFaultExit:
			r := e.Range()
			req = guestmem.Request{GPA: r.Start, Size: r.Len(), To: memattr.Shared}
			if e.Private() {
				req.To = memattr.Private
			}
			_, err := mem.Convert(req)
			fmt.Println("memory fault", req, "err", err) // then KVM_RUN again
		}
	}
	handle(kvm.HypercallExit{Nr: kvm.HCMapGPARange, Args: [6]uint64{0x8000, 2, kvm.MapGPARangePageSize4K}})
	handle(kvm.MemoryFaultExit{GPA: 0x8000, Size: guestmem.PageSize, Flags: kvm.MemoryExitFlagPrivate, Errno: unix.EFAULT})
	// Output:
	// MAP_GPA_RANGE GPA [0x8000, +0x2000) to shared ret 0
	// memory fault GPA [0x8000, +0x1000) to private err <nil>
}

// A hot-pluggable block (virtio-mem) and a second device hot-plugged later:
// plugged memory starts private, the new device is mapped at once with
// what is shared, and Walk tells a migration what to send.
func ExampleMemory_Plug() {
	mem, _ := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{
			{Name: "boot", GPA: 0, Size: 2 << 20},
			{Name: "vmem", GPA: 1 << 32, Size: 8 << 20, Hotplug: 2 << 20},
		},
	})
	defer mem.Close()
	dev1 := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
	mem.AttachIOMMU(dev1, dma.Options{})

	fmt.Println("plug:", mem.Plug(1<<32, 2<<20))
	mem.Convert(guestmem.Request{GPA: 1 << 32, Size: 1 << 20, To: memattr.Shared})

	dev2 := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
	mem.AttachIOMMU(dev2, dma.Options{})
	fmt.Println("dev2 maps:", dev2.Mappings())

	walk, _ := mem.Walk(1<<32, 8<<20)
	for e := range walk {
		fmt.Println(e.Block.Name(), e.GPA, e.Kind)
	}
	fmt.Println("unplug:", mem.Unplug(1<<32, 2<<20), "dev1 entries:", dev1.Len(), "dev2 entries:", dev2.Len())
	// Output:
	// plug: <nil>
	// dev2 maps: [{4294967296 1048576}]
	// vmem [0x100000000, 0x100100000) shared
	// vmem [0x100100000, 0x100200000) private
	// vmem [0x100200000, 0x100800000) unplugged
	// unplug: <nil> dev1 entries: 0 dev2 entries: 0
}

// A 64 TiB guest with no memory behind it: the state, the attributes and
// the IOMMU mappings are all that is kept, for replaying traces.
func ExampleNewModelBacking() {
	const size = 64 << 40
	bk, _ := guestmem.NewModelBacking(size, guestmem.Split)
	mem, _ := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{{Name: "huge", GPA: 0, Size: size, Backing: bk}},
	})
	defer mem.Close()
	dev := iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD})
	// One IOMMU entry for the whole extent (the default bounds entries at
	// dma.DefaultMaxExtent so that a split re-pins little).
	mem.AttachIOMMU(dev, dma.Options{MaxExtent: dma.Unbounded})
	mem.Convert(guestmem.Request{GPA: 1 << 40, Size: 1 << 40, To: memattr.Shared})

	fmt.Println("entries:", dev.Mappings())
	_, err := mem.ReadAt(make([]byte, 8), 1<<40)
	fmt.Println("host read:", errors.Is(err, guestmem.ErrNoHostMemory))
	calls, bytes := bk.Discards()
	fmt.Printf("discards: %d of %d GiB\n", calls, bytes>>30)
	// Output:
	// entries: [{1099511627776 1099511627776}]
	// host read: true
	// discards: 1 of 1024 GiB
}

// A VMM that has its own KVM fds hands gmem duplicates: SystemFromFile and
// VMFromFile adopt them (the VMM keeps and closes its own files), and a
// *kvm.VM is a guestmem.VM and MemslotBinder, so guestmem creates
// guest_memfd backings and binds the memslots. It needs /dev/kvm; see
// TestAdoptKVM in package kvm for the same code as a test.
func ExampleNew_kvm() {
	kvmFile, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0) // the VMM's
	if err != nil {
		fmt.Println(err)
		return
	}
	defer kvmFile.Close()
	sys, err := kvm.SystemFromFile(kvmFile)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer sys.Close()
	vm, err := sys.CreateVM(kvm.VMTypeDefault) // or sys.VMFromFile(vmmVMFile)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer vm.Close() // after mem.Close
	mem, err := guestmem.New(guestmem.Config{
		VM:     vm,
		Blocks: []guestmem.BlockConfig{{Name: "ram", GPA: 0, Size: 16 << 20}},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer mem.Close()
	slot, bound := mem.Blocks()[0].Slot()
	fmt.Println("memslot", slot, bound, "enforcement", mem.Enforcement())
}

// Attach a VFIO type1 device: the VMM's container (already set to
// Type1v2IOMMU with the device's group) is adopted by a dup and described
// as an iommu.Space. It needs a VFIO device; the rig runs the same calls.
func ExampleMemory_AttachIOMMU_vfio() {
	mem, _ := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{{Name: "ram", GPA: 0, Size: 16 << 20}},
	})
	defer mem.Close()
	vmmContainer, err := os.OpenFile(vfio.ContainerPath, os.O_RDWR, 0) // the VMM's, set up
	if err != nil {
		fmt.Println(err)
		return
	}
	defer vmmContainer.Close()
	c, err := vfio.ContainerFromFile(vmmContainer)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close() // after the Space's last use: Close detaches first
	space, err := vfio.NewSpace(c)
	if err != nil {
		fmt.Println(err)
		return
	}
	att, err := mem.AttachIOMMU(space, dma.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer att.Detach()
}

// Attach an iommufd device: the VMM's iommufd is adopted by a dup; the
// IOAS (with the device attached) is described as an iommu.Space.
func ExampleMemory_AttachIOMMU_iommufd() {
	mem, _ := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{{Name: "ram", GPA: 0, Size: 16 << 20}},
	})
	defer mem.Close()
	vmmIOMMU, err := os.OpenFile(iommufd.Path, os.O_RDWR, 0) // the VMM's
	if err != nil {
		fmt.Println(err)
		return
	}
	defer vmmIOMMU.Close()
	f, err := iommufd.FromFile(vmmIOMMU)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer f.Close()
	ioas, err := f.IOASAlloc() // the VMM attaches its device to it
	if err != nil {
		fmt.Println(err)
		return
	}
	space, err := iommufd.NewSpace(f, ioas)
	if err != nil {
		fmt.Println(err)
		return
	}
	if _, err := mem.AttachIOMMU(space, dma.Options{}); err != nil {
		fmt.Println(err)
	}
}
