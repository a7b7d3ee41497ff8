//go:build linux

package fdio

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkIoctl measures one ioctl through an FD against the bare system
// call, on /dev/null (ENOTTY: the kernel's shortest path).
func BenchmarkIoctl(b *testing.B) {
	fd, err := unix.Open(os.DevNull, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("raw", func(b *testing.B) {
		for b.Loop() {
			unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TIOCINQ, 0)
		}
	})
	d := New(fd, os.DevNull, errTestClosed)
	defer d.Close()
	b.Run("FD", func(b *testing.B) {
		b.ReportAllocs()
		var n int32
		for b.Loop() {
			IoctlPtr(d, unix.TIOCINQ, &n)
		}
	})
}
