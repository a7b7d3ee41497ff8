package vmm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
)

// Source says where a conversion request came from.
type Source int

const (
	// SourcePort is the paravirtual conversion port.
	SourcePort Source = iota + 1
	// SourceHypercall is KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE).
	SourceHypercall
	// SourceMemoryFault is KVM_EXIT_MEMORY_FAULT.
	SourceMemoryFault
)

// String returns "port", "hypercall" or "memory-fault".
func (s Source) String() string {
	switch s {
	case SourcePort:
		return "port"
	case SourceHypercall:
		return "hypercall"
	case SourceMemoryFault:
		return "memory-fault"
	}
	return fmt.Sprintf("source(%d)", int(s))
}

// ConversionEvent reports one conversion request and its outcome.
type ConversionEvent struct {
	CPU     int
	Source  Source
	Request guestmem.Request
	Result  guestmem.Result
	// Err is the executor's error, or the reason the request was refused
	// before reaching it.
	Err error
	// Ret is the answer the guest gets: 0, EINVAL or EAGAIN.
	Ret uint64
	// Took is how long the executor took (guestmem's Convert, kernel
	// calls included); 0 for a request refused before reaching it.
	Took time.Duration
}

// MachineConfig configures a Machine.
type MachineConfig struct {
	// Memory is the guest memory; the machine attaches its IOMMU to it.
	Memory *guestmem.Memory
	// Scenario is what the guest runs; its checks name the result words.
	Scenario Scenario
	// IOMMU is the space the DMA devices go through (default: a new VFIO
	// type1 model).
	IOMMU *iommu.Model
	// Policy shapes the IOMMU entries.
	Policy dma.Policy
	// Logger receives warnings (default: discard).
	Logger *slog.Logger
	// OnCheck, if set, is called with every result word as it arrives.
	OnCheck func(CheckResult)
	// OnConversion, if set, is called after every conversion request.
	OnConversion func(ConversionEvent)
	// OnHostCall, if set, runs every host call (a write to HostCallPort) on
	// the writing vCPU's goroutine while that vCPU waits.
	OnHostCall func(cpu int, id uint32)
	// SetKVMAttributes, if set, sets attributes in KVM directly
	// (KVM_SET_MEMORY_ATTRIBUTES). The machine uses it for one thing: a
	// memory fault on a private access to a range that is not guest RAM
	// means KVM holds a PRIVATE attribute gmem never set (gmem refuses to
	// make non-RAM private); the machine clears it, and the access goes on
	// as one to memory no device decodes.
	SetKVMAttributes func(kvm.MemoryAttributes) error
	// portTrace, if set, sees every port access.
	portTrace func(cpu int, port uint16, out bool, v uint32)
	// MaxFaultRepeats is how many times in a row one vCPU may raise the
	// same memory fault that cannot be converted before it is stopped
	// (default 8): re-entering would only fault again.
	MaxFaultRepeats int
}

// Machine is the part of the VMM that does not need KVM: the devices, the
// conversion glue and the exit handler. Port handlers and HandleExit may be
// called from one goroutine per vCPU at once.
type Machine struct {
	mem     *guestmem.Memory
	att     *guestmem.Attachment
	model   *iommu.Model
	space   *peakSpace
	log     *slog.Logger
	conv    []*convDevice
	dma     []*dmaDevice
	console *console
	onCheck func(CheckResult)
	onConv  func(ConversionEvent)
	repeats int
	trace   func(cpu int, port uint16, out bool, v uint32)
	onHost  func(cpu int, id uint32)
	setKVM  func(kvm.MemoryAttributes) error

	// checkMu lets conversions run in parallel (read side) while the
	// invariant check after each one sees no conversion in flight.
	checkMu sync.RWMutex

	faultMu sync.Mutex
	faults  []faultGuard

	stats machineCounters
}

// faultGuard remembers a vCPU's last failing memory fault.
type faultGuard struct {
	last  kvm.MemoryFaultExit
	count int
}

type machineCounters struct {
	ioExits, mmioExits, hypercalls, memoryFaults   atomic.Uint64
	portRequests, hypercallRequests, faultRequests atomic.Uint64
	retOK, retEINVAL, retEAGAIN, rejected, failed  atomic.Uint64
	dmaAllowed, dmaBlocked, violations, unknownIO  atomic.Uint64
	hostCalls, strayAttributes                     atomic.Uint64
}

// peakSpace is the model IOMMU with a record of its most entries at once.
type peakSpace struct {
	*iommu.Model
	peak atomic.Int64
}

