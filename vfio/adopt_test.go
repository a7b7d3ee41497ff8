package vfio

import (
	"errors"
	"io/fs"
	"os"
	"reflect"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

func openNull(t *testing.T) *os.File {
	t.Helper()
	f, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestAdoptWrongKind(t *testing.T) {
	null := openNull(t)
	fd := int(null.Fd())
	for name, adopt := range map[string]func() error{
		"NewContainer":      func() error { _, err := NewContainer(fd); return err },
		"NewGroup":          func() error { _, err := NewGroup(fd, 7); return err },
		"NewDevice":         func() error { _, err := NewDevice(fd, "0000:00:03.0"); return err },
		"ContainerFromFile": func() error { _, err := ContainerFromFile(null); return err },
		"GroupFromFile":     func() error { _, err := GroupFromFile(null, 7); return err },
		"DeviceFromFile":    func() error { _, err := DeviceFromFile(null, "x"); return err },
	} {
		err := adopt()
		var fe *FdError
		if !errors.As(err, &fe) || !errors.Is(err, unix.ENOTTY) {
			t.Errorf("%s(/dev/null) = %v, want an *FdError wrapping ENOTTY", name, err)
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			t.Fatalf("%s closed the refused fd: %v", name, err)
		}
	}
}

// TestAfterClose calls every method of a closed Container, Group and
// Device: each answers ErrClosed without reaching the kernel (the fd
// number, free again, may belong to another file by then).
func TestAfterClose(t *testing.T) {
	dup := func() *fdio.FD {
		fd, err := unix.Dup(int(openNull(t).Fd()))
		if err != nil {
			t.Fatal(err)
		}
		return newFD(fd, os.DevNull)
	}
	c, g, d := &Container{fd: dup()}, &Group{fd: dup(), id: 1}, &Device{fd: dup(), name: "dev"}
	for _, cl := range []interface{ Close() error }{c, g, d} {
		if err := cl.Close(); err != nil {
			t.Fatal(err)
		}
	}
	open := &Container{fd: dup()}
	defer open.Close()
	r := RegionInfo{Index: 0, Flags: RegionRead | RegionWrite | RegionMmap, Size: 4096}
	host := make([]byte, 4096)
	ran := false
	control := func(fd uintptr) { ran = true }
	calls := map[string]func() error{
		"Container.Control":          func() error { return c.Control(control) },
		"Group.Control":              func() error { return g.Control(control) },
		"Device.Control":             func() error { return d.Control(control) },
		"Container.Close":            c.Close,
		"Container.GetAPIVersion":    func() error { _, err := c.GetAPIVersion(); return err },
		"Container.CheckExtension":   func() error { _, err := c.CheckExtension(Type1v2IOMMU); return err },
		"Container.SetIOMMU":         func() error { return c.SetIOMMU(Type1v2IOMMU) },
		"Container.GetIOMMUInfo":     func() error { _, err := c.GetIOMMUInfo(); return err },
		"Container.MapDMA":           func() error { return c.MapDMA(0, host, MapRead) },
		"Container.UnmapDMA":         func() error { _, err := c.UnmapDMA(0, 4096, 0); return err },
		"Container.UnmapAllDMA":      func() error { _, err := c.UnmapAllDMA(); return err },
		"Group.Close":                g.Close,
		"Group.GetStatus":            func() error { _, err := g.GetStatus(); return err },
		"Group.SetContainer":         func() error { return g.SetContainer(open) },
		"Group.SetContainer(closed)": func() error { return (&Group{fd: dup()}).SetContainer(c) },
		"Group.UnsetContainer":       g.UnsetContainer,
		"Group.GetDeviceFD":          func() error { _, err := g.GetDeviceFD("x"); return err },
		"Device.Close":               d.Close,
		"Device.GetInfo":             func() error { _, err := d.GetInfo(); return err },
		"Device.GetRegionInfo":       func() error { _, err := d.GetRegionInfo(0); return err },
		"Device.Reset":               d.Reset,
		"Device.ReadRegion":          func() error { return d.ReadRegion(r, 0, make([]byte, 4)) },
		"Device.WriteRegion":         func() error { return d.WriteRegion(r, 0, make([]byte, 4)) },
		"Device.MmapRegion":          func() error { _, err := d.MmapRegion(r); return err },
		"Device.Read32":              func() error { _, err := d.Read32(r, 0); return err },
		"Device.Write32":             func() error { return d.Write32(r, 0, 1) },
		"Device.Read64":              func() error { _, err := d.Read64(r, 0); return err },
		"Device.Write64":             func() error { return d.Write64(r, 0, 1) },
		"Device.ReadConfig16":        func() error { _, err := d.ReadConfig16(0); return err },
		"Device.WriteConfig16":       func() error { return d.WriteConfig16(0, 1) },
		"Device.ReadConfig32":        func() error { _, err := d.ReadConfig32(0); return err },
		"Device.WriteConfig32":       func() error { return d.WriteConfig32(0, 1) },
		"Device.EnableBusMaster":     func() error { _, err := d.EnableBusMaster(); return err },
		"Device.BindIOMMUFD":         func() error { _, err := d.BindIOMMUFD(3); return err },
		"Device.AttachIOMMUFDPT":     func() error { _, err := d.AttachIOMMUFDPT(1); return err },
		"Device.DetachIOMMUFDPT":     d.DetachIOMMUFDPT,
	}
	for name, call := range calls {
		if err := call(); !errors.Is(err, ErrClosed) || !errors.Is(err, fs.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
	if ran {
		t.Error("Control ran its function after Close")
	}
	// Every method with an error result is in the table.
	for _, v := range []any{c, g, d} {
		ty := reflect.TypeOf(v)
		for i := range ty.NumMethod() {
			m := ty.Method(i)
			returnsErr := m.Type.NumOut() > 0 && m.Type.Out(m.Type.NumOut()-1) == reflect.TypeFor[error]()
			name := ty.Elem().Name() + "." + m.Name
			if returnsErr && !slices.Contains(keys(calls), name) {
				t.Errorf("%s is not called after Close", name)
			}
		}
	}
	if c.Fd() != -1 || g.Fd() != -1 || d.Fd() != -1 {
		t.Error("Fd after Close is not -1")
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
