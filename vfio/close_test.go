package vfio

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

// TestCloseRace closes a Container and a Device (over /dev/null, so no
// VFIO is needed) while goroutines keep calling them, and opens pipes
// right after each Close so that the freed numbers name other files. Each
// call must reach /dev/null (an ioctl answers ENOTTY, a region write
// succeeds) or answer ErrClosed: one that reached a recycled number would
// see a pipe (a write fails with ESPIPE, Control sees another inode) or
// EBADF. No Control function may start after Close returned.
func TestCloseRace(t *testing.T) {
	var null unix.Stat_t
	if err := unix.Stat(os.DevNull, &null); err != nil {
		t.Fatal(err)
	}
	r := RegionInfo{Flags: RegionRead | RegionWrite, Size: 4096}
	const rounds = 100
	for round := range rounds {
		open := func() int {
			fd, err := unix.Open(os.DevNull, unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			return fd
		}
		c := &Container{fd: newFD(open(), os.DevNull)}
		d := &Device{fd: newFD(open(), os.DevNull), name: "null"}
		var closed atomic.Bool
		var bad atomic.Value
		fail := func(format string, args ...any) { bad.CompareAndSwap(nil, fmt.Sprintf(format, args...)) }
		var wg sync.WaitGroup
		start := make(chan struct{})
		loop := func(name string, f func() error, ok func(error) bool) {
			wg.Go(func() {
				<-start
				for {
					err := f()
					if errors.Is(err, ErrClosed) {
						return
					}
					if !ok(err) {
						fail("%s: %v", name, err)
						return
					}
				}
			})
		}
		enotty := func(err error) bool { return errors.Is(err, unix.ENOTTY) }
		loop("Container.GetAPIVersion", func() error { _, err := c.GetAPIVersion(); return err }, enotty)
		loop("Device.Reset", d.Reset, enotty)
		loop("Device.WriteRegion", func() error { return d.WriteRegion(r, 0, []byte{1, 2, 3, 4}) },
			func(err error) bool { return err == nil })
		loop("Container.Control", func() error {
			var st unix.Stat_t
			var serr error
			err := c.Control(func(fd uintptr) {
				if closed.Load() {
					fail("Control ran after Close returned")
				}
				serr = unix.Fstat(int(fd), &st)
			})
			if err == nil && (serr != nil || st.Ino != null.Ino || st.Rdev != null.Rdev) {
				return fmt.Errorf("the descriptor names inode %d (%v), not /dev/null", st.Ino, serr)
			}
			return err
		}, func(err error) bool { return err == nil })
		close(start)
		for range round % 8 {
			runtime.Gosched()
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		closed.Store(true)
		pipes := openPipes(t, 2)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		pipes = append(pipes, openPipes(t, 2)...)
		wg.Wait()
		closeAll(pipes)
		if msg := bad.Load(); msg != nil {
			t.Fatalf("round %d: %s", round, msg)
		}
	}
}

// openPipes opens n pipes, which take the lowest free descriptor numbers:
// the ones a Close just freed. It returns their descriptors.
func openPipes(t *testing.T, n int) []int {
	t.Helper()
	var fds []int
	for range n {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		fds = append(fds, p[0], p[1])
	}
	return fds
}

// closeAll closes descriptors the test opened.
func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