// Map maps and notes the entry count.
func (p *peakSpace) Map(iova, size uint64, host []byte) error {
	if err := p.Model.Map(iova, size, host); err != nil {
		return err
	}
	p.note()
	return nil
}

// Cut cuts and notes the entry count: a cut inside an entry leaves two.
func (p *peakSpace) Cut(iova, size uint64) (uint64, error) {
	n, err := p.Model.Cut(iova, size)
	p.note()
	return n, err
}

// note records the model's entry count if it is the most so far.
func (p *peakSpace) note() {
	n := int64(p.Model.Len())
	for {
		old := p.peak.Load()
		if n <= old || p.peak.CompareAndSwap(old, n) {
			return
		}
	}
}

// NewMachine builds the devices of cfg.Scenario's vCPUs and attaches the
// IOMMU to the memory.
func NewMachine(cfg MachineConfig) (*Machine, error) {
	if err := cfg.Scenario.Validate(); err != nil {
		return nil, err
	}
	if cfg.Memory == nil {
		return nil, errors.New("vmm: machine without memory")
	}
	m := &Machine{
		mem:     cfg.Memory,
		model:   cfg.IOMMU,
		log:     cfg.Logger,
		console: newConsole(cfg.Scenario),
		onCheck: cfg.OnCheck,
		onConv:  cfg.OnConversion,
		repeats: cfg.MaxFaultRepeats,
		trace:   cfg.portTrace,
		onHost:  cfg.OnHostCall,
		setKVM:  cfg.SetKVMAttributes,
	}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	if m.model == nil {
		m.model = iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
	}
	if m.repeats == 0 {
		m.repeats = 8
	}
	m.space = &peakSpace{Model: m.model}
	n := len(cfg.Scenario.Programs)
	for cpu := range n {
		m.conv = append(m.conv, &convDevice{status: ConvStatusNone})
		m.dma = append(m.dma, &dmaDevice{engine: m.model, log: m.log, cpu: cpu, status: DMAStatusNone})
	}
	m.faults = make([]faultGuard, n)
	att, err := m.mem.AttachIOMMU(m.space, dma.Options{Policy: cfg.Policy, Logger: m.log})
	if err != nil {
		return nil, fmt.Errorf("vmm: %w", err)
	}
	m.att = att
	return m, nil
}

// Close detaches the IOMMU from the memory.
func (m *Machine) Close() error { return m.att.Detach() }

// Memory returns the guest memory.
func (m *Machine) Memory() *guestmem.Memory { return m.mem }

// IOMMU returns the IOMMU model the devices go through.
func (m *Machine) IOMMU() *iommu.Model { return m.model }

// Policy returns the policy the machine's IOMMU is mapped with:
// MachineConfig.Policy as dma.New resolved it for the model (Auto: Cut on a
// model that cuts, Extent otherwise).
func (m *Machine) Policy() dma.Policy { return m.att.Policy() }

// VCPUs returns the number of vCPUs the machine has devices for.
func (m *Machine) VCPUs() int { return len(m.conv) }

// convert runs a request through the executor, checks the invariants once
// no other conversion is in flight, and reports the event.
func (m *Machine) convert(cpu int, src Source, req guestmem.Request) (guestmem.Result, error) {
	m.checkMu.RLock()
	start := time.Now()
	res, err := m.mem.Convert(req)
	took := time.Since(start)
	m.checkMu.RUnlock()
	m.checkMu.Lock()
	if verr := m.att.Check(); verr != nil {
		m.stats.violations.Add(1)
		m.log.Error("vmm: invariant violated after a conversion", "cpu", cpu, "request", req, "err", verr)
	}
	m.checkMu.Unlock()
	m.answered(cpu, src, req, res, err, took)
	return res, err
}

// answered counts the answer to a request and reports the event.
func (m *Machine) answered(cpu int, src Source, req guestmem.Request, res guestmem.Result, err error, took time.Duration) uint64 {
	ret := guestmem.HypercallRet(err)
	switch {
	case err == nil:
	case errors.Is(err, guestmem.ErrInvalid) || errors.Is(err, guestmem.ErrNotRAM):
		m.stats.rejected.Add(1)
	default:
		m.stats.failed.Add(1)
	}
	switch ret {
	case kvm.HypercallRetOK:
		m.stats.retOK.Add(1)
	case kvm.HypercallRetEAGAIN:
		m.stats.retEAGAIN.Add(1)
	default:
		m.stats.retEINVAL.Add(1)
	}
	if m.onConv != nil {
		m.onConv(ConversionEvent{CPU: cpu, Source: src, Request: req, Result: res, Err: err, Ret: ret, Took: took})
	}
	return ret
}

