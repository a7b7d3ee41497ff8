package vmm

import (
	"errors"
	"fmt"

	"github.com/gmemproject/gmem/memattr"
)

// StepKind says what a Step does.
type StepKind int

const (
	// StepConvert writes a request into the conversion port, rings the
	// doorbell and checks the status against Want.
	StepConvert StepKind = iota + 1
	// StepFill has the guest write qwords Seed, Seed+1, ... to [GPA,
	// GPA+Size). It is not a check.
	StepFill
	// StepVerify checks that [GPA, GPA+Size) holds qwords Seed, Seed+1, ...
	StepVerify
	// StepDeviceFill has the DMA device fill its buffer with qwords Seed,
	// Seed+1, ... It is not a check.
	StepDeviceFill
	// StepDMA runs DMA command Cmd (DMACmdToBuffer from GPA, DMACmdToRAM to
	// GPA) for Size bytes and checks the status against Want.
	StepDMA
	// StepHost writes Seed to HostCallPort: the VMM runs host call Seed
	// before the guest goes on. It is not a check.
	StepHost
	// StepTouch checks that the qword at GPA reads Seed. GPA may be any
	// address the guest maps, RAM or not (what no device decodes reads as
	// all ones).
	StepTouch
)

// Step is one thing a program does. Convert, Verify, DMA and Touch steps
// are checks: each reports one result word on the console.
type Step struct {
	Kind StepKind
	// Name describes the check.
	Name string
	GPA  uint64
	Size uint64
	// Attr is the raw ConvAttr value (StepConvert).
	Attr uint32
	// Seed is the first qword of a pattern (StepFill, StepVerify,
	// StepDeviceFill).
	Seed uint64
	// Cmd is the DMA command (StepDMA).
	Cmd uint32
	// Want is the expected status (StepConvert, StepDMA).
	Want uint32
}

// IsCheck reports whether the step reports a result.
func (s Step) IsCheck() bool {
	return s.Kind == StepConvert || s.Kind == StepVerify || s.Kind == StepDMA || s.Kind == StepTouch
}

// Convert is a conversion request to `to` that must answer want.
func Convert(name string, gpa, size uint64, to memattr.State, want uint32) Step {
	attr := uint32(ConvToShared)
	if to == memattr.Private {
		attr = ConvToPrivate
	}
	return Step{Kind: StepConvert, Name: name, GPA: gpa, Size: size, Attr: attr, Want: want}
}

// ConvertRaw is a conversion request with a raw ConvAttr value.
func ConvertRaw(name string, gpa, size uint64, attr, want uint32) Step {
	return Step{Kind: StepConvert, Name: name, GPA: gpa, Size: size, Attr: attr, Want: want}
}

// Fill has the guest write a pattern.
func Fill(gpa, size, seed uint64) Step {
	return Step{Kind: StepFill, GPA: gpa, Size: size, Seed: seed}
}

// Verify checks a pattern in guest memory.
func Verify(name string, gpa, size, seed uint64) Step {
	return Step{Kind: StepVerify, Name: name, GPA: gpa, Size: size, Seed: seed}
}

// DeviceFill fills the DMA device's buffer with a pattern.
func DeviceFill(seed uint64) Step { return Step{Kind: StepDeviceFill, Seed: seed} }

// DMAToRAM has the device write size bytes of its buffer at gpa.
func DMAToRAM(name string, gpa, size uint64, want uint32) Step {
	return Step{Kind: StepDMA, Name: name, GPA: gpa, Size: size, Cmd: DMACmdToRAM, Want: want}
}

// DMAFromRAM has the device read size bytes at gpa into its buffer.
func DMAFromRAM(name string, gpa, size uint64, want uint32) Step {
	return Step{Kind: StepDMA, Name: name, GPA: gpa, Size: size, Cmd: DMACmdToBuffer, Want: want}
}

// Host has the VMM run host call id between two guest steps.
func Host(id uint32) Step { return Step{Kind: StepHost, Seed: uint64(id)} }

// Touch checks that the guest reads want at gpa.
func Touch(name string, gpa, want uint64) Step {
	return Step{Kind: StepTouch, Name: name, GPA: gpa, Seed: want}
}

