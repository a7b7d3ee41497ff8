package guest

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gmemproject/gmem/kvm"
)

func TestLongModeTables(t *testing.T) {
	const tables = 0x5000
	mem := make([]byte, 1<<20)
	cfg := LongModeConfig{TablesGPA: tables, MapSize: 1<<30 + 4<<20, Entry: 0x10000, Stack: 0x80000}
	b, err := LongMode(Flat{Mem: mem}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := TablesSize(cfg.MapSize); got != 0x5000 {
		t.Errorf("TablesSize(1 GiB + 4 MiB) = %#x, want 0x5000 (PML4, PDPT, GDT page, 2 PDs)", got)
	}
	q := func(gpa int) uint64 { return binary.LittleEndian.Uint64(mem[gpa:]) }
	// Entries: address | present (1) | writable (2), plus page size (0x80)
	// for 2 MiB leaves.
	for _, c := range []struct {
		name string
		gpa  int
		want uint64
	}{
		{"PML4[0] -> PDPT", 0x5000, 0x6003},
		{"PML4[1] empty", 0x5008, 0},
		{"PDPT[0] -> PD0", 0x6000, 0x8003},
		{"PDPT[1] -> PD1", 0x6008, 0x9003},
		{"PDPT[2] empty", 0x6010, 0},
		{"PD0[0] = 0", 0x8000, 0x83},
		{"PD0[1] = 2 MiB", 0x8008, 0x200083},
		{"PD0[511] = 1 GiB - 2 MiB", 0x8000 + 511*8, 0x3FE00083},
		{"PD1[0] = 1 GiB", 0x9000, 0x40000083},
		{"PD1[1] = 1 GiB + 2 MiB", 0x9008, 0x40200083},
		{"PD1[2] empty", 0x9010, 0},
		{"GDT null", 0x7000, 0},
		{"GDT code64", 0x7008, 0x00AF9B000000FFFF},
		{"GDT data", 0x7010, 0x00CF93000000FFFF},
		// TSS at 0x7100, limit 0x67, busy 64-bit TSS present (0x8B).
		{"GDT TSS low", 0x7018, 0x00008B0071000067},
		{"GDT TSS high", 0x7020, 0},
	} {
		if got := q(c.gpa); got != c.want {
			t.Errorf("%s at %#x = %#x, want %#x", c.name, c.gpa, got, c.want)
		}
	}
	for i, v := range mem {
		if (i < tables || i >= tables+0x5000) && v != 0 {
			t.Fatalf("LongMode wrote outside its tables at %#x", i)
		}
	}
	if diff := cmp.Diff(kvm.Regs{RIP: 0x10000, RSP: 0x80000, RFLAGS: 2}, b.Regs); diff != "" {
		t.Errorf("Regs (-want +got):\n%s", diff)
	}

	cur := kvm.Sregs{APICBase: 0xfee00900, CR8: 3, CR2: 0x1234, InterruptBitmap: [4]uint64{1}}
	s := b.Sregs(cur)
	code := kvm.Segment{Limit: 0xFFFFFFFF, Selector: 8, Type: 11, Present: 1, S: 1, L: 1, G: 1}
	data := kvm.Segment{Limit: 0xFFFFFFFF, Selector: 0x10, Type: 3, Present: 1, S: 1, DB: 1, G: 1}
	want := kvm.Sregs{
		CS: code, DS: data, ES: data, FS: data, GS: data, SS: data,
		TR:  kvm.Segment{Base: 0x7100, Limit: 0x67, Selector: 0x18, Type: 11, Present: 1},
		LDT: kvm.Segment{Unusable: 1},
		GDT: kvm.DTable{Base: 0x7000, Limit: 39},
		// PG | WP | NE | ET | MP | PE
		CR0: 0x80010033, CR2: 0x1234, CR3: 0x5000,
		// OSXMMEXCPT | OSFXSR | PAE
		CR4: 0x620, CR8: 3,
		// LMA | LME
		EFER: 0x500, APICBase: 0xfee00900, InterruptBitmap: [4]uint64{1},
	}
	if diff := cmp.Diff(want, s); diff != "" {
		t.Errorf("Sregs (-want +got):\n%s", diff)
	}
}

func TestLongModeTSSHighBase(t *testing.T) {
	// Tables above 4 GiB: the TSS descriptor's base spans both halves.
	const tables = 0x1_2345_6000
	mem := make([]byte, 0x6000)
	if _, err := LongMode(Flat{Mem: mem, Base: tables}, LongModeConfig{TablesGPA: tables, MapSize: 2 << 20}); err != nil {
		t.Fatal(err)
	}
	lo := binary.LittleEndian.Uint64(mem[0x2018:])
	hi := binary.LittleEndian.Uint64(mem[0x2020:])
	// Base 0x1_2345_8100: bits 23:0 = 0x458100 at 16, bits 31:24 = 0x23 at 56.
	if lo != 0x23008B4581000067 || hi != 1 {
		t.Errorf("TSS descriptor %#x %#x", lo, hi)
	}
}

func TestLongModeConfigErrors(t *testing.T) {
	mem := make([]byte, 1<<20)
	for _, c := range []struct {
		name string
		cfg  LongModeConfig
		want error
	}{
		{"tables unaligned", LongModeConfig{TablesGPA: 0x1800, MapSize: 2 << 20}, ErrConfig},
		{"map size 0", LongModeConfig{TablesGPA: 0x1000}, ErrConfig},
		{"map size not 2 MiB", LongModeConfig{TablesGPA: 0x1000, MapSize: 3 << 20}, ErrConfig},
		{"map size above 512 GiB", LongModeConfig{TablesGPA: 0x1000, MapSize: 513 << 30}, ErrConfig},
		{"tables above physical space", LongModeConfig{TablesGPA: 1 << 60, MapSize: 2 << 20}, ErrConfig},
		{"tables outside memory", LongModeConfig{TablesGPA: 1 << 20, MapSize: 2 << 20}, ErrOutside},
		{"tables run past memory", LongModeConfig{TablesGPA: 1<<20 - 0x1000, MapSize: 2 << 20}, ErrOutside},
	} {
		b, err := LongMode(Flat{Mem: mem}, c.cfg)
		if !errors.Is(err, c.want) || b != nil {
			t.Errorf("%s: %v, %v; want %v", c.name, b, err, c.want)
		}
	}
	for i, v := range mem {
		if v != 0 {
			t.Fatalf("a refused config wrote at %#x", i)
		}
	}
}

func TestFlat(t *testing.T) {
	f := Flat{Mem: make([]byte, 0x100), Base: 0x1000}
	if n, err := f.WriteAt([]byte{1, 2, 3}, 0x10fd); n != 3 || err != nil {
		t.Fatalf("write at the end: %d, %v", n, err)
	}
	got := make([]byte, 4)
	if n, err := f.ReadAt(got, 0x10fc); n != 4 || err != nil || !cmp.Equal(got, []byte{0, 1, 2, 3}) {
		t.Fatalf("read back: %d, %v, %x", n, err, got)
	}
	for _, gpa := range []int64{0xfff, 0x10fe, 0x1100, -1, 1 << 62} {
		if n, err := f.WriteAt([]byte{9, 9, 9}, gpa); !errors.Is(err, ErrOutside) || n != 0 {
			t.Errorf("write 3 at %#x: %d, %v", gpa, n, err)
		}
		if n, err := f.ReadAt(got[:3], gpa); !errors.Is(err, ErrOutside) || n != 0 {
			t.Errorf("read 3 at %#x: %d, %v", gpa, n, err)
		}
	}
	if n, err := f.WriteAt(nil, 0x1100); n != 0 || err != nil {
		t.Errorf("empty write at the end: %d, %v", n, err)
	}
}

// FuzzFlat checks Flat's bounds against a plain model: an access succeeds
// exactly when it lies inside [Base, Base+len(Mem)), and then touches
// exactly those bytes.
func FuzzFlat(f *testing.F) {
	f.Add(uint64(0x1000), uint16(0x100), int64(0x10fd), uint16(3))
	f.Add(uint64(0), uint16(16), int64(-1), uint16(1))
	f.Add(uint64(1<<63), uint16(16), int64(1<<62), uint16(16))
	f.Add(^uint64(0)-4, uint16(4), int64(-5), uint16(2))
	f.Fuzz(func(t *testing.T, base uint64, size uint16, gpa int64, n uint16) {
		fl := Flat{Mem: make([]byte, size), Base: base}
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(i + 1)
		}
		inside := gpa >= 0 && uint64(gpa) >= base &&
			uint64(gpa)-base <= uint64(size) && uint64(size)-(uint64(gpa)-base) >= uint64(n)
		w, err := fl.WriteAt(p, gpa)
		if inside != (err == nil) {
			t.Fatalf("WriteAt(%d bytes, %#x) on [%#x, +%#x): %v", n, gpa, base, size, err)
		}
		if !inside {
			if w != 0 {
				t.Fatalf("refused write reports %d bytes", w)
			}
			return
		}
		off := uint64(gpa) - base
		for i, v := range fl.Mem {
			want := byte(0)
			if uint64(i) >= off && uint64(i) < off+uint64(n) {
				want = byte(uint64(i) - off + 1)
			}
			if v != want {
				t.Fatalf("byte %d = %d, want %d", i, v, want)
			}
		}
		q := make([]byte, n)
		if r, err := fl.ReadAt(q, gpa); err != nil || r != int(n) || !cmp.Equal(p, q) {
			t.Fatalf("ReadAt: %d, %v", r, err)
		}
	})
}