// PortOut is a vCPU's out instruction: size bytes (1, 2 or 4) of v to port.
// Accesses other than 4-byte ones to a device's registers, and ports no
// device decodes, are ignored.
func (m *Machine) PortOut(cpu int, port uint16, size int, v uint32) {
	if m.trace != nil {
		m.trace(cpu, port, true, v)
	}
	if cpu < 0 || cpu >= len(m.conv) || size != 4 {
		m.stats.unknownIO.Add(1)
		return
	}
	switch {
	case port == ConsolePort:
		m.result(cpu, v)
	case port == HostCallPort:
		m.stats.hostCalls.Add(1)
		if m.onHost != nil {
			m.onHost(cpu, v)
		}
	case port >= convPort(cpu, 0) && port < convPort(cpu, ConvPortStride):
		m.convOut(cpu, port-convPort(cpu, 0), v)
	case port >= dmaPort(cpu, 0) && port < dmaPort(cpu, DMAPortStride):
		m.dmaOut(cpu, port-dmaPort(cpu, 0), v)
	default:
		m.stats.unknownIO.Add(1)
	}
}

// PortIn is a vCPU's in instruction. Registers that cannot be read, other
// access sizes and ports no device decodes read as all ones, like an empty
// ISA bus.
func (m *Machine) PortIn(cpu int, port uint16, size int) uint32 {
	v := m.portIn(cpu, port, size)
	if m.trace != nil {
		m.trace(cpu, port, false, v)
	}
	return v
}

func (m *Machine) portIn(cpu int, port uint16, size int) uint32 {
	if cpu < 0 || cpu >= len(m.conv) || size != 4 {
		m.stats.unknownIO.Add(1)
		return ^uint32(0)
	}
	switch port {
	case convPort(cpu, ConvStatus):
		d := m.conv[cpu]
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.status
	case dmaPort(cpu, DMAStatus):
		d := m.dma[cpu]
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.status
	}
	m.stats.unknownIO.Add(1)
	return ^uint32(0)
}

func (m *Machine) convOut(cpu int, reg uint16, v uint32) {
	d := m.conv[cpu]
	d.mu.Lock()
	defer d.mu.Unlock()
	switch reg {
	case ConvGPALo:
		setLo(&d.gpa, v)
	case ConvGPAHi:
		setHi(&d.gpa, v)
	case ConvSizeLo:
		setLo(&d.size, v)
	case ConvSizeHi:
		setHi(&d.size, v)
	case ConvAttr:
		d.attr = v
	case ConvDoorbell:
		m.stats.portRequests.Add(1)
		gpa, size, to, ok := d.request()
		req := guestmem.Request{GPA: gpa, Size: size, To: to}
		if !ok {
			err := fmt.Errorf("vmm: conversion port: %w: ConvAttr %d", guestmem.ErrInvalid, d.attr)
			req.To = memattr.State(d.attr)
			d.status = uint32(m.answered(cpu, SourcePort, req, guestmem.Result{Request: req}, err, 0))
			return
		}
		_, err := m.convert(cpu, SourcePort, req)
		d.status = uint32(guestmem.HypercallRet(err))
	default:
		m.stats.unknownIO.Add(1)
	}
}

func (m *Machine) dmaOut(cpu int, reg uint16, v uint32) {
	d := m.dma[cpu]
	d.mu.Lock()
	defer d.mu.Unlock()
	switch reg {
	case DMASrcLo:
		setLo(&d.src, v)
	case DMASrcHi:
		setHi(&d.src, v)
	case DMADstLo:
		setLo(&d.dst, v)
	case DMADstHi:
		setHi(&d.dst, v)
	case DMALen:
		d.length = v
	case DMASeedLo:
		setLo(&d.seed, v)
	case DMASeedHi:
		setHi(&d.seed, v)
	case DMACmd:
		switch d.command(v) {
		case transferAllowed:
			m.stats.dmaAllowed.Add(1)
		case transferBlocked:
			m.stats.dmaBlocked.Add(1)
		}
	default:
		m.stats.unknownIO.Add(1)
	}
}

