package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"iter"

	"github.com/gmemproject/gmem/trace"
)

// genSpec binds a generator to its own flags: flags registers them on fs and
// returns the function that builds the event sequence once fs is parsed.
type genSpec struct {
	name  string
	flags func(fs *flag.FlagSet) func(c trace.Common) (iter.Seq[trace.Event], error)
}

// genSpecs lists the generators gmem gen knows, in the order of
// trace.Generators.
func genSpecs() []genSpec {
	return []genSpec{
		{"boot", func(fs *flag.FlagSet) func(trace.Common) (iter.Seq[trace.Event], error) {
			o := trace.BootOptions{VCPUs: trace.DefaultBootVCPUs, Live: trace.DefaultBootLive}
			fs.IntVar(&o.VCPUs, "vcpus", o.VCPUs, "number of vCPUs (an SNP guest shares one GHCB page each)")
			fs.IntVar(&o.Live, "live", o.Live, "most coherent DMA buffers outstanding at once")
			return func(c trace.Common) (iter.Seq[trace.Event], error) { o.Common = c; return trace.Boot(o) }
		}},
		{"churn", func(fs *flag.FlagSet) func(trace.Common) (iter.Seq[trace.Event], error) {
			o := trace.ChurnOptions{Live: trace.DefaultChurnLive, Large: trace.DefaultChurnLarge}
			fs.IntVar(&o.Live, "live", o.Live, "most buffers outstanding at once")
			fs.IntVar(&o.Large, "large", o.Large, "percentage of 16 KiB buffers, the rest 4 KiB")
			return func(c trace.Common) (iter.Seq[trace.Event], error) {
				o.Common = c
				switch {
				case o.Large < 0 || o.Large > 100:
					return nil, fmt.Errorf("%w: --large %d: want a percentage from 0 to 100", trace.ErrValue, o.Large)
				case o.Large == 0:
					o.Large = -1 // the library's "none"; its 0 means the default
				}
				return trace.Churn(o)
			}
		}},
		{"implicit", func(fs *flag.FlagSet) func(trace.Common) (iter.Seq[trace.Event], error) {
			o := trace.ImplicitOptions{Run: trace.DefaultImplicitRun, Live: trace.DefaultImplicitLive}
			fs.IntVar(&o.Run, "run", o.Run, "mean number of adjacent pages faulted in a row (at most 256)")
			fs.IntVar(&o.Live, "live", o.Live, "most pages shared at once")
			return func(c trace.Common) (iter.Seq[trace.Event], error) { o.Common = c; return trace.Implicit(o) }
		}},
		{"hugepage", func(fs *flag.FlagSet) func(trace.Common) (iter.Seq[trace.Event], error) {
			o := trace.HugepageOptions{Huge: trace.DefaultHugepageSize, Live: trace.DefaultHugepageLive}
			fs.Var(sizeFlag{&o.Huge}, "huge", "huge range `SIZE`: a power of two from 2MiB to 1GiB")
			fs.IntVar(&o.Live, "live", o.Live, "most huge ranges shared at once")
			return func(c trace.Common) (iter.Seq[trace.Event], error) { o.Common = c; return trace.Hugepage(o) }
		}},
		{"hotplug", func(fs *flag.FlagSet) func(trace.Common) (iter.Seq[trace.Event], error) {
			o := trace.HotplugOptions{Block: trace.DefaultHotplugBlock, Live: trace.DefaultHotplugLive}
			fs.Var(sizeFlag{&o.Hotplug}, "hotplug", "virtio-mem region `SIZE`, a multiple of 128MiB (default: --ram rounded up)")
			fs.Var(sizeFlag{&o.Block}, "block", "virtio-mem block `SIZE`: a power of two from 4KiB to 1GiB")
			fs.IntVar(&o.Live, "live", o.Live, "most coherent DMA buffers outstanding at once")
			return func(c trace.Common) (iter.Seq[trace.Event], error) { o.Common = c; return trace.Hotplug(o) }
		}},
		{"adversarial", func(fs *flag.FlagSet) func(trace.Common) (iter.Seq[trace.Event], error) {
			var o trace.AdversarialOptions
			fs.Var(sizeFlag{&o.Window}, "window", fmt.Sprintf("attacked range `SIZE`, a multiple of 8KiB (default %s, or the largest RAM block if smaller)", trace.FormatSize(trace.DefaultAdversarialWindow)))
			return func(c trace.Common) (iter.Seq[trace.Event], error) { o.Common = c; return trace.Adversarial(o) }
		}},
	}
}

