// Command trial is the hands-on trial of a VMM engineer embedding gmem from
// its documentation, outside the gmem module: its own fake KVM and its own
// memfds (both in ../shared), two RAM blocks around an MMIO hole and a virtio-mem block, three
// model IOMMUs (one limited to 64 entries), four goroutines converting
// while the devices DMA, the host reads and Check runs (each goroutine
// drives one of those between its conversions), and Close under that load. Every error any call returns must be one the documentation
// names; the program exits 1 with the first that is not, and prints a
// summary whose lines do not depend on the interleaving.
package main

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
)

const (
	page = guestmem.PageSize
	mib  = 1 << 20

	lowGPA, lowSize   = 0, 32 * mib         // RAM below the hole
	holeGPA, holeSize = 32 * mib, 32 * mib  // the PCI hole
	highGPA, highSize = 64 * mib, 32 * mib  // RAM above it
	vmemGPA, vmemSize = 128 * mib, 32 * mib // virtio-mem
	plugBlock         = 2 * mib
	end               = vmemGPA + vmemSize

	converters = 4
	opsBefore  = 1500 // each converter's operations before Close
)

// undocumented collects the first error no documentation names.
type undocumented struct {
	mu  sync.Mutex
	err error
}

func (u *undocumented) report(what string, err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.err == nil {
		u.err = fmt.Errorf("%s: undocumented error: %w", what, err)
	}
}

func (u *undocumented) first() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.err
}

// closedOr reports whether err is nil, ErrClosed or one of the sentinels.
func closedOr(err error, sentinels ...error) bool {
	if err == nil || errors.Is(err, guestmem.ErrClosed) {
		return true
	}
	for _, s := range sentinels {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "trial:", err)
		os.Exit(1)
	}
}

func run() error {
	k := newFakeKVM()
	var rams []*splitRAM
	defer func() {
		for _, r := range rams {
			r.Close()
		}
	}()
	var blocks []guestmem.BlockConfig
	for _, b := range []struct {
		name      string
		gpa, size uint64
		hotplug   uint64
	}{{"low", lowGPA, lowSize, 0}, {"high", highGPA, highSize, 0}, {"vmem", vmemGPA, vmemSize, plugBlock}} {
		r, err := newSplitRAM("trial-"+b.name, int(b.size))
		if err != nil {
			return err
		}
		rams = append(rams, r)
		blocks = append(blocks, guestmem.BlockConfig{Name: b.name, GPA: b.gpa, Size: b.size, Backing: r, Hotplug: b.hotplug})
	}
	mem, err := guestmem.New(guestmem.Config{
		VM:     k,
		Blocks: blocks,
		MMIO:   []guestmem.Hole{{Name: "pci", GPA: holeGPA, Size: holeSize}},
	})
	if err != nil {
		return err
	}
	fmt.Println("blocks", len(mem.Blocks()), "holes", len(mem.Holes()), "enforcement", mem.Enforcement())

	models := []*iommu.Model{
		iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2}),
		iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2, EntryLimit: 64}),
		iommu.NewModel(iommu.Caps{Rules: iommu.IOMMUFD}),
	}
	var atts []*guestmem.Attachment
	for _, md := range models {
		a, err := mem.AttachIOMMU(md, dma.Options{})
		if err != nil {
			return err
		}
		atts = append(atts, a)
	}
	fmt.Println("devices", len(atts))
	// Half the virtio-mem block plugged before the guest starts.
	if err := mem.Plug(vmemGPA, vmemSize/2); err != nil {
		return err
	}

	var u undocumented
	var stop atomic.Bool
	var done atomic.Int64 // converters past opsBefore
	var wg sync.WaitGroup
	var converted, refused, transient, landed atomic.Uint64
	for g := range converters {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			for i := 0; !stop.Load(); i++ {
				if i == opsBefore {
					done.Add(1)
				}
				req := guestmem.Request{
					GPA:  uint64(rng.IntN(end/page)) * page,
					Size: uint64(1+rng.IntN(64)) * page,
					To:   memattr.State(rng.IntN(2)),
				}
				if rng.IntN(50) == 0 {
					req.GPA++ // a buggy guest's misaligned request
				}
				_, err := mem.Convert(req)
				switch ret := guestmem.HypercallRet(err); {
				case err == nil:
					converted.Add(1)
				case errors.Is(err, guestmem.ErrClosed):
					return
				case !errors.As(err, new(*guestmem.ConvertError)):
					u.report("Convert "+req.String(), err)
				case closedOr(err, guestmem.ErrInvalid, guestmem.ErrNotRAM, guestmem.ErrUnplugged) && ret == kvm.HypercallRetEINVAL:
					refused.Add(1)
				case guestmem.Transient(err) && ret == kvm.HypercallRetEAGAIN:
					transient.Add(1) // the 64-entry IOMMU is full
				default:
					u.report("Convert "+req.String(), err)
				}
				// A device DMAs to a random page meanwhile: the transfer
				// lands or faults, never anything else.
				md := models[(g+i)%len(models)]
				buf := make([]byte, 64)
				gpa := uint64(rng.IntN(end/page)) * page
				err = md.DMAWrite(gpa, buf)
				if err == nil {
					err = md.DMARead(gpa, buf)
				}
				if err == nil {
					landed.Add(1)
				} else if !errors.Is(err, iommu.ErrFault) {
					u.report("DMA", err)
				}
				// The host reads guest memory and checks the invariants.
				if i%16 == 0 {
					_, err := mem.ReadAt(buf[:16], int64(rng.IntN(end)))
					if !closedOr(err, guestmem.ErrPrivate, guestmem.ErrUnplugged, guestmem.ErrNoRAM) {
						u.report("ReadAt", err)
					}
					if err := atts[(g+i)%len(atts)].Check(); !closedOr(err) {
						u.report("Check", err)
					}
				}
				if g == 0 && i%8 == 0 {
					gpa := vmemGPA + uint64(rng.IntN(vmemSize/plugBlock))*plugBlock
					if rng.IntN(2) == 0 {
						err = mem.Plug(gpa, plugBlock)
					} else {
						err = mem.Unplug(gpa, plugBlock)
					}
					if !closedOr(err, guestmem.ErrPlugged, guestmem.ErrUnplugged) && !guestmem.Transient(err) {
						u.report("Plug/Unplug", err)
					}
				}
			}
		})
	}
	// Close under load, once every converter has done its share.
	for done.Load() < converters && u.first() == nil {
		runtime.Gosched()
	}
	cerr := mem.Close()
	stop.Store(true)
	wg.Wait()
	fmt.Fprintf(os.Stderr, "converted %d, refused %d, transient %d, DMA landed %d\n", converted.Load(), refused.Load(), transient.Load(), landed.Load())
	if err := u.first(); err != nil {
		return err
	}
	fmt.Println("close:", cerr)
	left := []int{}
	for _, md := range models {
		left = append(left, md.Len())
	}
	fmt.Println("entries after close:", left)
	var f *iommu.DMAFault
	fmt.Println("DMA after close faults:", errors.As(models[0].DMAWrite(lowGPA, make([]byte, 8)), &f))
	if converted.Load() == 0 || refused.Load() == 0 || transient.Load() == 0 || landed.Load() == 0 {
		return fmt.Errorf("the load did not run: %d converted, %d refused, %d transient, %d DMA landed", converted.Load(), refused.Load(), transient.Load(), landed.Load())
	}
	fmt.Println("trial ok")
	return nil
}
