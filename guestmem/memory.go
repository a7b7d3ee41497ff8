//go:build linux

package guestmem

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/pagemap"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/virtiomem"
)

// PageSize is the conversion granularity: the x86-64 base page.
const PageSize = kvm.PageSize

// DefaultMaxGPA is the end of the guest physical address space when
// Config.MaxGPA is 0: the architectural limit of x86-64 (52 bits).
const DefaultMaxGPA = 1 << 52

// ErrClosed is any call on a Memory or Attachment after Memory.Close, and a
// second Close. errors.Is(err, fs.ErrClosed) holds for it too.
var ErrClosed = fmt.Errorf("guestmem: %w", fs.ErrClosed)

// BlockConfig places one RAM block.
type BlockConfig struct {
	// Name identifies the block in errors, logs and fault injection.
	Name string
	// GPA and Size place the block; both multiples of PageSize, Size > 0.
	GPA, Size uint64
	// Backing, if not nil, is the block's memory, borrowed: its Size must
	// be Size, its InPlace must match Config.Mode, it must share no memory
	// with another block's (see Config.Validate), and guestmem never
	// closes it (the VMM closes it after Memory.Close). Nil means guestmem
	// creates a KVMBacking (with a Config.VM that is a MemslotBinder) or a
	// MemfdBacking (without a VM) and closes it in Memory.Close.
	Backing Backing
	// Hotplug, if not 0, makes the block hot-pluggable (virtio-mem) with
	// this plug granularity in bytes: a power of two, a multiple of
	// PageSize, dividing Size. Every part starts unplugged; see
	// Memory.Plug.
	Hotplug uint64
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
	// OpPunch is discarding one run of one side of a backing
	// (Backing.Discard): after a conversion, or after an unplug.
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
	// To is the state the conversion goes to (Private for an unplug).
	To memattr.State
	// File is the discarded side, "shared" or "private" (OpPunch only).
	File string
}

// Config describes guest memory. New copies it; later changes have no
// effect.
type Config struct {
	// Mode is the backing of every block (default Split).
	Mode Mode
	// Blocks are the RAM blocks; they must not overlap.
	Blocks []BlockConfig
	// MMIO are the holes of the GPA map that devices decode. Addresses
	// that are neither RAM nor a hole are unbacked; both are "not RAM".
	MMIO []Hole
	// MaxGPA is the end of the guest physical address space (default
	// DefaultMaxGPA). Requests reaching past it are invalid.
	MaxGPA uint64
	// VM, if not nil (nor a nil pointer), is the KVM VM the memory belongs to (*kvm.VM or a
	// VMM's own). Where it reports private memory the attributes are set
	// with KVM_SET_MEMORY_ATTRIBUTES (EnforceKVM); in place, where it
	// reports per-guest_memfd attributes (kvm.CapGuestMemfdMemoryAttributes),
	// with each block's KVM_SET_MEMORY_ATTRIBUTES2 (EnforceGuestMemfd, see
	// AttributeBacking). If it is also a
	// MemslotBinder, blocks without a Backing get a KVMBacking and blocks
	// whose backing is a GuestMemfdBacking are bound to memslots
	// FirstSlot, FirstSlot+1, ... in the order of Blocks. Without a VM the
	// attributes are kept in user space (for hosts without /dev/kvm). The
	// VM is borrowed: it must outlive the Memory.
	VM        VM
	FirstSlot uint32
	// ExternalMemslots says the VMM binds (and deletes) the memslots
	// itself: guestmem then never calls KVM_SET_USER_MEMORY_REGION2.
	ExternalMemslots bool
	// Bitmap keeps the state in dense bitmaps (QEMU's representation), the
	// baseline for comparisons. They are allocated at once: one bit per
	// page, 32 MiB per TiB of RAM (BitmapBytes).
	Bitmap bool
	// MaxBitmapBytes, with Bitmap, caps what the bitmaps of all blocks may
	// take together (BitmapBytes); 0 means the machine's physical memory
	// (pagemap.BitmapLimit), and a larger cap does not lift pagemap's own
	// limit of physical memory per bitmap. Validate and New refuse a
	// larger memory with a *pagemap.SizeError matching ErrTooLarge, before
	// allocating anything.
	MaxBitmapBytes uint64
	// Logger receives conversion failures and undo problems (default:
	// discard).
	Logger *slog.Logger
	// Inject, if not nil, is called before every backend operation; an
	// error makes the operation fail with it. It is for fault-injection
	// tests.
	Inject func(Fault) error
}

