//go:build linux

package kvm

import (
	"fmt"
	"runtime"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// VCPU is a vCPU fd with its kvm_run mapping. Run, the register methods
// and SetHypercallRet belong to the goroutine that runs the vCPU; Kick and
// SetImmediateExit may be called from any goroutine. Close must not race
// with any of them.
type VCPU struct {
	fd  int
	id  int
	run []byte
	// tid is the thread inside KVM_RUN, 0 when none: Kick signals it.
	tid atomic.Int32
}

// Fd returns the file descriptor, or -1 after Close.
func (v *VCPU) Fd() int { return v.fd }

// ID returns the vCPU id given to KVM_CREATE_VCPU.
func (v *VCPU) ID() int { return v.id }

// RunData returns the kvm_run mapping (struct kvm_run followed by the port
// I/O data page), for [DecodeExit] and [SetHypercallRet]. Slices of it stay
// valid until Close.
func (v *VCPU) RunData() []byte { return v.run }

// Close unmaps kvm_run and closes the vCPU fd.
func (v *VCPU) Close() error {
	if v.fd < 0 {
		return ErrClosed
	}
	if v.run != nil {
		if err := unix.Munmap(v.run); err != nil {
			return fmt.Errorf("kvm: munmap kvm_run of vCPU %d: %w", v.id, err)
		}
		v.run = nil
	}
	return closeFd(&v.fd)
}

// GetRegs reads the general-purpose registers (KVM_GET_REGS).
func (v *VCPU) GetRegs() (Regs, error) {
	var r Regs
	if v.fd < 0 {
		return r, ErrClosed
	}
	if _, err := ioctlPtr(v.fd, kvmGetRegs, &r); err != nil {
		return Regs{}, ioctlError("KVM_GET_REGS", err)
	}
	return r, nil
}

// SetRegs writes the general-purpose registers (KVM_SET_REGS).
func (v *VCPU) SetRegs(r Regs) error {
	if v.fd < 0 {
		return ErrClosed
	}
	if _, err := ioctlPtr(v.fd, kvmSetRegs, &r); err != nil {
		return ioctlError("KVM_SET_REGS", err)
	}
	return nil
}

// GetSregs reads the special registers (KVM_GET_SREGS).
func (v *VCPU) GetSregs() (Sregs, error) {
	var s Sregs
	if v.fd < 0 {
		return s, ErrClosed
	}
	if _, err := ioctlPtr(v.fd, kvmGetSregs, &s); err != nil {
		return Sregs{}, ioctlError("KVM_GET_SREGS", err)
	}
	return s, nil
}

// SetSregs writes the special registers (KVM_SET_SREGS).
func (v *VCPU) SetSregs(s Sregs) error {
	if v.fd < 0 {
		return ErrClosed
	}
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
func (v *VCPU) Run() (Exit, error) {
	if v.fd < 0 {
		return nil, ErrClosed
	}
	runtime.LockOSThread()
	v.tid.Store(int32(unix.Gettid()))
	_, err := ioctl(v.fd, kvmRun, 0)
	v.tid.Store(0)
	runtime.UnlockOSThread()
	return DecodeExit(v.run, err)
}

// SetHypercallRet sets the result of the current KVM_EXIT_HYPERCALL (see
// [SetHypercallRet]).
func (v *VCPU) SetHypercallRet(ret uint64) error {
	if v.fd < 0 {
		return ErrClosed
	}
	return SetHypercallRet(v.run, ret)
}

// SetImmediateExit sets or clears kvm_run.immediate_exit. While it is set,
// KVM_RUN returns EINTR (IntrExit) at once without entering the guest.
func (v *VCPU) SetImmediateExit(on bool) {
	var b uint8
	if on {
		b = 1
	}
	setRunByte(v.run, runOffImmediate, b)
}

// ImmediateExit reports whether kvm_run.immediate_exit is set, for a run
// loop that must tell a Kick from any other signal.
func (v *VCPU) ImmediateExit() bool { return runByte(v.run, runOffImmediate) != 0 }

// Kick stops the vCPU: it sets immediate_exit, so the next KVM_RUN returns
// at once, and signals the thread currently inside KVM_RUN, if any, so that
// it returns too (with IntrExit). The signal is SIGURG, which the Go runtime
// already uses for preemption and ignores otherwise. immediate_exit stays
// set until the vCPU's owner clears it with SetImmediateExit(false) after
// deciding to carry on; checking its own stop condition after clearing it
// closes the race with a concurrent Kick.
func (v *VCPU) Kick() error {
	v.SetImmediateExit(true)
	if tid := v.tid.Load(); tid != 0 {
		err := unix.Tgkill(unix.Getpid(), int(tid), unix.SIGURG)
		// ESRCH: the thread is gone, so it is no longer in KVM_RUN.
		if err != nil && err != unix.ESRCH {
			return fmt.Errorf("kvm: kick vCPU %d: %w", v.id, err)
		}
	}
	return nil
}
