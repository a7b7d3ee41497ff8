package guesttest

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/iommu"
)

// fidelitySeeds are the seeds of the randomized map/unmap sequences run on
// the kernel and on iommu.Model side by side. Fixed, so a difference can be
// replayed on the model alone.
var fidelitySeeds = []uint64{1, 2, 3, 4}

const (
	fidelityOps   = 300
	fidelityBase  = 0x1000000 // IOVA of the window's first page
	fidelityPages = 64        // window size in pages
	pageSize      = 4096
)

// fidelityOp is one request of a sequence.
type fidelityOp struct {
	unmap      bool
	iova, size uint64
	host       []byte // map only
	why        string // how the request was chosen
}

func (o fidelityOp) String() string {
	if o.unmap {
		return fmt.Sprintf("Unmap(%#x, %#x) [%s]", o.iova, o.size, o.why)
	}
	return fmt.Sprintf("Map(%#x, %#x) [%s]", o.iova, o.size, o.why)
}

// answer is what a Space said to one request.
type answer struct {
	errno unix.Errno // 0 for success
	size  uint64     // unmapped bytes, on success
	avail uint64     // Avail after the request, for limited spaces
}

func (a answer) String() string {
	s := errnoName(a.errno)
	if a.errno == 0 {
		s += fmt.Sprintf(" size %#x", a.size)
	}
	return s
}

// fidelity runs the seeded sequences on the kernel space ks (emptied by
// reset before each) and on iommu.NewModel(ks.Caps()), and fails at the
// first request the two answer differently, naming the seed, the step, the
// request, both answers and the mappings the model held.
func fidelity(t *testing.T, ks iommu.Space, reset func() error) {
	host := mmapShared(t, fidelityPages*pageSize)
	caps := ks.Caps()
	seen := map[string]int{}
	for _, seed := range fidelitySeeds {
		if err := reset(); err != nil {
			t.Fatal(err)
		}
		m := iommu.NewModel(caps)
		rng := rand.New(rand.NewPCG(seed, 0x676d656d))
		var history []string
		for step := range fidelityOps {
			// The middle third of each sequence mostly maps single pages,
			// to run into the entry limit and unmap around it.
			pressure := step >= fidelityOps/3 && step < 2*fidelityOps/3
			op := nextOp(rng, m, host, pressure)
			k := apply(ks, op)
			w := apply(m, op)
			if caps.EntryLimit == 0 { // Avail is not part of the answer
				k.avail, w.avail = 0, 0
			}
			key := "map"
			if op.unmap {
				key = "unmap"
			}
			key += ":" + errnoName(k.errno)
			if op.unmap && k.errno == 0 && k.size == 0 {
				key += "(size 0)"
			}
			seen[key]++
			history = append(history, fmt.Sprintf("%3d %v -> %v", step, op, k))
			if k != w {
				t.Errorf("%v model differs from the kernel: seed %d step %d: %v\n"+
					"  kernel: %v, avail %d\n  model:  %v, avail %d\n  model mappings before the step: %v\n  last steps:\n    %s",
					caps.Rules, seed, step, op, k, k.avail, w, w.avail, fmtMappings(m.Mappings()), strings.Join(tail(history, 12), "\n    "))
				break
			}
		}
	}
	if err := reset(); err != nil {
		t.Error(err)
	}
	var keys []string
	for k, n := range seen {
		keys = append(keys, fmt.Sprintf("%s=%d", k, n))
	}
	sort.Strings(keys)
	t.Logf("%v answers over %d seeds x %d steps: %s", caps.Rules, len(fidelitySeeds), fidelityOps, strings.Join(keys, " "))
	// The sequences must reach every answer that distinguishes the rules;
	// otherwise they prove little.
	want := []string{"map:ok", "map:EEXIST", "map:EINVAL", "unmap:ok"}
	switch caps.Rules {
	case iommu.Type1v2:
		want = append(want, "unmap:EINVAL", "unmap:ok(size 0)")
		if caps.EntryLimit != 0 && caps.EntryLimit < fidelityPages {
			want = append(want, "map:ENOSPC")
		}
	case iommu.IOMMUFD:
		want = append(want, "unmap:ENOENT")
	}
	for _, k := range want {
		if seen[k] == 0 {
			t.Errorf("no request was answered %s", k)
		}
	}
}

func tail(s []string, n int) []string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func fmtMappings(ms []iommu.Mapping) string {
	var parts []string
	for _, m := range ms {
		parts = append(parts, fmt.Sprintf("[%#x,+%#x)", m.IOVA, m.Size))
	}
	return "{" + strings.Join(parts, " ") + "}"
}

func apply(s iommu.Space, op fidelityOp) answer {
	var a answer
	if op.unmap {
		n, err := s.Unmap(op.iova, op.size)
		a.errno = errnoOf(err)
		if err == nil {
			a.size = n
		}
	} else {
		a.errno = errnoOf(s.Map(op.iova, op.size, op.host))
	}
	if avail, limited, err := s.Avail(); err == nil && limited {
		a.avail = avail
	}
	return a
}

