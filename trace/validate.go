package trace

import (
	"fmt"
	"sort"

	"github.com/gmemproject/gmem/span"
)

// Validator checks the rules that tie events of one trace together, the
// rules a replay enforces:
//
//   - RAM block names are unique; RAM blocks and MMIO holes do not overlap.
//   - A device is attached under a name not attached at the moment, and only
//     an attached device is detached.
//   - Every byte of a conversion lies in RAM, or in an MMIO hole if the
//     conversion is to shared (a VMM accepts and ignores that; to private is
//     an error).
//   - In hot-pluggable RAM, conversions touch only plugged memory.
//   - Plug and unplug lie inside one hot-pluggable RAM block, are aligned to
//     its block size, and plug only unplugged memory or unplug only plugged
//     memory (as a virtio-mem device answers such requests with an error).
//
// Feed events in order with Check; an event that breaks a rule is refused
// and leaves the Validator as it was. Memory grows with the number of RAM
// blocks, devices and plugged runs, not with the size of the guest.
type Validator struct {
	regions []region        // RAM and MMIO, sorted by GPA
	names   map[string]bool // RAM block names
	devs    map[string]bool // attached devices
}

// region is a RAM block or an MMIO hole.
type region struct {
	r       span.Range
	ram     bool
	name    string
	block   uint64    // hot-plug block size, 0 if not hot-pluggable
	plugged *span.Set // plugged memory of a hot-pluggable block
}

// NewValidator returns a Validator for a trace with no events yet.
func NewValidator() *Validator {
	return &Validator{names: map[string]bool{}, devs: map[string]bool{}}
}

// Check checks e against the rules and the events checked before it, and
// records its effect if it passes. Errors wrap ErrValue.
func (v *Validator) Check(e Event) error {
	if e == nil {
		return fmt.Errorf("%w: nil event", ErrValue)
	}
	if err := e.Check(); err != nil {
		return err
	}
	switch e := e.(type) {
	case RAM:
		if v.names[e.Name] {
			return fmt.Errorf("%w: RAM block %q declared twice", ErrValue, e.Name)
		}
		reg := region{r: e.Range(), ram: true, name: e.Name, block: e.Block}
		if e.Block != 0 {
			reg.plugged = &span.Set{}
		}
		if err := v.insert(reg); err != nil {
			return err
		}
		v.names[e.Name] = true
	case MMIO:
		return v.insert(region{r: e.Range()})
	case Attach:
		if v.devs[e.Dev] {
			return fmt.Errorf("%w: device %q attached twice", ErrValue, e.Dev)
		}
		v.devs[e.Dev] = true
	case Detach:
		if !v.devs[e.Dev] {
			return fmt.Errorf("%w: device %q is not attached", ErrValue, e.Dev)
		}
		delete(v.devs, e.Dev)
	case Convert:
		return v.convert(e)
	case Plug:
		reg, err := v.hotplug("plug", e.Range())
		if err != nil {
			return err
		}
		if reg.plugged.Overlaps(e.Range()) {
			return fmt.Errorf("%w: plug %v: part of it is already plugged", ErrValue, e.Range())
		}
		reg.plugged.Add(e.Range())
	case Unplug:
		reg, err := v.hotplug("unplug", e.Range())
		if err != nil {
			return err
		}
		if !reg.plugged.Covers(e.Range()) {
			return fmt.Errorf("%w: unplug %v: part of it is not plugged", ErrValue, e.Range())
		}
		reg.plugged.Remove(e.Range())
	}
	return nil
}

// insert adds a region that must not overlap any other.
func (v *Validator) insert(reg region) error {
	i := sort.Search(len(v.regions), func(i int) bool { return v.regions[i].r.End > reg.r.Start })
	if i < len(v.regions) && v.regions[i].r.Overlaps(reg.r) {
		return fmt.Errorf("%w: %v overlaps %s %v", ErrValue, reg.r, v.regions[i].what(), v.regions[i].r)
	}
	v.regions = append(v.regions, region{})
	copy(v.regions[i+1:], v.regions[i:])
	v.regions[i] = reg
	return nil
}

func (r *region) what() string {
	if r.ram {
		return fmt.Sprintf("RAM block %q", r.name)
	}
	return "MMIO hole"
}

// find returns the region containing x, or nil.
func (v *Validator) find(x uint64) *region {
	i := sort.Search(len(v.regions), func(i int) bool { return v.regions[i].r.End > x })
	if i < len(v.regions) && v.regions[i].r.Contains(x) {
		return &v.regions[i]
	}
	return nil
}

func (v *Validator) convert(e Convert) error {
	want := e.Range()
	for cur := want.Start; cur < want.End; {
		reg := v.find(cur)
		if reg == nil {
			return fmt.Errorf("%w: convert %v: %#x is neither RAM nor MMIO", ErrValue, want, cur)
		}
		part := reg.r.Intersect(want)
		switch {
		case !reg.ram && e.To == Private:
			return fmt.Errorf("%w: convert %v to private: %v is an MMIO hole", ErrValue, want, part)
		case reg.plugged != nil && !reg.plugged.Covers(part):
			return fmt.Errorf("%w: convert %v: part of %v in RAM block %q is not plugged", ErrValue, want, part, reg.name)
		}
		cur = part.End
	}
	return nil
}

// hotplug returns the hot-pluggable RAM block that holds all of r, checking
// that r is aligned to its block size.
func (v *Validator) hotplug(what string, r span.Range) (*region, error) {
	reg := v.find(r.Start)
	switch {
	case reg == nil || !reg.ram:
		return nil, fmt.Errorf("%w: %s %v: not in RAM", ErrValue, what, r)
	case reg.plugged == nil:
		return nil, fmt.Errorf("%w: %s %v: RAM block %q is not hot-pluggable", ErrValue, what, r, reg.name)
	case !reg.r.ContainsRange(r):
		return nil, fmt.Errorf("%w: %s %v: runs past the end of RAM block %q", ErrValue, what, r, reg.name)
	case !r.Aligned(reg.block):
		return nil, fmt.Errorf("%w: %s %v: not aligned to the block size %s of RAM block %q", ErrValue, what, r, FormatSize(reg.block), reg.name)
	}
	return reg, nil
}
