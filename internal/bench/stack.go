package bench

import (
	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
)

const page = 4096

// Shape is how a stack keeps its state and shapes its IOMMU entries.
type Shape struct {
	Name   string
	Bitmap bool // the baseline's one bitmap, not gmem's runs
	Policy dma.Policy
}

// The shapes compared: QEMU's algorithm, gmem, and the baseline's bitmap
// under gmem's mapper, which splits a difference between the two into what
// the mapper policy makes (Baseline against BitmapExtent) and what the page
// map makes (BitmapExtent against Gmem).
var (
	Baseline     = Shape{"baseline-bitmap-granule", true, dma.Granule}
	Gmem         = Shape{"gmem-runs-extent", false, dma.Extent}
	BitmapExtent = Shape{"bitmap-extent", true, dma.Extent}
)

// StackConfig configures a Stack.
type StackConfig struct {
	Region uint64
	Shape  Shape
	// MaxExtent bounds the extents (0: dma.DefaultMaxExtent).
	MaxExtent uint64
	// NoDevice leaves out the mapper and its IOMMU: the state alone.
	NoDevice bool
	// Backend is the attributes' kernel (default none).
	Backend memattr.Backend
}

// Stack is a region with one device: memattr over a discard manager, and a
// DMA mapper on a model IOMMU registered over the whole region.
type Stack struct {
	Manager *discard.Manager
	Attrs   *memattr.Attributes
	Model   *iommu.Model // nil with NoDevice
	Mapper  *dma.Mapper  // nil with NoDevice
}

// NewStack returns a stack of shape on a region of the given size, with the
// mapper's default extent bound.
func NewStack(region uint64, shape Shape) (*Stack, error) {
	return NewStackConfig(StackConfig{Region: region, Shape: shape})
}

// NewStackConfig returns the stack cfg describes. The device's IOMMU is an
// iommufd model: no entry limit, so the baseline is measured, not refused.
// Model and mapper are both sized to the region, so that conversions in
// distant parts of it take different lock shards (the parallel row).
func NewStackConfig(cfg StackConfig) (*Stack, error) {
	m := discard.New(cfg.Region, nil)
	attrs, err := memattr.New(m, memattr.Config{Bitmap: cfg.Shape.Bitmap, Backend: cfg.Backend})
	if err != nil {
		return nil, err
	}
	s := &Stack{Manager: m, Attrs: attrs}
	if cfg.NoDevice {
		return s, nil
	}
	s.Model = iommu.NewModelSpan(iommu.Caps{Rules: iommu.IOMMUFD}, cfg.Region)
	s.Mapper, err = dma.New(s.Model, nil, dma.Options{Policy: cfg.Shape.Policy, MaxExtent: cfg.MaxExtent, RegionSize: cfg.Region})
	if err != nil {
		return nil, err
	}
	if err := m.Register(s.Mapper, discard.Section{Size: cfg.Region}); err != nil {
		return nil, err
	}
	return s, nil
}
