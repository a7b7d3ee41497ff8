//go:build linux

package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/span"
)

// Layout of struct kvm_run (x86-64, 2352 bytes). Only the fields gmem reads
// or writes are named.
const (
	runSize          = 2352
	runOffImmediate  = 1   // immediate_exit, u8
	runOffExitReason = 8   // exit_reason, u32
	runOffFlags      = 14  // flags, u16
	runOffExit       = 32  // the exit union, 256 bytes
	runOffValidRegs  = 288 // kvm_valid_regs, u64 (first field after the union)

	// io: direction u8 @32, size u8 @33, port u16 @34, count u32 @36,
	// data_offset u64 @40 (from the start of the mapping).
	runOffIODirection  = 32
	runOffIOSize       = 33
	runOffIOPort       = 34
	runOffIOCount      = 36
	runOffIODataOffset = 40

	// mmio: phys_addr u64 @32, data [8]u8 @40, len u32 @48, is_write u8 @52.
	runOffMMIOPhysAddr = 32
	runOffMMIOData     = 40
	runOffMMIOLen      = 48
	runOffMMIOIsWrite  = 52

	// hypercall: nr u64 @32, args [6]u64 @40, ret u64 @88, flags u64 @96
	// (a union with the older u32 longmode).
	runOffHypercallNr    = 32
	runOffHypercallArgs  = 40
	runOffHypercallRet   = 88
	runOffHypercallFlags = 96

	// internal: suberror u32 @32, ndata u32 @36, data [16]u64 @40. The
	// system_event exit has the same shape (type, ndata, data).
	runOffInternalSuberror = 32
	runOffInternalNData    = 36
	runOffInternalData     = 40
	runMaxInternalData     = 16

	// fail_entry: hardware_entry_failure_reason u64 @32, cpu u32 @40.
	runOffFailEntryReason = 32
	runOffFailEntryCPU    = 40

	// hw (KVM_EXIT_UNKNOWN): hardware_exit_reason u64 @32.
	runOffUnknownReason = 32

	// memory_fault: flags u64 @32, gpa u64 @40, size u64 @48.
	runOffMemoryFaultFlags = 32
	runOffMemoryFaultGPA   = 40
	runOffMemoryFaultSize  = 48
)

// ErrBadRun means the kvm_run contents break the uAPI's rules: a field out
// of range, a data area outside the mapping, or an exit reason the KVM_RUN
// result does not allow. A live kernel never produces one; recorded or
// corrupted contents can.
var ErrBadRun = errors.New("kvm: malformed kvm_run")

// Exit is one decoded vCPU exit: one of IOExit, MMIOExit, HLTExit,
// ShutdownExit, IntrExit, HypercallExit, MemoryFaultExit, InternalErrorExit,
// FailEntryExit, UnknownExit, SystemEventExit or OtherExit.
type Exit interface {
	// Reason is the exit reason the value was decoded from.
	Reason() ExitReason
}

// IODirection is the direction of a port I/O exit.
type IODirection uint8

const (
	// IOIn is KVM_EXIT_IO_IN: the guest reads; the VMM fills Data.
	IOIn IODirection = 0
	// IOOut is KVM_EXIT_IO_OUT: the guest wrote Data.
	IOOut IODirection = 1
)

// String returns "in" or "out".
func (d IODirection) String() string {
	if d == IOIn {
		return "in"
	}
	return "out"
}

// IOExit is KVM_EXIT_IO: an in/out (or ins/outs) instruction on Port.
type IOExit struct {
	Direction IODirection
	// Size is the access width in bytes: 1, 2 or 4.
	Size uint8
	Port uint16
	// Count is the number of repetitions (string I/O), at least 1.
	Count uint32
	// DataOffset is where the data lives, from the start of the kvm_run
	// mapping.
	DataOffset uint64
	// Data is the Size*Count bytes at DataOffset. It aliases the kvm_run
	// buffer: for IOIn the VMM writes the guest's result into it before the
	// next KVM_RUN.
	Data []byte
}

// MMIOExit is KVM_EXIT_MMIO: an access to a guest physical address no
// memslot backs.
type MMIOExit struct {
	PhysAddr uint64
	// Data holds len bytes (1 to 8) and aliases the kvm_run buffer: for a
	// read the VMM writes the result into it before the next KVM_RUN.
	Data    []byte
	IsWrite bool
}

