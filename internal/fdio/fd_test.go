//go:build linux

package fdio

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio/fdiotest"
)

var errTestClosed = fmt.Errorf("fdio test: %w", fs.ErrClosed)

// isOpen reports whether descriptor number fd is open.
func isOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

// TestFD checks the life of an FD in one goroutine: calls see the
// descriptor, Close closes it once, and afterwards every call answers the
// closed error without running anything.
func TestFD(t *testing.T) {
	fd := fdiotest.OpenNull(t)
	d := New(fd, os.DevNull, errTestClosed)
	if d.Fd() != fd {
		t.Fatalf("Fd = %d, want %d", d.Fd(), fd)
	}
	var got uintptr
	if err := d.Control(func(n uintptr) { got = n }); err != nil || got != uintptr(fd) {
		t.Fatalf("Control: fd %d, %v", got, err)
	}
	if n, err := Call(d, func(fd int) (int, error) { return unix.Write(fd, []byte("abc")) }); n != 3 || err != nil {
		t.Fatalf("Call(write) = %d, %v", n, err)
	}
	if err := d.Do(func(int) error { return unix.EIO }); err != unix.EIO {
		t.Fatalf("Do returned %v, want fn's EIO", err)
	}
	// /dev/null has no ioctls (TIOCINQ is FIONREAD): the kernel's errno comes back bare.
	if _, err := Ioctl(d, unix.TIOCINQ, 0); err != unix.ENOTTY {
		t.Fatalf("Ioctl(/dev/null) = %v, want ENOTTY", err)
	}
	var n int32
	if _, err := IoctlPtr(d, unix.TIOCINQ, &n); err != unix.ENOTTY {
		t.Fatalf("IoctlPtr(/dev/null) = %v, want ENOTTY", err)
	}
	if _, err := IoctlBuf(d, unix.TIOCINQ, make([]byte, 4)); err != unix.ENOTTY {
		t.Fatalf("IoctlBuf(/dev/null) = %v, want ENOTTY", err)
	}

	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if isOpen(fd) {
		t.Errorf("descriptor %d still open after Close returned", fd)
	}
	if d.Fd() != -1 {
		t.Errorf("Fd after Close = %d, want -1", d.Fd())
	}
	ran := false
	mark := func(uintptr) { ran = true }
	for name, call := range map[string]func() error{
		"Close":    d.Close,
		"Control":  func() error { return d.Control(mark) },
		"Do":       func() error { return d.Do(func(int) error { ran = true; return nil }) },
		"Call":     func() error { _, err := Call(d, func(int) (int, error) { ran = true; return 0, nil }); return err },
		"Ioctl":    func() error { _, err := Ioctl(d, unix.TIOCINQ, 0); return err },
		"IoctlPtr": func() error { _, err := IoctlPtr(d, unix.TIOCINQ, &n); return err },
		"IoctlBuf": func() error { _, err := IoctlBuf(d, unix.TIOCINQ, nil); return err },
	} {
		if err := call(); err != errTestClosed || !errors.Is(err, fs.ErrClosed) {
			t.Errorf("%s after Close = %v, want the closed error", name, err)
		}
	}
	if ran {
		t.Error("a function ran after Close")
	}

	neg := New(-1, "none", errTestClosed)
	if neg.Fd() != -1 || neg.Control(mark) != errTestClosed || neg.Close() != errTestClosed || ran {
		t.Error("New(-1) is not a closed FD")
	}
}

// TestCloseWaitsForCalls holds a call inside Control while Close runs:
// Close refuses new calls at once but keeps the descriptor open, and does
// not return, until the call has left.
func TestCloseWaitsForCalls(t *testing.T) {
	fd := fdiotest.OpenNull(t)
	want, err := fdiotest.Identify(fd)
	if err != nil {
		t.Fatal(err)
	}
	d := New(fd, os.DevNull, errTestClosed)
	inside, release := make(chan struct{}), make(chan struct{})
	var seen fdiotest.Identity
	var seenErr error
	callDone := make(chan error)
	go func() {
		callDone <- d.Control(func(n uintptr) {
			close(inside)
			<-release
			// Close has begun by now; the number is still this file.
			seen, seenErr = fdiotest.Identify(int(n))
		})
	}()
	<-inside
	closeDone := make(chan error)
	go func() { closeDone <- d.Close() }()
	// Close has begun once Fd reports -1; new calls are refused from then.
	for d.Fd() != -1 {
		runtime.Gosched()
	}
	if err := d.Control(func(uintptr) { t.Error("a call started after Close began") }); err != errTestClosed {
		t.Errorf("Control while Close waits = %v, want the closed error", err)
	}
	select {
	case err := <-closeDone:
		t.Fatalf("Close returned (%v) while a call was inside Control", err)
	default:
	}
	if !isOpen(fd) {
		t.Fatal("Close closed the descriptor under a running call")
	}
	close(release)
	if err := <-callDone; err != nil {
		t.Fatal(err)
	}
	if seenErr != nil || seen != want {
		t.Errorf("the call saw %+v, %v; want %+v", seen, seenErr, want)
	}
	if err := <-closeDone; err != nil {
		t.Fatal(err)
	}
	if isOpen(fd) {
		t.Error("descriptor still open after Close returned")
	}
}

