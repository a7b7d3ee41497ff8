package vmm

import (
	"encoding/binary"
	"errors"
	"log/slog"
	"sync"

	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
)

// setLo and setHi write one half of a 64-bit register.
func setLo(r *uint64, v uint32) { *r = *r&^0xFFFF_FFFF | uint64(v) }
func setHi(r *uint64, v uint32) { *r = *r&0xFFFF_FFFF | uint64(v)<<32 }

// convDevice is one vCPU's bank of conversion-port registers. Ringing the
// doorbell hands the request to the machine's executor.
type convDevice struct {
	mu     sync.Mutex
	gpa    uint64
	size   uint64
	attr   uint32
	status uint32
}

// request is what the registers hold when the doorbell rings: the target
// state, or ok false for an unknown ConvAttr value.
func (d *convDevice) request() (gpa, size uint64, to memattr.State, ok bool) {
	switch d.attr {
	case ConvToShared:
		return d.gpa, d.size, memattr.Shared, true
	case ConvToPrivate:
		return d.gpa, d.size, memattr.Private, true
	}
	return d.gpa, d.size, 0, false
}

// DMAEngine moves a device's bytes through an IOMMU: iommu.Model's DMA
// engine, which refuses (with an error wrapping iommu.ErrFault) any byte
// outside the current mappings and then moves nothing.
type DMAEngine interface {
	DMARead(iova uint64, buf []byte) error
	DMAWrite(iova uint64, data []byte) error
}

var _ DMAEngine = (*iommu.Model)(nil)

// dmaDevice is the DMA test device of one vCPU.
type dmaDevice struct {
	engine DMAEngine
	log    *slog.Logger
	cpu    int

	mu       sync.Mutex
	src, dst uint64
	length   uint32
	seed     uint64
	status   uint32
	buf      [DMABufferSize]byte
}

// transfer is the outcome of one DMA command, for the machine's counters.
type transfer int

const (
	noTransfer transfer = iota
	transferAllowed
	transferBlocked
)

// command runs cmd and returns whether it was a transfer and how it went.
func (d *dmaDevice) command(cmd uint32) transfer {
	switch cmd {
	case DMACmdFill:
		for i := 0; i < DMABufferSize; i += 8 {
			binary.LittleEndian.PutUint64(d.buf[i:], d.seed+uint64(i/8))
		}
		d.status = DMAStatusOK
		return noTransfer
	case DMACmdToBuffer, DMACmdToRAM:
	default:
		d.status = DMAStatusBadRequest
		return noTransfer
	}
	if d.length == 0 || d.length > DMABufferSize {
		d.status = DMAStatusBadRequest
		return noTransfer
	}
	var err error
	if cmd == DMACmdToBuffer {
		// Read into a scratch buffer so that a refused read leaves the
		// device's buffer as it was.
		tmp := make([]byte, d.length)
		if err = d.engine.DMARead(d.src, tmp); err == nil {
			copy(d.buf[:], tmp)
		}
	} else {
		err = d.engine.DMAWrite(d.dst, d.buf[:d.length])
	}
	if err != nil {
		if !errors.Is(err, iommu.ErrFault) {
			d.log.Warn("vmm: DMA failed", "cpu", d.cpu, "cmd", cmd, "err", err)
		}
		d.status = DMAStatusBlocked
		return transferBlocked
	}
	d.status = DMAStatusOK
	return transferAllowed
}

// CheckResult is one result word from the console, matched with its check.
type CheckResult struct {
	Check
	Passed bool
	// Detail is the observed status of a failed status check, or the index
	// of the first wrong qword of a failed verify.
	Detail uint32
}

// console collects result words.
type console struct {
	mu      sync.Mutex
	checks  []Check
	results map[int]CheckResult
	done    []bool
	// problems are result words that match no check of the writing vCPU
	// and checks reported twice: each counts as a failed check.
	problems []string
}

func newConsole(s Scenario) *console {
	return &console{
		checks:  s.Checks(),
		results: make(map[int]CheckResult),
		done:    make([]bool, len(s.Programs)),
	}
}