// result takes a result word from vCPU cpu.
func (m *Machine) result(cpu int, w uint32) {
	c := m.console
	c.mu.Lock()
	id := int(w & resultIDMask)
	var res CheckResult
	report := false
	switch {
	case id == ResultDone:
		c.done[cpu] = true
	case id >= len(c.checks) || c.checks[id].CPU != cpu:
		c.problems = append(c.problems, fmt.Sprintf("vCPU %d reported result word %#x for no check of its own", cpu, w))
	default:
		if _, dup := c.results[id]; dup {
			c.problems = append(c.problems, fmt.Sprintf("check %d (%s) reported twice", id, c.checks[id].Name))
			break
		}
		res = CheckResult{Check: c.checks[id], Passed: w&ResultFail == 0, Detail: w >> detailShift & detailMask}
		c.results[id] = res
		report = true
	}
	c.mu.Unlock()
	if report && m.onCheck != nil {
		m.onCheck(res)
	}
}

// Action is what a vCPU does after an exit.
type Action int

const (
	// Continue runs the vCPU again.
	Continue Action = iota
	// Halt ends the vCPU's run: its program is over (hlt).
	Halt
	// Stop ends the vCPU's run with an error.
	Stop
)

// String returns "continue", "halt" or "stop".
func (a Action) String() string {
	switch a {
	case Continue:
		return "continue"
	case Halt:
		return "halt"
	}
	return "stop"
}

// Offsets in struct kvm_run that HandleRun reads when the kvm package
// refuses a memory-fault exit as malformed (include/uapi/linux/kvm.h):
// exit_reason u32 @8; memory_fault flags u64 @32, gpa @40, size @48.
const (
	runOffExitReason = 8
	runOffFaultFlags = 32
	runOffFaultGPA   = 40
	runOffFaultSize  = 48
	runMinSize       = 2352
)

// HandleRun decodes the kvm_run contents run after a KVM_RUN that returned
// runErr (live or recorded) and handles the exit with HandleExit.
func (m *Machine) HandleRun(cpu int, run []byte, runErr error) (Action, error) {
	e, err := kvm.DecodeExit(run, runErr)
	return m.HandleExit(cpu, run, e, err)
}

// HandleExit handles vCPU cpu's exit e, decoded from run with decodeErr.
// Conversion requests are executed and answered; a bad request is answered
// EINVAL and the vCPU continues. It returns Stop with an error for exits
// that end the guest (shutdown, internal errors, contents that cannot be
// decoded) and Halt when the guest executed hlt.
func (m *Machine) HandleExit(cpu int, run []byte, e kvm.Exit, decodeErr error) (Action, error) {
	if cpu < 0 || cpu >= len(m.conv) {
		return Stop, fmt.Errorf("vmm: exit of unknown vCPU %d", cpu)
	}
	if decodeErr != nil {
		if errors.Is(decodeErr, kvm.ErrBadRun) && len(run) >= runMinSize &&
			kvm.ExitReason(binary.LittleEndian.Uint32(run[runOffExitReason:])) == kvm.ExitMemoryFault {
			// A memory fault whose fields break the uAPI (unknown flag
			// bits, size 0): refuse the request, keep the guest.
			m.stats.memoryFaults.Add(1)
			m.stats.faultRequests.Add(1)
			f := kvm.MemoryFaultExit{
				Flags: binary.LittleEndian.Uint64(run[runOffFaultFlags:]),
				GPA:   binary.LittleEndian.Uint64(run[runOffFaultGPA:]),
				Size:  binary.LittleEndian.Uint64(run[runOffFaultSize:]),
			}
			req := guestmem.Request{GPA: f.GPA, Size: f.Size, To: faultTarget(f)}
			err := fmt.Errorf("%w: %w", guestmem.ErrInvalid, decodeErr)
			m.answered(cpu, SourceMemoryFault, req, guestmem.Result{Request: req}, err, 0)
			return m.guardFault(cpu, f, err)
		}
		return Stop, fmt.Errorf("vmm: vCPU %d: %w", cpu, decodeErr)
	}
	switch e := e.(type) {
	case kvm.IOExit:
		m.stats.ioExits.Add(1)
		m.io(cpu, e)
		return Continue, nil
	case kvm.MMIOExit:
		// Nothing decodes MMIO: reads see all ones, writes vanish.
		m.stats.mmioExits.Add(1)
		if !e.IsWrite {
			for i := range e.Data {
				e.Data[i] = 0xFF
			}
		}
		return Continue, nil
	case kvm.HLTExit:
		return Halt, nil
	case kvm.IntrExit:
		return Continue, nil
	case kvm.HypercallExit:
		m.stats.hypercalls.Add(1)
		return Continue, m.hypercall(cpu, run, e)
	case kvm.MemoryFaultExit:
		m.stats.memoryFaults.Add(1)
		m.stats.faultRequests.Add(1)
		req := guestmem.Request{GPA: e.GPA, Size: e.Size, To: faultTarget(e)}
		_, err := m.convert(cpu, SourceMemoryFault, req)
		if err != nil && errors.Is(err, guestmem.ErrNotRAM) && e.Private() && m.setKVM != nil {
			err = m.clearStray(cpu, e)
		}
		if err != nil {
			return m.guardFault(cpu, e, err)
		}
		m.faultMu.Lock()
		m.faults[cpu] = faultGuard{}
		m.faultMu.Unlock()
		return Continue, nil
	case kvm.ShutdownExit:
		return Stop, fmt.Errorf("vmm: vCPU %d shut down (triple fault)", cpu)
	case kvm.InternalErrorExit:
		return Stop, fmt.Errorf("vmm: vCPU %d: KVM internal error, suberror %d, data %#x", cpu, e.Suberror, e.Data)
	case kvm.FailEntryExit:
		return Stop, fmt.Errorf("vmm: vCPU %d: entry failed, reason %#x", cpu, e.HardwareEntryFailureReason)
	case nil:
		return Stop, fmt.Errorf("vmm: vCPU %d: no exit", cpu)
	}
	return Stop, fmt.Errorf("vmm: vCPU %d: unexpected exit %s", cpu, e.Reason())
}

