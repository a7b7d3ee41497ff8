package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/vmm"
)

// runDemo implements "gmem demo": it boots the built-in guest on KVM and
// reports what its conversions and its device's DMA did.
func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return demoEnv{kvmPath: kvm.DevicePath}.run(ctx, args, stdout, stderr)
}

// demoEnv is what tests change: the KVM device, and a scenario in place of
// the built-in one.
type demoEnv struct {
	kvmPath  string
	scenario *vmm.Scenario
}

// demoFlags are the command line of gmem demo.
type demoFlags struct {
	mode   guestmem.Mode
	vcpus  int
	policy dma.Policy
	rules  iommu.Rules
	// hugePages keeps large IOMMU pages on iommufd IOASes, the model's
	// and the real one's: they then cannot cut.
	hugePages bool
	json      bool
	noKVM     bool
	quiet     bool
	timeout   time.Duration
	// vfio ("type1" or "iommufd") and vfioDevice: a real IOMMU that gmem
	// keeps in step with the guest's shared pages, next to the model.
	vfio, vfioDevice string
}

// parseDemoFlags parses the command line. It returns flag.ErrHelp for -h.
func parseDemoFlags(args []string) (demoFlags, *flag.FlagSet, error) {
	f := demoFlags{vcpus: 2, timeout: 60 * time.Second}
	var mode, policy, rules string
	fs := newFlagSet("gmem demo")
	fs.StringVar(&mode, "mode", "inplace", "guest RAM backing, `MODE`: inplace (one guest_memfd, mmap-able) or split (guest_memfd + memfd)")
	fs.IntVar(&f.vcpus, "vcpus", f.vcpus, fmt.Sprintf("number of vCPUs, 1 to %d (vCPU 0 runs the scenario, the others convert concurrently)", vmm.MaxVCPUs))
	fs.StringVar(&policy, "policy", "auto", "IOMMU mapping `POLICY`: auto (cut where the IOMMU can cut, extent elsewhere), "+
		"extent (one entry per conversion, bounded at 2 MiB; a conversion to private inside one unmaps it and maps the rest of its chunk again), "+
		"granule (one entry per 4 KiB, as QEMU) or cut (entries as extent; a conversion to private inside one is one cut, and the rest stays mapped: "+
		"iommufd with huge pages off only)")
	fs.StringVar(&rules, "iommu", "type1", "kernel `RULES` the model IOMMU follows: type1 (VFIO) or iommufd (an IOAS with huge pages off, which cuts)")
	fs.BoolVar(&f.hugePages, "iommufd-huge-pages", false, "keep large IOMMU pages on the iommufd IOASes (--iommu iommufd, --vfio iommufd): they then cannot cut, and auto maps bounded extents there")
	fs.BoolVar(&f.json, "json", false, "print the report as one JSON object")
	fs.BoolVar(&f.noKVM, "no-kvm", false, "run the scenario host-driven, without KVM")
	fs.BoolVar(&f.quiet, "quiet", false, "no progress lines on stderr")
	fs.DurationVar(&f.timeout, "timeout", f.timeout, "stop the guest after this long")
	fs.StringVar(&f.vfio, "vfio", "", "also keep a real IOMMU in step, through `IFACE` type1 or iommufd (needs --vfio-device and KVM)")
	fs.StringVar(&f.vfioDevice, "vfio-device", "", "PCI address (`BDF`) of the device bound to vfio-pci whose IOMMU --vfio opens")
	if err := parseFlags(fs, args); err != nil {
		return f, fs, err
	}
	if fs.NArg() > 0 {
		return f, fs, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	var err error
	if f.mode, err = guestmem.ParseMode(mode); err != nil {
		return f, fs, fmt.Errorf("--mode: want inplace or split, not %q", mode)
	}
	if f.policy, err = dma.ParsePolicy(policy); err != nil {
		return f, fs, fmt.Errorf("--policy: want auto, extent, granule or cut, not %q", policy)
	}
	switch rules {
	case "type1":
		f.rules = iommu.Type1v2
	case "iommufd":
		f.rules = iommu.IOMMUFD
	default:
		return f, fs, fmt.Errorf("--iommu: want type1 or iommufd, not %q", rules)
	}
	if f.vcpus < 1 || f.vcpus > vmm.MaxVCPUs {
		return f, fs, fmt.Errorf("--vcpus %d: want 1 to %d", f.vcpus, vmm.MaxVCPUs)
	}
	if f.timeout <= 0 {
		return f, fs, fmt.Errorf("--timeout %v: want a positive duration", f.timeout)
	}
	switch {
	case f.vfio != "" && f.vfio != "type1" && f.vfio != "iommufd":
		return f, fs, fmt.Errorf("--vfio: want type1 or iommufd, not %q", f.vfio)
	case (f.vfio == "") != (f.vfioDevice == ""):
		return f, fs, errors.New("--vfio and --vfio-device go together")
	case f.vfio != "" && f.noKVM:
		return f, fs, errors.New("--vfio needs KVM (a guest whose memory the device reaches), not --no-kvm")
	case f.hugePages && f.rules != iommu.IOMMUFD && f.vfio != "iommufd":
		return f, fs, errors.New("--iommufd-huge-pages needs an iommufd IOAS: --iommu iommufd or --vfio iommufd")
	case f.policy == dma.Cut && !f.modelCaps().Cut:
		why := "type1 never cuts: --iommu iommufd"
		if f.rules == iommu.IOMMUFD {
			why = "an IOAS that keeps huge pages cannot cut: drop --iommufd-huge-pages"
		}
		return f, fs, fmt.Errorf("--policy cut: the model IOMMU cannot cut (%s, or --policy auto, which cuts only where the IOMMU can)", why)
	case f.policy == dma.Cut && f.vfio == "type1":
		return f, fs, errors.New("--policy cut with --vfio type1: type1 never cuts (--vfio iommufd, or --policy auto, which cuts only where the IOMMU can)")
	}
	return f, fs, nil
}

// modelCaps is the model IOMMU the flags ask for: an iommufd model is an
// IOAS with huge pages off that cuts, as iommufd.NewSpace sets one up,
// unless --iommufd-huge-pages.
func (f demoFlags) modelCaps() iommu.Caps {
	return iommu.Caps{Rules: f.rules, Cut: f.rules == iommu.IOMMUFD && !f.hugePages}
}

func (env demoEnv) run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	// vCPUs report checks from their own goroutines.
	stderr = &syncWriter{w: stderr}
	f, fs, err := parseDemoFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		demoHelp(stdout, fs)
		return exitOK
	}
	if err != nil {
		flagUsage(stderr, "gmem demo", err)
		return exitUsage
	}
	progress := func(format string, a ...any) {
		if !f.quiet {
			fmt.Fprintf(stderr, "gmem demo: "+format+"\n", a...)
		}
	}
	cfg := vmm.Config{
		Mode:     f.mode,
		VCPUs:    f.vcpus,
		Scenario: env.scenario,
		Policy:   f.policy,
		IOMMU:    iommu.NewModel(f.modelCaps()),
		Logger:   slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelError})),
		KVMPath:  env.kvmPath,
		OnCheck: func(r vmm.CheckResult) {
			if f.quiet {
				return
			}
			verdict := "pass"
			if !r.Passed {
				verdict = fmt.Sprintf("FAIL (detail %#x)", r.Detail)
			}
			fmt.Fprintf(stderr, "  [vCPU %d] %-4s %s\n", r.CPU, verdict, r.Name)
		},
	}
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()

	useKVM := !f.noKVM
	if f.noKVM {
		progress("--no-kvm: running the scenario host-driven (no vCPU), through the same executor and devices")
	} else if err := probeKVM(env.kvmPath, f.mode); err != nil {
		const rig = "to see it on real KVM with private memory (guest_memfd, KVM_SET_MEMORY_ATTRIBUTES, vmmcall) and real VFIO, run scripts/rig --demo (a QEMU guest; no /dev/kvm needed)"
		if f.vfio != "" {
			fmt.Fprintf(stderr, "gmem demo: --vfio needs KVM (a guest whose memory the device reaches): %v\n", err)
			fmt.Fprintf(stderr, "gmem demo: %s\n", rig)
			return exitUsage
		}
		useKVM = false
		progress("KVM cannot run the demo's guest (%v): running the scenario host-driven (no vCPU), through the same executor and devices", err)
		progress("%s", rig)
	}
	var rep demoReport
	if useKVM {
		v, err := vmm.New(cfg)
		if err != nil {
			fmt.Fprintf(stderr, "gmem demo: %v\n", err)
			return exitFail
		}
		var real *realIOMMU
		if f.vfio != "" {
			if real, err = openRealIOMMU(f.vfio, f.vfioDevice, f.hugePages); err == nil {
				err = real.attach(v.Memory(), f.policy)
			}
			if err != nil {
				fmt.Fprintf(stderr, "gmem demo: --vfio %s --vfio-device %s: %v\n", f.vfio, f.vfioDevice, err)
				if real != nil {
					real.close()
				}
				v.Close()
				return exitFail
			}
		}
		progress("booting the built-in guest: mode %v, %d vCPU(s), IOMMU %v (%v), enforcement %s, conversions by %s%s",
			f.mode, v.Machine().VCPUs(), f.rules, v.Machine().Policy(), v.Memory().Enforcement(), requestPathName(v.RequestPath()), vfioNote(f, real))
		rep.Report, err = v.Run(ctx)
		if real != nil {
			err = errors.Join(err, real.detach(&rep), real.close())
		}
		if cerr := v.Close(); cerr != nil && err == nil {
			err = cerr
		}
	} else {
		rep.Report, err = vmm.RunHostDriven(ctx, cfg)
	}
	if err != nil {
		if why := stoppedBy(parent, ctx, f.timeout); why != "" {
			// One message, not one per vCPU.
			err = errors.New(why)
			rep.Error = why
		}
		if rep.Mode == "" || f.json {
			// No report, or one a program reads: say it here too.
			fmt.Fprintf(stderr, "gmem demo: %v\n", err)
		}
	}
	if rep.Mode == "" {
		// Nothing ran (the machine could not be built).
		return exitFail
	}
	rep.Flavour = flavour(rep.Mode, rep.Enforcement, rep.GuestRan)
	if f.json {
		enc := json.NewEncoder(stdout)
		if err := enc.Encode(rep); err != nil {
			fmt.Fprintf(stderr, "gmem demo: %v\n", err)
			return exitFail
		}
	} else {
		writeDemoReport(stdout, rep)
	}
	if !rep.OK() {
		return exitFail
	}
	return exitOK
}