// Program is what one vCPU does, in order.
type Program struct {
	Steps []Step
}

// Scenario is one program per vCPU; vCPU i runs Programs[i].
type Scenario struct {
	Programs []Program
}

// Check names one check of a scenario. Its ID is its index in
// Scenario.Checks: checks are numbered program by program, in step order.
type Check struct {
	ID   int
	CPU  int
	Name string
}

// Checks lists the scenario's checks.
func (s Scenario) Checks() []Check {
	var out []Check
	for cpu, p := range s.Programs {
		for _, st := range p.Steps {
			if st.IsCheck() {
				out = append(out, Check{ID: len(out), CPU: cpu, Name: st.Name})
			}
		}
	}
	return out
}

// firstIDs returns the id of each program's first check.
func (s Scenario) firstIDs() []int {
	out := make([]int, len(s.Programs))
	n := 0
	for cpu, p := range s.Programs {
		out[cpu] = n
		for _, st := range p.Steps {
			if st.IsCheck() {
				n++
			}
		}
	}
	return out
}

// ErrScenario is a scenario the machine cannot run.
var ErrScenario = errors.New("vmm: bad scenario")

// maxChecks keeps check ids below ResultDone.
const maxChecks = ResultDone

// Validate checks what the compiler and the interpreter rely on: a program
// per vCPU (1 to MaxVCPUs), known step kinds, fills and verifies of whole
// qwords inside RAM the guest maps, and check ids that fit a result word.
func (s Scenario) Validate() error {
	if len(s.Programs) == 0 || len(s.Programs) > MaxVCPUs {
		return fmt.Errorf("%w: %d programs, want 1 to %d", ErrScenario, len(s.Programs), MaxVCPUs)
	}
	if n := len(s.Checks()); n > maxChecks {
		return fmt.Errorf("%w: %d checks, at most %d", ErrScenario, n, maxChecks)
	}
	for cpu, p := range s.Programs {
		for i, st := range p.Steps {
			fail := func(format string, args ...any) error {
				return fmt.Errorf("%w: vCPU %d step %d (%s): %s", ErrScenario, cpu, i, st.Name, fmt.Sprintf(format, args...))
			}
			switch st.Kind {
			case StepConvert, StepDeviceFill:
			case StepHost:
				if st.Seed > 1<<32-1 {
					return fail("host call %#x does not fit the port", st.Seed)
				}
			case StepTouch:
				if st.GPA%8 != 0 || st.GPA > MapSize-8 {
					return fail("touch at %#x: not an aligned qword the guest maps", st.GPA)
				}
			case StepFill, StepVerify:
				if st.Size == 0 || st.Size%8 != 0 || st.GPA%8 != 0 || st.Size/8 > 1<<31 {
					return fail("pattern of %#x bytes at %#x is not whole qwords", st.Size, st.GPA)
				}
				if !guestRAM(st.GPA, st.Size) {
					return fail("pattern [%#x, +%#x) outside the guest's RAM", st.GPA, st.Size)
				}
			case StepDMA:
				if st.Cmd != DMACmdToRAM && st.Cmd != DMACmdToBuffer {
					return fail("DMA command %d", st.Cmd)
				}
				if st.Size > 1<<32-1 {
					return fail("DMA length %#x", st.Size)
				}
			default:
				return fail("unknown step kind %d", st.Kind)
			}
		}
	}
	return nil
}

// guestRAM reports whether [gpa, gpa+size) is RAM the guest maps, above the
// memory its code and tables use.
func guestRAM(gpa, size uint64) bool {
	end := gpa + size
	return end > gpa && gpa >= BuffersGPA && end <= RAM1GPA+RAM1Size
}

// Pattern seeds of the built-in scenario: recognisable in a memory dump.
const (
	seedDevice  = 0xD0D0_0000_0000_0000
	seedGuest   = 0x6E57_0000_0000_0000
	seedPrivate = 0x9121_0000_0000_0000
)