// HLTExit is KVM_EXIT_HLT: the guest executed hlt (no in-kernel irqchip).
// Running the vCPU again continues after the hlt.
type HLTExit struct{}

// ShutdownExit is KVM_EXIT_SHUTDOWN, usually a triple fault.
type ShutdownExit struct{}

// IntrExit is what KVM_RUN returning EINTR means: a signal or
// immediate_exit stopped the vCPU before or during guest execution. The
// guest state is consistent; run again to continue.
type IntrExit struct{}

// HypercallExit is KVM_EXIT_HYPERCALL. The VMM answers with
// [SetHypercallRet] (or [VCPU.SetHypercallRet]) before the next KVM_RUN;
// KVM copies the value into the guest's RAX.
type HypercallExit struct {
	Nr   uint64
	Args [6]uint64
	// Ret is the current return value; recent kernels preset it to 0.
	Ret uint64
	// Flags has ExitHypercallLongMode set for a 64-bit caller.
	Flags uint64
}

// MemoryFaultExit is KVM_EXIT_MEMORY_FAULT, which comes with KVM_RUN
// failing with EFAULT or EHWPOISON: the guest touched [GPA, GPA+Size) in a
// way its memory cannot serve, typically a private access to a shared page
// or the other way round (an implicit conversion request).
type MemoryFaultExit struct {
	GPA, Size uint64
	// Flags may have MemoryExitFlagPrivate.
	Flags uint64
	// Errno is KVM_RUN's errno: unix.EFAULT, or unix.EHWPOISON for a
	// poisoned page.
	Errno unix.Errno
}

// InternalErrorExit is KVM_EXIT_INTERNAL_ERROR, KVM could not handle the
// exit itself (for example an instruction it cannot emulate).
type InternalErrorExit struct {
	Suberror uint32
	Data     []uint64
}

// FailEntryExit is KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the
// guest, usually because of an invalid register state.
type FailEntryExit struct {
	HardwareEntryFailureReason uint64
	CPU                        uint32
}

// UnknownExit is KVM_EXIT_UNKNOWN.
type UnknownExit struct {
	HardwareExitReason uint64
}

// SystemEventExit is KVM_EXIT_SYSTEM_EVENT (shutdown, reset, crash...).
type SystemEventExit struct {
	Type uint32
	Data []uint64
}

// OtherExit is any exit reason this package does not decode further.
type OtherExit struct {
	ExitReason ExitReason
}

// Reason implements Exit.
func (IOExit) Reason() ExitReason { return ExitIO }

// Reason implements Exit.
func (MMIOExit) Reason() ExitReason { return ExitMMIO }

// Reason implements Exit.
func (HLTExit) Reason() ExitReason { return ExitHLT }

// Reason implements Exit.
func (ShutdownExit) Reason() ExitReason { return ExitShutdown }

// Reason implements Exit.
func (IntrExit) Reason() ExitReason { return ExitIntr }

// Reason implements Exit.
func (HypercallExit) Reason() ExitReason { return ExitHypercall }

// Reason implements Exit.
func (MemoryFaultExit) Reason() ExitReason { return ExitMemoryFault }

// Reason implements Exit.
func (InternalErrorExit) Reason() ExitReason { return ExitInternalError }

// Reason implements Exit.
func (FailEntryExit) Reason() ExitReason { return ExitFailEntry }

// Reason implements Exit.
func (UnknownExit) Reason() ExitReason { return ExitUnknown }

// Reason implements Exit.
func (SystemEventExit) Reason() ExitReason { return ExitSystemEvent }

// Reason implements Exit.
func (e OtherExit) Reason() ExitReason { return e.ExitReason }

// LongMode reports whether the caller was in 64-bit mode.
func (h HypercallExit) LongMode() bool { return h.Flags&ExitHypercallLongMode != 0 }

// Private reports whether the faulting access was private.
func (m MemoryFaultExit) Private() bool { return m.Flags&MemoryExitFlagPrivate != 0 }

// Range returns [GPA, GPA+Size); DecodeExit has checked that it does not
// wrap.
func (m MemoryFaultExit) Range() span.Range {
	return span.Range{Start: m.GPA, End: m.GPA + m.Size}
}