// stoppedBy says why the demo was stopped early when its context ended:
// the timeout, or an interrupt; "" if it did not.
func stoppedBy(parent, ctx context.Context, timeout time.Duration) string {
	switch {
	case parent.Err() != nil:
		return "interrupted before the scenario finished"
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return fmt.Sprintf("--timeout %v reached before the scenario finished", timeout)
	}
	return ""
}

// probeKVM reports why the KVM device cannot hold the demo guest's memory
// of mode, or nil: it must open, and offer guest_memfd (in place, one that
// can be mmapped and start shared) on the VM type vmm.New picks for split
// memory: a KVM_X86_SW_PROTECTED_VM where the host offers one (a kernel
// before 6.18 offers guest_memfd on no other), the default type elsewhere.
func probeKVM(path string, mode guestmem.Mode) error {
	sys, err := kvm.OpenPath(path)
	if err != nil {
		return err
	}
	defer sys.Close()
	vmType := uint64(kvm.VMTypeDefault)
	if mode == guestmem.Split {
		ok, err := sys.SupportsVMType(kvm.VMTypeSWProtected)
		if err != nil {
			return err
		}
		if ok {
			vmType = kvm.VMTypeSWProtected
		}
	}
	vm, err := sys.CreateVM(vmType)
	if err != nil {
		return err
	}
	defer vm.Close()
	caps, err := vm.ProbeCapabilities()
	switch {
	case err != nil:
		return err
	case !caps.GuestMemfd:
		return errors.New("its KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD)")
	case mode == guestmem.InPlace && caps.GuestMemfdFlags&kvm.InPlaceFlags != kvm.InPlaceFlags:
		return fmt.Errorf("its guest_memfd cannot be mmapped shared (KVM_CAP_GUEST_MEMFD_FLAGS %#x, in place needs MMAP|INIT_SHARED, Linux 6.18)", caps.GuestMemfdFlags)
	}
	return nil
}