// Builtin returns the scenario gmem demo runs on vcpus vCPUs (1 to
// MaxVCPUs). vCPU 0 walks through every kind of conversion: to shared and
// DMA into it, back to private with the device refused and the page intact,
// mixed and partial ranges, ranges spanning the two RAM blocks, and requests
// the VMM must reject. Each other vCPU converts its own window of ram1 back
// and forth at the same time, with DMA checks after each conversion.
func Builtin(vcpus int) Scenario { return builtin(vcpus, false) }

// BuiltinSharedCode is Builtin for a VM whose code and tables stay shared
// (New on a VM with KVM private memory): the device reads the guest's code
// instead of being refused.
func BuiltinSharedCode(vcpus int) Scenario { return builtin(vcpus, true) }

func builtin(vcpus int, codeShared bool) Scenario {
	s := Scenario{Programs: []Program{mainProgram(codeShared)}}
	for cpu := 1; cpu < vcpus; cpu++ {
		s.Programs = append(s.Programs, workerProgram(cpu))
	}
	return s
}

const pg = 4096

func mainProgram(codeShared bool) Program {
	const (
		a = BuffersGPA           // 1 MiB: share, DMA, back to private
		b = BuffersGPA + 0x20000 // mixed and partial conversions
		x = RAM1GPA              // the ram0/ram1 boundary
		h = HoleGPA              // the MMIO hole
	)
	sh, pr := memattr.Shared, memattr.Private
	ok, inval := uint32(ConvStatusOK), uint32(ConvStatusEINVAL)
	dOK, dBlocked, dBad := uint32(DMAStatusOK), uint32(DMAStatusBlocked), uint32(DMAStatusBadRequest)
	var st []Step
	add := func(s ...Step) { st = append(st, s...) }

	// Share four pages and let the device write and read them.
	add(Convert("A[0:4] to shared", a, 4*pg, sh, ok),
		DeviceFill(seedDevice+1),
		DMAToRAM("device writes A[0]", a, pg, dOK),
		Verify("A[0] holds the device's bytes", a, pg, seedDevice+1),
		Fill(a+pg, pg, seedGuest+1),
		DMAFromRAM("device reads A[1]", a+pg, pg, dOK),
		DMAToRAM("device writes what it read to A[2]", a+2*pg, pg, dOK),
		Verify("A[2] holds the guest's bytes from A[1]", a+2*pg, pg, seedGuest+1))

	// One page back to private: the device is refused and the page intact.
	add(Convert("A[1] back to private", a+pg, pg, pr, ok),
		Fill(a+pg, pg, seedPrivate+1),
		DeviceFill(seedDevice+2),
		DMAToRAM("device refused writing private A[1]", a+pg, pg, dBlocked),
		Verify("private A[1] unchanged", a+pg, pg, seedPrivate+1),
		DMAFromRAM("device refused reading private A[1]", a+pg, pg, dBlocked),
		DMAToRAM("device still writes A[2] next to it", a+2*pg, pg, dOK),
		Verify("A[2] holds the device's bytes", a+2*pg, pg, seedDevice+2),
		DMAToRAM("device refused a transfer from A[0] into A[1]", a+pg/2, pg, dBlocked),
		Verify("A[0] unchanged by the refused transfer", a, pg, seedDevice+1))
	if codeShared {
		add(DMAFromRAM("device reads the guest's shared code", CodeGPA, pg, dOK))
	} else {
		add(DMAFromRAM("device refused reading guest code", CodeGPA, pg, dBlocked))
	}

	// Mixed and partial conversions of B[0:8].
	add(Convert("B[0:8] to shared", b, 8*pg, sh, ok),
		Convert("B[2:4] back to private (partial)", b+2*pg, 2*pg, pr, ok),
		DMAToRAM("device refused B[2]", b+2*pg, pg, dBlocked),
		Convert("B[0:8] to shared again (mixed)", b, 8*pg, sh, ok),
		DMAToRAM("device reaches B[2] again", b+2*pg, pg, dOK),
		Convert("B[1:7] to private (partial)", b+pg, 6*pg, pr, ok),
		DMAToRAM("device reaches B[0]", b, pg, dOK),
		DMAToRAM("device refused B[1]", b+pg, pg, dBlocked),
		DMAToRAM("device refused B[6]", b+6*pg, pg, dBlocked),
		DMAToRAM("device reaches B[7]", b+7*pg, pg, dOK),
		Convert("B[0:8] to private (mixed)", b, 8*pg, pr, ok),
		DMAToRAM("device refused B[0]", b, pg, dBlocked),
		DMAToRAM("device refused B[7]", b+7*pg, pg, dBlocked),
		Convert("B[0:8] to private again (same state)", b, 8*pg, pr, ok))

	// Requests spanning ram0 and ram1.
	add(Convert("X[-2:2] to shared across ram0/ram1", x-2*pg, 4*pg, sh, ok),
		DeviceFill(seedDevice+3),
		DMAToRAM("device writes across the block boundary", x-pg/2, pg, dOK),
		Verify("bytes across the block boundary", x-pg/2, pg, seedDevice+3),
		Convert("X[-1:1] back to private across ram0/ram1", x-pg, 2*pg, pr, ok),
		DMAToRAM("device refused across the block boundary", x-pg/2, pg, dBlocked),
		DMAToRAM("device still reaches X[-2] in ram0", x-2*pg, pg, dOK),
		DMAToRAM("device still reaches X[1] in ram1", x+pg, pg, dOK),
		Convert("X[-2:2] to private", x-2*pg, 4*pg, pr, ok))

	// Requests the VMM must reject, changing nothing.
	add(Convert("unaligned GPA rejected", a+0x10, pg, sh, inval),
		Convert("unaligned size rejected", a, pg/2, sh, inval),
		Convert("zero size rejected", a, 0, sh, inval),
		ConvertRaw("unknown direction rejected", a, pg, 7, inval),
		Convert("wrapping range rejected", 1<<64-pg, 2*pg, sh, inval),
		Convert("range beyond the address space rejected", MaxGPA-pg, 2*pg, sh, inval),
		Convert("MMIO hole to private rejected", h, pg, pr, inval),
		Convert("unbacked range to private rejected", 12*mib, pg, pr, inval),
		Convert("MMIO hole to shared accepted and ignored", h, 16*pg, sh, ok),
		Convert("last page of ram1 to shared", h-pg, pg, sh, ok),
		Convert("private range running into the MMIO hole rejected", h-pg, 2*pg, pr, inval),
		DMAToRAM("last page of ram1 still shared", h-pg, pg, dOK),
		DMAToRAM("device refused the MMIO hole", h, pg, dBlocked),
		DMAToRAM("device rejects a zero-length transfer", a, 0, dBad),
		DMAToRAM("device rejects an oversized transfer", a, DMABufferSize+8, dBad),
		Convert("last page of ram1 back to private", h-pg, pg, pr, ok),
		Convert("A[0:4] back to private", a, 4*pg, pr, ok),
		DMAToRAM("device refused A[0] at the end", a, pg, dBlocked))
	return Program{Steps: st}
}

// workerProgram is vCPU cpu's churn over a window of ram1 of its own.
func workerProgram(cpu int) Program {
	w := uint64(RAM1GPA + mib + (cpu-1)*256*1024)
	ok := uint32(ConvStatusOK)
	sh, pr := memattr.Shared, memattr.Private
	var st []Step
	for k := range uint64(8) {
		p := w + k*2*pg
		seed := uint64(cpu)<<40 | k<<32
		name := func(s string) string { return fmt.Sprintf("vCPU %d round %d: %s", cpu, k, s) }
		st = append(st,
			Convert(name("to shared"), p, 2*pg, sh, ok),
			DeviceFill(seedDevice|seed),
			DMAToRAM(name("device writes"), p, pg, DMAStatusOK),
			Verify(name("device's bytes arrived"), p, pg, seedDevice|seed),
			Convert(name("back to private"), p, 2*pg, pr, ok),
			Fill(p+pg, pg, seedPrivate|seed),
			DMAToRAM(name("device refused"), p+pg, pg, DMAStatusBlocked),
			Verify(name("private page unchanged"), p+pg, pg, seedPrivate|seed))
	}
	return Program{Steps: st}
}
