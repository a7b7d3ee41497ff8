// Package embedtest builds and runs a program outside the gmem module that
// embeds gmem into a VMM owning its own fds, through exported API only.
package embedtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestEmbed copies testdata/vmm into a temporary module that requires gmem
// with a replace to this checkout, and runs it. It uses the module cache
// only (GOPROXY=off, GOFLAGS=-mod=mod), with gmem's go.sum for the
// dependencies' hashes.
func TestEmbed(t *testing.T) {
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("needs the go command: %v", err)
	}
	_, here, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(here), "..", "..")
	dir := t.TempDir()
	src, err := os.ReadFile(filepath.Join("testdata", "vmm", "main.go"))
	if err != nil {
		t.Fatal(err)
	}
	sum, err := os.ReadFile(filepath.Join(root, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	mod := "module example.com/vmm\n\ngo 1.26.0\n\nrequire github.com/gmemproject/gmem v0.0.0\n\nreplace github.com/gmemproject/gmem => " + root + "\n"
	for name, data := range map[string][]byte{"main.go": src, "go.mod": []byte(mod), "go.sum": sum} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(goCmd, "run", ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod", "GOPROXY=off", "GOWORK=off")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go run: %v\n%s", err, out)
	}
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
	if diff := cmp.Diff(want, string(out)); diff != "" {
		t.Errorf("output (-want +got):\n%s", diff)
	}
}
