package trace

import (
	"errors"
	"fmt"
	"unicode/utf8"

	"github.com/gmemproject/gmem/span"
)

// PageSize is the granule of every address and size in a trace: guests
// convert, and KVM tracks attributes, in 4 KiB pages.
const PageSize = 4096

// maxNameLen bounds RAM and device names so that a hostile trace cannot make
// a replay keep arbitrarily long strings per event.
const maxNameLen = 256

// Op names an event kind; it is the "op" field of a JSON Lines event.
type Op string

// The event kinds.
const (
	OpRAM     Op = "ram"
	OpMMIO    Op = "mmio"
	OpAttach  Op = "attach"
	OpDetach  Op = "detach"
	OpConvert Op = "convert"
	OpPlug    Op = "plug"
	OpUnplug  Op = "unplug"
)

// Event is one step of a trace: one of RAM, MMIO, Attach, Detach, Convert,
// Plug or Unplug. A replay switches on the concrete type.
//
// The set of event types is closed; Check reports whether the event is well
// formed on its own (fields present and in range, sizes non-zero, addresses
// page aligned, no overflow): what gmem writes and generates always is.
// Parsers require it of the machine's events only; a guest request is read
// as written and answered by the executor. Rules that involve more than one
// event are the Validator's.
type Event interface {
	// Op returns the event kind.
	Op() Op
	// Check reports whether the event is well formed on its own.
	Check() error
	sealed()
}

// Mode is how a RAM block is backed, which decides the order of the phases
// of a conversion (see DESIGN.md, guestmem).
type Mode uint8

// Backing modes. The zero Mode is invalid so that a forgotten field is an
// error rather than a silent default.
const (
	// Split is guest_memfd for private pages plus separate shared memory
	// (QEMU's behaviour today).
	Split Mode = iota + 1
	// InPlace is one mmap-able guest_memfd converted in place.
	InPlace
)

// String returns "split" or "inplace".
func (m Mode) String() string {
	switch m {
	case Split:
		return "split"
	case InPlace:
		return "inplace"
	}
	return fmt.Sprintf("Mode(%d)", uint8(m))
}

// ParseMode parses "split" or "inplace".
func ParseMode(s string) (Mode, error) {
	switch s {
	case "split":
		return Split, nil
	case "inplace":
		return InPlace, nil
	}
	return 0, fmt.Errorf("%w: mode %q: want split or inplace", ErrValue, s)
}

// IOMMU is the kernel interface a device's DMA mappings go through.
type IOMMU uint8

// IOMMU kinds; the zero IOMMU is invalid.
const (
	// Type1 is a VFIO type1 v2 container, limited to dma_entry_limit
	// mappings (65,535 by default).
	Type1 IOMMU = iota + 1
	// IOMMUFD is an iommufd IOAS, which has no entry limit.
	IOMMUFD
)

// String returns "type1" or "iommufd".
func (k IOMMU) String() string {
	switch k {
	case Type1:
		return "type1"
	case IOMMUFD:
		return "iommufd"
	}
	return fmt.Sprintf("IOMMU(%d)", uint8(k))
}

// ParseIOMMU parses "type1" or "iommufd".
func ParseIOMMU(s string) (IOMMU, error) {
	switch s {
	case "type1":
		return Type1, nil
	case "iommufd":
		return IOMMUFD, nil
	}
	return 0, fmt.Errorf("%w: iommu %q: want type1 or iommufd", ErrValue, s)
}

// State is the target of a conversion.
type State uint8

// Page states; the zero State is invalid.
const (
	// Private pages are reachable by the guest only; no device may map them.
	Private State = iota + 1
	// Shared pages are reachable by the host and by assigned devices.
	Shared
)

