//go:build linux

package replay

import (
	"errors"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/span"
)

// Reasons a guest request is refused, the keys of Result.RejectedBy.
const (
	ReasonMisaligned = "misaligned"               // start or size not a multiple of 4 KiB (or of the plug granularity)
	ReasonEmpty      = "size 0"                   // nothing to convert
	ReasonWraps      = "wraps around"             // start+size overflows
	ReasonBeyond     = "beyond the address space" // past the guest's highest physical address (guestmem.Config.MaxGPA)
	ReasonNotRAM     = "not RAM made private"     // an MMIO hole or unbacked memory made private
	ReasonUnplugged  = "unplugged memory"         // a conversion of unplugged memory; an unplug of memory not all plugged; a plug or unplug outside one hot-pluggable block
	ReasonPlugged    = "plugged already"          // a plug of memory that is plugged in part or whole
	ReasonNoEntries  = "out of IOMMU entries"     // ENOSPC: a type1 container's dma_entry_limit
	ReasonOther      = "other"
)

// Reason classifies why the executor refused a guest request (convert,
// plug, unplug): the one mapping from guestmem's errors to the counts of a
// Result. An attach the library refuses is not a guest request and is never
// classified here: it is a *RunError.
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
	case errors.Is(err, guestmem.ErrUnplugged):
		return ReasonUnplugged
	case errors.Is(err, guestmem.ErrPlugged):
		return ReasonPlugged
	case errors.Is(err, unix.ENOSPC):
		return ReasonNoEntries
	}
	return ReasonOther
}
