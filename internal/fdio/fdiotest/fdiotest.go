//go:build linux

// Package fdiotest is the test scaffolding of the descriptor wrappers (fdio,
// kvm, vfio, iommufd): /dev/null descriptors, the identity of the file a
// descriptor names, and the close race, in which goroutines keep calling a
// wrapper while the test closes it and opens pipes on the numbers Close
// freed. It imports nothing of gmem's, so fdio's own tests can use it.
package fdiotest

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// OpenNull opens /dev/null read-write as a bare descriptor the test owns.
func OpenNull(t testing.TB) int {
	t.Helper()
	fd, err := unix.Open(os.DevNull, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

// Identity is the device and inode a descriptor names.
type Identity struct{ Dev, Ino uint64 }

// Identify answers the Identity of the file descriptor fd names.
func Identify(fd int) (Identity, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return Identity{}, err
	}
	return Identity{st.Dev, st.Ino}, nil
}

// Null answers the Identity of /dev/null.
func Null(t testing.TB) Identity {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(os.DevNull, &st); err != nil {
		t.Fatal(err)
	}
	return Identity{st.Dev, st.Ino}
}

// Is answers a check that an error matches target (errors.Is).
func Is(target error) func(error) bool {
	return func(err error) bool { return errors.Is(err, target) }
}

// OK is the check of a call that must succeed.
func OK(err error) bool { return err == nil }

// pipesPerClose is how many pipes Race.Close opens: more numbers than one
// Close frees, the lowest (the freed one) first.
const pipesPerClose = 4

// Race is one round of a close race. Goroutines started with Go call the
// wrapper under test until it answers its closed error; the test then
// Starts them, Closes the wrapper (Close opens pipes on the freed numbers)
// and Waits. A call that reached a recycled number would see a pipe: fail
// with ENOTTY, ESPIPE or EBADF, see another inode, or write into the pipe.
type Race struct {
	t        testing.TB
	isClosed func(error) bool
	start    chan struct{}
	wg       sync.WaitGroup
	returned atomic.Bool // a Close has returned
	bad      atomic.Value
	pipes    [][2]int
}

// NewRace prepares a round. isClosed recognizes the wrapper's closed
// error: a goroutine stops when its call answers it.
func NewRace(t testing.TB, isClosed func(error) bool) *Race {
	return &Race{t: t, isClosed: isClosed, start: make(chan struct{})}
}

// Fail records a failure of the round (the first one is kept); any
// goroutine may call it.
func (r *Race) Fail(format string, args ...any) {
	r.bad.CompareAndSwap(nil, fmt.Sprintf(format, args...))
}

// Go starts a goroutine that, once the round starts, makes call over and
// over until it answers the closed error. An answer ok refuses fails the
// round.
func (r *Race) Go(name string, call func() error, ok func(error) bool) {
	r.wg.Go(func() {
		<-r.start
		for {
			err := call()
			if r.isClosed(err) {
				return
			}
			if !ok(err) {
				r.Fail("%s: %v", name, err)
				return
			}
		}
	})
}

// GoControl is Go over control, a wrapper's Control method: each function
// Control runs must run before Close returned, on a descriptor that names
// want, and runs then on it too (when not nil), which must succeed.
func (r *Race) GoControl(name string, control func(func(uintptr)) error, want Identity, then func(fd int) error) {
	r.Go(name, func() error {
		var id Identity
		var idErr, thenErr error
		err := control(func(fd uintptr) {
			if r.returned.Load() {
				r.Fail("%s ran after Close returned", name)
			}
			id, idErr = Identify(int(fd))
			if then != nil {
				thenErr = then(int(fd))
			}
		})
		if err != nil {
			return err
		}
		if idErr != nil || thenErr != nil {
			return fmt.Errorf("fstat %v, call %v", idErr, thenErr)
		}
		if id != want {
			return fmt.Errorf("the descriptor names %+v, not %+v", id, want)
		}
		return nil
	}, OK)
}

// Start releases the goroutines, then yields round%8 times, so that Close
// comes after a different number of calls from round to round.
func (r *Race) Start(round int) {
	close(r.start)
	for range round % 8 {
		runtime.Gosched()
	}
}

// Close calls closeFn (a wrapper's Close), which must succeed, and at once
// opens pipes, which take the lowest free numbers: the ones it freed.
func (r *Race) Close(closeFn func() error) {
	r.t.Helper()
	if err := closeFn(); err != nil {
		r.t.Fatal(err)
	}
	r.returned.Store(true)
	for range pipesPerClose {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
			r.t.Fatal(err)
		}
		r.pipes = append(r.pipes, p)
	}
}

// Wait waits for the goroutines, checks that no call wrote into a pipe,
// closes the pipes and fails the test if the round failed.
func (r *Race) Wait(round int) {
	r.t.Helper()
	r.wg.Wait()
	for _, p := range r.pipes {
		n, err := unix.IoctlGetInt(p[0], unix.TIOCINQ)
		if err != nil || n != 0 {
			r.t.Errorf("round %d: a pipe opened after Close holds %d bytes (%v): a call wrote to a recycled number", round, n, err)
		}
		unix.Close(p[0])
		unix.Close(p[1])
	}
	if msg := r.bad.Load(); msg != nil {
		r.t.Fatalf("round %d: %s", round, msg)
	}
}