// clearStray clears the PRIVATE attribute KVM holds for a range that is
// not guest RAM, the cause of a private memory fault there.
func (m *Machine) clearStray(cpu int, f kvm.MemoryFaultExit) error {
	if err := m.setKVM(kvm.MemoryAttributes{Address: f.GPA, Size: f.Size}); err != nil {
		return fmt.Errorf("vmm: clear the stray private attribute of [%#x, +%#x): %w", f.GPA, f.Size, err)
	}
	m.stats.strayAttributes.Add(1)
	m.log.Warn("vmm: cleared a private attribute KVM held for memory that is not guest RAM",
		"cpu", cpu, "gpa", f.GPA, "size", f.Size)
	return nil
}

// faultTarget is the state a memory fault asks for: the access's kind.
func faultTarget(f kvm.MemoryFaultExit) memattr.State {
	if f.Private() {
		return memattr.Private
	}
	return memattr.Shared
}

// guardFault lets a vCPU re-enter after a failed memory-fault conversion,
// unless it has raised the same failing fault MaxFaultRepeats times in a
// row.
func (m *Machine) guardFault(cpu int, f kvm.MemoryFaultExit, err error) (Action, error) {
	m.faultMu.Lock()
	defer m.faultMu.Unlock()
	g := &m.faults[cpu]
	f.Errno = 0
	if g.count > 0 && g.last == f {
		g.count++
	} else {
		*g = faultGuard{last: f, count: 1}
	}
	if g.count >= m.repeats {
		return Stop, fmt.Errorf("vmm: vCPU %d raised the same memory fault (gpa %#x size %#x flags %#x) %d times: %w",
			cpu, f.GPA, f.Size, f.Flags, g.count, err)
	}
	return Continue, nil
}

// io handles a port I/O exit, string I/O included (one access per element).
func (m *Machine) io(cpu int, e kvm.IOExit) {
	n := int(e.Size)
	for i := range int(e.Count) {
		data := e.Data[i*n : (i+1)*n]
		if e.Direction == kvm.IOOut {
			var b [4]byte
			copy(b[:], data)
			m.PortOut(cpu, e.Port, n, binary.LittleEndian.Uint32(b[:]))
			continue
		}
		var b [4]byte
		binary.LittleEndian.PutUint32(b[:], m.PortIn(cpu, e.Port, n))
		copy(data, b[:n])
	}
}