// runGen implements "gmem gen NAME [flags]".
func runGen(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		genUsage(stderr)
		return exitUsage
	}
	if isHelp(args[0]) || args[0] == "help" {
		genUsage(stdout)
		return exitOK
	}
	name := args[0]
	var spec genSpec
	var info trace.GeneratorInfo
	for _, s := range genSpecs() {
		if s.name == name {
			spec = s
		}
	}
	for _, g := range trace.Generators() {
		if g.Name == name {
			info = g
		}
	}
	if spec.flags == nil || info.Name == "" {
		fmt.Fprintf(stderr, "gmem gen: unknown generator %q\n", name)
		genUsage(stderr)
		return exitUsage
	}

	fs := newFlagSet("gmem gen " + name)
	c := trace.Common{
		RAM:      trace.DefaultRAM,
		Seed:     1,
		Devices:  1,
		IOMMU:    trace.Type1,
		Mode:     trace.Split,
		Platform: trace.TDX,
	}
	fs.Var(sizeFlag{&c.RAM}, "ram", "boot RAM `SIZE`, a multiple of 2MiB (e.g. 16GiB, 1TiB)")
	fs.Uint64Var(&c.Seed, "seed", c.Seed, "pseudo-random seed; the same flags and seed give the same trace")
	events := "number of workload events (default 10000; see above for what counts)"
	if name == "adversarial" {
		events = "number of conversions (default: exactly one cycle)"
	}
	fs.IntVar(&c.Events, "events", 0, events)
	fs.IntVar(&c.Devices, "devices", c.Devices, "number of devices attached")
	fs.Var(enumFlag[trace.IOMMU]{&c.IOMMU, trace.ParseIOMMU}, "iommu", "devices' IOMMU: type1 or iommufd")
	fs.Uint64Var(&c.Limit, "limit", 0, "type1 dma_entry_limit to record on each attach (0: the kernel's default, 65535)")
	fs.Var(enumFlag[trace.Mode]{&c.Mode, trace.ParseMode}, "mode", "RAM backing: split (guest_memfd + shared memory) or inplace")
	fs.Var(enumFlag[trace.Platform]{&c.Platform, trace.ParsePlatform}, "platform", "how large conversions reach the VMM: tdx (2 MiB pieces) or snp (page-state-change runs)")
	build := spec.flags(fs)

	if err := parseFlags(fs, args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			genHelp(stdout, fs, info)
			return exitOK
		}
		flagUsage(stderr, "gmem gen "+name, err)
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "gmem gen %s: unexpected argument %q\n", name, fs.Arg(0))
		return exitUsage
	}
	if err := explicitZero(fs); err != nil {
		flagUsage(stderr, "gmem gen "+name, err)
		return exitUsage
	}
	seq, err := build(c)
	if err != nil {
		fmt.Fprintf(stderr, "gmem gen %s: %v\n", name, err)
		return exitUsage
	}

	// Check what is written against the replay's rules as it streams: a
	// generator that broke them would be a bug, reported as a failed check.
	w := trace.NewWriter(stdout)
	v := trace.NewValidator()
	n := 0
	for e := range seq {
		if n%4096 == 0 && ctx.Err() != nil {
			fmt.Fprintf(stderr, "gmem gen %s: interrupted after %d events\n", name, n)
			_ = w.Flush()
			return exitFail
		}
		if err := v.Check(e); err != nil {
			fmt.Fprintf(stderr, "gmem gen %s: event %d is invalid: %v\n", name, n+1, err)
			_ = w.Flush()
			return exitFail
		}
		if err := w.Write(e); err != nil {
			fmt.Fprintf(stderr, "gmem gen %s: %v\n", name, err)
			return exitFail
		}
		n++
	}
	if err := w.Flush(); err != nil {
		fmt.Fprintf(stderr, "gmem gen %s: %v\n", name, err)
		return exitFail
	}
	return exitOK
}

// zeroMeans lists the gen flags whose 0 is a value of its own; for the
// others the library reads 0 as "the default", so a 0 given on the command
// line is refused rather than silently replaced.
var zeroMeans = map[string]bool{
	"limit": true, // the kernel's default, as documented
	"large": true, // no 16 KiB buffers
	"seed":  true, // a seed like any other
}

// explicitZero returns an error for the first flag given as 0 that is not
// in zeroMeans.
func explicitZero(fs *flag.FlagSet) error {
	var err error
	fs.Visit(func(f *flag.Flag) {
		if err == nil && !zeroMeans[f.Name] && f.Value.String() == "0" {
			err = fmt.Errorf("--%s 0: want more than 0 (leave the flag out for its default)", f.Name)
		}
	})
	return err
}

func isHelp(s string) bool { return s == "-h" || s == "-help" || s == "--help" }

func genUsage(w io.Writer) {
	fmt.Fprint(w, `usage: gmem gen NAME [flags] > trace.jsonl

Writes a generated trace of a confidential guest's memory conversions, as
JSON Lines, to stdout: the machine (RAM blocks, the PCI hole, attached
devices) first, then the workload. Traces are reproducible: the same flags
and --seed give the same trace.

generators:
`)
	for _, g := range trace.Generators() {
		fmt.Fprintf(w, "  %-12s %s\n", g.Name, g.Summary)
	}
	fmt.Fprint(w, "\nRun 'gmem gen NAME -h' for the guest behaviour a generator models and its flags.\n")
}

func genHelp(w io.Writer, fs *flag.FlagSet, info trace.GeneratorInfo) {
	fmt.Fprintf(w, "usage: gmem gen %s [flags] > trace.jsonl\n\n%s: %s\n\n%s\n\nflags:\n", info.Name, info.Name, info.Summary, info.Behaviour)
	printFlags(w, fs)
	fmt.Fprint(w, "\nSizes take binary units (KiB, MiB, GiB, TiB, or K, M, G, T) or 0x hex.\n")
}

// sizeFlag is a byte count flag parsed with trace.ParseSize.
type sizeFlag struct{ p *uint64 }

func (f sizeFlag) String() string {
	if f.p == nil {
		return ""
	}
	return trace.FormatSize(*f.p)
}

func (f sizeFlag) Set(s string) error {
	v, err := trace.ParseSize(s)
	if err != nil {
		return err
	}
	*f.p = v
	return nil
}

// enumFlag is a flag whose values are the names of a trace enum.
type enumFlag[T fmt.Stringer] struct {
	p     *T
	parse func(string) (T, error)
}

func (f enumFlag[T]) String() string {
	if f.p == nil {
		return ""
	}
	return (*f.p).String()
}

func (f enumFlag[T]) Set(s string) error {
	v, err := f.parse(s)
	if err != nil {
		return err
	}
	*f.p = v
	return nil
}

func (enumFlag[T]) isEnum() {}