// Memory is the guest RAM of one VM.
//
// Its methods are safe for concurrent use, Close included. Close waits for
// the calls in flight; afterwards every method with an error result returns
// an error matching ErrClosed (wrapped in *ConvertError or *AccessError for
// Convert and the accessors), and the queries without one (Blocks, Stats,
// StateStats, ...) answer from the final state. Nothing panics.
type Memory struct {
	mode        Mode
	enforcement Enforcement
	vm          VM
	binder      MemslotBinder // nil: guestmem binds no memslot
	maxGPA      uint64
	log         *slog.Logger
	inject      func(Fault) error
	blocks      []*Block // ascending GPA
	holes       []Hole   // ascending GPA

	// life: every call holds it for reading; Close holds it for writing,
	// to wait for them, then sets closed.
	life   sync.RWMutex
	closed atomic.Bool
	// attMu guards atts, the live attachments, which Close detaches.
	attMu sync.Mutex
	atts  []*Attachment

	// convMu lets conversions within one block run in parallel (memattr
	// locks their ranges) while a conversion spanning blocks, a plug and
	// an unplug run alone, so that undoing finished steps cannot undo
	// anyone else's change.
	convMu sync.RWMutex

	requests, conversions, noops, rejected, failed atomic.Uint64
	pagesShared, pagesPrivate, ignored             atomic.Uint64
	attrCalls, punches, punchedBytes, undoFailures atomic.Uint64
	plugs, unplugs                                 atomic.Uint64
	attrNanos, punchNanos                          atomic.Int64
}

// Block is one RAM block. Its accessors are safe for concurrent use and
// after Close.
type Block struct {
	m         *Memory
	name      string
	gpa, size uint64
	mgr       *discard.Manager
	attrs     *memattr.Attributes
	vmem      *virtiomem.Device // nil unless hot-pluggable

	backing Backing
	owned   bool   // guestmem created backing and closes it
	host    []byte // backing.Host(), fixed at creation
	slot    uint32
	slotted bool
	// file keeps the attributes of an in-place block under
	// EnforceGuestMemfd, the block at offset fileOff.
	file    AttributeFile
	fileOff uint64

	// record is the attributes as last set where they are kept (KVM or the
	// user-space record), one entry per page, 1 = private.
	recMu  sync.Mutex
	record pagemap.Map
}

// Validate checks cfg without creating anything: the mode, the layout of
// blocks and holes, the backings' sizes and modes, the hot-plug block
// sizes, and that no two blocks share memory (one Backing in two blocks,
// overlapping host mappings, overlapping ranges of one file behind host
// mappings or guest_memfds; the private side of a backing that is no
// GuestMemfdBacking cannot be seen). New calls it first.
func (cfg Config) Validate() error {
	_, err := cfg.validate()
	return err
}

// New creates the blocks of cfg, every page private, and binds their
// memslots where cfg.VM is a MemslotBinder (see Config.VM).
func New(cfg Config) (*Memory, error) {
	holes, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	m := &Memory{
		mode:        cfg.Mode,
		enforcement: EnforceUserSpace,
		vm:          cfg.VM,
		maxGPA:      cfg.maxGPA(),
		log:         cfg.Logger,
		inject:      cfg.Inject,
		holes:       holes,
	}
	if isNil(m.vm) {
		m.vm = nil // a nil *kvm.VM (or other pointer) in the interface means no VM
	}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	if m.vm != nil {
		if b, ok := m.vm.(MemslotBinder); ok {
			m.binder = b
		}
		if m.enforcement, err = enforcement(m.vm, m.mode); err != nil {
			return nil, err
		}
	}
	for i, bc := range cfg.Blocks {
		b, err := m.newBlock(bc, cfg.FirstSlot+uint32(i), cfg)
		if err != nil {
			m.closeBlocks()
			return nil, err
		}
		m.blocks = append(m.blocks, b)
	}
	slices.SortFunc(m.blocks, func(a, b *Block) int { return cmp.Compare(a.gpa, b.gpa) })
	return m, nil
}

