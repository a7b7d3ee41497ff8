//go:build linux

package kvm

import (
	"fmt"
	"runtime"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

// VCPU is a vCPU fd with its kvm_run mapping. Run, the register methods
// and SetHypercallRet belong to the goroutine that runs the vCPU; Kick,
// SetImmediateExit and ImmediateExit may be called from any goroutine, and
// so may Close: it stops a Run in progress as Kick does and waits for it
// (see [VCPU.Close]). After Close every method returns ErrClosed, or does
// nothing where it returns no error.
type VCPU struct {
	fd *fdio.FD
	id int
	// run is the kvm_run mapping, unmapped by Close once no call uses it;
	// the slice itself never changes.
	run []byte
	// tid is the thread inside KVM_RUN, 0 when none: Kick signals it.
	tid atomic.Int32
}

// Fd returns the file descriptor, or -1 after Close. The number is lent,
// not given: Close and the garbage collector (once the VCPU is
// unreachable) close it, and it may then name another file. Where Close
// may race, use Control.
func (v *VCPU) Fd() int { return v.fd.Fd() }

// Control runs fn with the descriptor, which stays open (and kvm_run
// mapped) until fn returns even if Close runs meanwhile (Close waits for
// fn); after Close it returns ErrClosed without running fn. fn must not
// Close the VCPU.
func (v *VCPU) Control(fn func(fd uintptr)) error { return v.fd.Control(fn) }

// ID returns the vCPU id given to KVM_CREATE_VCPU.
func (v *VCPU) ID() int { return v.id }

// RunData returns the kvm_run mapping (struct kvm_run followed by the port
// I/O data page), for [DecodeExit] and [SetHypercallRet], or nil after
// Close. It and slices of it (the data of a decoded exit) stay valid until
// Close, which unmaps it: the goroutine that runs the vCPU reads them
// between its Runs, so it is the one to call Close, or it must be done
// with them first.
func (v *VCPU) RunData() []byte {
	if v.fd.Fd() < 0 {
		return nil
	}
	return v.run
}

// Close stops the vCPU and releases it: it refuses new calls, interrupts
// a KVM_RUN in progress as Kick does (immediate_exit and a signal to its
// thread), waits until every call in flight has returned (Run returns
// IntrExit, or ErrClosed if it had not entered KVM_RUN yet), then closes
// the fd and unmaps kvm_run. So Close may be called from any goroutine
// while Run blocks, and returns once Run has; it does not deadlock on a
// guest that never exits. A goroutine that clears immediate_exit
// (SetImmediateExit(false)) concurrently with Close can delay it until the
// guest's next exit. A second Close returns ErrClosed.
func (v *VCPU) Close() error {
	// interrupt fails only if the signal cannot be sent, which leaves the
	// wait to immediate_exit and the guest's next exit.
	err := v.fd.CloseWaking(func() { v.interrupt() })
	if err == ErrClosed {
		return err
	}
	// No call is left that could touch kvm_run, and none can start.
	if merr := unix.Munmap(v.run); merr != nil {
		return fmt.Errorf("kvm: munmap kvm_run of vCPU %d: %w", v.id, merr)
	}
	if err != nil {
		return fmt.Errorf("kvm: close vCPU %d: %w", v.id, err)
	}
	return nil
}

// GetRegs reads the general-purpose registers (KVM_GET_REGS).
func (v *VCPU) GetRegs() (Regs, error) {
	var r Regs
	if _, err := ioctlPtr(v.fd, kvmGetRegs, &r); err != nil {
		return Regs{}, ioctlError("KVM_GET_REGS", err)
	}
	return r, nil
}

// SetRegs writes the general-purpose registers (KVM_SET_REGS).
func (v *VCPU) SetRegs(r Regs) error {
	if _, err := ioctlPtr(v.fd, kvmSetRegs, &r); err != nil {
		return ioctlError("KVM_SET_REGS", err)
	}
	return nil
}

// GetSregs reads the special registers (KVM_GET_SREGS).
func (v *VCPU) GetSregs() (Sregs, error) {
	var s Sregs
	if _, err := ioctlPtr(v.fd, kvmGetSregs, &s); err != nil {
		return Sregs{}, ioctlError("KVM_GET_SREGS", err)
	}
	return s, nil
}

// SetSregs writes the special registers (KVM_SET_SREGS).
func (v *VCPU) SetSregs(s Sregs) error {
	if _, err := ioctlPtr(v.fd, kvmSetSregs, &s); err != nil {
		return ioctlError("KVM_SET_SREGS", err)
	}
	return nil
}

// Run runs the vCPU until its next exit (KVM_RUN) and decodes the exit with
// [DecodeExit]. A signal or [VCPU.Kick] gives IntrExit; a memory fault gives
// MemoryFaultExit; other KVM_RUN failures are returned as errors wrapping
// the errno.
//
// The calling goroutine stays on one OS thread for the duration, so that
// Kick can signal that thread.
//
// A Close from another goroutine interrupts it: Run then returns IntrExit,
// or ErrClosed if it had not entered KVM_RUN yet.
func (v *VCPU) Run() (Exit, error) {
	var (
		e   Exit
		err error
	)
	// The outer Control keeps kvm_run mapped while the exit is decoded.
	if cerr := v.fd.Control(func(uintptr) {
		runtime.LockOSThread()
		v.tid.Store(int32(unix.Gettid()))
		_, err = ioctl(v.fd, kvmRun, 0)
		v.tid.Store(0)
		runtime.UnlockOSThread()
		if err == ErrClosed {
			return
		}
		e, err = DecodeExit(v.run, err)
	}); cerr != nil {
		return nil, cerr
	}
	return e, err
}

// SetHypercallRet sets the result of the current KVM_EXIT_HYPERCALL (see
// [SetHypercallRet]).
func (v *VCPU) SetHypercallRet(ret uint64) error {
	var err error
	if cerr := v.fd.Control(func(uintptr) { err = SetHypercallRet(v.run, ret) }); cerr != nil {
		return cerr
	}
	return err
}

// SetImmediateExit sets or clears kvm_run.immediate_exit. While it is set,
// KVM_RUN returns EINTR (IntrExit) at once without entering the guest.
// After Close it does nothing.
func (v *VCPU) SetImmediateExit(on bool) {
	var b uint8
	if on {
		b = 1
	}
	v.fd.Control(func(uintptr) { setRunByte(v.run, runOffImmediate, b) })
}

// ImmediateExit reports whether kvm_run.immediate_exit is set, for a run
// loop that must tell a Kick from any other signal. After Close it reports
// true: a closed vCPU does not run again, so a loop that carries on only
// while the flag is clear stops.
func (v *VCPU) ImmediateExit() bool {
	set := true
	v.fd.Control(func(uintptr) { set = runByte(v.run, runOffImmediate) != 0 })
	return set
}

// Kick stops the vCPU: it sets immediate_exit, so the next KVM_RUN returns
// at once, and signals the thread currently inside KVM_RUN, if any, so that
// it returns too (with IntrExit). The signal is SIGURG, which the Go runtime
// already uses for preemption and ignores otherwise. immediate_exit stays
// set until the vCPU's owner clears it with SetImmediateExit(false) after
// deciding to carry on; checking its own stop condition after clearing it
// closes the race with a concurrent Kick.
//
// After Close it returns ErrClosed: the vCPU is already stopped.
func (v *VCPU) Kick() error {
	var err error
	if cerr := v.fd.Control(func(uintptr) { err = v.interrupt() }); cerr != nil {
		return cerr
	}
	return err
}

// interrupt is Kick without the fd's reference, for Close (which holds the
// mapping until the calls in flight are done).
func (v *VCPU) interrupt() error {
	setRunByte(v.run, runOffImmediate, 1)
	if tid := v.tid.Load(); tid != 0 {
		err := unix.Tgkill(unix.Getpid(), int(tid), unix.SIGURG)
		// ESRCH: the thread is gone, so it is no longer in KVM_RUN.
		if err != nil && err != unix.ESRCH {
			return fmt.Errorf("kvm: kick vCPU %d: %w", v.id, err)
		}
	}
	return nil
}
