package iommu

import "github.com/gmemproject/gmem/span"

// Window measures what one operation's map and unmap calls cost a device.
//
// The window of an operation is the memory whose state the operation does not
// change but which the device cannot reach at some moment during it: bytes
// mapped when the operation began, unmapped by one of its calls, and mapped
// again when it ends (a split that unmaps a whole entry to map its
// remainders). Memory the operation maps afresh, or unmaps for good, is its
// change, not its window. A cut (Cutter) is told as an unmap of the pages it
// removes only: the parts of the mappings it split stay mapped throughout,
// so an operation whose only call is a cut has no window.
//
// Re-pinned bytes are bytes mapped again after being unmapped within the
// operation: the kernel unpins and pins those pages anew (type1 and iommufd
// both pin on map).
//
// The zero Window is ready to use. It is not safe for concurrent use; its
// owner serialises the calls it feeds it.
type Window struct {
	lost     span.Set // mapped at the start, unmapped since
	fresh    span.Set // not mapped at the start, mapped since
	repinned uint64
	// mapped says whether Mapped was called: an operation that only
	// unmapped (a discard that cut nothing) has no window, and Bytes then
	// asks nothing of its caller.
	mapped bool
}

// Reset starts a new operation. It keeps the memory of the last one's
// ranges, so a Window reused for operation after operation (one per lock
// shard, say) stops allocating.
func (w *Window) Reset() {
	w.lost.Clear()
	w.fresh.Clear()
	w.repinned = 0
	w.mapped = false
}

// Mapped records a successful map of r.
func (w *Window) Mapped(r span.Range) {
	w.mapped = true
	if len(w.lost.Ranges()) == 0 {
		// The common case, a populate that unmapped nothing first: all of
		// r is fresh, and no slice of it need be built.
		w.fresh.Add(r)
		return
	}
	for _, x := range w.lost.Inside(r) {
		w.repinned += x.Len()
	}
	for _, x := range w.lost.Minus(r) {
		w.fresh.Add(x)
	}
}

// Unmapped records that the mapping of r was removed.
func (w *Window) Unmapped(r span.Range) {
	if len(w.fresh.Ranges()) == 0 {
		// The common case, a discard that mapped nothing first: all of r
		// was mapped at the start.
		w.lost.Add(r)
		return
	}
	for _, x := range w.fresh.Minus(r) {
		w.lost.Add(x)
	}
	w.fresh.Remove(r)
}

// Repinned returns the bytes re-pinned so far.
func (w *Window) Repinned() uint64 { return w.repinned }

// Bytes returns the window: the lost bytes that are mapped now, as told by
// mapped, which returns how many bytes of a range are mapped now. Lost bytes
// are mapped again only by a map the Window was told of, so without one
// Bytes is 0 and mapped is not called: the common discard pays no lookup.
func (w *Window) Bytes(mapped func(span.Range) uint64) uint64 {
	if !w.mapped {
		return 0
	}
	var n uint64
	for _, r := range w.lost.Ranges() {
		n += mapped(r)
	}
	return n
}