func (cfg Config) maxGPA() uint64 {
	if cfg.MaxGPA == 0 {
		return DefaultMaxGPA
	}
	return cfg.MaxGPA
}

// validate checks cfg and returns the holes sorted.
func (cfg Config) validate() ([]Hole, error) {
	if cfg.Mode != InPlace && cfg.Mode != Split {
		return nil, fmt.Errorf("%w: unknown mode %d", ErrLayout, cfg.Mode)
	}
	maxGPA := cfg.maxGPA()
	if maxGPA%PageSize != 0 {
		return nil, fmt.Errorf("%w: max GPA %#x not page aligned", ErrLayout, maxGPA)
	}
	if len(cfg.Blocks) == 0 {
		return nil, fmt.Errorf("%w: no RAM blocks", ErrLayout)
	}
	type placed struct {
		what string
		r    span.Range
	}
	var all []placed
	names := map[string]bool{}
	for _, b := range cfg.Blocks {
		if b.Name == "" || names[b.Name] {
			return nil, fmt.Errorf("%w: block name %q empty or repeated", ErrLayout, b.Name)
		}
		names[b.Name] = true
		r, err := span.Checked(b.GPA, b.Size, PageSize, maxGPA)
		if err != nil {
			return nil, fmt.Errorf("%w: block %s at GPA %#x: %w", ErrLayout, b.Name, b.GPA, err)
		}
		if bk := b.Backing; bk != nil {
			if isNil(bk) {
				return nil, fmt.Errorf("%w: block %s: backing is a nil %T", ErrLayout, b.Name, bk)
			}
			if bk.Size() != b.Size {
				return nil, fmt.Errorf("%w: block %s: backing of %#x bytes for a block of %#x", ErrLayout, b.Name, bk.Size(), b.Size)
			}
			if bk.InPlace() != (cfg.Mode == InPlace) {
				return nil, fmt.Errorf("%w: block %s: backing in place %v in mode %v", ErrLayout, b.Name, bk.InPlace(), cfg.Mode)
			}
			if h := bk.Host(); h != nil && uint64(len(h)) != b.Size {
				return nil, fmt.Errorf("%w: block %s: backing's host mapping is %#x bytes, not %#x", ErrLayout, b.Name, len(h), b.Size)
			}
		} else if b.Size > uint64(int(^uint(0)>>1)) {
			return nil, fmt.Errorf("%w: block %s too large to map", ErrLayout, b.Name)
		}
		if hp := b.Hotplug; hp != 0 && (!span.IsPowerOfTwo(hp) || hp%PageSize != 0 || b.Size%hp != 0) {
			return nil, fmt.Errorf("%w: block %s: hot-plug block size %#x is not a power-of-two multiple of the page size dividing %#x", ErrLayout, b.Name, hp, b.Size)
		}
		all = append(all, placed{"block " + b.Name, r})
	}
	var holes []Hole
	for _, h := range cfg.MMIO {
		r, err := span.Checked(h.GPA, h.Size, PageSize, maxGPA)
		if err != nil {
			return nil, fmt.Errorf("%w: MMIO hole %s at GPA %#x: %w", ErrLayout, h.Name, h.GPA, err)
		}
		all = append(all, placed{"MMIO hole " + h.Name, r})
		holes = append(holes, h)
	}
	slices.SortFunc(all, func(a, b placed) int { return cmp.Compare(a.r.Start, b.r.Start) })
	for i := 1; i < len(all); i++ {
		if all[i-1].r.Overlaps(all[i].r) {
			return nil, fmt.Errorf("%w: %s at GPA %v overlaps %s at GPA %v", ErrLayout, all[i-1].what, all[i-1].r, all[i].what, all[i].r)
		}
	}
	if err := checkShared(cfg.Blocks); err != nil {
		return nil, err
	}
	if cfg.Bitmap {
		if err := cfg.checkBitmaps(); err != nil {
			return nil, err
		}
	}
	slices.SortFunc(holes, func(a, b Hole) int { return cmp.Compare(a.GPA, b.GPA) })
	return holes, nil
}

