// Package randtest is the scaffolding the randomized oracle tests share:
// how many operations they run, a fault injector that fails one backend
// call of an operation, IOMMU mappings compared page by page, and a
// device's view of a page cut at random. It is imported only by tests.
package randtest

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"

	"github.com/gmemproject/gmem/iommu"
)

// Ops is a randomized test's number of operations: GMEM_RANDOM_OPS where it
// is set (CI sets 1,000,000), scaled to the cost of the test's operations,
// else a quick default.
type Ops struct {
	// Short and Full are the defaults under -short and otherwise.
	Short, Full int
	// Div divides GMEM_RANDOM_OPS (1 when 0), for operations that cost
	// more than most; Min is the least the quotient gives.
	Div, Min int
}

// Count answers the number of operations. A GMEM_RANDOM_OPS that is not a
// positive number fails the test.
func (o Ops) Count(t testing.TB) int {
	t.Helper()
	if s := os.Getenv("GMEM_RANDOM_OPS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("GMEM_RANDOM_OPS=%q: want a positive number", s)
		}
		return max(n/max(o.Div, 1), o.Min)
	}
	if testing.Short() {
		return o.Short
	}
	return o.Full
}

// Injector fails the n-th backend call after it is armed, once, with Err.
// A test stops it at the first failure of any kind, so that an operation
// meets at most one: I3 is promised for single failures (a rollback that
// fails is reported, not repaired). It is safe for concurrent use.
type Injector struct {
	// Err is the error the failing call answers.
	Err error

	mu    sync.Mutex
	armed bool
	n     int
	fired bool
}

// Arm makes the n-th call from now fail.
func (f *Injector) Arm(n int) { f.mu.Lock(); f.armed, f.n, f.fired = true, n, false; f.mu.Unlock() }

// Disarm stops injecting and reports whether a call failed since Arm.
func (f *Injector) Disarm() (fired bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fired, f.armed, f.fired = f.fired, false, false
	return fired
}

// Call counts one backend call and answers the error it must fail with:
// Err for the armed one, nil for the others.
func (f *Injector) Call() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.armed {
		return nil
	}
	if f.n--; f.n == 0 {
		f.armed, f.fired = false, true
		return f.Err
	}
	return nil
}

// Stop stops injecting without forgetting whether a call failed: for a
// failure that did not come from the injector.
func (f *Injector) Stop() { f.mu.Lock(); f.armed = false; f.mu.Unlock() }

// Pages normalises mappings to one 4 KiB Mapping per page, so that two
// entry layouts covering the same pages compare equal: a rollback may
// leave an entry cut that covers what it covered before.
func Pages(ms []iommu.Mapping) []iommu.Mapping {
	const page = 4096
	var out []iommu.Mapping
	for _, m := range ms {
		for a := m.IOVA; a < m.IOVA+m.Size; a += page {
			out = append(out, iommu.Mapping{IOVA: a, Size: page})
		}
	}
	return out
}

// CheckCutPage checks what a device reaches through model once page p of
// host, mapped at base, is cut, cut[p] included: DMA to p faults and
// leaves host alone, and DMA to p's neighbours and to one random page that
// cut says is still mapped lands in host where it belongs. step names the
// cut in failures.
func CheckCutPage(t testing.TB, model *iommu.Model, base uint64, host []byte, cut []bool, p int, rng *rand.Rand, step string) {
	t.Helper()
	const page = 4096
	if err := model.DMAWrite(base+uint64(p)*page, []byte("blocked")); !errors.Is(err, iommu.ErrFault) {
		t.Fatalf("%s: DMA to the cut page = %v, want a fault", step, err)
	}
	if !bytes.Equal(host[p*page:p*page+7], make([]byte, 7)) {
		t.Fatalf("%s: a blocked write changed page %d", step, p)
	}
	for _, q := range []int{p - 1, p + 1, rng.IntN(len(cut))} {
		if q < 0 || q >= len(cut) || cut[q] {
			continue
		}
		msg := fmt.Appendf(nil, "%s page %d", step, q)
		off := q*page + 64
		if err := model.DMAWrite(base+uint64(off), msg); err != nil {
			t.Fatalf("%s: DMA to still-mapped page %d: %v", step, q, err)
		}
		if !bytes.Equal(host[off:off+len(msg)], msg) {
			t.Fatalf("%s: DMA to page %d landed elsewhere", step, q)
		}
	}
}