var le = binary.LittleEndian

// DecodeExit decodes the kvm_run mapping run (at least the 2352 bytes of
// struct kvm_run; the full mapping when an I/O exit's data follows it) after
// a KVM_RUN that returned runErr.
//
// runErr nil: the exit reason is decoded. runErr EINTR: IntrExit. runErr
// EFAULT or EHWPOISON with exit reason KVM_EXIT_MEMORY_FAULT: a
// MemoryFaultExit. Any other runErr is returned wrapped (errors.Is works on
// the errno). Contents that break the uAPI's rules give an error wrapping
// ErrBadRun. Slices in the result alias run.
func DecodeExit(run []byte, runErr error) (Exit, error) {
	if len(run) < runSize {
		return nil, fmt.Errorf("%w: %d bytes, kvm_run is %d", ErrBadRun, len(run), runSize)
	}
	reason := ExitReason(le.Uint32(run[runOffExitReason:]))
	if runErr != nil {
		var errno unix.Errno
		switch {
		case errors.Is(runErr, unix.EINTR):
			return IntrExit{}, nil
		case errors.As(runErr, &errno) && (errno == unix.EFAULT || errno == unix.EHWPOISON) &&
			reason == ExitMemoryFault:
			return decodeMemoryFault(run, errno)
		}
		// exit_reason means nothing after other failures.
		return nil, ioctlError("KVM_RUN", runErr)
	}
	switch reason {
	case ExitIO:
		return decodeIO(run)
	case ExitMMIO:
		return decodeMMIO(run)
	case ExitHLT:
		return HLTExit{}, nil
	case ExitShutdown:
		return ShutdownExit{}, nil
	case ExitIntr:
		return IntrExit{}, nil
	case ExitHypercall:
		return decodeHypercall(run)
	case ExitMemoryFault:
		return nil, fmt.Errorf("%w: %s without KVM_RUN failing with EFAULT or EHWPOISON", ErrBadRun, reason)
	case ExitInternalError:
		sub, data, err := decodeWords(run)
		if err != nil {
			return nil, err
		}
		return InternalErrorExit{Suberror: sub, Data: data}, nil
	case ExitSystemEvent:
		typ, data, err := decodeWords(run)
		if err != nil {
			return nil, err
		}
		return SystemEventExit{Type: typ, Data: data}, nil
	case ExitFailEntry:
		return FailEntryExit{
			HardwareEntryFailureReason: le.Uint64(run[runOffFailEntryReason:]),
			CPU:                        le.Uint32(run[runOffFailEntryCPU:]),
		}, nil
	case ExitUnknown:
		return UnknownExit{HardwareExitReason: le.Uint64(run[runOffUnknownReason:])}, nil
	}
	return OtherExit{ExitReason: reason}, nil
}

func decodeIO(run []byte) (Exit, error) {
	e := IOExit{
		Direction:  IODirection(run[runOffIODirection]),
		Size:       run[runOffIOSize],
		Port:       le.Uint16(run[runOffIOPort:]),
		Count:      le.Uint32(run[runOffIOCount:]),
		DataOffset: le.Uint64(run[runOffIODataOffset:]),
	}
	if e.Direction != IOIn && e.Direction != IOOut {
		return nil, fmt.Errorf("%w: io direction %d", ErrBadRun, e.Direction)
	}
	if e.Size != 1 && e.Size != 2 && e.Size != 4 {
		return nil, fmt.Errorf("%w: io size %d", ErrBadRun, e.Size)
	}
	if e.Count == 0 {
		return nil, fmt.Errorf("%w: io count 0", ErrBadRun)
	}
	n := uint64(e.Size) * uint64(e.Count) // cannot overflow: 4 * 2^32
	end, carry := bits.Add64(e.DataOffset, n, 0)
	// The data must lie after struct kvm_run: inside it, an "in" result
	// would overwrite the kernel's fields.
	if carry != 0 || e.DataOffset < runSize || end > uint64(len(run)) {
		return nil, fmt.Errorf("%w: io data [%#x, +%#x) outside the %#x-byte mapping after kvm_run",
			ErrBadRun, e.DataOffset, n, len(run))
	}
	e.Data = run[e.DataOffset:end:end]
	return e, nil
}

