package vmm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guest"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
)

// Config configures a VM or a host-driven run.
type Config struct {
	// Mode is the memory's backing.
	Mode guestmem.Mode
	// VCPUs is the number of vCPUs when Scenario is nil (default 1): the
	// built-in scenario for that many.
	VCPUs int
	// Scenario is what the guest runs (default Builtin(VCPUs)); it decides
	// the number of vCPUs.
	Scenario *Scenario
	// Policy shapes the IOMMU entries.
	Policy dma.Policy
	// IOMMU is the space the devices go through (default: a new VFIO type1
	// model).
	IOMMU *iommu.Model
	// Logger receives warnings (default: discard).
	Logger *slog.Logger
	// OnCheck and OnConversion are passed to the Machine.
	OnCheck      func(CheckResult)
	OnConversion func(ConversionEvent)
	// Inject is passed to guestmem, for fault-injection tests.
	Inject func(guestmem.Fault) error
	// KVMPath is the KVM device (default /dev/kvm).
	KVMPath string
	// DefaultVMType keeps the VM on the default VM type even where the
	// host offers one with private memory (see New).
	DefaultVMType bool
	// OnHostCall is passed to the Machine.
	OnHostCall func(cpu int, id uint32)
	// OnExit, if set, is called on the vCPU's goroutine after every exit
	// is handled, before the vCPU enters the guest again, with the time
	// the guest waited (see ExitTiming). It should return quickly: the
	// guest waits for it too, though it is not counted.
	OnExit func(ExitTiming)

	// portTrace, if set, sees every port access (tests compare the
	// compiled guest with the interpreter).
	portTrace func(cpu int, port uint16, out bool, v uint32)
}

func (c *Config) scenario() (Scenario, error) {
	if c.Scenario != nil {
		s := *c.Scenario
		return s, s.Validate()
	}
	n := c.VCPUs
	if n == 0 {
		n = 1
	}
	if n < 1 || n > MaxVCPUs {
		return Scenario{}, fmt.Errorf("%w: %d vCPUs, want 1 to %d", ErrScenario, n, MaxVCPUs)
	}
	return Builtin(n), nil
}

func (c *Config) machine(mem *guestmem.Memory, s Scenario) MachineConfig {
	return MachineConfig{
		Memory: mem, Scenario: s, IOMMU: c.IOMMU, Policy: c.Policy, Logger: c.Logger,
		OnCheck: c.OnCheck, OnConversion: c.OnConversion, OnHostCall: c.OnHostCall, portTrace: c.portTrace,
	}
}

// ExitTiming is how long one exit kept a vCPU out of the guest.
type ExitTiming struct {
	CPU int
	// Exit is the decoded exit (nil when its kvm_run contents could not be
	// decoded).
	Exit kvm.Exit
	// Handled is the time from KVM_RUN's return to the end of the exit's
	// handling, right before the vCPU enters again: what the guest waits
	// for an answer (KVM_EXIT_HYPERCALL to re-entry for a conversion).
	Handled time.Duration
}

// VM is the built-in guest on KVM, ready to run.
type VM struct {
	sys      *kvm.System
	vm       *kvm.VM
	mem      *guestmem.Memory
	mach     *Machine
	vcpus    []*kvm.VCPU
	scenario Scenario
	path     RequestPath
	ran      bool
	onExit   func(ExitTiming)
}

