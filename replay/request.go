//go:build linux

package replay

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/trace"
)

// Reasons a guest request is refused, the keys of Result.RejectedBy.
const (
	ReasonMisaligned = "misaligned"               // start or size not a multiple of 4 KiB (or of the virtio-mem block)
	ReasonEmpty      = "size 0"                   // nothing to convert
	ReasonWraps      = "wraps around"             // start+size overflows
	ReasonBeyond     = "beyond the address space" // past the guest's highest physical address
	ReasonNotRAM     = "not RAM, to private"      // MMIO or unbacked memory made private
	ReasonNoEntries  = "out of IOMMU entries"     // ENOSPC: a type1 container's dma_entry_limit
	ReasonPlugState  = "plug state"               // plug of plugged or unplug of unplugged memory
	ReasonPlugRange  = "outside the hot-pluggable block"
	ReasonOther      = "other"
)

// Errors of the hot-plug requests, answered as a virtio-mem device answers
// them (VIRTIO_MEM_RESP_ERROR).
var (
	errPlugState = errors.New("plug state")
	errPlugRange = errors.New("outside the hot-pluggable block")
)

// Reason classifies why a request was refused: the one mapping from the
// executor's errors to the counts of a Result.
func Reason(err error) string {
	switch {
	case errors.Is(err, span.ErrAlign):
		return ReasonMisaligned
	case errors.Is(err, span.ErrEmpty):
		return ReasonEmpty
	case errors.Is(err, span.ErrOverflow):
		return ReasonWraps
	case errors.Is(err, span.ErrBounds):
		return ReasonBeyond
	case errors.Is(err, guestmem.ErrNotRAM):
		return ReasonNotRAM
	case errors.Is(err, unix.ENOSPC):
		return ReasonNoEntries
	case errors.Is(err, errPlugState):
		return ReasonPlugState
	case errors.Is(err, errPlugRange):
		return ReasonPlugRange
	}
	return ReasonOther
}

// convertRequest checks a conversion as the executor does before touching
// anything, and returns its range and its pieces in RAM and MMIO holes.
func (rp *Replayer) convertRequest(e trace.Convert) (span.Range, []part, error) {
	r, err := span.Checked(e.GPA, e.Size, trace.PageSize, guestmem.DefaultMaxGPA)
	if err != nil {
		return r, nil, fmt.Errorf("convert [%#x, +%#x) to %v: %w: %w", e.GPA, e.Size, e.To, guestmem.ErrInvalid, err)
	}
	parts := rp.split(r)
	if e.To == trace.Private {
		cur := r.Start
		for _, p := range parts {
			if p.r.Start != cur || p.ram < 0 {
				bad := span.Range{Start: cur, End: p.r.Start}
				what := "unbacked"
				if p.r.Start == cur {
					bad, what = p.r, "an MMIO hole"
				}
				return r, nil, fmt.Errorf("convert %v to private: %w: %v is %s", r, guestmem.ErrNotRAM, bad, what)
			}
			cur = p.r.End
		}
		if cur != r.End {
			return r, nil, fmt.Errorf("convert %v to private: %w: %v is unbacked", r, guestmem.ErrNotRAM, span.Range{Start: cur, End: r.End})
		}
	}
	return r, parts, nil
}

// plugRequest checks a plug or unplug as a virtio-mem device does: inside
// the hot-pluggable block it starts in (the Validator has made sure there
// is one) and aligned to its block size. Whether the blocks are in the
// right state is each run's to answer (run.plug).
func (rp *Replayer) plugRequest(gpa, size uint64, plug bool) (span.Range, []part, error) {
	verb := "unplug"
	if plug {
		verb = "plug"
	}
	parts := rp.split(span.Range{Start: gpa, End: gpa + 1})
	reg := rp.runs[1].regions[parts[0].ram]
	r, err := span.Checked(gpa, size, reg.ram.Block, span.Range{End: reg.ram.GPA + reg.ram.Size}.End)
	if errors.Is(err, span.ErrBounds) {
		err = fmt.Errorf("%w: %w", errPlugRange, err)
	}
	if err != nil {
		return r, nil, fmt.Errorf("%s [%#x, +%#x) in RAM block %q: %w", verb, gpa, size, reg.ram.Name, err)
	}
	return r, []part{{r: r, ram: parts[0].ram}}, nil
}
