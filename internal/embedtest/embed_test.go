// Package embedtest builds and runs programs outside the gmem module that
// embed gmem into a VMM owning its own fds, through exported API only.
package embedtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// runOutside copies testdata/name, with the VMM parts in testdata/shared
// (same package), into a temporary module that requires gmem with a
// replace to this checkout, and runs it with go run and the given build
// flags, returning its standard output. It uses the module
// cache only (GOPROXY=off, GOFLAGS=-mod=mod), with gmem's go.sum for the
// dependencies' hashes.
func runOutside(t *testing.T, name string, flags ...string) string {
	t.Helper()
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("needs the go command: %v", err)
	}
	_, here, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(here), "..", "..")
	dir := t.TempDir()
	files := map[string][]byte{}
	for _, path := range []string{filepath.Join("testdata", name, "main.go"), filepath.Join("testdata", "shared", "vmmparts.go"), filepath.Join(root, "go.sum")} {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		files[filepath.Base(path)] = data
	}
	files["go.mod"] = []byte("module example.com/" + name + "\n\ngo 1.26.0\n\nrequire github.com/gmemproject/gmem v0.0.0\n\nreplace github.com/gmemproject/gmem => " + root + "\n")
	for file, data := range files {
		if err := os.WriteFile(filepath.Join(dir, file), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(goCmd, append(append([]string{"run"}, flags...), ".")...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod", "GOPROXY=off", "GOWORK=off")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go run %v: %v\nstdout:\n%s\nstderr:\n%s", flags, err, out, stderr.String())
	}
	t.Logf("stderr:\n%s", stderr.String())
	return string(out)
}

// TestEmbed runs testdata/vmm: a VMM with its own KVM (a fake), memory and
// IOMMU embeds gmem through exported API only.
func TestEmbed(t *testing.T) {
	out := runOutside(t, "vmm")
	want := `enforcement: kvm-attributes
MAP_GPA_RANGE shared, ret 0 kvm private: false
host reads "from dev1"
memory fault converted, err <nil>
MAP_GPA_RANGE on MMIO, ret 22
dev2 entries: 3 dev1 entries: 3
shared 84 KiB, unplugged 6144 KiB
after Close: true dev1 DMA faults: true
vmm closed its own fds
`
	if diff := cmp.Diff(want, out); diff != "" {
		t.Errorf("output (-want +got):\n%s", diff)
	}
}

// raceSupported reports whether go run -race can build here: the race
// detector needs cgo and a C compiler.
func raceSupported(t *testing.T) (bool, string) {
	out, err := exec.Command("go", "env", "CGO_ENABLED", "CC").Output()
	if err != nil {
		return false, err.Error()
	}
	f := strings.Fields(string(out))
	if len(f) < 2 || f[0] != "1" {
		return false, "cgo is disabled"
	}
	if _, err := exec.LookPath(f[1]); err != nil {
		return false, "no C compiler: " + err.Error()
	}
	return true, ""
}

// TestTrial runs testdata/trial under the race detector: the hands-on
// trial's VMM (two RAM blocks around an MMIO hole, virtio-mem, three model
// IOMMUs one of them limited to 64 entries, four goroutines converting while
// the devices DMA, Close under load). It exits 1 on any error the
// documentation does not name; a panic or a data race fails it too. With
// -short, or where the race detector cannot build, it runs without it.
func TestTrial(t *testing.T) {
	var flags []string
	if ok, why := raceSupported(t); !ok {
		t.Logf("running without the race detector: %s", why)
	} else if testing.Short() {
		t.Log("running without the race detector (-short)")
	} else {
		flags = append(flags, "-race")
	}
	out := runOutside(t, "trial", flags...)
	want := `blocks 3 holes 1 enforcement kvm-attributes
devices 3
close: <nil>
entries after close: [0 0 0]
DMA after close faults: true
trial ok
`
	if diff := cmp.Diff(want, out); diff != "" {
		t.Errorf("output (-want +got):\n%s", diff)
	}
}
