package trace

import (
	"fmt"
	"math/rand/v2"
	"strconv"

	"github.com/gmemproject/gmem/span"
)

// Generator defaults and bounds.
const (
	// DefaultRAM is the boot RAM of a generated guest when none is given:
	// the 16 GiB guest whose 4,194,304 pages overflow type1's default
	// dma_entry_limit under QEMU's per-page mapping.
	DefaultRAM = 16 << 30
	// DefaultEvents is the number of workload events when none is given.
	DefaultEvents = 10000
	// MinRAM and MaxRAM bound the boot RAM of a generated guest; it must
	// also be a multiple of 2 MiB.
	MinRAM = 128 << 20
	MaxRAM = 1 << 50
	// MaxLive bounds every generator's number of outstanding allocations,
	// which is what its memory grows with.
	MaxLive = 1 << 20

	hugePage2M = 2 << 20
	lowTop     = 2 << 30 // q35 puts at most 2 GiB of RAM below the PCI hole ...
	highBase   = 4 << 30 // ... and the rest above 4 GiB.
)

// Platform is the confidential-computing technology of a generated guest. It
// decides how a large conversion reaches the VMM.
type Platform uint8

// Platforms; the zero Platform is invalid.
const (
	// TDX: the guest asks for a whole range with one MapGPA; KVM hands it to
	// the VMM in pieces of at most 2 MiB from the start of the range
	// (TDX_MAP_GPA_MAX_LEN), one KVM_HC_MAP_GPA_RANGE exit each.
	TDX Platform = iota + 1
	// SNP: the guest describes a range as page-state-change entries, 2 MiB
	// entries where the range is 2 MiB aligned and 4 KiB entries elsewhere,
	// at most 253 entries per request; KVM joins adjacent entries of the same
	// page size into one exit.
	SNP
)

// String returns "tdx" or "snp".
func (p Platform) String() string {
	switch p {
	case TDX:
		return "tdx"
	case SNP:
		return "snp"
	}
	return fmt.Sprintf("Platform(%d)", uint8(p))
}

// ParsePlatform parses "tdx" or "snp".
func ParsePlatform(s string) (Platform, error) {
	switch s {
	case "tdx":
		return TDX, nil
	case "snp":
		return SNP, nil
	}
	return 0, fmt.Errorf("%w: platform %q: want tdx or snp", ErrValue, s)
}

// Common holds what every generator needs: the machine and the size of the
// trace. Zero fields take the documented defaults.
//
// The machine is laid out as QEMU's q35 does it: RAM up to 2 GiB at address
// 0 (block "ram-below-4g"), the PCI hole from 2 GiB to 4 GiB (an MMIO event),
// and RAM beyond 2 GiB from 4 GiB up (block "ram-above-4g"). Devices named
// dev0, dev1, ... are attached after the RAM is declared, as a VMM attaches
// assigned devices before the guest runs.
type Common struct {
	// RAM is the boot RAM in bytes: a multiple of 2 MiB in [MinRAM, MaxRAM].
	// 0 means DefaultRAM.
	RAM uint64
	// Seed selects the pseudo-random sequence; the same options and seed
	// always give the same trace.
	Seed uint64
	// Events is the number of workload events, as each generator defines
	// it; 0 means the generator's default.
	Events int
	// Devices is the number of devices attached, at most MaxDevices; 0 means 1.
	Devices int
	// IOMMU is the devices' IOMMU; 0 means Type1.
	IOMMU IOMMU
	// Limit is the type1 dma_entry_limit recorded on each attach; 0 leaves
	// the kernel's default (65,535).
	Limit uint64
	// Mode is the backing of every RAM block; 0 means Split.
	Mode Mode
	// Platform decides how large conversions are delivered; 0 means TDX.
	Platform Platform
}