// requestPathName says how the guest asks for conversions.
func requestPathName(p vmm.RequestPath) string {
	if p == vmm.ViaHypercall {
		return "vmmcall (KVM_HC_MAP_GPA_RANGE)"
	}
	return "the conversion port"
}

// vfioNote names the real IOMMU, if any, and its policy.
func vfioNote(f demoFlags, real *realIOMMU) string {
	if real == nil {
		return ""
	}
	return fmt.Sprintf(", real VFIO %s for %s (%s)", f.vfio, f.vfioDevice, real.policyNote())
}

// modelPolicyLine says which policy the model IOMMU ran and why: "cut
// (iommufd, huge pages off: 6 cut calls)".
func modelPolicyLine(r vmm.Report) string {
	space := r.IOMMURules
	switch {
	case r.IOMMURules == iommu.IOMMUFD.String() && r.IOMMUCut:
		space += ", huge pages off"
	case r.IOMMURules == iommu.IOMMUFD.String():
		space += ", huge pages kept: no cut"
	}
	if r.IOMMUPolicy == dma.Cut.String() {
		return fmt.Sprintf("%s on the model (%s): %s", r.IOMMUPolicy, space, plural(r.IOMMUCutCalls, "cut call", "cut calls"))
	}
	return fmt.Sprintf("%s on the model (%s)", r.IOMMUPolicy, space)
}

