package vfio

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio/fdiotest"
)

// TestCloseRace closes a Container and a Device (over /dev/null, so no
// VFIO is needed) while goroutines keep calling them, and opens pipes
// right after each Close so that the freed numbers name other files. Each
// call must reach /dev/null (an ioctl answers ENOTTY, a region write
// succeeds) or answer ErrClosed: one that reached a recycled number would
// see a pipe (a write fails with ESPIPE, Control sees another inode) or
// EBADF. No Control function may start after Close returned.
func TestCloseRace(t *testing.T) {
	null := fdiotest.Null(t)
	isClosed := func(err error) bool { return errors.Is(err, ErrClosed) }
	enotty := fdiotest.Is(unix.ENOTTY)
	r := RegionInfo{Flags: RegionRead | RegionWrite, Size: 4096}
	const rounds = 100
	for round := range rounds {
		c := &Container{fd: newFD(fdiotest.OpenNull(t), os.DevNull)}
		d := &Device{fd: newFD(fdiotest.OpenNull(t), os.DevNull), name: "null"}
		race := fdiotest.NewRace(t, isClosed)
		race.Go("Container.GetAPIVersion", func() error { _, err := c.GetAPIVersion(); return err }, enotty)
		race.Go("Device.Reset", d.Reset, enotty)
		race.Go("Device.WriteRegion", func() error { return d.WriteRegion(r, 0, []byte{1, 2, 3, 4}) }, fdiotest.OK)
		race.GoControl("Container.Control", c.Control, null, nil)
		race.Start(round)
		race.Close(c.Close)
		race.Close(d.Close)
		race.Wait(round)
	}
}
