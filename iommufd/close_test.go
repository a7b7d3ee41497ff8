package iommufd

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

// TestCloseRace closes an IOMMUFD (over /dev/null, so no iommufd is
// needed) while goroutines keep calling it, and opens pipes right after
// the Close so that the freed number names another file. Each ioctl must
// reach /dev/null (ENOTTY) or answer ErrClosed, never EBADF; Control must
// see /dev/null, and never start after Close returned.
func TestCloseRace(t *testing.T) {
	var null unix.Stat_t
	if err := unix.Stat(os.DevNull, &null); err != nil {
		t.Fatal(err)
	}
	const rounds = 100
	for round := range rounds {
		fd, err := unix.Open(os.DevNull, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		f := &IOMMUFD{fd: fdio.New(fd, os.DevNull, ErrClosed)}
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
		loop("GetOption", func() error { _, err := f.GetOption(OptionRlimitMode, 0); return err }, enotty)
		loop("IOASAlloc", func() error { _, err := f.IOASAlloc(); return err }, enotty)
		loop("Control", func() error {
			var st unix.Stat_t
			var serr error
			err := f.Control(func(fd uintptr) {
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
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		closed.Store(true)
		var pipes [2][2]int
		for i := range pipes {
			if err := unix.Pipe2(pipes[i][:], unix.O_CLOEXEC); err != nil {
				t.Fatal(err)
			}
		}
		wg.Wait()
		for _, p := range pipes {
			unix.Close(p[0])
			unix.Close(p[1])
		}
		if msg := bad.Load(); msg != nil {
			t.Fatalf("round %d: %s", round, msg)
		}
	}
}
