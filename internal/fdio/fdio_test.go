//go:build linux

package fdio

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func TestAdopt(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "fdio")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var got int
	fd, err := Adopt(f, func(fd int) (int, error) { got = fd; return fd, nil })
	if err != nil || fd != got {
		t.Fatalf("Adopt = %d, %v", fd, err)
	}
	if fd == int(f.Fd()) {
		t.Fatal("Adopt did not duplicate")
	}
	if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("duplicate flags %#x, %v: want close-on-exec", flags, err)
	}
	if err := unix.Close(fd); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("still open"); err != nil {
		t.Errorf("closing the duplicate closed f: %v", err)
	}
	// A failing adopt closes the duplicate.
	refuse := errors.New("refused")
	_, err = Adopt(f, func(fd int) (int, error) { got = fd; return 0, refuse })
	if !errors.Is(err, refuse) {
		t.Fatal(err)
	}
	if _, err := unix.FcntlInt(uintptr(got), unix.F_GETFD, 0); !errors.Is(err, unix.EBADF) {
		t.Errorf("the refused duplicate %d is still open: %v", got, err)
	}
}
