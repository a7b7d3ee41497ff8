package iommufd

import (
	"errors"
	"io/fs"
	"os"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

func TestAdoptWrongKind(t *testing.T) {
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	fd := int(null.Fd())
	var fe *FdError
	if _, err := NewIOMMUFD(fd); !errors.As(err, &fe) || !errors.Is(err, unix.ENOTTY) {
		t.Errorf("NewIOMMUFD(/dev/null) = %v, want an *FdError wrapping ENOTTY", err)
	}
	if _, err := FromFile(null); !errors.As(err, &fe) {
		t.Errorf("FromFile(/dev/null) = %v, want an *FdError", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		t.Fatalf("a refused adoption closed the fd: %v", err)
	}
}

// TestAfterClose calls every method of a closed IOMMUFD: each answers
// ErrClosed without reaching the kernel.
func TestAfterClose(t *testing.T) {
	fd, err := unix.Open(os.DevNull, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := &IOMMUFD{fd: fdio.New(fd, os.DevNull, ErrClosed)}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	host := make([]byte, 4096)
	ran := false
	calls := map[string]func() error{
		"Control":        func() error { return f.Control(func(uintptr) { ran = true }) },
		"Close":          f.Close,
		"Destroy":        func() error { return f.Destroy(1) },
		"IOASAlloc":      func() error { _, err := f.IOASAlloc(); return err },
		"IOASIOVARanges": func() error { _, err := f.IOASIOVARanges(1); return err },
		"IOASMap":        func() error { _, err := f.IOASMap(1, 0, host, MapFixedIOVA); return err },
		"IOASMapFile":    func() error { _, err := f.IOASMapFile(1, 0, 0, 0, 4096, MapFixedIOVA); return err },
		"IOASUnmap":      func() error { _, err := f.IOASUnmap(1, 0, 4096); return err },
		"IOASCopy":       func() error { _, err := f.IOASCopy(2, 0, 1, 0, 4096, MapFixedIOVA); return err },
		"IOASAllowIOVAs": func() error { return f.IOASAllowIOVAs(1, []IOVARange{{Start: 0, Last: 4095}}) },
		"SetOption":      func() error { return f.SetOption(OptionHugePages, 1, 0) },
		"GetOption":      func() error { _, err := f.GetOption(OptionRlimitMode, 0); return err },
		"SetHugePages":   func() error { return f.SetHugePages(1, false) },
		"HugePages":      func() error { _, err := f.HugePages(1); return err },
		"VFIOIOASGet":    func() error { _, err := f.VFIOIOASGet(); return err },
		"VFIOIOASSet":    func() error { return f.VFIOIOASSet(1) },
		"VFIOIOASClear":  f.VFIOIOASClear,
		"VFIOUnmapDMA":   func() error { _, err := f.VFIOUnmapDMA(0, 4096); return err },
	}
	for name, call := range calls {
		if err := call(); !errors.Is(err, ErrClosed) || !errors.Is(err, fs.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
	if ran {
		t.Error("Control ran its function after Close")
	}
	ty := reflect.TypeOf(f)
	for i := range ty.NumMethod() {
		m := ty.Method(i)
		if m.Type.NumOut() > 0 && m.Type.Out(m.Type.NumOut()-1) == reflect.TypeFor[error]() {
			if _, ok := calls[m.Name]; !ok {
				t.Errorf("%s is not called after Close", m.Name)
			}
		}
	}
	if f.Fd() != -1 {
		t.Error("Fd after Close is not -1")
	}
}
