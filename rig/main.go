// Command rig is the host side of scripts/rig: it packs the initramfs of
// the test guest and boots it under QEMU (TCG, q35, emulated Intel IOMMU,
// edu DMA device), streams the guest console to the terminal and a log
// file, and turns the guest's verdict lines into one summary line per
// backend and its exit status.
//
//	rig initramfs -busybox /bin/busybox -test guesttest [-gmem gmem] [-vmmtest vmmtest] -o initrd.gz
//	rig boot -kernel bzImage -initrd initrd.gz -backend all -log console.log
//	rig boot -kernel bzImage -initrd initrd.gz -backend inplace -log console.log
//	rig boot -kernel bzImage -initrd initrd.gz -demo json -log console.log
//
// The inplace backend (a kernel with mmap-able guest_memfd, 6.18 or later)
// runs the in-place checks, which also run gmem demo (-gmem) and vmm's
// host-KVM tests (-vmmtest, a static go test -c of ./vmm) inside the guest.
//
// With -demo the guest runs gmem demo (the initramfs needs -gmem) on KVM
// with private memory and a real VFIO IOMMU instead of the tests, and the
// rig ends with the demo's report (or its JSON object, last).
//
// scripts/rig installs the packages, builds and caches the kernel, builds
// the static guest test binary (rig/guesttest) and then runs these.
package main

import (
	"bufio"
	"compress/gzip"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"regexp"
	"strings"
	"syscall"
	"time"
)

// initScript is the guest's /init. Unknown KEY=VALUE words of the kernel
// command line reach it as environment variables (GMEM_RIG_BACKEND).
const initScript = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo "GMEM-RIG boot kernel $(uname -r), backend ${GMEM_RIG_BACKEND:-all}"
if [ -n "$GMEM_RIG_DEMO" ]; then
	bdf=
	for d in /sys/bus/pci/devices/*; do
		[ "$(cat $d/vendor)" = 0x1234 ] && [ "$(cat $d/device)" = 0x11e8 ] && bdf=${d##*/}
	done
	echo vfio-pci >/sys/bus/pci/devices/$bdf/driver_override
	echo $bdf >/sys/bus/pci/drivers_probe
	json=
	[ "$GMEM_RIG_DEMO" = json ] && json=--json
	/gmem demo --mode split --vfio $GMEM_RIG_VFIO --vfio-device $bdf $json
	echo "GMEM-RIG demo rc=$?"
	poweroff -f
fi
GMEM_RIG=1 GMEM_RIG_BACKEND=${GMEM_RIG_BACKEND:-all} GMEM_RIG_ENTRY_LIMIT=$GMEM_RIG_ENTRY_LIMIT /guesttest -test.v -test.timeout=%s
echo "GMEM-RIG end rc=$?"
poweroff -f
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: rig initramfs|boot [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "initramfs":
		err = initramfsCmd(os.Args[2:])
	case "boot":
		var ok bool
		ok, err = bootCmd(os.Args[2:])
		if err == nil && !ok {
			os.Exit(1)
		}
	default:
		err = fmt.Errorf("unknown command %q (want initramfs or boot)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "rig: error: %v\n", err)
		os.Exit(1)
	}
}

func initramfsCmd(args []string) error {
	fs := flag.NewFlagSet("initramfs", flag.ContinueOnError)
	busybox := fs.String("busybox", "/bin/busybox", "static busybox binary")
	test := fs.String("test", "", "static guest test binary (go test -c of rig/guesttest)")
	out := fs.String("o", "", "output initramfs (gzip'ed newc cpio)")
	testTimeout := fs.Duration("test-timeout", 5*time.Minute, "-test.timeout of the guest test binary")
	gmem := fs.String("gmem", "", "static gmem binary for -demo boots and the inplace backend (optional)")
	vmmTest := fs.String("vmmtest", "", "static test binary of ./vmm for the inplace backend (optional)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *test == "" || *out == "" {
		return errors.New("initramfs: -test and -o are required")
	}
	bb, err := os.ReadFile(*busybox)
	if err != nil {
		return err
	}
	tb, err := os.ReadFile(*test)
	if err != nil {
		return err
	}
	var gb, vb []byte
	if *gmem != "" {
		if gb, err = os.ReadFile(*gmem); err != nil {
			return err
		}
	}
	if *vmmTest != "" {
		if vb, err = os.ReadFile(*vmmTest); err != nil {
			return err
		}
	}
	f, err := os.Create(*out)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := writeInitramfs(f, bb, tb, gb, vb, *testTimeout); err != nil {
		return err
	}
	return f.Close()
}