// String returns "private" or "shared".
func (s State) String() string {
	switch s {
	case Private:
		return "private"
	case Shared:
		return "shared"
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// ParseState parses "private" or "shared".
func ParseState(s string) (State, error) {
	switch s {
	case "private":
		return Private, nil
	case "shared":
		return Shared, nil
	}
	return 0, fmt.Errorf("%w: state %q: want shared or private", ErrValue, s)
}

// RAM declares a block of guest RAM, all private at creation (as KVM and QEMU
// create guest_memfd memory). A block with a non-zero Block is hot-pluggable
// (virtio-mem): it starts unplugged, and only Plug makes parts of it usable.
type RAM struct {
	Name  string // unique among RAM blocks
	GPA   uint64 // guest physical address of the first byte
	Size  uint64 // bytes
	Mode  Mode
	Block uint64 // virtio-mem block size in bytes; 0 for ordinary RAM
}

// MMIO declares a guest physical range that is not RAM (a PCI hole). Guests
// convert such ranges to shared (TDX firmware does), which a VMM accepts and
// ignores; converting them to private is an error.
type MMIO struct {
	GPA  uint64
	Size uint64
}

// Attach assigns a device whose DMA mappings follow all guest RAM: from now
// on every shared, plugged page must be mapped for it and no other page.
type Attach struct {
	Dev   string // unique among attached devices
	IOMMU IOMMU
	// Limit is the type1 dma_entry_limit to apply; 0 means the kernel's
	// default (65,535). It must be 0 for iommufd, which has no limit.
	Limit uint64
}

// Detach removes a device attached earlier, with all its mappings.
type Detach struct {
	Dev string
}

// Convert asks for [GPA, GPA+Size) to become To: a guest's explicit request
// (TDX MapGPA, SNP page-state change, KVM_HC_MAP_GPA_RANGE) or an implicit
// one (KVM_EXIT_MEMORY_FAULT).
type Convert struct {
	GPA  uint64
	Size uint64
	To   State
}

// Plug makes [GPA, GPA+Size) of a hot-pluggable RAM block usable (a virtio-mem
// plug request). Plugged memory starts private.
type Plug struct {
	GPA  uint64
	Size uint64
}

// Unplug gives [GPA, GPA+Size) of a hot-pluggable RAM block back (a
// virtio-mem unplug request); its pages are discarded whatever their state.
type Unplug struct {
	GPA  uint64
	Size uint64
}

// Op returns OpRAM.
func (RAM) Op() Op { return OpRAM }

// Op returns OpMMIO.
func (MMIO) Op() Op { return OpMMIO }

// Op returns OpAttach.
func (Attach) Op() Op { return OpAttach }

// Op returns OpDetach.
func (Detach) Op() Op { return OpDetach }

// Op returns OpConvert.
func (Convert) Op() Op { return OpConvert }

// Op returns OpPlug.
func (Plug) Op() Op { return OpPlug }

// Op returns OpUnplug.
func (Unplug) Op() Op { return OpUnplug }

func (RAM) sealed()     {}
func (MMIO) sealed()    {}
func (Attach) sealed()  {}
func (Detach) sealed()  {}
func (Convert) sealed() {}
func (Plug) sealed()    {}
func (Unplug) sealed()  {}

// Range returns the block's guest physical range.
func (e RAM) Range() span.Range { return span.Range{Start: e.GPA, End: e.GPA + e.Size} }

// Range returns the hole's guest physical range.
func (e MMIO) Range() span.Range { return span.Range{Start: e.GPA, End: e.GPA + e.Size} }

// Range returns the converted guest physical range.
func (e Convert) Range() span.Range { return span.Range{Start: e.GPA, End: e.GPA + e.Size} }

// Range returns the plugged guest physical range.
func (e Plug) Range() span.Range { return span.Range{Start: e.GPA, End: e.GPA + e.Size} }

// Range returns the unplugged guest physical range.
func (e Unplug) Range() span.Range { return span.Range{Start: e.GPA, End: e.GPA + e.Size} }

// Check reports whether the block is well formed: a valid name and mode, a
// non-empty page-aligned range that does not wrap, and a block size that is
// zero or a power of two of at least one page dividing GPA and Size.
func (e RAM) Check() error {
	if err := checkName("name", e.Name); err != nil {
		return err
	}
	if err := checkPages("ram", e.GPA, e.Size); err != nil {
		return err
	}
	if e.Mode != Split && e.Mode != InPlace {
		return fmt.Errorf("%w: ram %q: mode missing or invalid", ErrValue, e.Name)
	}
	if e.Block != 0 {
		if !span.IsPowerOfTwo(e.Block) || e.Block < PageSize {
			return fmt.Errorf("%w: ram %q: block %#x is not a power of two of at least 4 KiB", ErrValue, e.Name, e.Block)
		}
		if (e.GPA|e.Size)&(e.Block-1) != 0 {
			return fmt.Errorf("%w: ram %q: gpa %#x and size %#x must be multiples of block %#x", ErrValue, e.Name, e.GPA, e.Size, e.Block)
		}
	}
	return nil
}

// Check reports whether the hole is a non-empty page-aligned range that does
// not wrap.
func (e MMIO) Check() error { return checkPages("mmio", e.GPA, e.Size) }

// MaxEntryLimit is the largest type1 dma_entry_limit: the module parameter
// is an unsigned int.
const MaxEntryLimit = 1<<32 - 1

// Check reports whether the device has a valid name and IOMMU, and a limit
// only where the IOMMU has one, at most MaxEntryLimit.
func (e Attach) Check() error {
	if err := checkName("dev", e.Dev); err != nil {
		return err
	}
	switch e.IOMMU {
	case Type1:
		if e.Limit > MaxEntryLimit {
			return fmt.Errorf("%w: attach %q: limit %d is past type1's largest dma_entry_limit, %d", ErrValue, e.Dev, e.Limit, uint64(MaxEntryLimit))
		}
	case IOMMUFD:
		if e.Limit != 0 {
			return fmt.Errorf("%w: attach %q: iommufd has no entry limit", ErrValue, e.Dev)
		}
	default:
		return fmt.Errorf("%w: attach %q: iommu missing or invalid", ErrValue, e.Dev)
	}
	return nil
}

// Check reports whether the device name is valid.
func (e Detach) Check() error { return checkName("dev", e.Dev) }

// Check reports whether the conversion has a valid target and a non-empty
// page-aligned range that does not wrap.
func (e Convert) Check() error {
	if e.To != Shared && e.To != Private {
		return fmt.Errorf("%w: convert: target state missing or invalid", ErrValue)
	}
	return checkPages("convert", e.GPA, e.Size)
}

// Check reports whether the range is non-empty, page aligned and does not
// wrap. Alignment to the block size depends on the RAM block and is the
// Validator's.
func (e Plug) Check() error { return checkPages("plug", e.GPA, e.Size) }

// Check reports whether the range is non-empty, page aligned and does not
// wrap.
func (e Unplug) Check() error { return checkPages("unplug", e.GPA, e.Size) }

func checkPages(what string, gpa, size uint64) error {
	if size == 0 {
		return fmt.Errorf("%w: %s: size 0", ErrValue, what)
	}
	if _, err := span.FromSize(gpa, size); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrValue, what, err)
	}
	if (gpa|size)&(PageSize-1) != 0 {
		return fmt.Errorf("%w: %s: gpa %#x size %#x not multiples of 4 KiB", ErrValue, what, gpa, size)
	}
	return nil
}

