package vfio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/gmemproject/gmem/span"
)

// IOVARange is one window of IOVAs the container accepts, inclusive of
// both ends as the kernel reports it (struct vfio_iova_range).
type IOVARange struct {
	Start, End uint64
}

// Span returns r as a half-open span.Range. An End of 2^64-1 is clamped to
// [Start, 2^64-1): span.Range cannot express the last address, and no caller
// maps it.
func (r IOVARange) Span() span.Range {
	if r.End == math.MaxUint64 {
		return span.Range{Start: r.Start, End: math.MaxUint64}
	}
	return span.Range{Start: r.Start, End: r.End + 1}
}

// Migration is the VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION capability.
type Migration struct {
	Flags              uint32
	PgsizeBitmap       uint64
	MaxDirtyBitmapSize uint64
}

// IOMMUInfo is the answer of VFIO_IOMMU_GET_INFO with its capability chain
// decoded.
type IOMMUInfo struct {
	// Flags are VFIO_IOMMU_INFO_* (InfoPgsizes, InfoCaps).
	Flags uint32
	// IOVAPgsizes is the bitmap of IOMMU page sizes.
	IOVAPgsizes uint64
	// IOVARanges are the usable IOVA windows
	// (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE), nil if the cap is absent.
	IOVARanges []IOVARange
	// Migration is the dirty-tracking capability, nil if absent.
	Migration *Migration
	// DMAAvail is how many more mappings the container accepts
	// (VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL); valid if HasDMAAvail.
	DMAAvail    uint32
	HasDMAAvail bool
}

// MinPageSize returns the smallest IOMMU page size, or 0 if none is
// reported.
func (i IOMMUInfo) MinPageSize() uint64 {
	return i.IOVAPgsizes & -i.IOVAPgsizes
}

// ErrMalformed means a VFIO_IOMMU_GET_INFO reply could not be decoded.
var ErrMalformed = errors.New("vfio: malformed capability chain")

// maxCaps bounds the walk of a capability chain, so a chain whose next
// offsets loop ends with an error instead of spinning.
const maxCaps = 64

// ParseIOMMUInfo decodes a VFIO_IOMMU_GET_INFO reply: struct
// vfio_iommu_type1_info followed by its capability chain, as the kernel
// wrote it into buf. Unknown capabilities are skipped. It returns an error
// wrapping ErrMalformed if buf is short, a capability lies outside buf, or
// the chain is longer than 64 entries.
func ParseIOMMUInfo(buf []byte) (IOMMUInfo, error) {
	ne := binary.NativeEndian
	if len(buf) < iommuInfoSize {
		return IOMMUInfo{}, fmt.Errorf("%w: reply of %d bytes", ErrMalformed, len(buf))
	}
	argsz := ne.Uint32(buf[0:])
	info := IOMMUInfo{
		Flags:       ne.Uint32(buf[4:]),
		IOVAPgsizes: ne.Uint64(buf[8:]),
	}
	if info.Flags&InfoCaps == 0 {
		return info, nil
	}
	// The chain lies inside the first argsz bytes the kernel filled.
	end := uint64(len(buf))
	if uint64(argsz) < end {
		end = uint64(argsz)
	}
	off := uint64(ne.Uint32(buf[16:]))
	for n := 0; off != 0; n++ {
		if n == maxCaps {
			return IOMMUInfo{}, fmt.Errorf("%w: more than %d capabilities", ErrMalformed, maxCaps)
		}
		if off < iommuInfoSize || off+capHeaderSize > end {
			return IOMMUInfo{}, fmt.Errorf("%w: capability at %d outside [%d, %d)", ErrMalformed, off, iommuInfoSize, end)
		}
		c := buf[off:end]
		id := ne.Uint16(c[0:])
		next := uint64(ne.Uint32(c[4:]))
		switch id {
		case capIOVARange:
			if len(c) < iovaRangeArrayOff {
				return IOMMUInfo{}, fmt.Errorf("%w: short IOVA range capability", ErrMalformed)
			}
			nr := uint64(ne.Uint32(c[iovaRangeNrOff:]))
			if nr > uint64(len(c)-iovaRangeArrayOff)/iovaRangeEntrySize {
				return IOMMUInfo{}, fmt.Errorf("%w: %d IOVA ranges do not fit", ErrMalformed, nr)
			}
			info.IOVARanges = make([]IOVARange, nr)
			for i := range info.IOVARanges {
				e := c[iovaRangeArrayOff+i*iovaRangeEntrySize:]
				info.IOVARanges[i] = IOVARange{Start: ne.Uint64(e[0:]), End: ne.Uint64(e[8:])}
			}
		case capMigration:
			if len(c) < migrationSize {
				return IOMMUInfo{}, fmt.Errorf("%w: short migration capability", ErrMalformed)
			}
			info.Migration = &Migration{
				Flags:              ne.Uint32(c[migrationFlagsOff:]),
				PgsizeBitmap:       ne.Uint64(c[migrationPgsizesOff:]),
				MaxDirtyBitmapSize: ne.Uint64(c[migrationMaxOff:]),
			}
		case capDMAAvail:
			if len(c) < dmaAvailSize {
				return IOMMUInfo{}, fmt.Errorf("%w: short DMA avail capability", ErrMalformed)
			}
			info.DMAAvail = ne.Uint32(c[dmaAvailOff:])
			info.HasDMAAvail = true
		}
		off = next
	}
	return info, nil
}
