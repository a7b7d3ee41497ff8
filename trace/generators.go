package trace

// GeneratorInfo describes one generator for help texts.
type GeneratorInfo struct {
	// Name is what the command line calls it.
	Name string
	// Summary is one line.
	Summary string
	// Behaviour describes the guest behaviour the generator models and what
	// Events counts.
	Behaviour string
}

// Generators lists the generators in the order help shows them. The
// functions are Boot, Churn, Implicit, Hugepage, Hotplug and Adversarial;
// their doc comments say the same in more detail.
func Generators() []GeneratorInfo {
	return []GeneratorInfo{
		{
			Name:    "boot",
			Summary: "TDX/SNP Linux guest: swiotlb at boot, then coherent-buffer churn",
			Behaviour: `A confidential Linux guest from boot to steady I/O. An SNP guest first shares
one 4 KiB GHCB page per vCPU. The kernel then converts its swiotlb bounce
pool to shared: 6% of RAM, at least 64 MiB, at most 1 GiB, at the top of
the RAM below 4 GiB, delivered in the platform's pieces (TDX: 2 MiB each;
SNP: runs of 2 MiB or 4 KiB page-state entries, at most 253 per request).
After that drivers allocate coherent DMA buffers of 4 to 64 KiB (small ones
more often, naturally aligned, anywhere in RAM), each converted to shared
when allocated and back to private, exactly as shared, when freed.
--events counts the coherent-buffer conversions; the boot conversions come
on top.`,
		},
		{
			Name:    "churn",
			Summary: "random 4 KiB/16 KiB allocate-convert-free",
			Behaviour: `Steady DMA buffer churn of a running guest's network or storage driver:
a 4 KiB or 16 KiB buffer (naturally aligned, anywhere in RAM) is allocated
and converted to shared, later freed and converted back to private exactly
as it was shared. Below --live outstanding buffers, allocating and freeing
are equally likely. --events counts the conversions.`,
		},
		{
			Name:    "implicit",
			Summary: "4 KiB conversions from memory faults (kvm_memory_fault)",
			Behaviour: `Implicit conversions as KVM reports them with KVM_EXIT_MEMORY_FAULT: the
guest accesses a page with the other attribute and the VMM converts exactly
that 4 KiB page. Buffers are touched page after page, so faults come in
runs of adjacent pages (1 to 2*--run-1 pages, mean --run) that go shared,
and later fault back to private page by page. At most --live pages are
shared at once. --events counts the conversions.`,
		},
		{
			Name:    "hugepage",
			Summary: "partial conversions inside 2 MiB/1 GiB ranges",
			Behaviour: `A guest shares whole naturally aligned huge ranges (--huge, 2 MiB or 1 GiB)
at once, then converts pieces of them (4 KiB up to a quarter of the range,
power-of-two sized and aligned) to private and back to shared, and finally
returns whole ranges to private. Each partial conversion to private cuts a
mapping that covered more than the piece. At most --live ranges are shared
at once. --events counts the conversions.`,
		},
		{
			Name:    "hotplug",
			Summary: "virtio-mem plug/unplug with conversions in plugged memory",
			Behaviour: `A guest with a virtio-mem region (--hotplug bytes, --block device block
size) above its boot RAM and 4 GiB, all unplugged at start. The requested
size changes now and then; the Linux driver follows it. It plugs the lowest
128 MiB memory block not fully plugged in one request. It unplugs from the
highest memory block with plugged memory: the whole block in one request
when it is fully plugged and a block or more must go (failing one time in
four, an unmovable page in the way), else one device block at a time from
the back, skipping blocks that cannot be emptied. Every shared buffer in
memory about to be unplugged is freed (converted back to private) first.
In between, drivers churn coherent buffers of 4 to 64 KiB in boot RAM and
plugged memory.
--events counts plugs, unplugs and conversions.`,
		},
		{
			Name:    "adversarial",
			Summary: "alternating pages: most runs, most mappings, most splits",
			Behaviour: `A hostile guest converting alternating pages of a --window (at a random
2 MiB boundary of the largest RAM block), in cycles of five phases: every
other page to shared one by one (most runs and mappings), the same pages
back to private, the whole window to shared, every other page to private
one by one (each cuts a large mapping: a split), the whole window back to
private. The next cycle uses the other parity. --events counts the
conversions; the default is exactly one cycle.`,
		},
	}
}