// TestCloseWaking: a call that blocks until woken would hold Close
// forever; CloseWaking's wake runs after new calls are refused and before
// the wait, and so releases it.
func TestCloseWaking(t *testing.T) {
	d := New(fdiotest.OpenNull(t), os.DevNull, errTestClosed)
	inside, wake := make(chan struct{}), make(chan struct{})
	callDone := make(chan error)
	go func() {
		callDone <- d.Control(func(uintptr) {
			close(inside)
			<-wake
		})
	}()
	<-inside
	var refused error
	if err := d.CloseWaking(func() {
		refused = d.Control(func(uintptr) { t.Error("a call started after Close began") })
		close(wake)
	}); err != nil {
		t.Fatal(err)
	}
	if refused != errTestClosed {
		t.Errorf("Control during wake = %v, want the closed error", refused)
	}
	if err := <-callDone; err != nil {
		t.Fatal(err)
	}
	if err := d.CloseWaking(func() { t.Error("wake ran on a second Close") }); err != errTestClosed {
		t.Errorf("second CloseWaking = %v", err)
	}
}

// TestCloseRace races Close against many calls, over and over. Each call
// writes a byte through the descriptor and checks, inside Control, that
// the number still names the file the FD was made for. As soon as Close
// returns, the test opens pipes, which take the lowest free numbers, the
// closed one first. A call that ran on a recycled number would have
// written into a pipe, or seen another inode, or failed with EBADF; every
// call must instead succeed on the right file or answer the closed error,
// and none may start after Close returned.
func TestCloseRace(t *testing.T) {
	const rounds, callers = 100, 4
	isClosed := func(err error) bool { return err == errTestClosed }
	write := func(fd int) error { _, err := unix.Write(fd, []byte{'x'}); return err }
	for round := range rounds {
		fd := fdiotest.OpenNull(t)
		want, err := fdiotest.Identify(fd)
		if err != nil {
			t.Fatal(err)
		}
		d := New(fd, os.DevNull, errTestClosed)
		race := fdiotest.NewRace(t, isClosed)
		for range callers {
			race.GoControl("call", d.Control, want, write)
		}
		// Let the callers get going: Close comes after some calls.
		race.Start(round)
		race.Close(d.Close)
		race.Wait(round)
	}
}

// TestOwn: a refused check leaves the descriptor open and the caller's,
// even through garbage collections (no *os.File was made for it); an
// accepted one hands it to the FD; the check's view is closed afterwards.
func TestOwn(t *testing.T) {
	fd := fdiotest.OpenNull(t)
	defer unix.Close(fd)
	refuse := errors.New("wrong kind")
	var view *FD
	if _, err := Own(fd, os.DevNull, errTestClosed, func(v *FD) error {
		view = v
		_, err := Ioctl(v, unix.TIOCINQ, 0)
		if err != unix.ENOTTY {
			t.Errorf("the view's ioctl = %v, want ENOTTY", err)
		}
		return refuse
	}); err != refuse {
		t.Fatalf("Own = %v, want the check's error", err)
	}
	if err := view.Control(func(uintptr) { t.Error("the view ran a call after Own") }); err != errTestClosed {
		t.Errorf("view after Own = %v, want the closed error", err)
	}
	runtime.GC()
	runtime.GC()
	if !isOpen(fd) {
		t.Fatal("a refused Own closed the descriptor")
	}

	d, err := Own(fd, os.DevNull, errTestClosed, func(*FD) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if d.Fd() != fd {
		t.Errorf("owned Fd = %d, want %d", d.Fd(), fd)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if isOpen(fd) {
		t.Error("Close of an owned FD left the descriptor open")
	}
}