// hypercall answers a KVM_EXIT_HYPERCALL: KVM_HC_MAP_GPA_RANGE is executed
// (a malformed one answered EINVAL), anything else answered -KVM_ENOSYS.
func (m *Machine) hypercall(cpu int, run []byte, h kvm.HypercallExit) error {
	var ret uint64
	mr, err := h.MapGPARange()
	if errors.Is(err, kvm.ErrNotMapGPARange) {
		ret = kvm.HypercallRetENOSYS
	} else {
		m.stats.hypercallRequests.Add(1)
		// The size is for reporting only when the request is malformed
		// (it may have wrapped).
		req := guestmem.Request{GPA: h.Args[0], Size: h.Args[1] * kvm.PageSize, To: memattr.Shared}
		if h.Args[2]&kvm.MapGPARangeEncrypted != 0 {
			req.To = memattr.Private
		}
		if err != nil {
			err = fmt.Errorf("%w: %w", guestmem.ErrInvalid, err)
			ret = m.answered(cpu, SourceHypercall, req, guestmem.Result{Request: req}, err, 0)
		} else {
			req.Size = mr.Size()
			_, err = m.convert(cpu, SourceHypercall, req)
			ret = guestmem.HypercallRet(err)
		}
	}
	if err := kvm.SetHypercallRet(run, ret); err != nil {
		return fmt.Errorf("vmm: vCPU %d: %w", cpu, err)
	}
	return nil
}

// Stats counts what the machine saw and did.
type Stats struct {
	// Exits by kind (HandleExit calls).
	IOExits, MMIOExits, Hypercalls, MemoryFaults uint64
	// Conversion requests by source.
	PortRequests, HypercallRequests, MemoryFaultRequests uint64
	// Answers given: 0, EINVAL, EAGAIN.
	AnsweredOK, AnsweredEINVAL, AnsweredEAGAIN uint64
	// Rejected requests were invalid (nothing touched); Failed ones were
	// valid but a step failed and the conversion was undone.
	Rejected, Failed uint64
	// DMA transfers the IOMMU let through or refused.
	DMAAllowed, DMABlocked uint64
	// Violations of I1/I2 found after conversions.
	Violations uint64
	// UnknownIO counts port accesses no device decodes.
	UnknownIO uint64
	// HostCalls counts writes to HostCallPort.
	HostCalls uint64
	// StrayAttributes counts private attributes KVM held for memory that is
	// not guest RAM, cleared after the memory faults they caused.
	StrayAttributes uint64
	// IOMMUEntries is the current number of IOMMU entries, PeakEntries the
	// most at once.
	IOMMUEntries, PeakEntries int
}

// Stats returns the counters.
func (m *Machine) Stats() Stats {
	s := &m.stats
	return Stats{
		IOExits: s.ioExits.Load(), MMIOExits: s.mmioExits.Load(),
		Hypercalls: s.hypercalls.Load(), MemoryFaults: s.memoryFaults.Load(),
		PortRequests: s.portRequests.Load(), HypercallRequests: s.hypercallRequests.Load(),
		MemoryFaultRequests: s.faultRequests.Load(),
		AnsweredOK:          s.retOK.Load(), AnsweredEINVAL: s.retEINVAL.Load(), AnsweredEAGAIN: s.retEAGAIN.Load(),
		Rejected: s.rejected.Load(), Failed: s.failed.Load(),
		DMAAllowed: s.dmaAllowed.Load(), DMABlocked: s.dmaBlocked.Load(),
		Violations: s.violations.Load(), UnknownIO: s.unknownIO.Load(),
		HostCalls: s.hostCalls.Load(), StrayAttributes: s.strayAttributes.Load(),
		IOMMUEntries: m.model.Len(), PeakEntries: int(m.space.peak.Load()),
	}
}

// Results returns the check results received so far, by id.
func (m *Machine) Results() []CheckResult {
	c := m.console
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]CheckResult, 0, len(c.results))
	for _, r := range c.results {
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b CheckResult) int { return a.ID - b.ID })
	return out
}

// Verdict sums up the checks: passed, and a line for each failed or missing
// check, each stray result word, and each vCPU that did not finish its
// program.
func (m *Machine) Verdict() (passed int, failed []string) {
	c := m.console
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, ch := range c.checks {
		r, ok := c.results[ch.ID]
		switch {
		case !ok:
			failed = append(failed, fmt.Sprintf("check %d (vCPU %d) %q: not reported", ch.ID, ch.CPU, ch.Name))
		case !r.Passed:
			failed = append(failed, fmt.Sprintf("check %d (vCPU %d) %q: failed, detail %#x", ch.ID, ch.CPU, ch.Name, r.Detail))
		default:
			passed++
		}
	}
	failed = append(failed, c.problems...)
	for cpu, d := range c.done {
		if !d {
			failed = append(failed, fmt.Sprintf("vCPU %d did not finish its program", cpu))
		}
	}
	return passed, failed
}