// vfioPolicyLine says which policy the real IOMMU ran, and whether its
// space cut and if not why.
func vfioPolicyLine(r demoReport) string {
	switch {
	case r.VFIOCut != nil && *r.VFIOCut:
		return r.VFIOPolicy + " (the IOAS cuts: huge pages off, set as its file's compat IOAS)"
	case r.VFIOCutReason != "":
		return fmt.Sprintf("%s (the IOAS does not cut: %s)", r.VFIOPolicy, r.VFIOCutReason)
	}
	return r.VFIOPolicy + " (type1 never cuts)"
}

// writeDemoReport prints the human report.
func writeDemoReport(w io.Writer, r demoReport) {
	where := "guest ran on KVM"
	if !r.GuestRan {
		where = "scenario ran host-driven (no guest)"
	}
	fmt.Fprintf(w, "gmem demo: %s, mode %s, %d vCPU(s)\n", where, r.Mode, r.VCPUs)
	fmt.Fprintf(w, "  checks        %d passed, %d failed\n", r.ChecksPassed, r.ChecksFailed)
	fmt.Fprintf(w, "  conversions   %d done of %d requests (%d rejected as invalid, %d failed and undone)\n",
		r.Conversions, r.ConversionRequests, r.Rejected, r.Failed)
	fmt.Fprintf(w, "  pages         %d made shared, %d made private, %d hole punches\n",
		r.PagesToShared, r.PagesToPrivate, r.Punches)
	fmt.Fprintf(w, "  DMA           %d transfers allowed, %d blocked by the IOMMU\n", r.DMAAllowed, r.DMABlocked)
	fmt.Fprintf(w, "  IOMMU entries peak %d, now %d (%d split)\n", r.IOMMUEntriesPeak, r.IOMMUEntriesNow, r.IOMMUSplits)
	fmt.Fprintf(w, "  policy        %s\n", modelPolicyLine(r.Report))
	fmt.Fprintf(w, "  state map     %d runs\n", r.StateRuns)
	fmt.Fprintf(w, "  invariants    %d violations (I1/I2 checked after every conversion)\n", r.Violations)
	fmt.Fprintf(w, "  enforcement   %s (%s)\n", r.Enforcement, guestmem.Enforcement(r.Enforcement).Describe())
	fmt.Fprintf(w, "  flavour       %s\n", r.Flavour)
	if r.VFIO != "" {
		fmt.Fprintf(w, "  VFIO          %s for %s: %d map, %d unmap and %d cut calls, entries peak %d, now %d (%d split)\n",
			r.VFIO, r.VFIODevice, r.VFIOMapCalls, r.VFIOUnmapCalls, r.VFIOCutCalls, r.VFIOEntriesPeak, r.VFIOEntriesNow, r.VFIOSplits)
		fmt.Fprintf(w, "  VFIO policy   %s\n", vfioPolicyLine(r))
	}
	unreported := 0
	for _, f := range r.FailedChecks {
		if r.Error != "" && strings.HasSuffix(f, ": not reported") {
			// Stopped early: the checks it never reached are one line.
			unreported++
			continue
		}
		fmt.Fprintf(w, "  failed: %s\n", f)
	}
	if unreported > 0 {
		fmt.Fprintf(w, "  failed: %s not reported before it stopped (--json lists them)\n", plural(uint64(unreported), "check", "checks"))
	}
	if r.Error != "" {
		fmt.Fprintf(w, "  stopped: %s\n", r.Error)
	}
	if r.OK() {
		fmt.Fprintln(w, "result: PASS")
	} else {
		fmt.Fprintln(w, "result: FAIL")
	}
}

