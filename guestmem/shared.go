//go:build linux

package guestmem

// SharedBacking returns the host mapping of the block's shared side, block
// offset 0 first: the shared memfd of a split block (what the host and
// devices reach; pages made private are punched out of it), the guest_memfd
// mapping of an in-place block, nil for a backing without host memory and
// after Close. Accesses through it bypass the attribute checks of ReadAt and
// WriteAt: it is for tests that look at, or plant values in, what the host
// can see. It is valid until Close.
func (b *Block) SharedBacking() []byte {
	if b.m.closed.Load() {
		return nil
	}
	return b.host
}
