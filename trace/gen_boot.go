package trace

import (
	"iter"
	"math/rand/v2"

	"github.com/gmemproject/gmem/span"
)

// Defaults of the boot generator.
const (
	DefaultBootVCPUs = 4
	DefaultBootLive  = 512
)

// swiotlb sizing of a confidential Linux guest (mem_encrypt_setup_arch):
// 6% of RAM, at least the default 64 MiB pool, at most 1 GiB, in whole
// segments of 128 slabs of 2 KiB.
const (
	swiotlbMin     = 64 << 20
	swiotlbMax     = 1 << 30
	swiotlbSegment = 128 * 2048
	// swiotlbSlack bounds what memblock has already taken from the top of
	// low memory before the pool is allocated (page tables, ACPI copies,
	// the crash kernel...).
	swiotlbSlack = 64 << 20
)

// BootOptions sizes the boot generator.
type BootOptions struct {
	Common
	// VCPUs is the number of vCPUs; an SNP guest shares one GHCB page per
	// vCPU. 0 means DefaultBootVCPUs.
	VCPUs int
	// Live is the most coherent DMA buffers outstanding at once; 0 means
	// DefaultBootLive.
	Live int
}

// Boot generates the conversions of a confidential Linux guest (TDX or
// SEV-SNP) from boot to steady I/O.
//
// Early in boot an SNP guest shares one 4 KiB GHCB page per vCPU. Then the
// kernel sets up its swiotlb bounce-buffer pool, through which all streaming
// DMA of a confidential guest goes: 6% of RAM, at least 64 MiB and at most
// 1 GiB, taken by memblock from the top of memory below 4 GiB, and converted
// to shared in one request that reaches the VMM in the platform's pieces
// (2 MiB for TDX; runs of 2 MiB or 4 KiB page-state entries, at most 253 per
// request, for SNP). The pool stays shared for the life of the guest.
//
// After that, drivers allocate coherent DMA buffers (dma_alloc_coherent): 4
// to 64 KiB, small ones more often, naturally aligned as the buddy allocator
// returns them, anywhere in RAM; each is converted to shared when allocated
// and back to private when freed, exactly as it was shared. Common.Events
// counts these coherent-buffer conversions; the boot conversions come on top.
func Boot(o BootOptions) (iter.Seq[Event], error) {
	c, err := o.Common.normalize(DefaultEvents)
	if err != nil {
		return nil, err
	}
	vcpus, err := checkLive("vcpus", o.VCPUs, DefaultBootVCPUs)
	if err != nil {
		return nil, err
	}
	live, err := checkLive("live", o.Live, DefaultBootLive)
	if err != nil {
		return nil, err
	}
	pool := swiotlbSize(c.RAM)
	return func(yield func(Event) bool) {
		rng := newRand(c.Seed)
		e := &emitter{yield: yield, left: c.Events}
		if !e.setup(c.setup()...) {
			return
		}
		a := &arena{blocks: c.blocks()}

		// memblock allocates top-down: the pool ends a little below the top
		// of the RAM under 4 GiB.
		low := a.blocks[0]
		slack := min(swiotlbSlack, low.Len()-pool)
		end := low.End - rng.Uint64N(slack/PageSize+1)*PageSize
		tlb := span.Range{Start: end - pool, End: end}
		a.used.Add(tlb)

		if c.Platform == SNP {
			for range vcpus {
				ghcb, ok := a.pick(rng, PageSize, PageSize, false)
				if !ok || !e.convert(c.Platform, ghcb, Shared, false) {
					return
				}
			}
		}
		if !e.convert(c.Platform, tlb, Shared, false) {
			return
		}
		sizeOf := func() uint64 { return coherentSize(rng) }
		for churn(rng, a, live, sizeOf, e, c.Platform) {
		}
	}, nil
}

// swiotlbSize returns the swiotlb pool size of a confidential guest with ram
// bytes of RAM.
func swiotlbSize(ram uint64) uint64 {
	s := min(max(ram/100*6, swiotlbMin), swiotlbMax)
	return (s + swiotlbSegment - 1) / swiotlbSegment * swiotlbSegment
}

// coherentSize draws the size of a coherent DMA buffer: 4 KiB with
// probability 8/16, 8 KiB 4/16, 16 KiB 2/16, 32 and 64 KiB 1/16 each (small
// descriptor rings and command buffers dominate).
func coherentSize(rng *rand.Rand) uint64 {
	switch k := rng.IntN(16); {
	case k < 8:
		return 4 << 10
	case k < 12:
		return 8 << 10
	case k < 14:
		return 16 << 10
	case k < 15:
		return 32 << 10
	}
	return 64 << 10
}
