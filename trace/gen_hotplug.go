package trace

import (
	"fmt"
	"iter"
	"slices"

	"github.com/gmemproject/gmem/span"
)

// Defaults of the hotplug generator.
const (
	DefaultHotplugBlock = 2 << 20
	DefaultHotplugLive  = 256
	// linuxMemoryBlock is the unit in which Linux on x86 adds and onlines
	// memory (memory_block_size_bytes, 128 MiB for guests below 64 GiB).
	linuxMemoryBlock = 128 << 20
	hotplugAlign     = 1 << 30 // QEMU places device memory at a 1 GiB boundary
	maxHotplug       = 1 << 46
)

// HotplugOptions sizes the hotplug generator.
type HotplugOptions struct {
	Common
	// Hotplug is the size of the virtio-mem region: a multiple of the
	// memory block (128 MiB, or Block if larger), at most 64 TiB. 0 means
	// Common.RAM rounded up to that.
	Hotplug uint64
	// Block is the virtio-mem device block size: a power of two from 4 KiB
	// to 1 GiB. 0 means DefaultHotplugBlock.
	Block uint64
	// Live is the most coherent DMA buffers outstanding at once; 0 means
	// DefaultHotplugLive.
	Live int
}

// Hotplug generates virtio-mem plug and unplug of a confidential guest's
// hot-pluggable memory, with conversions inside what is plugged.
//
// The machine has, besides its boot RAM, a virtio-mem region (RAM block
// "virtio-mem0" with a block size, placed at the first 1 GiB boundary above
// the boot RAM and 4 GiB), all unplugged at start. The host changes the requested size
// from time to time; the Linux driver follows it. To grow, it plugs the
// lowest memory block (128 MiB, the unit Linux adds memory in) that is not
// fully plugged, all of its unplugged part in one request. To shrink, it
// works on the highest memory block that has any memory plugged: if that
// block is fully plugged and at least a memory block must go, it tries to
// unplug the whole block in one request (which succeeds three times in
// four, failing when an unmovable page is in the way); otherwise it unplugs
// one device block at a time from the back, each block being movable with
// probability 3/4 (skipped otherwise), as the sub-block mode does. Offlining
// migrates pages away, so every shared buffer inside is freed and converted
// back to private before the unplug. While the plugged size matches the
// request, drivers churn coherent DMA buffers (4 to 64 KiB, shared then
// private again) in boot RAM and plugged memory alike, never in unplugged
// memory. Common.Events counts the plugs, unplugs and conversions.
func Hotplug(o HotplugOptions) (iter.Seq[Event], error) {
	c, err := o.Common.normalize(DefaultEvents)
	if err != nil {
		return nil, err
	}
	block := o.Block
	if block == 0 {
		block = DefaultHotplugBlock
	}
	if !span.IsPowerOfTwo(block) || block < PageSize || block > 1<<30 {
		return nil, fmt.Errorf("%w: block %s: want a power of two from 4KiB to 1GiB", ErrValue, FormatSize(block))
	}
	mb := max(uint64(linuxMemoryBlock), block)
	size := o.Hotplug
	if size == 0 {
		size = (c.RAM + mb - 1) / mb * mb
	}
	if size == 0 || size%mb != 0 || size > maxHotplug {
		return nil, fmt.Errorf("%w: hotplug size %s: want a multiple of %s up to %s", ErrValue, FormatSize(size), FormatSize(mb), FormatSize(maxHotplug))
	}
	live, err := checkLive("live", o.Live, DefaultHotplugLive)
	if err != nil {
		return nil, err
	}
	// QEMU's x86 machines put device memory above 4 GiB and above all
	// RAM, at a 1 GiB boundary.
	base := (max(c.highestEnd(), highBase) + hotplugAlign - 1) / hotplugAlign * hotplugAlign
	region := span.Range{Start: base, End: base + size}
	vmem := RAM{Name: "virtio-mem0", GPA: region.Start, Size: size, Mode: c.Mode, Block: block}
	if err := vmem.Check(); err != nil {
		return nil, err
	}
	return func(yield func(Event) bool) {
		rng := newRand(c.Seed)
		e := &emitter{yield: yield, left: c.Events}
		setup := c.setup()
		// The region is declared with the boot RAM, before the devices.
		n := len(c.blocks()) + 1
		setup = append(setup[:n:n], append([]Event{vmem}, setup[n:]...)...)
		if !e.setup(setup...) {
			return
		}
		plugged := &span.Set{}
		boot := c.blocks()
		a := &arena{blocks: boot}
		// Buffers go to boot RAM and plugged memory only.
		replugged := func() {
			a.blocks = append(slices.Clip(boot), plugged.Ranges()...)
		}
		sizeOf := func() uint64 { return coherentSize(rng) }
		mbs := size / mb
		var target, have uint64 // requested and plugged bytes
		for {
			switch {
			case have < target:
				// Plug the unplugged part of the lowest memory block with
				// one: the first gap of the plugged set.
				gap := region.Start
				if len(plugged.Ranges()) > 0 && plugged.Ranges()[0].Start == region.Start {
					gap = plugged.Ranges()[0].End
				}
				mbEnd := (gap-region.Start)/mb*mb + mb + region.Start
				end := mbEnd
				if i := plugged.Index(gap); i < len(plugged.Ranges()) {
					end = min(end, plugged.Ranges()[i].Start)
				}
				r := span.Range{Start: gap, End: end}
				if !e.event(Plug{GPA: r.Start, Size: r.Len()}) {
					return
				}
				plugged.Add(r)
				have += r.Len()
				replugged()
			case have > target:
				// Unplug from the highest memory block with plugged memory.
				top := plugged.Ranges()[len(plugged.Ranges())-1].End - 1
				mbStart := (top-region.Start)/mb*mb + region.Start
				mbr := span.Range{Start: mbStart, End: mbStart + mb}
				parts := plugged.Inside(mbr)
				var b span.Range
				if len(parts) == 1 && parts[0] == mbr && have-target >= mb && rng.IntN(4) != 0 {
					// Fast path: the whole memory block in one request
					// (it fails when an unmovable page is in the way).
					b = mbr
				} else {
					// One device block at a time from the back, skipping
					// those that cannot be emptied now.
					var blocks []span.Range
					for _, p := range slices.Backward(parts) {
						for s := p.End - block; ; s -= block {
							blocks = append(blocks, span.Range{Start: s, End: s + block})
							if s == p.Start || len(blocks) == 64 {
								break
							}
						}
						if len(blocks) == 64 {
							break
						}
					}
					b = blocks[len(blocks)-1]
					for _, x := range blocks {
						if rng.IntN(4) != 0 {
							b = x
							break
						}
					}
				}
				// Free what is shared inside it first.
				for i := 0; i < len(a.live); {
					if !a.live[i].Overlaps(b) {
						i++
						continue
					}
					if !e.convert(c.Platform, a.freeAt(i), Private, true) {
						return
					}
				}
				if !e.event(Unplug{GPA: b.Start, Size: b.Len()}) {
					return
				}
				plugged.Remove(b)
				have -= b.Len()
				replugged()
			default:
				if rng.IntN(512) == 0 {
					target = rng.Uint64N(mbs+1) * mb
					continue
				}
				if !churn(rng, a, live, sizeOf, e, c.Platform) {
					return
				}
			}
		}
	}, nil
}
