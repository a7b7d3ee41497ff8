package bench

import (
	"fmt"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/replay"
	"github.com/gmemproject/gmem/trace"
)

// Split measures what a conversion to private that cuts a large shared
// extent costs the kernel and the device: bytes re-pinned, and the window
// (bytes that stay shared but are unreachable by the device for a moment).
// The baseline's granule entries are never split; gmem's extents are, and
// dma.DefaultMaxExtent bounds the cost. Each row's note gives the unbounded
// extent's number too, the cost before the bound.
func Split(sz Sizes) ([]Row, error) {
	cut := func(baseline bool, maxExtent uint64) (dma.Stats, error) {
		shape := Gmem
		if baseline {
			shape = Baseline
		}
		s, err := NewStackConfig(StackConfig{Region: 2 * sz.RoundTrip, Shape: shape, MaxExtent: maxExtent})
		if err != nil {
			return dma.Stats{}, err
		}
		if err := s.Attrs.Convert(0, sz.RoundTrip, memattr.Shared); err != nil {
			return dma.Stats{}, err
		}
		before := s.Mapper.Stats()
		if err := s.Attrs.Convert(sz.RoundTrip/2, page, memattr.Private); err != nil {
			return dma.Stats{}, err
		}
		after := s.Mapper.Stats()
		return dma.Stats{
			RepinnedBytes: after.RepinnedBytes - before.RepinnedBytes,
			WindowBytes:   after.WindowBytes - before.WindowBytes,
		}, nil
	}
	base, err := cut(true, 0)
	if err != nil {
		return nil, err
	}
	bounded, err := cut(false, 0)
	if err != nil {
		return nil, err
	}
	unbounded, err := cut(false, dma.Unbounded)
	if err != nil {
		return nil, err
	}
	scale := fmt.Sprintf("4 KiB cut in a %s extent", trace.FormatSize(sz.RoundTrip))
	rows := []Row{
		{Name: "split: re-pinned by one cut", Unit: "bytes", Baseline: float64(base.RepinnedBytes), Gmem: float64(bounded.RepinnedBytes), Better: "lower", Scale: scale,
			Note: fmt.Sprintf("bytes unmapped and pinned again when a page in the middle of a shared extent becomes private; gmem caps entries at %s (unbounded extent: %s)",
				trace.FormatSize(dma.DefaultMaxExtent), Human(unbounded.RepinnedBytes))},
		{Name: "split: window of one cut", Unit: "bytes", Baseline: float64(base.WindowBytes), Gmem: float64(bounded.WindowBytes), Better: "lower", Scale: scale,
			Note: fmt.Sprintf("bytes that stay shared but a device cannot reach during that conversion (unbounded extent: %s)", Human(unbounded.WindowBytes))},
	}

	// A trace whose cuts fall inside 1 GiB extents: SNP delivers a large
	// share as one run, then the guest converts pieces back to private.
	opts := trace.HugepageOptions{Common: trace.Common{RAM: 16 << 30, Events: sz.BootEvents, Platform: trace.SNP, Seed: 1}, Huge: 1 << 30, Live: 8}
	run := func(maxExtent uint64) (replay.Result, error) {
		seq, err := trace.Hugepage(opts)
		if err != nil {
			return replay.Result{}, err
		}
		res := replay.Events(seq, replay.Options{MaxExtent: maxExtent})
		if res.Violations > 0 {
			return res, fmt.Errorf("hugepage trace: %d violations: %+v", res.Violations, res.ViolationDetails)
		}
		return res, nil
	}
	res, err := run(0)
	if err != nil {
		return nil, err
	}
	unb, err := run(dma.Unbounded)
	if err != nil {
		return nil, err
	}
	scale = fmt.Sprintf("hugepage 1GiB, snp, 16GiB, %s events", Commas(res.Events))
	b, g, u := res.Baseline, res.Gmem, unb.Gmem
	rows = append(rows,
		Row{Name: "split trace: window", Unit: "bytes", Baseline: float64(b.WindowBytes), Gmem: float64(g.WindowBytes), Better: "lower", Scale: scale,
			Note: fmt.Sprintf("window summed over the trace (unbounded extent: %s, largest %s; bounded: largest %s)", Human(u.WindowBytes), Human(u.MaxWindow), Human(g.MaxWindow))},
		Row{Name: "split trace: entries peak", Unit: "entries", Baseline: float64(b.EntriesPeak), Gmem: float64(g.EntriesPeak), Better: "lower", Scale: scale,
			Note: fmt.Sprintf("what the bound costs in entries (unbounded extent: %s; the baseline hit type1's limit %s times)", Commas(u.EntriesPeak), Commas(b.LimitFailures))},
	)
	return rows, nil
}