// New creates a KVM VM with the machine's memory and devices, loads the
// compiled programs and page tables, and puts every vCPU at its program's
// first instruction in long mode.
//
// Split memory goes on a KVM_X86_SW_PROTECTED_VM where the host offers one
// (KVM_CAP_VM_TYPES), unless cfg.DefaultVMType: KVM then keeps the
// attributes and the private pages live in guest_memfd, out of the host's
// reach. In-place memory goes on one where the host converts in place with
// private memory (kvm.System.ProbeInPlace: Linux 7.4's per-guest_memfd
// attributes), unless cfg.DefaultVMType; elsewhere on the default type,
// with the attributes in user space. On a VM with private memory the
// guest's tables, code and stacks, [0, BuffersGPA),
// are made shared before they are written (the host cannot write
// guest_memfd, and without NRIPS KVM decodes trapping instructions through
// the shared alias), and the guest asks for conversions with vmmcall
// (KVM_HC_MAP_GPA_RANGE, answered through KVM_EXIT_HYPERCALL). Otherwise
// the VM has the default type and the guest uses the conversion port.
func New(cfg Config) (_ *VM, err error) {
	s, err := cfg.scenario()
	if err != nil {
		return nil, err
	}
	v := &VM{onExit: cfg.OnExit}
	defer func() {
		if err != nil {
			v.Close()
		}
	}()
	path := cfg.KVMPath
	if path == "" {
		path = kvm.DevicePath
	}
	if v.sys, err = kvm.OpenPath(path); err != nil {
		return nil, err
	}
	vmType := uint64(kvm.VMTypeDefault)
	switch {
	case cfg.DefaultVMType:
	case cfg.Mode == guestmem.Split:
		ok, err := v.sys.SupportsVMType(kvm.VMTypeSWProtected)
		if err != nil {
			return nil, err
		}
		if ok {
			vmType = kvm.VMTypeSWProtected
		}
	case cfg.Mode == guestmem.InPlace:
		sup, err := v.sys.ProbeInPlace()
		if err != nil {
			return nil, err
		}
		if sup.OK() {
			vmType = sup.VMType
		}
	}
	if v.vm, err = v.sys.CreateVM(vmType); err != nil {
		return nil, err
	}
	exits, err := enableHypercallExits(v.vm)
	if err != nil {
		return nil, err
	}
	mcfg := memoryConfig(cfg.Mode)
	mcfg.VM, mcfg.Logger, mcfg.Inject = v.vm, cfg.Logger, cfg.Inject
	if v.mem, err = guestmem.New(mcfg); err != nil {
		return nil, err
	}
	mach := cfg.machine(v.mem, s)
	if v.mem.Enforcement().Kernel() {
		if _, err := v.mem.Convert(guestmem.Request{GPA: RAM0GPA, Size: BuffersGPA, To: memattr.Shared}); err != nil {
			return nil, fmt.Errorf("vmm: share the guest's code and tables: %w", err)
		}
		if cfg.Scenario == nil {
			s = builtin(len(s.Programs), true)
			mach.Scenario = s
		}
		if exits {
			v.path = ViaHypercall
		}
		if v.mem.Enforcement() == guestmem.EnforceKVM {
			mach.SetKVMAttributes = v.vm.SetMemoryAttributes
		}
	}
	v.scenario = s
	if v.mach, err = NewMachine(mach); err != nil {
		return nil, err
	}
	entries, err := LoadFor(v.mem.Guest(), s, v.path)
	if err != nil {
		return nil, err
	}
	boot, err := guest.LongMode(v.mem.Guest(), guest.LongModeConfig{
		TablesGPA: TablesGPA, MapSize: MapSize, Entry: entries[0], Stack: stackTop(0),
	})
	if err != nil {
		return nil, fmt.Errorf("vmm: %w", err)
	}
	// KVM checks the 64-bit EFER of the boot state against the guest's
	// CPUID (long mode), so every vCPU gets what KVM supports first.
	cpuid, err := v.sys.GetSupportedCPUID()
	if err != nil {
		return nil, err
	}
	for cpu := range s.Programs {
		vc, err := v.vm.CreateVCPU(cpu)
		if err != nil {
			return nil, err
		}
		v.vcpus = append(v.vcpus, vc)
		if err := vc.SetCPUID2(cpuid); err != nil {
			return nil, err
		}
		boot.Regs.RIP, boot.Regs.RSP = entries[cpu], stackTop(cpu)
		if err := boot.Load(vc); err != nil {
			return nil, fmt.Errorf("vmm: %w", err)
		}
	}
	return v, nil
}

// enableHypercallExits makes KVM_HC_MAP_GPA_RANGE exit to the VMM
// (KVM_CAP_EXIT_HYPERCALL) where KVM offers it and reports whether it did;
// otherwise KVM answers the guest -KVM_ENOSYS itself.
func enableHypercallExits(vm *kvm.VM) (bool, error) {
	have, err := vm.CheckExtension(kvm.CapExitHypercall)
	if err != nil {
		return false, err
	}
	if uint64(have)&(1<<kvm.HCMapGPARange) == 0 {
		return false, nil
	}
	return true, vm.EnableExitHypercall(1 << kvm.HCMapGPARange)
}

// stackTop is vCPU cpu's initial stack pointer.
func stackTop(cpu int) uint64 { return StacksGPA + uint64(cpu+1)*4096 }

// Load compiles the scenario's programs and writes them into guest memory
// from CodeGPA on, each starting on a page boundary. It returns each
// program's entry point.
func Load(mem GuestMemory, s Scenario) ([]uint64, error) { return LoadFor(mem, s, ViaPort) }

