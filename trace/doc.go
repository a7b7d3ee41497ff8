// Package trace reads, writes and generates traces of a confidential guest's
// memory conversions: the input from which gmem answers how many DMA
// mappings, how much tracking memory and how many ioctls a guest's
// conversions need.
//
// # Events
//
// A trace is a sequence of Events: RAM and MMIO declare the guest physical
// layout, Attach and Detach add and remove assigned devices (each device's
// DMA mappings follow all RAM), Convert asks for a range to become shared or
// private, Plug and Unplug change the plugged part of hot-pluggable
// (virtio-mem) RAM. A replay switches on the concrete type. Each event checks
// itself (Event.Check); the Validator checks the trace's structure, the
// machine it describes (the machine first, no overlaps, devices attached
// once, plugs where there is hot-pluggable RAM). What a guest's request
// does, and whether the VMM refuses it, is the executor's (guestmem) to say:
// a trace may hold misaligned, empty or unbacked requests, as a buggy
// guest's log does.
//
// # Formats
//
// Two input formats are read, given by Options.Format or told apart by the
// first line that is neither blank nor a comment ('#' first): if it starts
// with '{' the input is JSON Lines, otherwise a QEMU trace log. Comment
// lines are skipped in both and counted.
//
// JSON Lines is gmem's own format, one event per line (see ParseEvent for the
// fields). Addresses and sizes may be JSON numbers or strings; strings accept
// decimal, 0x hexadecimal, and decimal numbers with a binary unit, with or
// without spaces before the unit ("16GiB", "2 MiB", "4K"; see ParseSize).
// Writer writes the format back, and what it writes parses to the same
// events.
//
// A QEMU trace log holds kvm_convert_memory and kvm_memory_fault lines,
// whatever precedes the event name (the "PID@SEC.USEC:" prefix, a
// timestamp), among any other lines, which are counted as unrecognised. The log does not describe the machine, so Options
// does: a RAM layout (ParseRAMLayout parses the command line form), a number
// of devices and their IOMMU, and the RAM and attach events made from them
// come first.
//
// Reader returns the events of either format one at a time, JSON Lines in
// constant memory (a QEMU log is read whole first, as its highest address
// may decide the RAM layout); Parse collects them all into a Trace.
//
// Malformed input is reported as a *ParseError with the line number and a
// cause that wraps ErrSyntax, ErrSchema or ErrValue; with Options.KeepGoing,
// Parse collects them all (ParseErrors) and keeps the good lines. Empty input
// is ErrEmpty and binary input ErrNotText.
//
// # Generators
//
// Boot, Churn, Implicit, Hugepage, Hotplug and Adversarial produce traces
// that model guest behaviour (each function's documentation says which),
// sized by options and reproducible from a seed. They return iter.Seq
// sequences that compute events as they are consumed, so memory does not
// grow with the size of the guest or the length of the trace: a 1 TiB guest
// costs what a 1 GiB one does. Generators lists them for help texts.
package trace
