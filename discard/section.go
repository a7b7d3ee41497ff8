package discard

import (
	"fmt"

	"github.com/gmemproject/gmem/span"
)

// Section is a window of one region: Size bytes starting at byte Offset of
// the region, seen at guest physical address GPA. It is what a listener
// registers for and what every notification carries (QEMU's
// MemoryRegionSection, reduced to what gmem needs).
type Section struct {
	Offset uint64 // offset within the region, bytes
	Size   uint64 // bytes
	GPA    uint64 // guest physical address of Offset
}

// Range returns the section's extent in region offsets.
func (s Section) Range() span.Range { return span.Range{Start: s.Offset, End: s.Offset + s.Size} }

// GPARange returns the section's extent in guest physical addresses.
func (s Section) GPARange() span.Range { return span.Range{Start: s.GPA, End: s.GPA + s.Size} }

// Intersect clips s to r (region offsets), moving GPA by the same amount as
// Offset. It reports false, returning the zero Section, if nothing is left.
func (s Section) Intersect(r span.Range) (Section, bool) {
	x := s.Range().Intersect(r)
	if x.Empty() {
		return Section{}, false
	}
	return Section{Offset: x.Start, Size: x.Len(), GPA: s.GPA + (x.Start - s.Offset)}, true
}

// valid reports whether s is well formed: neither its region range nor its
// GPA range wraps.
func (s Section) valid() error {
	if _, err := span.FromSize(s.Offset, s.Size); err != nil {
		return fmt.Errorf("section offset: %w", err)
	}
	if _, err := span.FromSize(s.GPA, s.Size); err != nil {
		return fmt.Errorf("section GPA: %w", err)
	}
	return nil
}

// String formats s for logs and errors.
func (s Section) String() string {
	return fmt.Sprintf("offset %#x size %#x gpa %#x", s.Offset, s.Size, s.GPA)
}
