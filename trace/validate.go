package trace

import (
	"errors"
	"fmt"
	"sort"

	"github.com/gmemproject/gmem/span"
)

// ErrMachine means the trace describes an impossible machine: RAM blocks
// with the same name, RAM or MMIO overlapping, a device attached twice or
// detached without being attached, a plug or unplug where there is no
// hot-pluggable RAM block. Such a trace is wrong input, unlike a guest's
// request that the VMM refuses.
var ErrMachine = errors.New("bad machine description")

// Validator checks the rules about a trace's own structure, the machine it
// describes:
//
//   - The machine comes first: RAM and MMIO are declared before the first
//     other event, at least one RAM block, all of one mode (one VM's
//     memory is backed one way).
//   - RAM block names are unique; RAM blocks and MMIO holes do not overlap.
//   - A device is attached under a name not attached at the moment, and only
//     an attached device is detached.
//   - A plug or unplug starts in a hot-pluggable RAM block (the virtio-mem
//     device it is addressed to).
//
// It says nothing of what a guest's request does: a conversion of unbacked
// memory, a misaligned one, a plug of memory already plugged are requests
// the VMM answers (guestmem decides, and replay counts its refusals), not
// broken traces.
//
// Feed events in order with Check; an event that breaks a rule is refused
// and leaves the Validator as it was. Memory grows with the number of RAM
// blocks, MMIO holes and devices, not with the size of the guest.
type Validator struct {
	regions []region        // RAM and MMIO, sorted by GPA
	names   map[string]bool // RAM block names
	devs    map[string]bool // attached devices
	mode    Mode            // of the first RAM block
	running bool            // an event other than RAM or MMIO was accepted
}

// region is a RAM block or an MMIO hole.
type region struct {
	r       span.Range
	ram     bool
	name    string
	hotplug bool
}

// NewValidator returns a Validator for a trace with no events yet.
func NewValidator() *Validator {
	return &Validator{names: map[string]bool{}, devs: map[string]bool{}}
}

// Check checks e against the rules and the events checked before it, and
// records its effect if it passes. A machine event must also pass its own
// Check (ErrValue); a broken rule wraps ErrMachine.
func (v *Validator) Check(e Event) error {
	if e == nil {
		return fmt.Errorf("%w: nil event", ErrValue)
	}
	if err := checkParsed(e); err != nil {
		return err
	}
	switch e.(type) {
	case RAM, MMIO:
		if v.running {
			return fmt.Errorf("%w: %s after the first attach or request: the machine is declared first", ErrMachine, e.Op())
		}
	default:
		if v.mode == 0 {
			return fmt.Errorf("%w: %s before any RAM block", ErrMachine, e.Op())
		}
	}
	if err := v.check(e); err != nil {
		return err
	}
	switch e.(type) {
	case RAM, MMIO:
	default:
		v.running = true
	}
	return nil
}

func (v *Validator) check(e Event) error {
	switch e := e.(type) {
	case RAM:
		if v.mode != 0 && e.Mode != v.mode {
			return fmt.Errorf("%w: RAM block %q is %v, the blocks before it %v: one VM's memory is backed one way", ErrMachine, e.Name, e.Mode, v.mode)
		}
		if v.names[e.Name] {
			return fmt.Errorf("%w: RAM block %q declared twice", ErrMachine, e.Name)
		}
		if err := v.insert(region{r: e.Range(), ram: true, name: e.Name, hotplug: e.Block != 0}); err != nil {
			return err
		}
		v.names[e.Name] = true
		v.mode = e.Mode
	case MMIO:
		return v.insert(region{r: e.Range()})
	case Attach:
		if v.devs[e.Dev] {
			return fmt.Errorf("%w: device %q attached twice", ErrMachine, e.Dev)
		}
		v.devs[e.Dev] = true
	case Detach:
		if !v.devs[e.Dev] {
			return fmt.Errorf("%w: device %q is not attached", ErrMachine, e.Dev)
		}
		delete(v.devs, e.Dev)
	case Plug:
		return v.hotplug("plug", e.GPA)
	case Unplug:
		return v.hotplug("unplug", e.GPA)
	}
	return nil
}

// insert adds a region that must not overlap any other.
func (v *Validator) insert(reg region) error {
	i := sort.Search(len(v.regions), func(i int) bool { return v.regions[i].r.End > reg.r.Start })
	if i < len(v.regions) && v.regions[i].r.Overlaps(reg.r) {
		what := "MMIO hole"
		if reg.ram {
			what = fmt.Sprintf("RAM block %q", reg.name)
		}
		return fmt.Errorf("%w: %s %v overlaps %s %v", ErrMachine, what, reg.r, v.regions[i].what(), v.regions[i].r)
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

// hotplug checks that a plug or unplug request starting at gpa has a
// virtio-mem device to go to: a hot-pluggable RAM block holding gpa.
func (v *Validator) hotplug(what string, gpa uint64) error {
	reg := v.find(gpa)
	switch {
	case reg == nil || !reg.ram:
		return fmt.Errorf("%w: %s at %#x: no RAM block there", ErrMachine, what, gpa)
	case !reg.hotplug:
		return fmt.Errorf("%w: %s at %#x: RAM block %q is not hot-pluggable", ErrMachine, what, gpa, reg.name)
	}
	return nil
}
