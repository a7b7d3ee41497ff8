//go:build linux

// Package fdio is the one file descriptor wrapper behind gmem's kvm, vfio
// and iommufd types ([FD]), its ioctl helpers, and the adoption of a
// caller's descriptor (take it, or duplicate a borrowed *os.File).
package fdio

import (
	"errors"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// closedBit marks an FD's state once Close has begun; the bits below it
// count the calls in flight.
const closedBit = 1 << 62

// FD is an owned file descriptor. It keeps the descriptor in an *os.File
// and runs every system call on it inside the file's RawConn.Control, as
// packages os and net do: the runtime's reference on the descriptor keeps
// its number from being closed, and so from being reused by another file,
// while a call runs.
//
// FD also counts the calls in flight itself, because the runtime's Close of
// a blocking descriptor (every KVM, VFIO and iommufd fd is one) returns at
// once and leaves the real close(2) to the last call out. FD's Close
// refuses new calls at once, waits for the calls in flight, and then closes
// the descriptor: when it returns, the kernel has seen the close (a VFIO
// cdev is unbound, a VM's last reference dropped). A call that would block
// for long (KVM_RUN) must be woken: see [FD.CloseWaking].
//
// Its methods are safe for concurrent use, Close included; after Close they
// return the error New was given (the owning package's ErrClosed) and run
// nothing. Calls may nest (a Control inside a Control of the same FD), but
// Close must not be called from inside a Control of the FD it closes: it
// would wait for itself.
type FD struct {
	// state is closedBit once Close has begun, plus the calls in flight.
	state atomic.Int64
	// drained is closed by the last call to leave after Close began.
	drained chan struct{}
	// file and rc hold the descriptor; both are nil for the borrowed view
	// Own hands its check.
	file *os.File
	rc   syscall.RawConn
	// num is the descriptor number.
	num int
	// errClosed is what calls answer after Close.
	errClosed error
}

// New returns an FD for fd and takes ownership of it: Close closes it, and
// so does the garbage collector if the FD is dropped unclosed (the
// *os.File's cleanup). name names the file in errors from close(2).
// errClosed is what every call answers after Close; it should match
// fs.ErrClosed. A negative fd gives an FD that is already closed.
func New(fd int, name string, errClosed error) *FD {
	d := &FD{num: fd, errClosed: errClosed, drained: make(chan struct{})}
	if fd < 0 {
		d.num = -1
		d.state.Store(closedBit)
		return d
	}
	f := os.NewFile(uintptr(fd), name)
	// SyscallConn fails only for a nil *os.File.
	rc, _ := f.SyscallConn()
	d.file, d.rc = f, rc
	return d
}

// Own takes ownership of fd, as New, if check succeeds on a borrowed view
// of it; otherwise it returns check's error and leaves fd as it found it:
// open, the caller's, and never given to an *os.File (whose cleanup would
// close it). check may issue any call on the view; the view is closed,
// without closing fd, before Own returns. Constructors that adopt a
// descriptor check its kind this way.
func Own(fd int, name string, errClosed error, check func(view *FD) error) (*FD, error) {
	view := &FD{num: fd, errClosed: errClosed, drained: make(chan struct{})}
	err := check(view)
	view.Close()
	if err != nil {
		return nil, err
	}
	return New(fd, name, errClosed), nil
}

// enter counts a call in, or reports false once Close has begun.
func (d *FD) enter() bool {
	for {
		s := d.state.Load()
		if s&closedBit != 0 {
			return false
		}
		if d.state.CompareAndSwap(s, s+1) {
			return true
		}
	}
}

// exit counts a call out; the last one out after Close began lets Close
// go on.
func (d *FD) exit() {
	if d.state.Add(-1) == closedBit {
		close(d.drained)
	}
}

// Control runs fn with the descriptor. The descriptor stays open, and its
// number names this file, until fn returns, even if Close is called
// meanwhile (Close then waits for fn). After Close it returns the closed
// error without running fn. This is how a descriptor is handed to another
// call that takes its number: a memslot's guest_memfd, the iommufd of
// VFIO_DEVICE_BIND_IOMMUFD, the container of VFIO_GROUP_SET_CONTAINER.
func (d *FD) Control(fn func(fd uintptr)) error {
	if !d.enter() {
		return d.errClosed
	}
	defer d.exit()
	if d.rc == nil {
		fn(uintptr(d.num))
		return nil
	}
	if err := d.rc.Control(fn); err != nil {
		// Only Close closes the file, and Close waits for this call.
		if errors.Is(err, os.ErrClosed) {
			return d.errClosed
		}
		return err
	}
	return nil
}

// Do runs fn with the descriptor as [FD.Control] does and returns fn's
// error, or the closed error without running fn.
func (d *FD) Do(fn func(fd int) error) error {
	var err error
	if cerr := d.Control(func(fd uintptr) { err = fn(int(fd)) }); cerr != nil {
		return cerr
	}
	return err
}

// Call runs fn with the descriptor as [FD.Control] does and returns fn's
// results, or the closed error without running fn.
func Call[T any](d *FD, fn func(fd int) (T, error)) (T, error) {
	var v T
	var err error
	if cerr := d.Control(func(fd uintptr) { v, err = fn(int(fd)) }); cerr != nil {
		return v, cerr
	}
	return v, err
}

// Fd returns the descriptor number, or -1 once Close has begun. The number
// is only lent: Close, which may run at any time, and the garbage
// collector, once the FD is unreachable, close it, and the number may then
// name another file. Hand it to the kernel inside [FD.Control] instead
// where Close may race.
func (d *FD) Fd() int {
	if d.state.Load()&closedBit != 0 {
		return -1
	}
	return d.num
}

// Close closes the descriptor: it refuses new calls at once, waits for the
// calls in flight, then closes. A second Close returns the closed error.
func (d *FD) Close() error { return d.CloseWaking(nil) }

// CloseWaking is Close for a descriptor whose calls may block until woken
// (KVM_RUN until a signal or immediate_exit): once new calls are refused,
// it runs wake, if not nil, and then waits for the calls in flight. wake
// runs before the wait, so what the calls use is still there for it to
// touch; it must make every call in flight return, including one about to
// start its blocking system call.
func (d *FD) CloseWaking(wake func()) error {
	for {
		s := d.state.Load()
		if s&closedBit != 0 {
			return d.errClosed
		}
		if !d.state.CompareAndSwap(s, s|closedBit) {
			continue
		}
		if wake != nil {
			wake()
		}
		if s != 0 {
			<-d.drained
		}
		break
	}
	if d.file == nil {
		return nil
	}
	return d.file.Close()
}

// Dup returns a close-on-exec duplicate of f's descriptor; f stays the
// caller's and keeps its mode (os.File.Fd would make it blocking). The
// duplicate shares the open file description: closing one leaves the other
// open.
func Dup(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	dup, derr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) {
		dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, derr
	}
	return dup, nil
}

// Adopt dups f and hands the duplicate to adopt, closing it again if adopt
// fails: the shape of every XFromFile constructor.
func Adopt[T any](f *os.File, adopt func(fd int) (T, error)) (T, error) {
	fd, err := Dup(f)
	if err != nil {
		var zero T
		return zero, err
	}
	x, err := adopt(fd)
	if err != nil {
		unix.Close(fd)
	}
	return x, err
}
