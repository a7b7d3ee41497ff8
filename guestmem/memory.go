//go:build linux

package guestmem

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/span"
)

// PageSize is the conversion granularity: the x86-64 base page.
const PageSize = kvm.PageSize

// DefaultMaxGPA is the end of the guest physical address space when
// Config.MaxGPA is 0: the architectural limit of x86-64 (52 bits).
const DefaultMaxGPA = 1 << 52

// BlockConfig places one RAM block.
type BlockConfig struct {
	// Name identifies the block in errors, logs and fault injection.
	Name string
	// GPA and Size place the block; both multiples of PageSize, Size > 0.
	GPA, Size uint64
}

// Hole is an MMIO range of the GPA map: no RAM behind it.
type Hole struct {
	Name      string
	GPA, Size uint64
}

// Range returns the hole's GPA range.
func (h Hole) Range() span.Range { return span.Range{Start: h.GPA, End: h.GPA + h.Size} }

// Op names a backend operation, for fault injection.
type Op int

// Backend operations a Config.Inject hook sees.
const (
	// OpSetAttributes is setting one run's attributes (KVM ioctl or the
	// user-space record).
	OpSetAttributes Op = iota + 1
	// OpPunch is punching one run out of a backing file.
	OpPunch
)

// String returns "set-attributes" or "punch".
func (o Op) String() string {
	switch o {
	case OpSetAttributes:
		return "set-attributes"
	case OpPunch:
		return "punch"
	}
	return fmt.Sprintf("op(%d)", int(o))
}

// Fault describes a backend operation about to run, for Config.Inject.
type Fault struct {
	Op    Op
	Block string
	// GPA is the run the operation works on.
	GPA span.Range
	// To is the state the conversion goes to.
	To memattr.State
	// File is the punched file, "guest_memfd" or "memfd" (OpPunch only).
	File string
}

// Config describes guest memory.
type Config struct {
	// Mode is the backing of every block.
	Mode Mode
	// Blocks are the RAM blocks; they must not overlap.
	Blocks []BlockConfig
	// MMIO are the holes of the GPA map that devices decode. Addresses
	// that are neither RAM nor a hole are unbacked; both are "not RAM".
	MMIO []Hole
	// MaxGPA is the end of the guest physical address space (default
	// DefaultMaxGPA). Requests reaching past it are invalid.
	MaxGPA uint64
	// VM, if not nil, is the KVM VM the memory belongs to: blocks are backed
	// by guest_memfd and bound to memslots FirstSlot, FirstSlot+1, ...
	// Without a VM the backing is memfds only and the attributes are kept in
	// user space (for hosts without /dev/kvm).
	VM        *kvm.VM
	FirstSlot uint32
	// Bitmap keeps the state in dense bitmaps (QEMU's representation), the
	// baseline for comparisons.
	Bitmap bool
	// Logger receives conversion failures and undo problems (default:
	// discard).
	Logger *slog.Logger
	// Inject, if not nil, is called before every backend operation; an
	// error makes the operation fail with it. It is for fault-injection
	// tests.
	Inject func(Fault) error
}

// Memory is the guest RAM of one VM. Convert, the accessors, the queries and
// AttachIOMMU are safe for concurrent use; Close must not race with them.
type Memory struct {
	mode        Mode
	enforcement Enforcement
	vm          *kvm.VM
	maxGPA      uint64
	log         *slog.Logger
	inject      func(Fault) error
	blocks      []*Block // ascending GPA
	holes       []Hole   // ascending GPA

	// convMu lets conversions within one block run in parallel (memattr
	// locks their ranges) while a conversion spanning blocks runs alone, so
	// that undoing its finished blocks cannot undo anyone else's change.
	convMu sync.RWMutex

	requests, conversions, noops, rejected, failed atomic.Uint64
	pagesShared, pagesPrivate, ignored             atomic.Uint64
	attrCalls, punches, punchedBytes, undoFailures atomic.Uint64
	closeOnce                                      sync.Once
	closeErr                                       error
}