// ErrTooLarge is a memory whose state cannot be held on this machine: with
// Config.Bitmap, bitmaps larger than Config.MaxBitmapBytes or the physical
// memory. Errors matching it are *pagemap.SizeError, which give the bytes
// needed and the limit. It is pagemap.ErrTooLarge.
var ErrTooLarge = pagemap.ErrTooLarge

// BitmapBytes returns what Config.Bitmap allocates for blocks: one bit per
// page of each block, and one per plug block of a hot-pluggable block.
// Their sizes must be multiples of PageSize (and of Hotplug).
func BitmapBytes(blocks []BlockConfig) uint64 {
	var n uint64
	for _, b := range blocks {
		n += pagemap.BitmapBytes(b.Size/PageSize, 1)
		if b.Hotplug != 0 {
			n += pagemap.BitmapBytes(b.Size/b.Hotplug, 1)
		}
	}
	return n
}

// checkBitmaps refuses bitmaps larger than the limit, before anything is
// allocated: Go's runtime answers an allocation the kernel refuses with a
// fatal error.
func (cfg Config) checkBitmaps() error {
	need := BitmapBytes(cfg.Blocks)
	limit, name := cfg.MaxBitmapBytes, "Config.MaxBitmapBytes"
	if limit == 0 {
		limit, name = pagemap.BitmapLimit()
	}
	if need <= limit {
		return nil
	}
	var ram uint64
	for _, b := range cfg.Blocks {
		ram += b.Size
	}
	return fmt.Errorf("guestmem: %w", &pagemap.SizeError{
		What:      fmt.Sprintf("the bitmap state (Config.Bitmap) of %s of RAM", pagemap.FormatBytes(ram)),
		Bytes:     need,
		Limit:     limit,
		LimitName: name,
	})
}

// isNil reports whether x is nil or, held in an interface, a nil pointer,
// map, slice, function or channel: a value whose methods cannot be called
// with any meaning.
func isNil(x any) bool {
	if x == nil {
		return true
	}
	switch v := reflect.ValueOf(x); v.Kind() {
	case reflect.Pointer, reflect.Map, reflect.Slice, reflect.Func, reflect.Chan, reflect.UnsafePointer:
		return v.IsNil()
	}
	return false
}

// newBlock creates or adopts a block's backing, binds its memslot and
// creates its state.
func (m *Memory) newBlock(bc BlockConfig, slot uint32, cfg Config) (_ *Block, err error) {
	b := &Block{m: m, name: bc.Name, gpa: bc.GPA, size: bc.Size, slot: slot, backing: bc.Backing}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	if b.backing == nil {
		if b.backing, err = m.newBacking(bc); err != nil {
			return nil, fmt.Errorf("guestmem: block %s: %w", b.name, err)
		}
		b.owned = true
	}
	b.host = b.backing.Host()
	if gb, ok := b.backing.(GuestMemfdBacking); ok && m.binder != nil && !cfg.ExternalMemslots {
		if err := b.bind(gb); err != nil {
			return nil, err
		}
	}
	rec, err := pagemap.NewRuns(b.size/PageSize, 1)
	if err != nil {
		return nil, fmt.Errorf("guestmem: block %s: %w", b.name, err)
	}
	if err := rec.Set(span.Range{End: b.size / PageSize}, 1); err != nil {
		return nil, fmt.Errorf("guestmem: block %s: %w", b.name, err)
	}
	b.record = rec
	switch m.enforcement {
	case EnforceKVM:
		// KVM starts every GPA shared; a confidential block starts private.
		err := m.vm.SetMemoryAttributes(kvm.MemoryAttributes{Address: b.gpa, Size: b.size, Attributes: kvm.MemoryAttributePrivate})
		if err != nil {
			return nil, fmt.Errorf("guestmem: block %s: %w", b.name, err)
		}
	case EnforceGuestMemfd:
		if err := b.adoptAttributeFile(); err != nil {
			return nil, err
		}
	}
	b.mgr = discard.New(b.size, m.log)
	b.attrs, err = memattr.New(b.mgr, memattr.Config{
		PageSize: PageSize,
		Backend:  backend{b},
		InPlace:  m.mode == InPlace,
		Bitmap:   cfg.Bitmap,
	})
	if err != nil {
		return nil, fmt.Errorf("guestmem: block %s: %w", b.name, err)
	}
	if bc.Hotplug != 0 {
		b.vmem, err = virtiomem.New(b.mgr, virtiomem.Config{
			BlockSize: bc.Hotplug,
			Bitmap:    cfg.Bitmap,
			Release:   b.releaseUnplugged,
		})
		if err != nil {
			return nil, fmt.Errorf("guestmem: block %s: %w", b.name, err)
		}
	}
	return b, nil
}

