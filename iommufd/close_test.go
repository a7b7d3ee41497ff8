package iommufd

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
	"github.com/gmemproject/gmem/internal/fdio/fdiotest"
)

// TestCloseRace closes an IOMMUFD (over /dev/null, so no iommufd is
// needed) while goroutines keep calling it, and opens pipes right after
// the Close so that the freed number names another file. Each ioctl must
// reach /dev/null (ENOTTY) or answer ErrClosed, never EBADF; Control must
// see /dev/null, and never start after Close returned.
func TestCloseRace(t *testing.T) {
	null := fdiotest.Null(t)
	isClosed := func(err error) bool { return errors.Is(err, ErrClosed) }
	enotty := fdiotest.Is(unix.ENOTTY)
	const rounds = 100
	for round := range rounds {
		f := &IOMMUFD{fd: fdio.New(fdiotest.OpenNull(t), os.DevNull, ErrClosed)}
		race := fdiotest.NewRace(t, isClosed)
		race.Go("GetOption", func() error { _, err := f.GetOption(OptionRlimitMode, 0); return err }, enotty)
		race.Go("IOASAlloc", func() error { _, err := f.IOASAlloc(); return err }, enotty)
		race.GoControl("Control", f.Control, null, nil)
		race.Start(round)
		race.Close(f.Close)
		race.Wait(round)
	}
}