// normalize applies defaults and checks ranges. defEvents is the generator's
// default number of events.
func (c Common) normalize(defEvents int) (Common, error) {
	if c.RAM == 0 {
		c.RAM = DefaultRAM
	}
	if c.RAM < MinRAM || c.RAM > MaxRAM || c.RAM%hugePage2M != 0 {
		return c, fmt.Errorf("%w: RAM %s: want a multiple of 2 MiB from %s to %s", ErrValue, FormatSize(c.RAM), FormatSize(MinRAM), FormatSize(MaxRAM))
	}
	switch {
	case c.Events < 0:
		return c, fmt.Errorf("%w: events %d is negative", ErrValue, c.Events)
	case c.Events == 0:
		c.Events = defEvents
	}
	switch {
	case c.Devices < 0 || c.Devices > MaxDevices:
		return c, fmt.Errorf("%w: devices %d not in [0, %d]", ErrValue, c.Devices, MaxDevices)
	case c.Devices == 0:
		c.Devices = 1
	}
	if c.IOMMU == 0 {
		c.IOMMU = Type1
	}
	if c.Mode == 0 {
		c.Mode = Split
	}
	if c.Platform == 0 {
		c.Platform = TDX
	}
	if c.Platform != TDX && c.Platform != SNP {
		return c, fmt.Errorf("%w: invalid %v", ErrValue, c.Platform)
	}
	// Let the events check the rest (IOMMU, limit, mode).
	for _, e := range c.setup() {
		if err := e.Check(); err != nil {
			return c, err
		}
	}
	return c, nil
}

// blocks returns the boot RAM blocks.
func (c Common) blocks() []span.Range {
	if c.RAM <= lowTop {
		return []span.Range{{Start: 0, End: c.RAM}}
	}
	return []span.Range{{Start: 0, End: lowTop}, {Start: highBase, End: highBase + c.RAM - lowTop}}
}

// setup returns the events that describe the machine: RAM, the PCI hole,
// device attachments.
func (c Common) setup() []Event {
	names := []string{"ram-below-4g", "ram-above-4g"}
	var out []Event
	for i, b := range c.blocks() {
		out = append(out, RAM{Name: names[i], GPA: b.Start, Size: b.Len(), Mode: c.Mode})
	}
	out = append(out, MMIO{GPA: lowTop, Size: highBase - lowTop})
	for i := range c.Devices {
		out = append(out, Attach{Dev: "dev" + strconv.Itoa(i), IOMMU: c.IOMMU, Limit: c.Limit})
	}
	return out
}

// highestEnd returns the end of the highest boot RAM block.
func (c Common) highestEnd() uint64 {
	b := c.blocks()
	return b[len(b)-1].End
}

// newRand returns the generator's pseudo-random source for seed. PCG is
// specified exactly, so a seed means the same trace on every platform.
func newRand(seed uint64) *rand.Rand {
	return rand.New(rand.NewPCG(seed, 0x676d656d)) // "gmem"
}

// emitter yields events and counts the workload events among them, so that a
// generator stops after exactly the number asked for.
type emitter struct {
	yield func(Event) bool
	left  int  // workload events still to emit
	done  bool // the consumer stopped or left reached 0
}

// setup yields events that do not count as workload.
func (e *emitter) setup(evs ...Event) bool {
	for _, ev := range evs {
		if e.done {
			return false
		}
		if !e.yield(ev) {
			e.done = true
		}
	}
	return !e.done
}

// event yields one workload event; it returns false once the generator must
// stop.
func (e *emitter) event(ev Event) bool {
	if e.done || e.left <= 0 {
		e.done = true
		return false
	}
	e.left--
	if !e.yield(ev) || e.left == 0 {
		e.done = true
	}
	return !e.done
}

// convert yields the conversion of r as the platform delivers it: one event
// per request the VMM sees. count says whether the events are workload
// events.
func (e *emitter) convert(p Platform, r span.Range, to State, count bool) bool {
	ok := true
	requests(p, r, func(c span.Range) bool {
		ev := Convert{GPA: c.Start, Size: c.Len(), To: to}
		if count {
			ok = e.event(ev)
		} else {
			ok = e.setup(ev)
		}
		return ok
	})
	return ok && !e.done
}