// newBacking creates the backing of a block that has none.
func (m *Memory) newBacking(bc BlockConfig) (Backing, error) {
	if m.binder != nil {
		return NewKVMBacking(m.binder, bc.Name, bc.Size, m.mode)
	}
	return NewMemfdBacking(bc.Name, bc.Size, m.mode)
}

// bind binds the block's memslot to its guest_memfd.
func (b *Block) bind(gb GuestMemfdBacking) error {
	fd, off := gb.GuestMemfd()
	var addr uint64
	if b.host != nil {
		// For in-place memory this must be the guest_memfd's own mapping:
		// KVM's emulator goes through it. Split memory on a VM without
		// private memory is served from it entirely.
		addr = kvm.HostAddr(b.host)
	}
	err := b.m.binder.SetUserMemoryRegion2(kvm.UserspaceMemoryRegion2{
		Slot:             b.slot,
		Flags:            kvm.MemGuestMemfd,
		GuestPhysAddr:    b.gpa,
		MemorySize:       b.size,
		UserspaceAddr:    addr,
		GuestMemfd:       uint32(fd),
		GuestMemfdOffset: off,
	})
	if err != nil {
		return fmt.Errorf("guestmem: block %s: %w", b.name, err)
	}
	b.slotted = true
	return nil
}

// close deletes the memslot gmem bound and closes the backing gmem created.
func (b *Block) close() error {
	var errs []error
	if b.slotted {
		err := b.m.binder.SetUserMemoryRegion2(kvm.UserspaceMemoryRegion2{Slot: b.slot, Flags: kvm.MemGuestMemfd})
		// A closed VM has no memslots left to delete.
		if err != nil && !errors.Is(err, kvm.ErrClosed) {
			errs = append(errs, fmt.Errorf("guestmem: block %s: %w", b.name, err))
		}
		b.slotted = false
	}
	if b.owned {
		if c, ok := b.backing.(io.Closer); ok {
			if err := c.Close(); err != nil && !errors.Is(err, ErrClosed) {
				errs = append(errs, fmt.Errorf("guestmem: block %s: %w", b.name, err))
			}
		}
		b.owned = false
	}
	return errors.Join(errs...)
}

// enter admits a call: it fails with ErrClosed after Close. A nil error
// must be followed by exit.
func (m *Memory) enter() error {
	m.life.RLock()
	if m.closed.Load() {
		m.life.RUnlock()
		return ErrClosed
	}
	return nil
}

func (m *Memory) exit() { m.life.RUnlock() }