// FuzzLongMode checks that LongMode accepts exactly the documented configs
// and, when it does, writes only inside [TablesGPA, TablesGPA+TablesSize).
func FuzzLongMode(f *testing.F) {
	f.Add(uint64(0x1000), uint64(2<<20))
	f.Add(uint64(0x1800), uint64(2<<20))
	f.Add(uint64(0x10000), uint64(1<<30+2<<20))
	f.Add(uint64(0), uint64(512<<30))
	f.Add(uint64(1<<20), uint64(0))
	f.Fuzz(func(t *testing.T, tablesGPA, mapSize uint64) {
		const memSize = 1 << 20
		mem := make([]byte, memSize)
		_, err := LongMode(Flat{Mem: mem}, LongModeConfig{TablesGPA: tablesGPA, MapSize: mapSize})
		valid := tablesGPA%0x1000 == 0 && mapSize != 0 && mapSize%(2<<20) == 0 && mapSize <= 512<<30 && tablesGPA <= 1<<52
		fits := valid && tablesGPA < memSize && TablesSize(mapSize) <= memSize-tablesGPA
		if fits != (err == nil) {
			t.Fatalf("LongMode(%#x, %#x) = %v; valid %v, fits %v", tablesGPA, mapSize, err, valid, fits)
		}
		if err != nil {
			if valid && !errors.Is(err, ErrOutside) || !valid && !errors.Is(err, ErrConfig) {
				t.Fatalf("LongMode(%#x, %#x): wrong error %v", tablesGPA, mapSize, err)
			}
			return
		}
		for i, v := range mem {
			if v != 0 && (uint64(i) < tablesGPA || uint64(i) >= tablesGPA+TablesSize(mapSize)) {
				t.Fatalf("wrote at %#x outside the tables", i)
			}
		}
	})
}