// Block is one RAM block.
type Block struct {
	m         *Memory
	name      string
	gpa, size uint64
	mgr       *discard.Manager
	attrs     *memattr.Attributes

	// mem is what the guest reaches through the memslot and what the host
	// and devices use for shared pages: the guest_memfd mapping (in place)
	// or the shared memfd mapping (split).
	mem     []byte
	shared  file // the file behind mem
	private file // split: the private side; in place: nil
	// privateName names the private file in faults and errors.
	privateName string
	slot        uint32
	slotted     bool

	// record is the attributes as last set where they are kept (KVM or the
	// user-space record), one entry per page, 1 = private.
	recMu  sync.Mutex
	record pagemap.Map
}

// ErrLayout is a Config whose blocks or holes are misplaced.
var ErrLayout = errors.New("guestmem: bad memory layout")

// New creates the blocks of cfg, every page private, and binds them to
// cfg.VM's memslots when there is a VM.
func New(cfg Config) (*Memory, error) {
	if cfg.Mode != InPlace && cfg.Mode != Split {
		return nil, fmt.Errorf("guestmem: unknown mode %d", cfg.Mode)
	}
	m := &Memory{
		mode:        cfg.Mode,
		enforcement: EnforceUserSpace,
		vm:          cfg.VM,
		maxGPA:      cfg.MaxGPA,
		log:         cfg.Logger,
		inject:      cfg.Inject,
	}
	if m.maxGPA == 0 {
		m.maxGPA = DefaultMaxGPA
	}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	if err := m.layout(cfg); err != nil {
		return nil, err
	}
	if m.vm != nil {
		have, err := m.vm.CheckExtension(kvm.CapMemoryAttributes)
		if err != nil {
			return nil, fmt.Errorf("guestmem: %w", err)
		}
		if uint64(have)&kvm.MemoryAttributePrivate != 0 {
			m.enforcement = EnforceKVM
		}
	}
	for i, bc := range cfg.Blocks {
		b, err := m.newBlock(bc, cfg.FirstSlot+uint32(i), cfg.Bitmap)
		if err != nil {
			m.Close()
			return nil, err
		}
		m.blocks = append(m.blocks, b)
	}
	slices.SortFunc(m.blocks, func(a, b *Block) int { return cmpU64(a.gpa, b.gpa) })
	return m, nil
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// layout validates the blocks and holes of cfg and keeps the holes sorted.
func (m *Memory) layout(cfg Config) error {
	if m.maxGPA%PageSize != 0 {
		return fmt.Errorf("%w: max GPA %#x not page aligned", ErrLayout, m.maxGPA)
	}
	if len(cfg.Blocks) == 0 {
		return fmt.Errorf("%w: no RAM blocks", ErrLayout)
	}
	type placed struct {
		what string
		r    span.Range
	}
	var all []placed
	names := map[string]bool{}
	for _, b := range cfg.Blocks {
		if b.Name == "" || names[b.Name] {
			return fmt.Errorf("%w: block name %q empty or repeated", ErrLayout, b.Name)
		}
		names[b.Name] = true
		r, err := span.Checked(b.GPA, b.Size, PageSize, m.maxGPA)
		if err != nil {
			return fmt.Errorf("%w: block %s: %w", ErrLayout, b.Name, err)
		}
		if b.Size > uint64(int(^uint(0)>>1)) {
			return fmt.Errorf("%w: block %s too large to map", ErrLayout, b.Name)
		}
		all = append(all, placed{"block " + b.Name, r})
	}
	for _, h := range cfg.MMIO {
		r, err := span.Checked(h.GPA, h.Size, PageSize, m.maxGPA)
		if err != nil {
			return fmt.Errorf("%w: MMIO hole %s: %w", ErrLayout, h.Name, err)
		}
		all = append(all, placed{"MMIO hole " + h.Name, r})
		m.holes = append(m.holes, h)
	}
	slices.SortFunc(all, func(a, b placed) int { return cmpU64(a.r.Start, b.r.Start) })
	for i := 1; i < len(all); i++ {
		if all[i-1].r.Overlaps(all[i].r) {
			return fmt.Errorf("%w: %s %v overlaps %s %v", ErrLayout, all[i-1].what, all[i-1].r, all[i].what, all[i].r)
		}
	}
	slices.SortFunc(m.holes, func(a, b Hole) int { return cmpU64(a.GPA, b.GPA) })
	return nil
}

// newBlock creates a block's files, mapping, memslot and state.
func (m *Memory) newBlock(bc BlockConfig, slot uint32, bitmap bool) (_ *Block, err error) {
	b := &Block{m: m, name: bc.Name, gpa: bc.GPA, size: bc.Size, slot: slot, privateName: "memfd"}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	if m.vm != nil {
		err = b.backKVM()
	} else {
		err = b.backMemfd()
	}
	if err != nil {
		return nil, err
	}
	rec, err := pagemap.NewRuns(b.size/PageSize, 1)
	if err != nil {
		return nil, fmt.Errorf("guestmem: block %s: %w", b.name, err)
	}
	if err := rec.Set(span.Range{End: b.size / PageSize}, 1); err != nil {
		return nil, fmt.Errorf("guestmem: block %s: %w", b.name, err)
	}
	b.record = rec
	if m.enforcement == EnforceKVM {
		// KVM starts every GPA shared; a confidential block starts private.
		err := m.vm.SetMemoryAttributes(kvm.MemoryAttributes{Address: b.gpa, Size: b.size, Attributes: kvm.MemoryAttributePrivate})
		if err != nil {
			return nil, fmt.Errorf("guestmem: block %s: %w", b.name, err)
		}
	}
	b.mgr = discard.New(b.size, m.log)
	b.attrs, err = memattr.New(b.mgr, memattr.Config{
		PageSize: PageSize,
		Backend:  backend{b},
		InPlace:  m.mode == InPlace,
		Bitmap:   bitmap,
	})
	if err != nil {
		return nil, fmt.Errorf("guestmem: block %s: %w", b.name, err)
	}
	return b, nil
}

// backKVM creates the guest_memfd (and, split, the shared memfd) and binds
// the memslot.
func (b *Block) backKVM() error {
	vm := b.m.vm
	var gmem *kvm.GuestMemfd
	var err error
	switch b.m.mode {
	case InPlace:
		flags := uint64(kvm.GuestMemfdFlagMmap | kvm.GuestMemfdFlagInitShared)
		gmem, err = vm.CreateGuestMemfd(b.size, flags)
		if err != nil {
			return fmt.Errorf("guestmem: block %s: in-place memory needs an mmap-able, initially shared guest_memfd: %w", b.name, err)
		}
		b.shared = gmem
		b.mem, err = gmem.Mmap(0, b.size)
		if err != nil {
			return fmt.Errorf("guestmem: block %s: %w", b.name, err)
		}
	case Split:
		gmem, err = vm.CreateGuestMemfd(b.size, 0)
		if err != nil {
			return fmt.Errorf("guestmem: block %s: %w", b.name, err)
		}
		b.private, b.privateName = gmem, "guest_memfd"
		sh, err := newMemfd("gmem-"+b.name, b.size)
		if err != nil {
			return err
		}
		b.shared = sh
		if b.mem, err = sh.Mmap(); err != nil {
			return err
		}
	}
	err = vm.SetUserMemoryRegion2(kvm.UserspaceMemoryRegion2{
		Slot:          b.slot,
		Flags:         kvm.MemGuestMemfd,
		GuestPhysAddr: b.gpa,
		MemorySize:    b.size,
		// For in-place memory this must be the guest_memfd's own mapping:
		// KVM's emulator goes through it. Split memory on a VM without
		// private memory is served from it entirely.
		UserspaceAddr: kvm.HostAddr(b.mem),
		GuestMemfd:    uint32(gmem.Fd()),
	})
	if err != nil {
		return fmt.Errorf("guestmem: block %s: %w", b.name, err)
	}
	b.slotted = true
	return nil
}

// backMemfd backs the block with memfds only, for hosts without KVM.
func (b *Block) backMemfd() error {
	sh, err := newMemfd("gmem-"+b.name, b.size)
	if err != nil {
		return err
	}
	b.shared = sh
	if b.mem, err = sh.Mmap(); err != nil {
		return err
	}
	if b.m.mode == Split {
		pr, err := newMemfd("gmem-private-"+b.name, b.size)
		if err != nil {
			return err
		}
		b.private = pr
	}
	return nil
}

// close releases what the block holds: memslot, mapping, files.
func (b *Block) close() error {
	var errs []error
	if b.slotted {
		err := b.m.vm.SetUserMemoryRegion2(kvm.UserspaceMemoryRegion2{Slot: b.slot, Flags: kvm.MemGuestMemfd})
		// A closed VM has no memslots left to delete.
		if err != nil && !errors.Is(err, kvm.ErrClosed) {
			errs = append(errs, err)
		}
		b.slotted = false
	}
	if b.mem != nil {
		if err := unix.Munmap(b.mem); err != nil {
			errs = append(errs, fmt.Errorf("guestmem: munmap block %s: %w", b.name, err))
		}
		b.mem = nil
	}
	for _, f := range []file{b.shared, b.private} {
		if f == nil {
			continue
		}
		if err := f.Close(); err != nil && !errors.Is(err, kvm.ErrClosed) {
			errs = append(errs, err)
		}
	}
	b.shared, b.private = nil, nil
	return errors.Join(errs...)
}

// Close deletes the memslots, unmaps the memory and closes the files.
// Attachments must be detached first. Calling it again returns the first
// call's result.
func (m *Memory) Close() error {
	m.closeOnce.Do(func() {
		var errs []error
		for _, b := range m.blocks {
			if err := b.close(); err != nil {
				errs = append(errs, err)
			}
		}
		m.closeErr = errors.Join(errs...)
	})
	return m.closeErr
}

// Mode returns the backing mode.
func (m *Memory) Mode() Mode { return m.mode }

// Enforcement says who keeps the attributes on this host.
func (m *Memory) Enforcement() Enforcement { return m.enforcement }

// MaxGPA returns the end of the guest physical address space.
func (m *Memory) MaxGPA() uint64 { return m.maxGPA }

// Blocks returns the RAM blocks in ascending GPA order.
func (m *Memory) Blocks() []*Block { return slices.Clone(m.blocks) }

// Holes returns the MMIO holes in ascending GPA order.
func (m *Memory) Holes() []Hole { return slices.Clone(m.holes) }

// Block returns the block holding gpa, or nil.
func (m *Memory) Block(gpa uint64) *Block {
	i, found := slices.BinarySearchFunc(m.blocks, gpa, func(b *Block, g uint64) int { return cmpU64(b.gpa, g) })
	if found {
		return m.blocks[i]
	}
	if i > 0 && m.blocks[i-1].Range().Contains(gpa) {
		return m.blocks[i-1]
	}
	return nil
}

// Hole returns the MMIO hole holding gpa, if any.
func (m *Memory) Hole(gpa uint64) (Hole, bool) {
	for _, h := range m.holes {
		if h.Range().Contains(gpa) {
			return h, true
		}
	}
	return Hole{}, false
}

// piece is a part of a GPA range: inside block b, or not RAM when b is nil.
type piece struct {
	r span.Range
	b *Block
}

// split cuts r into RAM pieces (one per block) and the gaps between them.
func (m *Memory) split(r span.Range) []piece {
	var out []piece
	at := r.Start
	for _, b := range m.blocks {
		x := b.Range().Intersect(r)
		if x.Empty() {
			continue
		}
		if x.Start > at {
			out = append(out, piece{r: span.Range{Start: at, End: x.Start}})
		}
		out = append(out, piece{r: x, b: b})
		at = x.End
	}
	if at < r.End {
		out = append(out, piece{r: span.Range{Start: at, End: r.End}})
	}
	return out
}

// describe names what lies at the start of a non-RAM piece.
func (m *Memory) describe(r span.Range) string {
	for _, h := range m.holes {
		if h.Range().Overlaps(r) {
			return "MMIO hole " + h.Name
		}
	}
	return "unbacked"
}

// StateStats summarises the state maps of every block.
type StateStats struct {
	// Runs is the number of maximal same-state runs, summed over blocks.
	Runs int
	// SharedBytes and PrivateBytes partition the RAM.
	SharedBytes, PrivateBytes uint64
	// MapBytes is the memory the state maps hold.
	MapBytes uint64
}

// StateStats returns the state-map summary.
func (m *Memory) StateStats() StateStats {
	var s StateStats
	for _, b := range m.blocks {
		b.attrs.Runs(span.Range{End: b.size}, func(span.Range, memattr.State) { s.Runs++ })
		sh := b.attrs.SharedBytes()
		s.SharedBytes += sh
		s.PrivateBytes += b.size - sh
		s.MapBytes += b.attrs.StateBytes()
	}
	return s
}

// Stats counts what the executor and the backends did.
type Stats struct {
	// Requests is every Convert call.
	Requests uint64
	// Conversions are requests that succeeded, NoOps among them those that
	// found every page already in the requested state.
	Conversions, NoOps uint64
	// Rejected requests were invalid or asked to make non-RAM private;
	// nothing was touched.
	Rejected uint64
	// Failed requests were valid but a step failed; they were undone.
	Failed uint64
	// PagesToShared and PagesToPrivate count pages whose state changed.
	PagesToShared, PagesToPrivate uint64
	// IgnoredBytes is non-RAM skipped by conversions to shared.
	IgnoredBytes uint64
	// AttributeCalls counts successful attribute changes (one per backend
	// call, KVM or user space).
	AttributeCalls uint64
	// Punches and PunchedBytes count hole punches of backing files.
	Punches, PunchedBytes uint64
	// UndoFailures counts undo steps that failed after a failure.
	UndoFailures uint64
}

// Stats returns the counters.
func (m *Memory) Stats() Stats {
	return Stats{
		Requests:       m.requests.Load(),
		Conversions:    m.conversions.Load(),
		NoOps:          m.noops.Load(),
		Rejected:       m.rejected.Load(),
		Failed:         m.failed.Load(),
		PagesToShared:  m.pagesShared.Load(),
		PagesToPrivate: m.pagesPrivate.Load(),
		IgnoredBytes:   m.ignored.Load(),
		AttributeCalls: m.attrCalls.Load(),
		Punches:        m.punches.Load(),
		PunchedBytes:   m.punchedBytes.Load(),
		UndoFailures:   m.undoFailures.Load(),
	}
}

// Name returns the block's name.
func (b *Block) Name() string { return b.name }

// GPA returns the block's first guest physical address.
func (b *Block) GPA() uint64 { return b.gpa }

// Size returns the block's size in bytes.
func (b *Block) Size() uint64 { return b.size }

// Range returns the block's GPA range.
func (b *Block) Range() span.Range { return span.Range{Start: b.gpa, End: b.gpa + b.size} }

// Section returns the whole block as a discard section at its GPA.
func (b *Block) Section() discard.Section {
	return discard.Section{Offset: 0, Size: b.size, GPA: b.gpa}
}

// Manager returns the block's discard manager (listeners register here).
func (b *Block) Manager() *discard.Manager { return b.mgr }

// Attributes returns the block's shared/private state.
func (b *Block) Attributes() *memattr.Attributes { return b.attrs }

// Slot returns the block's memslot id and whether it has one.
func (b *Block) Slot() (uint32, bool) { return b.slot, b.slotted }

// StateRun is a maximal GPA range in one state.
type StateRun struct {
	GPA   span.Range
	State memattr.State
}

// StateRuns returns the block's state as maximal runs, ascending.
func (b *Block) StateRuns() []StateRun {
	var out []StateRun
	b.attrs.Runs(span.Range{End: b.size}, func(r span.Range, s memattr.State) {
		out = append(out, StateRun{GPA: b.toGPA(r), State: s})
	})
	return out
}

// RecordedRuns returns the attributes as last set where they are kept (KVM
// or the user-space record), as maximal runs: after every conversion,
// failed or not, they equal StateRuns.
func (b *Block) RecordedRuns() []StateRun {
	b.recMu.Lock()
	defer b.recMu.Unlock()
	var out []StateRun
	for run := range b.record.Runs(span.Range{End: b.record.Pages()}) {
		s := memattr.Shared
		if run.Value == 1 {
			s = memattr.Private
		}
		r := span.Range{Start: run.Start * PageSize, End: run.End * PageSize}
		out = append(out, StateRun{GPA: b.toGPA(r), State: s})
	}
	return out
}

// toGPA turns block offsets into GPAs.
func (b *Block) toGPA(r span.Range) span.Range {
	return span.Range{Start: b.gpa + r.Start, End: b.gpa + r.End}
}