// requests calls f with each KVM_HC_MAP_GPA_RANGE request that a guest's
// conversion of r reaches the VMM as, until f returns false.
func requests(p Platform, r span.Range, f func(span.Range) bool) {
	switch p {
	case SNP:
		const maxEntries = 253 // VMGEXIT_PSC_MAX_ENTRY
		cur := r.Start
		for cur < r.End {
			// One page-state-change buffer; KVM makes one exit per run of
			// adjacent entries with the same page size.
			runStart := cur
			runHuge := false
			for n := 0; cur < r.End && n < maxEntries; n++ {
				huge := cur%hugePage2M == 0 && r.End-cur >= hugePage2M
				if n == 0 {
					runHuge = huge
				} else if huge != runHuge {
					if !f(span.Range{Start: runStart, End: cur}) {
						return
					}
					runStart, runHuge = cur, huge
				}
				if huge {
					cur += hugePage2M
				} else {
					cur += PageSize
				}
			}
			if !f(span.Range{Start: runStart, End: cur}) {
				return
			}
		}
	default:
		for cur := r.Start; cur < r.End; cur += min(hugePage2M, r.End-cur) {
			if !f(span.Range{Start: cur, End: cur + min(hugePage2M, r.End-cur)}) {
				return
			}
		}
	}
}

// arena hands out ranges of guest memory that do not overlap each other or
// anything reserved, as a guest's page allocator does, and remembers the
// live ones so that one can be freed at random. Its memory grows with the
// number of live allocations, not with the size of the guest.
type arena struct {
	blocks []span.Range // where allocations may go
	used   span.Set
	live   []span.Range
}

// pick returns a random range of size bytes, aligned to align, inside the
// blocks and not overlapping anything used; it reserves it and, if keep,
// records it as live. Random places are tried first, as a guest's memory is
// fragmented; if they keep colliding, the first free place is taken, so pick
// fails only when there is no room at all.
func (a *arena) pick(rng *rand.Rand, size, align uint64, keep bool) (span.Range, bool) {
	slots := func(b span.Range) uint64 {
		b = b.Inward(align)
		if b.Len() < size {
			return 0
		}
		return (b.Len()-size)/align + 1
	}
	var total uint64
	for _, b := range a.blocks {
		total += slots(b)
	}
	if total == 0 {
		return span.Range{}, false
	}
	take := func(r span.Range) (span.Range, bool) {
		a.used.Add(r)
		if keep {
			a.live = append(a.live, r)
		}
		return r, true
	}
	for range 16 {
		k := rng.Uint64N(total)
		for _, b := range a.blocks {
			n := slots(b)
			if k >= n {
				k -= n
				continue
			}
			start := b.Inward(align).Start + k*align
			if r := (span.Range{Start: start, End: start + size}); !a.used.Overlaps(r) {
				return take(r)
			}
			break
		}
	}
	up := func(x uint64) uint64 { return (x + align - 1) / align * align }
	for _, b := range a.blocks {
		cur := b.Start
		for _, u := range append(a.used.Inside(b), span.Range{Start: b.End, End: b.End}) {
			if s := up(cur); s+size <= u.Start {
				return take(span.Range{Start: s, End: s + size})
			}
			cur = max(cur, u.End)
		}
	}
	return span.Range{}, false
}

// freeAt forgets live allocation i and returns it.
func (a *arena) freeAt(i int) span.Range {
	r := a.live[i]
	last := len(a.live) - 1
	a.live[i] = a.live[last]
	a.live = a.live[:last]
	a.used.Remove(r)
	return r
}

// freeRandom forgets a random live allocation and returns it.
func (a *arena) freeRandom(rng *rand.Rand) span.Range {
	return a.freeAt(rng.IntN(len(a.live)))
}

// churn is one step of buffer churn: with live allocations below max it
// allocates (size from sizeOf, naturally aligned) and shares, at max it frees
// one and makes it private again, in between it tosses a coin. It returns
// false when the trace must stop.
func churn(rng *rand.Rand, a *arena, maxLive int, sizeOf func() uint64, e *emitter, p Platform) bool {
	n := len(a.live)
	if n == 0 || (n < maxLive && rng.IntN(2) == 0) {
		size := sizeOf()
		if r, got := a.pick(rng, size, size, true); got {
			return e.convert(p, r, Shared, true)
		}
		if n == 0 {
			// No room at all and nothing to free: the guest is too small
			// for the options. Stop rather than spin.
			e.done = true
			return false
		}
	}
	return e.convert(p, a.freeRandom(rng), Private, true)
}

// checkLive validates a bound on outstanding allocations; 0 means def.
func checkLive(name string, v, def int) (int, error) {
	switch {
	case v == 0:
		return def, nil
	case v < 0 || v > MaxLive:
		return 0, fmt.Errorf("%w: %s %d not in [1, %d]", ErrValue, name, v, MaxLive)
	}
	return v, nil
}