// nextOp picks the next request, steered by the model's mappings (which
// equal the kernel's as long as no difference was found) towards the cases
// where the rules differ: cuts, empty ranges, overlaps, exact and adjacent
// covers, and the entry limit.
func nextOp(rng *rand.Rand, m *iommu.Model, host []byte, pressure bool) fidelityOp {
	ms := m.Mappings()
	page := func(p uint64) uint64 { return fidelityBase + p*pageSize }
	mapAt := func(p, n uint64, why string) fidelityOp {
		n = min(n, fidelityPages-p)
		return fidelityOp{iova: page(p), size: n * pageSize, host: host[p*pageSize : (p+n)*pageSize], why: why}
	}
	unmap := func(iova, size uint64, why string) fidelityOp {
		return fidelityOp{unmap: true, iova: iova, size: size, why: why}
	}
	r := rng.IntN(100)
	switch {
	case pressure && r < 70:
		return mapAt(rng.Uint64N(fidelityPages), 1, "one-page map")
	case r < 45:
		p := rng.Uint64N(fidelityPages)
		return mapAt(p, []uint64{1, 1, 2, 3, 4, 8}[rng.IntN(6)], "random map")
	case r < 50:
		// Malformed or misplaced requests, which must fail the same way.
		p := page(rng.Uint64N(fidelityPages))
		switch rng.IntN(11) {
		case 0:
			return fidelityOp{iova: p, size: 0, host: host[:0], why: "map size 0"}
		case 1:
			return fidelityOp{iova: p + 0x800, size: pageSize, host: host[:pageSize], why: "map unaligned iova"}
		case 2:
			return fidelityOp{iova: p, size: 0x1800, host: host[:0x1800], why: "map unaligned size"}
		case 3:
			return fidelityOp{iova: 0xfee00000, size: pageSize, host: host[:pageSize], why: "map in the MSI window"}
		case 4:
			return fidelityOp{iova: 0xfedff000, size: 2 * pageSize, host: host[:2*pageSize], why: "map straddling the MSI window"}
		case 5:
			return fidelityOp{iova: math.MaxUint64 - pageSize + 1, size: 2 * pageSize, host: host[:2*pageSize], why: "map wrapping past 2^64"}
		case 6:
			return unmap(p, 0, "unmap size 0")
		case 7:
			return unmap(p+0x800, pageSize, "unmap unaligned iova")
		case 8:
			return unmap(p, 0x1800, "unmap unaligned size")
		case 9:
			return unmap(math.MaxUint64-pageSize+1, 2*pageSize, "unmap wrapping past 2^64")
		default:
			return unmap(0, math.MaxUint64, "unmap [0, 2^64-1)")
		}
	}
	if len(ms) == 0 {
		p := rng.Uint64N(fidelityPages)
		return unmap(page(p), pageSize*(1+rng.Uint64N(4)), "unmap with nothing mapped")
	}
	x := ms[rng.IntN(len(ms))]
	switch rng.IntN(9) {
	case 0:
		return unmap(x.IOVA, x.Size, "exact")
	case 1:
		// Two adjacent mappings with one request, if there are any.
		for i := 0; i+1 < len(ms); i++ {
			if ms[i].IOVA+ms[i].Size == ms[i+1].IOVA {
				return unmap(ms[i].IOVA, ms[i].Size+ms[i+1].Size, "adjacent cover")
			}
		}
		return unmap(x.IOVA, x.Size, "exact")
	case 2:
		return unmap(x.IOVA, pageSize, "head page")
	case 3:
		return unmap(x.IOVA+x.Size-pageSize, pageSize, "tail page")
	case 4:
		if x.Size >= 3*pageSize {
			return unmap(x.IOVA+pageSize, pageSize, "middle page")
		}
		return unmap(x.IOVA+x.Size-pageSize, 2*pageSize, "straddles the end")
	case 5:
		// A gap between mappings, if there is one.
		for i := 0; i+1 < len(ms); i++ {
			if end := ms[i].IOVA + ms[i].Size; end < ms[i+1].IOVA {
				return unmap(end, ms[i+1].IOVA-end, "empty gap")
			}
		}
		return unmap(page(fidelityPages), pageSize, "empty, past the window")
	case 6:
		return unmap(x.IOVA-pageSize, x.Size+2*pageSize, "superset")
	case 7:
		// Map over an existing mapping's second half.
		p := (x.IOVA - fidelityBase + x.Size/2) / pageSize
		return mapAt(p, 2, "overlap")
	default:
		p := rng.Uint64N(fidelityPages)
		return unmap(page(p), pageSize*(1+rng.Uint64N(8)), "random unmap")
	}
}

// TestFidelityGenerator runs the fidelity sequences with a model standing
// in for the kernel, on any host: the answers agree by construction, and
// what is tested is that the sequences reach every answer that tells the
// rules apart (fidelity fails otherwise).
func TestFidelityGenerator(t *testing.T) {
	if os.Getenv("GMEM_RIG") == "1" {
		t.Skip("in the guest the sequences run against the kernel (the model-fidelity checks)")
	}
	for _, caps := range []iommu.Caps{
		{Rules: iommu.Type1v2, PageSize: pageSize, EntryLimit: 16, Ranges: measuredRanges},
		{Rules: iommu.IOMMUFD, PageSize: pageSize, Ranges: measuredRanges},
	} {
		t.Run(caps.Rules.String(), func(t *testing.T) {
			m := iommu.NewModel(caps)
			fidelity(t, m, func() error {
				_, err := m.Unmap(0, 1<<47)
				if errnoOf(err) == unix.ENOENT {
					return nil
				}
				return err
			})
		})
	}
}