// writeInitramfs writes the gzip'ed cpio archive: /init, /bin/busybox,
// /guesttest, /gmem and /vmmtest if given, the mount points and
// /dev/console (so the kernel can give /init the console before devtmpfs
// is mounted).
func writeInitramfs(w io.Writer, busybox, test, gmem, vmmTest []byte, testTimeout time.Duration) error {
	zw, err := gzip.NewWriterLevel(w, gzip.BestSpeed)
	if err != nil {
		return err
	}
	c := newCPIOWriter(zw)
	for _, d := range []string{"bin", "dev", "proc", "sys", "tmp"} {
		c.Dir(d, 0o755)
	}
	c.CharDev("dev/console", 0o600, 5, 1)
	c.File("bin/busybox", 0o755, busybox)
	c.File("init", 0o755, []byte(fmt.Sprintf(initScript, testTimeout)))
	c.File("guesttest", 0o755, test)
	if gmem != nil {
		c.File("gmem", 0o755, gmem)
	}
	if vmmTest != nil {
		c.File("vmmtest", 0o755, vmmTest)
	}
	if err := c.Close(); err != nil {
		return err
	}
	return zw.Close()
}

// guestCPU is the emulated CPU: an AMD model with SVM and nested paging,
// so the guest kernel's kvm_amd can offer KVM_X86_SW_PROTECTED_VM (private
// memory needs a TDP MMU). It is named explicitly so that another QEMU's
// "max" cannot change it; TCG cannot emulate VMX, so there is no Intel
// choice.
const guestCPU = "qemu64,+svm,+npt"

// qemuArgs is the QEMU command of vfio-rig.md. bench adds GMEM_RIG_BENCH=1
// to the kernel command line, which /init passes on to the guest tests: they
// then also measure the bench rows (rig/guesttest/bench_test.go). The guest
// has 2 GiB, room for the bench's 1 GiB region next to the tests.
func qemuArgs(kernel, initrd, backend string, entryLimit int, demo string, bench bool) []string {
	// no_timer_check: under TCG on a busy host the kernel's check that the
	// timer interrupt arrives through the remapped IO-APIC can time out and
	// panic; skipping it changes nothing the tests look at.
	appendLine := fmt.Sprintf("console=ttyS0 intel_iommu=on no_timer_check panic=-1 loglevel=4 "+
		"vfio_iommu_type1.dma_entry_limit=%d GMEM_RIG_ENTRY_LIMIT=%d GMEM_RIG_BACKEND=%s", entryLimit, entryLimit, backend)
	if demo != "" {
		vfio := "type1"
		if backend == "iommufd" {
			vfio = "iommufd"
		}
		appendLine += fmt.Sprintf(" GMEM_RIG_DEMO=%s GMEM_RIG_VFIO=%s", demo, vfio)
	}
	if bench {
		appendLine += " GMEM_RIG_BENCH=1"
	}
	return []string{
		"-machine", "q35,kernel-irqchip=split", "-accel", "tcg", "-cpu", guestCPU,
		"-m", "2G", "-smp", "1",
		"-device", "intel-iommu,intremap=on,caching-mode=on", "-device", "edu",
		"-kernel", kernel, "-initrd", initrd, "-append", appendLine,
		"-nographic", "-no-reboot",
	}
}