// LoadFor is Load with conversions asked for the given way.
func LoadFor(mem GuestMemory, s Scenario, path RequestPath) ([]uint64, error) {
	at := uint64(CodeGPA)
	first := s.firstIDs()
	var entries []uint64
	for cpu, p := range s.Programs {
		code, err := CompileFor(p, cpu, first[cpu], path)
		if err != nil {
			return nil, err
		}
		if at+uint64(len(code)) > StacksGPA {
			return nil, fmt.Errorf("%w: programs need more than the %#x bytes at %#x", ErrScenario, StacksGPA-CodeGPA, CodeGPA)
		}
		if _, err := mem.WriteAt(code, int64(at)); err != nil {
			return nil, fmt.Errorf("vmm: load vCPU %d program: %w", cpu, err)
		}
		entries = append(entries, at)
		at = (at + uint64(len(code)) + 4095) &^ 4095
	}
	return entries, nil
}

// KVM returns the KVM VM (for tests that act on the kernel directly).
func (v *VM) KVM() *kvm.VM { return v.vm }

// RequestPath returns how the loaded guest asks for conversions.
func (v *VM) RequestPath() RequestPath { return v.path }

// Machine returns the VM's machine.
func (v *VM) Machine() *Machine { return v.mach }

// Memory returns the VM's memory.
func (v *VM) Memory() *guestmem.Memory { return v.mem }

// Run runs every vCPU on its own goroutine until each has halted, one
// stops with an error (the others are then stopped too), or ctx is done.
// It may be called once. The report covers everything the machine did.
func (v *VM) Run(ctx context.Context) (Report, error) {
	if v.ran {
		return Report{}, errors.New("vmm: VM already ran")
	}
	v.ran = true
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make([]error, len(v.vcpus))
	var wg sync.WaitGroup
	for cpu, vc := range v.vcpus {
		wg.Go(func() {
			if errs[cpu] = v.runVCPU(ctx, cpu, vc); errs[cpu] != nil {
				cancel()
			}
		})
	}
	// Kick the vCPUs out of KVM_RUN when the run is cancelled. The kicks
	// must be over before Run returns, so that none stops a later Run.
	kicked := make(chan struct{})
	stopKicks := context.AfterFunc(ctx, func() {
		defer close(kicked)
		for _, vc := range v.vcpus {
			vc.Kick()
		}
	})
	wg.Wait()
	if !stopKicks() {
		<-kicked
	}
	err := errors.Join(errs...)
	rep := buildReport(v.mach, true, err)
	return rep, err
}

func (v *VM) runVCPU(ctx context.Context, cpu int, vc *kvm.VCPU) error {
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("vmm: vCPU %d: %w", cpu, context.Cause(ctx))
		}
		e, err := vc.Run()
		exited := time.Now()
		act, herr := v.mach.HandleExit(cpu, vc.RunData(), e, err)
		if v.onExit != nil {
			v.onExit(ExitTiming{CPU: cpu, Exit: e, Handled: time.Since(exited)})
		}
		switch act {
		case Halt:
			return nil
		case Stop:
			return herr
		}
		if herr != nil {
			return herr
		}
	}
}

// Close releases the vCPUs, the machine, the memory and the VM.
func (v *VM) Close() error {
	var errs []error
	for _, vc := range v.vcpus {
		if err := vc.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	v.vcpus = nil
	if v.mach != nil {
		if err := v.mach.Close(); err != nil {
			errs = append(errs, err)
		}
		v.mach = nil
	}
	if v.mem != nil {
		if err := v.mem.Close(); err != nil {
			errs = append(errs, err)
		}
		v.mem = nil
	}
	if v.vm != nil {
		if err := v.vm.Close(); err != nil {
			errs = append(errs, err)
		}
		v.vm = nil
	}
	if v.sys != nil {
		if err := v.sys.Close(); err != nil {
			errs = append(errs, err)
		}
		v.sys = nil
	}
	return errors.Join(errs...)
}

// RunHostDriven runs the scenario without KVM: memfd-backed memory, the
// same machine, and one software vCPU (Interpret) per program, each on its
// own goroutine.
func RunHostDriven(ctx context.Context, cfg Config) (Report, error) {
	s, err := cfg.scenario()
	if err != nil {
		return Report{}, err
	}
	mcfg := memoryConfig(cfg.Mode)
	mcfg.Logger, mcfg.Inject = cfg.Logger, cfg.Inject
	mem, err := guestmem.New(mcfg)
	if err != nil {
		return Report{}, err
	}
	defer mem.Close()
	mach, err := NewMachine(cfg.machine(mem, s))
	if err != nil {
		return Report{}, err
	}
	defer mach.Close()
	errs := make([]error, len(s.Programs))
	var wg sync.WaitGroup
	first := s.firstIDs()
	for cpu, p := range s.Programs {
		wg.Go(func() { errs[cpu] = Interpret(ctx, mach, cpu, p, first[cpu], mem.Guest()) })
	}
	wg.Wait()
	err = errors.Join(errs...)
	return buildReport(mach, false, err), err
}