// Close waits for the calls in flight, detaches every live Attachment
// (newest first), deletes the memslots guestmem bound and unmaps and closes
// the backings it created; borrowed backings and the VM stay the caller's.
// If an attachment cannot be detached, the memory of its blocks stays
// mapped (a device may still reach it) and the error says so. A second
// Close returns ErrClosed.
func (m *Memory) Close() error {
	m.life.Lock()
	defer m.life.Unlock()
	if m.closed.Load() {
		return ErrClosed
	}
	m.closed.Store(true)
	var errs []error
	reachable := map[*Block]bool{}
	m.attMu.Lock()
	atts := m.atts
	m.atts = nil
	m.attMu.Unlock()
	for i := len(atts) - 1; i >= 0; i-- {
		a := atts[i]
		if err := a.detach(); err != nil {
			errs = append(errs, err)
			for _, b := range a.blocks {
				reachable[b] = true
			}
		}
	}
	for _, b := range m.blocks {
		if reachable[b] {
			errs = append(errs, fmt.Errorf("guestmem: block %s at GPA %#x left mapped: a device may still reach it", b.name, b.gpa))
			continue
		}
		if err := b.close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// closeBlocks closes the blocks of a Memory that New abandons.
func (m *Memory) closeBlocks() {
	for _, b := range m.blocks {
		b.close()
	}
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
	i, found := slices.BinarySearchFunc(m.blocks, gpa, func(b *Block, g uint64) int { return cmp.Compare(b.gpa, g) })
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
	// Runs is the number of maximal runs of one state (shared, private or
	// unplugged), summed over blocks.
	Runs int
	// SharedBytes and PrivateBytes partition the plugged RAM;
	// UnpluggedBytes is the unplugged part of hot-pluggable blocks (which is
	// private too, and counted only here).
	SharedBytes, PrivateBytes, UnpluggedBytes uint64
	// MapBytes is the memory the state maps hold.
	MapBytes uint64
}

// StateStats returns the state-map summary.
func (m *Memory) StateStats() StateStats {
	var s StateStats
	for _, b := range m.blocks {
		for e := range b.extents(span.Range{End: b.size}) {
			s.Runs++
			switch e.Kind {
			case KindShared:
				s.SharedBytes += e.GPA.Len()
			case KindPrivate:
				s.PrivateBytes += e.GPA.Len()
			case KindUnplugged:
				s.UnpluggedBytes += e.GPA.Len()
			}
		}
		s.MapBytes += b.attrs.StateBytes()
		if b.vmem != nil {
			s.MapBytes += b.vmem.StateBytes()
		}
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
	// AttributeTime and PunchTime are the time spent in the kernel's
	// attribute calls (KVM_SET_MEMORY_ATTRIBUTES, or the guest_memfd's
	// KVM_SET_MEMORY_ATTRIBUTES2 in place) and in punches
	// (Backing.Discard): what conversions spent in the kernel, against
	// gmem's own work.
	AttributeTime, PunchTime time.Duration
	// UndoFailures counts undo steps that failed after a failure.
	UndoFailures uint64
	// Plugs and Unplugs count successful Plug and Unplug calls.
	Plugs, Unplugs uint64
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
		AttributeTime:  time.Duration(m.attrNanos.Load()),
		PunchTime:      time.Duration(m.punchNanos.Load()),
		UndoFailures:   m.undoFailures.Load(),
		Plugs:          m.plugs.Load(),
		Unplugs:        m.unplugs.Load(),
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

// Manager returns the block's discard manager, where a VMM's own listeners
// (a vhost-user backend, a device model) register. Calls through it bypass
// Memory's lifecycle: after Close its listeners get nothing more.
func (b *Block) Manager() *discard.Manager { return b.mgr }

// Attributes returns the block's shared/private state. Convert through
// Memory.Convert: converting here skips the executor's checks.
func (b *Block) Attributes() *memattr.Attributes { return b.attrs }

// Backing returns the block's memory.
func (b *Block) Backing() Backing { return b.backing }

// Hotplug returns the block's plug granularity, 0 if it is not
// hot-pluggable.
func (b *Block) Hotplug() uint64 {
	if b.vmem == nil {
		return 0
	}
	return b.vmem.BlockSize()
}

// PluggedBytes returns the plugged bytes of the block (all of it unless it
// is hot-pluggable).
func (b *Block) PluggedBytes() uint64 {
	if b.vmem == nil {
		return b.size
	}
	return b.vmem.PluggedBytes()
}

// Slot returns the block's memslot id and whether guestmem bound it; the
// memslot is deleted by Close.
func (b *Block) Slot() (uint32, bool) {
	b.m.life.RLock()
	defer b.m.life.RUnlock()
	return b.slot, b.slotted
}

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