func bootCmd(args []string) (bool, error) {
	fs := flag.NewFlagSet("boot", flag.ContinueOnError)
	kernel := fs.String("kernel", "", "guest bzImage")
	initrd := fs.String("initrd", "", "guest initramfs")
	backend := fs.String("backend", "all", "type1, iommufd, kvm, inplace or all (type1, iommufd and kvm)")
	logPath := fs.String("log", "", "file to copy the guest console to")
	timeout := fs.Duration("timeout", 10*time.Minute, "how long the guest may run")
	entryLimit := fs.Int("dma-entry-limit", 16, "vfio_iommu_type1.dma_entry_limit on the kernel command line")
	qemu := fs.String("qemu", "qemu-system-x86_64", "QEMU binary")
	demo := fs.String("demo", "", "run gmem demo instead of the tests: text or json (its report, or its JSON object, ends the output)")
	bench := fs.Bool("bench", false, "also run the bench rows in the guest (GMEM-RIG bench lines, for gmem bench --rig)")
	if err := fs.Parse(args); err != nil {
		return false, err
	}
	if *demo != "" && *demo != "text" && *demo != "json" {
		return false, fmt.Errorf("boot: -demo must be text or json, not %q", *demo)
	}
	backends, err := parseBackend(*backend)
	if err != nil {
		return false, err
	}
	if *kernel == "" || *initrd == "" {
		return false, errors.New("boot: -kernel and -initrd are required")
	}
	var logw io.Writer = io.Discard
	if *logPath != "" {
		lf, err := os.Create(*logPath)
		if err != nil {
			return false, err
		}
		defer lf.Close()
		logw = lf
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	qargs := qemuArgs(*kernel, *initrd, *backend, *entryLimit, *demo, *bench)
	out := io.MultiWriter(os.Stdout, logw)
	var v *Verdicts
	// A TCG guest on a loaded host occasionally dies in early boot, before
	// /init runs (no verdict can be lost then): boot once more in that case.
	for attempt := 1; ; attempt++ {
		v = NewVerdicts()
		runQEMU(ctx, *qemu, qargs, *timeout, out, v)
		if v.Booted() || attempt == 2 || ctx.Err() != nil {
			break
		}
		fmt.Fprintln(out, "rig: the guest did not reach /init; booting it once more")
	}
	if *demo != "" {
		return demoSummary(v, *demo, logw)
	}
	lines, ok := v.Summary(backends)
	for _, l := range lines {
		fmt.Println(l)
	}
	if *logPath != "" {
		for _, l := range lines {
			fmt.Fprintln(logw, l)
		}
	}
	return ok, nil
}

// demoSummary ends a -demo boot: the demo's exit status, and in json mode
// its JSON object as the last line.
func demoSummary(v *Verdicts, mode string, logw io.Writer) (bool, error) {
	rc, ran := v.Demo()
	var line string
	switch {
	case !ran:
		line = "rig: demo fail: the guest never reported the demo's end"
	case rc != 0:
		line = fmt.Sprintf("rig: demo fail: gmem demo exited with %d", rc)
	default:
		line = "rig: demo pass"
	}
	fmt.Fprintln(os.Stderr, line)
	fmt.Fprintln(logw, line)
	if mode == "json" {
		js := v.JSON()
		if js == "" {
			return false, errors.New("the demo printed no JSON object")
		}
		fmt.Println(js)
	}
	return ran && rc == 0, nil
}

// runQEMU boots the guest once under timeout(1), copying the console to out
// and feeding it to v, and says how QEMU ended.
func runQEMU(ctx context.Context, qemu string, args []string, timeout time.Duration, out io.Writer, v *Verdicts) {
	// The context is a backstop should timeout(1) itself hang.
	ctx, cancel := context.WithTimeout(ctx, timeout+30*time.Second)
	defer cancel()
	secs := fmt.Sprintf("%d", int(timeout.Seconds()))
	cmd := exec.CommandContext(ctx, "timeout", append([]string{"-k", "10", secs, qemu}, args...)...)
	// timeout(1) runs QEMU in its own process group, out of reach of the
	// terminal's ^C: on interrupt, ask timeout to pass SIGTERM on.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 20 * time.Second
	cmd.Stdin = nil // /dev/null: QEMU must not put the terminal in raw mode
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintf(out, "rig: QEMU: %v\n", err)
		return
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(out, "rig: start QEMU: %v\n", err)
		return
	}
	if err := stream(stdout, out, v); err != nil {
		fmt.Fprintf(out, "rig: reading the console: %v\n", err)
	}
	werr := cmd.Wait()
	var exit *exec.ExitError
	switch {
	case errors.As(werr, &exit) && exit.ExitCode() == 124:
		fmt.Fprintf(out, "rig: QEMU timed out after %s\n", timeout)
	case werr != nil:
		fmt.Fprintf(out, "rig: QEMU: %v\n", werr)
	default:
		fmt.Fprintf(out, "rig: guest ran %s\n", time.Since(start).Round(100*time.Millisecond))
	}
}

// escapeRE matches the terminal control sequences SeaBIOS and iPXE write to
// the serial console (reset, clear screen, colours, line wrap), which would
// wipe the terminal the rig reports to.
var escapeRE = regexp.MustCompile(`\x1b(?:\[[0-9;?]*[A-Za-z]|[A-Za-z])`)

// stream copies the console to w line by line, without terminal control
// sequences, and feeds each line to v.
func stream(r io.Reader, w io.Writer, v *Verdicts) error {
	br := bufio.NewReader(r)
	for {
		line, err := br.ReadString('\n')
		line = escapeRE.ReplaceAllString(line, "")
		if len(line) > 0 {
			if _, werr := io.WriteString(w, line); werr != nil {
				return werr
			}
			v.Line(strings.TrimRight(line, "\r\n"))
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}
