package guest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/gmemproject/gmem/kvm"
)

// Selectors of the GDT LongMode writes.
const (
	CodeSelector = 0x08 // 64-bit ring-0 code
	DataSelector = 0x10 // ring-0 data, used for ds, es, fs, gs, ss
	TSSSelector  = 0x18 // 64-bit TSS (two slots)
)

// Offsets of LongMode's structures from LongModeConfig.TablesGPA.
const (
	pml4Off = 0x0000
	pdptOff = 0x1000
	gdtOff  = 0x2000
	tssOff  = 0x2100 // same page as the GDT, after it
	pdOff   = 0x3000 // one page directory per GiB mapped

	gdtLimit = 5*8 - 1 // null, code, data, TSS (16 bytes)
	tssLimit = 0x67    // a 104-byte 64-bit TSS

	gib = 1 << 30
	mib = 1 << 20
	// MaxMapSize is the most LongMode maps: one PML4 entry's worth.
	MaxMapSize = 512 * gib
)

// Control register and EFER bits LongMode sets.
const (
	cr0PE = 1 << 0  // protected mode
	cr0MP = 1 << 1  // monitor coprocessor
	cr0ET = 1 << 4  // extension type (fixed 1 on modern CPUs)
	cr0NE = 1 << 5  // native FPU errors
	cr0WP = 1 << 16 // write protect in ring 0
	cr0PG = 1 << 31 // paging

	cr4PAE        = 1 << 5
	cr4OSFXSR     = 1 << 9
	cr4OSXMMEXCPT = 1 << 10

	eferLME = 1 << 8
	eferLMA = 1 << 10

	// Page table entry bits: present, writable, page size (2 MiB in a PD).
	ptePresent = 1 << 0
	pteWrite   = 1 << 1
	ptePS      = 1 << 7

	rflagsFixed = 1 << 1 // bit 1 of RFLAGS always reads 1
)

// LongModeConfig says where LongMode puts its structures and where the
// guest starts.
type LongModeConfig struct {
	// TablesGPA is where the page tables, GDT and TSS go: a 4 KiB-aligned
	// guest physical address with TablesSize(MapSize) bytes of RAM behind it
	// that nothing else uses.
	TablesGPA uint64
	// MapSize is how many bytes, from GPA 0, are identity mapped with 2 MiB
	// pages: a positive multiple of 2 MiB, at most MaxMapSize. It may cover
	// holes with no RAM; guest accesses there become MMIO exits.
	MapSize uint64
	// Entry is the first instruction's address (RIP).
	Entry uint64
	// Stack is the initial RSP.
	Stack uint64
}

// TablesSize returns how many bytes LongMode writes at TablesGPA for a
// given MapSize (rounded up to whole GiB of page directories).
func TablesSize(mapSize uint64) uint64 {
	return pdOff + (mapSize+gib-1)/gib*0x1000
}

// Boot is the vCPU state LongMode prepared.
type Boot struct {
	// Regs are the general-purpose registers to load: RIP, RSP, RFLAGS.
	Regs kvm.Regs
	cfg  LongModeConfig
}

// ErrConfig is an unusable LongModeConfig.
var ErrConfig = errors.New("guest: bad long mode config")

// LongMode writes identity-mapped page tables (2 MiB pages, present and
// writable), a GDT with a 64-bit code segment, a data segment and a TSS, and
// the TSS itself into guest memory mem (offsets are guest physical
// addresses) and returns the state that starts a vCPU at cfg.Entry in
// 64-bit mode, ring 0, interrupts off, with no IDT: any exception becomes a
// triple fault and a shutdown exit.
func LongMode(mem io.WriterAt, cfg LongModeConfig) (*Boot, error) {
	switch {
	case cfg.TablesGPA%0x1000 != 0:
		return nil, fmt.Errorf("%w: tables at %#x not page aligned", ErrConfig, cfg.TablesGPA)
	case cfg.MapSize == 0 || cfg.MapSize%(2*mib) != 0 || cfg.MapSize > MaxMapSize:
		return nil, fmt.Errorf("%w: map size %#x", ErrConfig, cfg.MapSize)
	case cfg.TablesGPA > 1<<52:
		return nil, fmt.Errorf("%w: tables at %#x beyond physical addresses", ErrConfig, cfg.TablesGPA)
	}
	tables := make([]byte, TablesSize(cfg.MapSize))
	le := binary.LittleEndian
	base := cfg.TablesGPA

	le.PutUint64(tables[pml4Off:], base+pdptOff|ptePresent|pteWrite)
	npd := int((cfg.MapSize + gib - 1) / gib)
	for i := range npd {
		le.PutUint64(tables[pdptOff+8*i:], base+pdOff+uint64(i)*0x1000|ptePresent|pteWrite)
	}
	for j := range int(cfg.MapSize / (2 * mib)) {
		le.PutUint64(tables[pdOff+8*j:], uint64(j)*2*mib|ptePresent|pteWrite|ptePS)
	}

	gdt := tables[gdtOff:]
	le.PutUint64(gdt[CodeSelector:], descriptor(0, 0xFFFFF, 0x9B, 0xA)) // P, S, exec/read, accessed; G, L
	le.PutUint64(gdt[DataSelector:], descriptor(0, 0xFFFFF, 0x93, 0xC)) // P, S, read/write, accessed; G, D/B
	tss := base + tssOff
	le.PutUint64(gdt[TSSSelector:], descriptor(tss, tssLimit, 0x8B, 0)) // P, busy 64-bit TSS
	le.PutUint64(gdt[TSSSelector+8:], tss>>32)

	if _, err := mem.WriteAt(tables, int64(base)); err != nil {
		return nil, fmt.Errorf("guest: write long mode tables at %#x: %w", base, err)
	}
	return &Boot{
		Regs: kvm.Regs{RIP: cfg.Entry, RSP: cfg.Stack, RFLAGS: rflagsFixed},
		cfg:  cfg,
	}, nil
}