func decodeMMIO(run []byte) (Exit, error) {
	n := le.Uint32(run[runOffMMIOLen:])
	w := run[runOffMMIOIsWrite]
	if n == 0 || n > 8 {
		return nil, fmt.Errorf("%w: mmio len %d", ErrBadRun, n)
	}
	if w > 1 {
		return nil, fmt.Errorf("%w: mmio is_write %d", ErrBadRun, w)
	}
	end := runOffMMIOData + int(n)
	return MMIOExit{
		PhysAddr: le.Uint64(run[runOffMMIOPhysAddr:]),
		Data:     run[runOffMMIOData:end:end],
		IsWrite:  w == 1,
	}, nil
}

func decodeHypercall(run []byte) (Exit, error) {
	h := HypercallExit{
		Nr:    le.Uint64(run[runOffHypercallNr:]),
		Ret:   le.Uint64(run[runOffHypercallRet:]),
		Flags: le.Uint64(run[runOffHypercallFlags:]),
	}
	for i := range h.Args {
		h.Args[i] = le.Uint64(run[runOffHypercallArgs+8*i:])
	}
	// Bits 31:1 must be zero. Bits 63:32 were padding after the u32
	// longmode field in older kernels and are not looked at.
	if h.Flags&0xffff_fffe != 0 {
		return nil, fmt.Errorf("%w: hypercall flags %#x", ErrBadRun, h.Flags)
	}
	return h, nil
}

func decodeMemoryFault(run []byte, errno unix.Errno) (Exit, error) {
	m := MemoryFaultExit{
		Flags: le.Uint64(run[runOffMemoryFaultFlags:]),
		GPA:   le.Uint64(run[runOffMemoryFaultGPA:]),
		Size:  le.Uint64(run[runOffMemoryFaultSize:]),
		Errno: errno,
	}
	if m.Flags&^uint64(MemoryExitFlagPrivate) != 0 {
		return nil, fmt.Errorf("%w: memory fault flags %#x", ErrBadRun, m.Flags)
	}
	if m.Size == 0 {
		return nil, fmt.Errorf("%w: memory fault size 0 at %#x", ErrBadRun, m.GPA)
	}
	if _, err := span.FromSize(m.GPA, m.Size); err != nil {
		return nil, fmt.Errorf("%w: memory fault: %w", ErrBadRun, err)
	}
	return m, nil
}

// decodeWords decodes the (u32, ndata u32, data [16]u64) shape shared by
// the internal-error and system-event exits.
func decodeWords(run []byte) (uint32, []uint64, error) {
	first := le.Uint32(run[runOffInternalSuberror:])
	n := le.Uint32(run[runOffInternalNData:])
	if n > runMaxInternalData {
		return 0, nil, fmt.Errorf("%w: ndata %d > %d", ErrBadRun, n, runMaxInternalData)
	}
	var data []uint64
	for i := range int(n) {
		data = append(data, le.Uint64(run[runOffInternalData+8*i:]))
	}
	return first, data, nil
}

// SetHypercallRet writes the hypercall result into a kvm_run buffer whose
// current exit is KVM_EXIT_HYPERCALL; KVM hands it to the guest on the next
// KVM_RUN.
func SetHypercallRet(run []byte, ret uint64) error {
	if len(run) < runSize {
		return fmt.Errorf("%w: %d bytes, kvm_run is %d", ErrBadRun, len(run), runSize)
	}
	if r := ExitReason(le.Uint32(run[runOffExitReason:])); r != ExitHypercall {
		return fmt.Errorf("kvm: set hypercall ret: current exit is %s", r)
	}
	le.PutUint64(run[runOffHypercallRet:], ret)
	return nil
}

// MapGPARange is a decoded KVM_HC_MAP_GPA_RANGE request: convert Pages 4 KiB
// pages starting at GPA to private (ToPrivate) or shared.
type MapGPARange struct {
	GPA   uint64
	Pages uint64
	// ToPrivate is true for KVM_MAP_GPA_RANGE_ENCRYPTED.
	ToPrivate bool
	// PageSize is the guest's preferred page size in bytes (4 KiB, 2 MiB or
	// 1 GiB); a hint only, the request is always counted in 4 KiB pages.
	PageSize uint64
}

