package guesttest

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/vfio"
)

// QEMU's edu device (docs/specs/edu.rst in QEMU): a PCI device with a 4 KiB
// internal buffer and a DMA engine that copies between that buffer and
// IOVAs, through the IOMMU.
const (
	// EduVendor and EduDevice are edu's PCI ids.
	EduVendor = 0x1234
	EduDevice = 0x11e8
	// EduIDValue is what the identification register reads.
	EduIDValue = 0x010000ed
	// EduBuffer is the device address of the internal buffer.
	EduBuffer = 0x40000
	// EduMaxCount is the largest transfer the tests use; QEMU aborts on a
	// transfer past the 4 KiB buffer.
	EduMaxCount = 3000
	// EduDMAMask: edu masks DMA addresses to 28 bits, so IOVAs must stay
	// below it.
	EduDMAMask = 1<<28 - 1

	eduRegID       = 0x00
	eduRegLiveness = 0x04
	eduRegDMASrc   = 0x80
	eduRegDMADst   = 0x88
	eduRegDMACount = 0x90
	eduRegDMACmd   = 0x98

	eduCmdStart = 1 << 0
	eduCmdToRAM = 1 << 1 // direction: device buffer to RAM
)

// Edu drives an edu device opened through VFIO: identification and
// liveness through pread/pwrite on the device fd, DMA through the mmap'ed
// BAR0.
type Edu struct {
	dev  *vfio.Device
	bar0 vfio.RegionInfo
	mmio []byte
	// DMATimeout bounds one transfer; edu completes each from a 100 ms
	// timer.
	DMATimeout time.Duration
}

// NewEdu maps BAR0 of dev, checks the identification register and turns
// on bus mastering, without which the device's DMA goes nowhere.
func NewEdu(dev *vfio.Device) (*Edu, error) {
	bar0, err := dev.GetRegionInfo(vfio.PCIBAR0RegionIndex)
	if err != nil {
		return nil, err
	}
	mmio, err := dev.MmapRegion(bar0)
	if err != nil {
		return nil, err
	}
	e := &Edu{dev: dev, bar0: bar0, mmio: mmio, DMATimeout: 10 * time.Second}
	id, err := e.ID()
	if err != nil {
		e.Close()
		return nil, err
	}
	if id != EduIDValue {
		e.Close()
		return nil, fmt.Errorf("edu: identification register reads %#x, want %#x", id, EduIDValue)
	}
	cmd, err := dev.EnableBusMaster()
	if err != nil {
		e.Close()
		return nil, err
	}
	if cmd&vfio.PCICommandBusMaster == 0 {
		e.Close()
		return nil, fmt.Errorf("edu: PCI_COMMAND %#x after enabling bus mastering", cmd)
	}
	return e, nil
}

// Close unmaps BAR0. The device fd stays open.
func (e *Edu) Close() error { return unix.Munmap(e.mmio) }

// BAR0 returns the BAR0 region information.
func (e *Edu) BAR0() vfio.RegionInfo { return e.bar0 }

// ID reads the identification register with pread.
func (e *Edu) ID() (uint32, error) { return e.dev.Read32(e.bar0, eduRegID) }

// Liveness writes v to the liveness register with pwrite and reads back
// the device's answer, the bitwise NOT of v.
func (e *Edu) Liveness(v uint32) (uint32, error) {
	if err := e.dev.Write32(e.bar0, eduRegLiveness, v); err != nil {
		return 0, err
	}
	return e.dev.Read32(e.bar0, eduRegLiveness)
}

// MMIOID reads the identification register through the mmap'ed BAR0.
func (e *Edu) MMIOID() uint32 { return vfio.Load32(e.mmio, eduRegID) }

// MMIOLiveness is Liveness through the mmap'ed BAR0.
func (e *Edu) MMIOLiveness(v uint32) uint32 {
	vfio.Store32(e.mmio, eduRegLiveness, v)
	return vfio.Load32(e.mmio, eduRegLiveness)
}

// ToDevice copies n bytes from iova into the device buffer.
func (e *Edu) ToDevice(iova uint64, n int) error { return e.dma(iova, EduBuffer, n, 0) }

// ToRAM copies n bytes from the device buffer to iova.
func (e *Edu) ToRAM(iova uint64, n int) error { return e.dma(EduBuffer, iova, n, eduCmdToRAM) }

// ErrDMATimeout means a transfer did not complete in time.
var ErrDMATimeout = errors.New("edu: DMA did not complete")

func (e *Edu) dma(src, dst uint64, n int, dir uint64) error {
	if err := e.start(src, dst, n, dir); err != nil {
		return err
	}
	deadline := time.Now().Add(e.DMATimeout)
	for e.Busy() {
		if time.Now().After(deadline) {
			return fmt.Errorf("%w in %v (src %#x dst %#x count %d)", ErrDMATimeout, e.DMATimeout, src, dst, n)
		}
		time.Sleep(2 * time.Millisecond)
	}
	return nil
}

// StartToRAM starts copying n bytes from the device buffer to iova and
// returns at once; the transfer runs until Busy reports false.
func (e *Edu) StartToRAM(iova uint64, n int) error { return e.start(EduBuffer, iova, n, eduCmdToRAM) }

// Busy reports whether a transfer is still running.
func (e *Edu) Busy() bool { return vfio.Load64(e.mmio, eduRegDMACmd)&eduCmdStart != 0 }

func (e *Edu) start(src, dst uint64, n int, dir uint64) error {
	if n <= 0 || n > EduMaxCount {
		return fmt.Errorf("edu: DMA of %d bytes (1..%d)", n, EduMaxCount)
	}
	if src > EduDMAMask || dst > EduDMAMask {
		return fmt.Errorf("edu: DMA address above the 28-bit mask (src %#x dst %#x)", src, dst)
	}
	vfio.Store64(e.mmio, eduRegDMASrc, src)
	vfio.Store64(e.mmio, eduRegDMADst, dst)
	vfio.Store64(e.mmio, eduRegDMACount, uint64(n))
	vfio.Store64(e.mmio, eduRegDMACmd, eduCmdStart|dir)
	return nil
}