// descriptor packs a legacy segment descriptor: access is the byte with
// P, DPL, S and type; flags is the nibble with G, D/B, L, AVL.
func descriptor(base uint64, limit uint32, access, flags uint8) uint64 {
	return uint64(limit&0xFFFF) |
		(base&0xFFFFFF)<<16 |
		uint64(access)<<40 |
		uint64(limit>>16&0xF)<<48 |
		uint64(flags&0xF)<<52 |
		(base>>24&0xFF)<<56
}

// Sregs returns cur with everything long mode needs replaced: segments,
// GDT, IDT, CR0, CR3, CR4 and EFER. The rest (APIC base, CR8, pending
// interrupts) is kept from cur, normally what KVM_GET_SREGS returned.
func (b *Boot) Sregs(cur kvm.Sregs) kvm.Sregs {
	s := cur
	s.CS = kvm.Segment{Limit: 0xFFFFFFFF, Selector: CodeSelector, Type: 0xB,
		Present: 1, S: 1, L: 1, G: 1}
	data := kvm.Segment{Limit: 0xFFFFFFFF, Selector: DataSelector, Type: 0x3,
		Present: 1, S: 1, DB: 1, G: 1}
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = kvm.Segment{Base: b.cfg.TablesGPA + tssOff, Limit: tssLimit, Selector: TSSSelector,
		Type: 0xB, Present: 1}
	s.LDT = kvm.Segment{Unusable: 1}
	s.GDT = kvm.DTable{Base: b.cfg.TablesGPA + gdtOff, Limit: gdtLimit}
	s.IDT = kvm.DTable{}
	s.CR0 = cr0PE | cr0MP | cr0ET | cr0NE | cr0WP | cr0PG
	s.CR3 = b.cfg.TablesGPA + pml4Off
	s.CR4 = cr4PAE | cr4OSFXSR | cr4OSXMMEXCPT
	s.EFER = eferLME | eferLMA
	return s
}

// Flat is guest memory that is one host mapping: Mem holds the guest
// physical addresses [Base, Base+len(Mem)). It implements io.WriterAt and
// io.ReaderAt with offsets that are guest physical addresses, and refuses
// any access not wholly inside.
type Flat struct {
	Mem  []byte
	Base uint64
}

// ErrOutside is an access to a Flat outside its memory.
var ErrOutside = errors.New("guest: access outside guest memory")

func (f Flat) window(n int, gpa int64) ([]byte, error) {
	if gpa < 0 || uint64(gpa) < f.Base || uint64(gpa)-f.Base > uint64(len(f.Mem)) ||
		uint64(n) > uint64(len(f.Mem))-(uint64(gpa)-f.Base) {
		return nil, fmt.Errorf("%w: [%#x, +%#x) with memory at [%#x, +%#x)", ErrOutside, gpa, n, f.Base, len(f.Mem))
	}
	off := uint64(gpa) - f.Base
	return f.Mem[off : off+uint64(n)], nil
}

// WriteAt copies p to guest physical address gpa.
func (f Flat) WriteAt(p []byte, gpa int64) (int, error) {
	w, err := f.window(len(p), gpa)
	if err != nil {
		return 0, err
	}
	return copy(w, p), nil
}

// ReadAt copies guest memory at guest physical address gpa into p.
func (f Flat) ReadAt(p []byte, gpa int64) (int, error) {
	w, err := f.window(len(p), gpa)
	if err != nil {
		return 0, err
	}
	return copy(p, w), nil
}