// Size returns the request's length in bytes.
func (m MapGPARange) Size() uint64 { return m.Pages * PageSize }

// Range returns [GPA, GPA+Size); DecodeMapGPARange has checked that it does
// not wrap.
func (m MapGPARange) Range() span.Range {
	return span.Range{Start: m.GPA, End: m.GPA + m.Size()}
}

// Reasons a KVM_HC_MAP_GPA_RANGE request is refused, wrapped in a
// *MapGPARangeError.
var (
	// ErrMapGPAUnaligned: the GPA is not 4 KiB aligned.
	ErrMapGPAUnaligned = errors.New("gpa not page aligned")
	// ErrMapGPAZeroPages: the page count is 0.
	ErrMapGPAZeroPages = errors.New("zero pages")
	// ErrMapGPAWrap: the range runs past the end of the address space.
	ErrMapGPAWrap = errors.New("range wraps")
	// ErrMapGPAAttributes: attribute bits other than a page size of 0 to 2
	// (bits 3:0) and bit 4 (encrypted).
	ErrMapGPAAttributes = errors.New("invalid attributes")
	// ErrNotMapGPARange: the hypercall is not KVM_HC_MAP_GPA_RANGE.
	ErrNotMapGPARange = errors.New("kvm: hypercall is not KVM_HC_MAP_GPA_RANGE")
)

// MapGPARangeError is a KVM_HC_MAP_GPA_RANGE request the guest got wrong.
// The VMM answers it with [HypercallRetEINVAL].
type MapGPARangeError struct {
	GPA, Pages, Attributes uint64
	// Err is one of ErrMapGPAUnaligned, ErrMapGPAZeroPages, ErrMapGPAWrap,
	// ErrMapGPAAttributes.
	Err error
}

// Error describes the request and why it was refused.
func (e *MapGPARangeError) Error() string {
	return fmt.Sprintf("kvm: KVM_HC_MAP_GPA_RANGE(gpa %#x, pages %#x, attrs %#x): %v",
		e.GPA, e.Pages, e.Attributes, e.Err)
}

// Unwrap returns the reason.
func (e *MapGPARangeError) Unwrap() error { return e.Err }

// DecodeMapGPARange decodes and validates the three KVM_HC_MAP_GPA_RANGE
// arguments (a0 = gpa, a1 = number of 4 KiB pages, a2 = attributes).
func DecodeMapGPARange(gpa, pages, attrs uint64) (MapGPARange, error) {
	fail := func(err error) (MapGPARange, error) {
		return MapGPARange{}, &MapGPARangeError{GPA: gpa, Pages: pages, Attributes: attrs, Err: err}
	}
	if gpa%PageSize != 0 {
		return fail(ErrMapGPAUnaligned)
	}
	if pages == 0 {
		return fail(ErrMapGPAZeroPages)
	}
	if hi, lo := bits.Mul64(pages, PageSize); hi != 0 {
		return fail(ErrMapGPAWrap)
	} else if _, carry := bits.Add64(gpa, lo, 0); carry != 0 {
		return fail(ErrMapGPAWrap)
	}
	sz := attrs & 0xf
	if attrs&^uint64(0xf|MapGPARangeEncrypted) != 0 || sz > MapGPARangePageSize1G {
		return fail(ErrMapGPAAttributes)
	}
	return MapGPARange{
		GPA:       gpa,
		Pages:     pages,
		ToPrivate: attrs&MapGPARangeEncrypted != 0,
		PageSize:  PageSize << (9 * sz), // 4 KiB, 2 MiB, 1 GiB
	}, nil
}

// MapGPARange decodes h as a KVM_HC_MAP_GPA_RANGE request. It returns
// ErrNotMapGPARange for another hypercall and a *MapGPARangeError for a
// malformed request.
func (h HypercallExit) MapGPARange() (MapGPARange, error) {
	if h.Nr != HCMapGPARange {
		return MapGPARange{}, fmt.Errorf("%w: nr %d", ErrNotMapGPARange, h.Nr)
	}
	return DecodeMapGPARange(h.Args[0], h.Args[1], h.Args[2])
}