func checkName(field, s string) error {
	switch {
	case s == "":
		return fmt.Errorf("%w: %s missing or empty", ErrValue, field)
	case len(s) > maxNameLen:
		return fmt.Errorf("%w: %s longer than %d bytes", ErrValue, field, maxNameLen)
	case !utf8.ValidString(s):
		return fmt.Errorf("%w: %s is not valid UTF-8", ErrValue, field)
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("%w: %s %q contains a control character", ErrValue, field, s)
		}
	}
	return nil
}

// Errors that classify what is wrong with an input; a ParseError or a value
// error wraps one of them, so callers test with errors.Is.
var (
	// ErrSyntax means a line is not valid JSON (JSON Lines) or not a
	// well-formed trace line (QEMU log).
	ErrSyntax = errors.New("syntax error")
	// ErrSchema means an unknown op or field, or a missing or repeated field.
	ErrSchema = errors.New("schema error")
	// ErrValue means a field's value is out of range: a malformed or
	// overflowing number, an unknown enum, or a misaligned or empty range
	// where the machine is described (a guest's request may be misaligned
	// or empty: that is for the VMM to refuse).
	ErrValue = errors.New("invalid value")
	// ErrNotText means the input is not a text file (a NUL byte where the
	// first line should be).
	ErrNotText = errors.New("input is not text")
	// ErrEmpty means the input holds no line but blanks and comments.
	ErrEmpty = errors.New("empty input")
)
