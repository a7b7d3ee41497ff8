// Package virtiomem tracks which blocks of a hot-pluggable memory region are
// plugged (virtio-mem), the second source of a discard.Manager next to
// memattr: with both on one region a page is populated, and so reachable by
// a device, only when it is shared AND plugged.
//
// Every block is unplugged at creation. Plug and Unplug are transactions like
// memattr conversions: a listener may refuse a plug (for example a DMA mapper
// out of IOMMU entries), and then nothing changes. A listener cannot veto an
// unplug; it fails only when a listener cannot carry it out (an IOMMU with no
// entry left to split a mapping), again changing nothing, which the device
// reports to the guest as a busy answer.
package virtiomem

import (
	"fmt"
	"sync/atomic"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/span"
)

// DefaultBlockSize is the block size used when Config.BlockSize is 0.
const DefaultBlockSize = 2 << 20

// Config configures a Device.
type Config struct {
	// BlockSize is the plug granularity in bytes (default 2 MiB).
	BlockSize uint64
	// Release, if not nil, frees the memory of blocks once they are
	// unplugged and no device reaches them (madvise or hole punch).
	Release func(runs []span.Range) error
	// Bitmap keeps the state in a dense bitmap (the baseline) instead of runs.
	Bitmap bool
}

// Device is the plugged/unplugged state of one region.
type Device struct {
	src *discard.StateSource
	cfg Config

	plugs, unplugs, failures atomic.Uint64
}

// New returns the device state of the manager's region, every block
// unplugged, and adds it to the manager as a source.
func New(m *discard.Manager, cfg Config) (*Device, error) {
	if cfg.BlockSize == 0 {
		cfg.BlockSize = DefaultBlockSize
	}
	if !span.IsPowerOfTwo(cfg.BlockSize) || m.Size()%cfg.BlockSize != 0 {
		return nil, fmt.Errorf("virtiomem: region size %#x is not a multiple of the block size %#x (a power of two)", m.Size(), cfg.BlockSize)
	}
	n := m.Size() / cfg.BlockSize
	var pm pagemap.Map
	var err error
	if cfg.Bitmap {
		pm, err = pagemap.NewBitmap(n, 1)
	} else {
		pm, err = pagemap.NewRuns(n, 1)
	}
	if err != nil {
		return nil, err
	}
	src, err := discard.NewStateSource(m, cfg.BlockSize, pm)
	if err != nil {
		return nil, err
	}
	if err := m.AddSource(src); err != nil {
		return nil, fmt.Errorf("virtiomem: %w", err)
	}
	return &Device{src: src, cfg: cfg}, nil
}

// Source returns the discard.Source the device added to the manager.
func (d *Device) Source() discard.Source { return d.src }

// BlockSize returns the plug granularity.
func (d *Device) BlockSize() uint64 { return d.cfg.BlockSize }

// Plug plugs [offset, offset+size), block aligned. Listeners are told after
// the blocks count as plugged; if one refuses, the plug is undone.
func (d *Device) Plug(offset, size uint64) error {
	return d.change(offset, size, true)
}

// Unplug unplugs [offset, offset+size), block aligned: listeners drop the
// blocks, then they count as unplugged, then their memory is released.
func (d *Device) Unplug(offset, size uint64) error {
	return d.change(offset, size, false)
}

// UnplugAll unplugs the whole region.
func (d *Device) UnplugAll() error {
	return d.change(0, d.src.Size(), false)
}

func (d *Device) change(offset, size uint64, plug bool) error {
	verb := "unplug"
	if plug {
		verb = "plug"
	}
	r, err := d.src.Check(offset, size)
	if err != nil {
		d.failures.Add(1)
		return fmt.Errorf("virtiomem: %s: %w", verb, err)
	}
	var steps discard.Steps
	if rel := d.cfg.Release; rel != nil && !plug {
		steps.Release = func(runs []span.Range, _ bool) error { return rel(runs) }
	}
	if _, err := d.src.Change(r, plug, steps); err != nil {
		d.failures.Add(1)
		return fmt.Errorf("virtiomem: %s offset %v: %w", verb, r, err)
	}
	if plug {
		d.plugs.Add(1)
	} else {
		d.unplugs.Add(1)
	}
	return nil
}

// IsPlugged reports whether every block r touches is plugged.
func (d *Device) IsPlugged(r span.Range) bool { return d.src.Populated(r) }

// IsUnplugged reports whether every block r touches is unplugged.
func (d *Device) IsUnplugged(r span.Range) bool { return d.src.Discarded(r) }

// PluggedBytes returns how many bytes are plugged.
func (d *Device) PluggedBytes() uint64 { return d.src.Count(span.Range{End: d.src.Size()}) }

// Runs calls fn for each maximal run of r (rounded out to blocks) with
// whether it is plugged, from one consistent snapshot. fn must not call d.
func (d *Device) Runs(r span.Range, fn func(run span.Range, plugged bool)) { d.src.Runs(r, fn) }

// StateBytes returns the memory the state map holds.
func (d *Device) StateBytes() uint64 { return d.src.Bytes() }

// Stats returns how many plugs and unplugs succeeded and how many requests
// failed.
func (d *Device) Stats() (plugs, unplugs, failures uint64) {
	return d.plugs.Load(), d.unplugs.Load(), d.failures.Load()
}