func demoHelp(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprint(w, `usage: gmem demo [flags]

Boots gmem's built-in test guest on KVM, in 64-bit mode on guest_memfd memory,
with a DMA test device behind an IOMMU (gmem's model, IOVA = GPA). The guest
converts buffers to shared and has the device DMA into them, converts some back
to private and checks that the device is refused and the page unchanged, does
mixed, partial and block-spanning conversions, and sends requests the VMM must
reject. It reports each check on a console port; progress goes to stderr, the
report to stdout. The IOMMU invariants are checked after every conversion.

Split memory goes on a KVM_X86_SW_PROTECTED_VM where KVM offers one: KVM then
keeps the attributes (enforcement kvm-attributes), private pages live in
guest_memfd, and the guest asks with vmmcall. With --vfio, gmem also keeps a
real IOMMU (VFIO type1 or iommufd, of the device at --vfio-device) equal to the
guest's shared pages.

The policy (--policy, default auto) shapes the IOMMU entries of both: one per
converted extent, and a conversion to private inside one is a cut where the
IOMMU can cut (an iommufd IOAS with huge pages off, set as its file's compat
IOAS: the rest of the entry stays mapped and pinned, and the device never loses
memory it still owns), elsewhere an unmap of the entry and a map of the rest of
its 2 MiB chunk. The model (--iommu iommufd) and the real iommufd IOAS are set
up to cut unless --iommufd-huge-pages; the real one falls back to the bounded
extent where the kernel does not let it cut. The report says which policy each
ran and, for the real iommufd, whether it cut and if not why.

Without /dev/kvm, or with --no-kvm, the same scenario runs host-driven (no
vCPU) through the same executor and devices, and guest_ran is false. To see the
real thing anyway, run scripts/rig --demo [--json]: it boots a QEMU guest with
KVM (SVM emulated), an IOMMU and a PCI device, and runs this demo inside it.

flags:
`)
	printFlags(w, fs)
	fmt.Fprint(w, `
Exit status: 0 if every check passed and no invariant was violated, 1 otherwise
(a failed check, the timeout, an interrupt, --policy cut on a real iommufd
IOAS the kernel does not let cut), 2 for usage errors (--vfio without KVM,
--policy cut with a type1 IOMMU or --iommufd-huge-pages among them).
`)
}

// syncWriter serialises writes from several goroutines.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
