//go:build linux

package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
)

// mapSize is the size of a vCPU mapping on x86-64 hosts (kvm_run page, PIO
// page, coalesced MMIO page); the test images use it so that I/O data can
// sit at its usual offset, 4096.
const mapSize = 3 * 4096

// img builds a kvm_run image. Offsets are written as literal numbers from
// the reference, not with the decoder's constants, so that a wrong constant
// shows up as a failing case.
type img []byte

func newImg(reason uint32) img {
	b := make(img, mapSize)
	binary.LittleEndian.PutUint32(b[8:], reason)
	return b
}

func (b img) u8(off int, v uint8) img   { b[off] = v; return b }
func (b img) u16(off int, v uint16) img { binary.LittleEndian.PutUint16(b[off:], v); return b }
func (b img) u32(off int, v uint32) img { binary.LittleEndian.PutUint32(b[off:], v); return b }
func (b img) u64(off int, v uint64) img { binary.LittleEndian.PutUint64(b[off:], v); return b }
func (b img) bytes(off int, v ...byte) img {
	copy(b[off:], v)
	return b
}

// ioImg is an I/O exit: direction @32, size @33, port @34, count @36,
// data_offset @40.
func ioImg(dir, size uint8, port uint16, count uint32, dataOff uint64) img {
	return newImg(2).u8(32, dir).u8(33, size).u16(34, port).u32(36, count).u64(40, dataOff)
}

// mmioImg is an MMIO exit: phys_addr @32, data @40, len @48, is_write @52.
func mmioImg(addr uint64, n uint32, write uint8, data ...byte) img {
	return newImg(6).u64(32, addr).bytes(40, data...).u32(48, n).u8(52, write)
}

// hcImg is a hypercall exit: nr @32, args @40.., ret @88, flags @96.
func hcImg(nr uint64, args [6]uint64, ret, flags uint64) img {
	b := newImg(3).u64(32, nr).u64(88, ret).u64(96, flags)
	for i, a := range args {
		b.u64(40+8*i, a)
	}
	return b
}

// mfImg is a memory-fault exit: flags @32, gpa @40, size @48.
func mfImg(flags, gpa, size uint64) img {
	return newImg(39).u64(32, flags).u64(40, gpa).u64(48, size)
}

func TestDecodeExit(t *testing.T) {
	for _, c := range []struct {
		name    string
		run     []byte
		runErr  error
		want    Exit
		wantErr error
	}{
		{name: "io out byte", run: ioImg(1, 1, 0x3f8, 1, 4096).bytes(4096, 'A'),
			want: IOExit{Direction: IOOut, Size: 1, Port: 0x3f8, Count: 1, DataOffset: 4096, Data: []byte{'A'}}},
		{name: "io in dword string", run: ioImg(0, 4, 0x10, 2, 4096).bytes(4096, 1, 2, 3, 4, 5, 6, 7, 8),
			want: IOExit{Direction: IOIn, Size: 4, Port: 0x10, Count: 2, DataOffset: 4096, Data: []byte{1, 2, 3, 4, 5, 6, 7, 8}}},
		{name: "io word at end of mapping", run: ioImg(1, 2, 0xffff, 1, mapSize-2).bytes(mapSize-2, 0xaa, 0xbb),
			want: IOExit{Direction: IOOut, Size: 2, Port: 0xffff, Count: 1, DataOffset: mapSize - 2, Data: []byte{0xaa, 0xbb}}},
		{name: "io bad direction", run: ioImg(2, 1, 1, 1, 4096), wantErr: ErrBadRun},
		{name: "io size 3", run: ioImg(1, 3, 1, 1, 4096), wantErr: ErrBadRun},
		{name: "io size 8", run: ioImg(1, 8, 1, 1, 4096), wantErr: ErrBadRun},
		{name: "io count 0", run: ioImg(1, 1, 1, 0, 4096), wantErr: ErrBadRun},
		{name: "io data past mapping", run: ioImg(1, 4, 1, 1, mapSize-2), wantErr: ErrBadRun},
		{name: "io data inside kvm_run", run: ioImg(0, 1, 1, 1, 100), wantErr: ErrBadRun},
		{name: "io data offset wraps", run: ioImg(1, 4, 1, 4, ^uint64(0)-3), wantErr: ErrBadRun},
		{name: "io huge count", run: ioImg(1, 4, 1, 0xffffffff, 4096), wantErr: ErrBadRun},
		{name: "io data with kvm_run only", run: ioImg(1, 1, 1, 1, 4096)[:2352], wantErr: ErrBadRun},

		{name: "mmio write 4", run: mmioImg(0xfee00000, 4, 1, 1, 2, 3, 4, 5),
			want: MMIOExit{PhysAddr: 0xfee00000, Data: []byte{1, 2, 3, 4}, IsWrite: true}},
		{name: "mmio read 8", run: mmioImg(0xd0000000, 8, 0),
			want: MMIOExit{PhysAddr: 0xd0000000, Data: make([]byte, 8)}},
		{name: "mmio len 0", run: mmioImg(0x1000, 0, 0), wantErr: ErrBadRun},
		{name: "mmio len 9", run: mmioImg(0x1000, 9, 0), wantErr: ErrBadRun},
		{name: "mmio is_write 2", run: mmioImg(0x1000, 1, 2), wantErr: ErrBadRun},

		{name: "hlt", run: newImg(5), want: HLTExit{}},
		{name: "shutdown", run: newImg(8), want: ShutdownExit{}},
		{name: "intr reason", run: newImg(10), want: IntrExit{}},
		{name: "eintr", run: newImg(2), runErr: unix.EINTR, want: IntrExit{}},
		{name: "debug is other", run: newImg(4), want: OtherExit{ExitReason: ExitDebug}},
		{name: "reason 1000 is other", run: newImg(1000), want: OtherExit{ExitReason: 1000}},
		{name: "unknown", run: newImg(0).u64(32, 0x30), want: UnknownExit{HardwareExitReason: 0x30}},
		{name: "fail entry", run: newImg(9).u64(32, 0x80000021).u32(40, 1),
			want: FailEntryExit{HardwareEntryFailureReason: 0x80000021, CPU: 1}},

		{name: "internal error", run: newImg(17).u32(32, 1).u32(36, 2).u64(40, 0xdead).u64(48, 0xbeef),
			want: InternalErrorExit{Suberror: 1, Data: []uint64{0xdead, 0xbeef}}},
		{name: "internal error no data", run: newImg(17).u32(32, 3), want: InternalErrorExit{Suberror: 3}},
		{name: "internal error ndata 17", run: newImg(17).u32(32, 1).u32(36, 17), wantErr: ErrBadRun},
		{name: "system event", run: newImg(24).u32(32, 2).u32(36, 1).u64(40, 7),
			want: SystemEventExit{Type: 2, Data: []uint64{7}}},
		{name: "system event ndata huge", run: newImg(24).u32(36, 0xffffffff), wantErr: ErrBadRun},

		{name: "hypercall map gpa 64-bit", run: hcImg(12, [6]uint64{0x100000, 16, 0x10}, 0, 1),
			want: HypercallExit{Nr: 12, Args: [6]uint64{0x100000, 16, 0x10}, Flags: 1}},
		{name: "hypercall 32-bit caller", run: hcImg(12, [6]uint64{0x1000, 1, 0}, 0, 0),
			want: HypercallExit{Nr: 12, Args: [6]uint64{0x1000, 1, 0}}},
		{name: "hypercall preset ret and old padding", run: hcImg(12, [6]uint64{}, 5, 0xabcd_0000_0000_0001),
			want: HypercallExit{Nr: 12, Ret: 5, Flags: 0xabcd_0000_0000_0001}},
		{name: "hypercall flags bit 1", run: hcImg(12, [6]uint64{}, 0, 2), wantErr: ErrBadRun},
		{name: "hypercall flags bit 31", run: hcImg(12, [6]uint64{}, 0, 1<<31|1), wantErr: ErrBadRun},

		{name: "memory fault private", run: mfImg(8, 0x200000, 0x1000), runErr: unix.EFAULT,
			want: MemoryFaultExit{GPA: 0x200000, Size: 0x1000, Flags: 8, Errno: unix.EFAULT}},
		{name: "memory fault shared wrapped errno", run: mfImg(0, 0x3000, 0x1000), runErr: fmt.Errorf("run: %w", unix.EFAULT),
			want: MemoryFaultExit{GPA: 0x3000, Size: 0x1000, Errno: unix.EFAULT}},
		{name: "memory fault hwpoison", run: mfImg(0, 0x3000, 0x1000), runErr: unix.EHWPOISON,
			want: MemoryFaultExit{GPA: 0x3000, Size: 0x1000, Errno: unix.EHWPOISON}},
		{name: "memory fault without efault", run: mfImg(8, 0x1000, 0x1000), wantErr: ErrBadRun},
		{name: "memory fault with eintr", run: mfImg(8, 0x1000, 0x1000), runErr: unix.EINTR, want: IntrExit{}},
		{name: "memory fault with einval", run: mfImg(8, 0x1000, 0x1000), runErr: unix.EINVAL, wantErr: unix.EINVAL},
		{name: "memory fault unknown flag", run: mfImg(9, 0x1000, 0x1000), runErr: unix.EFAULT, wantErr: ErrBadRun},
		{name: "memory fault size 0", run: mfImg(8, 0x1000, 0), runErr: unix.EFAULT, wantErr: ErrBadRun},
		{name: "memory fault wraps", run: mfImg(8, ^uint64(0)&^0xfff, 0x2000), runErr: unix.EFAULT, wantErr: ErrBadRun},
		{name: "efault without memory fault", run: newImg(2), runErr: unix.EFAULT, wantErr: unix.EFAULT},

		{name: "einval", run: newImg(5), runErr: unix.EINVAL, wantErr: unix.EINVAL},
		{name: "short buffer", run: make([]byte, 2351), wantErr: ErrBadRun},
		{name: "short buffer with error", run: make([]byte, 10), runErr: unix.EINTR, wantErr: ErrBadRun},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := DecodeExit(c.run, c.runErr)
			if c.wantErr != nil {
				if !errors.Is(err, c.wantErr) {
					t.Fatalf("DecodeExit = %#v, %v; want error %v", got, err, c.wantErr)
				}
				if c.wantErr != ErrBadRun && errors.Is(err, ErrBadRun) {
					t.Errorf("error %v also claims a malformed kvm_run", err)
				}
				if got != nil {
					t.Errorf("exit %#v returned with error", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("DecodeExit: %v", err)
			}
			if diff := cmp.Diff(c.want, got); diff != "" {
				t.Errorf("DecodeExit (-want +got):\n%s", diff)
			}
			if got.Reason() != c.want.Reason() {
				t.Errorf("Reason = %v, want %v", got.Reason(), c.want.Reason())
			}
		})
	}
}

// TestExitDataAliasesRun checks that the VMM's answer to an "in" or an MMIO
// read lands in the kvm_run buffer, where KVM picks it up.
func TestExitDataAliasesRun(t *testing.T) {
	run := ioImg(0, 4, 0x60, 1, 4096)
	ex, err := DecodeExit(run, nil)
	if err != nil {
		t.Fatal(err)
	}
	copy(ex.(IOExit).Data, []byte{9, 8, 7, 6})
	if got := binary.LittleEndian.Uint32(run[4096:]); got != 0x06070809 {
		t.Errorf("PIO data page holds %#x after writing the in result", got)
	}
	run = mmioImg(0xd0000000, 2, 0)
	ex, err = DecodeExit(run, nil)
	if err != nil {
		t.Fatal(err)
	}
	copy(ex.(MMIOExit).Data, []byte{0x34, 0x12, 0xff})
	if got := binary.LittleEndian.Uint16(run[40:]); got != 0x1234 || run[42] != 0 {
		t.Errorf("mmio.data holds %#x, %#x after writing the read result", got, run[42])
	}
}

func TestSetHypercallRet(t *testing.T) {
	run := hcImg(12, [6]uint64{0x1000, 1, 0x10}, 0, 1)
	if err := SetHypercallRet(run, HypercallRetEINVAL); err != nil {
		t.Fatal(err)
	}
	if got := binary.LittleEndian.Uint64(run[88:]); got != 22 {
		t.Errorf("ret @88 = %d, want 22", got)
	}
	ex, err := DecodeExit(run, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := ex.(HypercallExit).Ret; got != 22 {
		t.Errorf("decoded Ret = %d, want 22", got)
	}
	before := append([]byte(nil), run...)
	if err := SetHypercallRet(newImg(5), 0); err == nil {
		t.Error("SetHypercallRet on an HLT exit succeeded")
	}
	if err := SetHypercallRet(run[:100], 0); !errors.Is(err, ErrBadRun) {
		t.Errorf("SetHypercallRet on a short buffer: %v", err)
	}
	if diff := cmp.Diff(before, []byte(run)); diff != "" {
		t.Errorf("failed calls changed the buffer:\n%s", diff)
	}
}

func TestDecodeMapGPARange(t *testing.T) {
	const top = ^uint64(0) &^ 0xfff // last page
	for _, c := range []struct {
		name               string
		gpa, pages, attrs  uint64
		want               MapGPARange
		wantErr            error
		wantSize, wantSpan uint64
	}{
		{name: "4k shared", gpa: 0x1000, pages: 1, attrs: 0,
			want: MapGPARange{GPA: 0x1000, Pages: 1, PageSize: 4096}},
		{name: "2m private", gpa: 0x200000, pages: 512, attrs: 0x11,
			want: MapGPARange{GPA: 0x200000, Pages: 512, ToPrivate: true, PageSize: 2 << 20}},
		{name: "1g shared", gpa: 1 << 30, pages: 1 << 18, attrs: 2,
			want: MapGPARange{GPA: 1 << 30, Pages: 1 << 18, PageSize: 1 << 30}},
		{name: "ends one page below the top", gpa: top - 0x1000, pages: 1, attrs: 0x10,
			want: MapGPARange{GPA: top - 0x1000, Pages: 1, ToPrivate: true, PageSize: 4096}},
		{name: "unaligned", gpa: 0x1001, pages: 1, wantErr: ErrMapGPAUnaligned},
		{name: "half page", gpa: 0x800, pages: 1, wantErr: ErrMapGPAUnaligned},
		{name: "zero pages", gpa: 0x1000, pages: 0, wantErr: ErrMapGPAZeroPages},
		{name: "wraps", gpa: top, pages: 2, wantErr: ErrMapGPAWrap},
		// The kernel's gfn check lets this one through, but its end, 2^64,
		// cannot be expressed as a range.
		{name: "reaches 2^64", gpa: top, pages: 1, wantErr: ErrMapGPAWrap},
		{name: "pages overflow bytes", gpa: 0, pages: 1 << 52, wantErr: ErrMapGPAWrap},
		{name: "all pages", gpa: 0, pages: ^uint64(0), wantErr: ErrMapGPAWrap},
		{name: "page size 3", gpa: 0, pages: 1, attrs: 3, wantErr: ErrMapGPAAttributes},
		{name: "page size 15 encrypted", gpa: 0, pages: 1, attrs: 0x1f, wantErr: ErrMapGPAAttributes},
		{name: "bit 5", gpa: 0, pages: 1, attrs: 0x20, wantErr: ErrMapGPAAttributes},
		{name: "bit 63", gpa: 0, pages: 1, attrs: 1 << 63, wantErr: ErrMapGPAAttributes},
		{name: "enc stat 2", gpa: 0, pages: 1, attrs: 2 << 4, wantErr: ErrMapGPAAttributes},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := DecodeMapGPARange(c.gpa, c.pages, c.attrs)
			// The same request through a hypercall exit decoded from bytes.
			ex, derr := DecodeExit(hcImg(12, [6]uint64{c.gpa, c.pages, c.attrs}, 0, 1), nil)
			if derr != nil {
				t.Fatalf("DecodeExit: %v", derr)
			}
			viaExit, verr := ex.(HypercallExit).MapGPARange()
			if c.wantErr != nil {
				var me *MapGPARangeError
				if !errors.Is(err, c.wantErr) || !errors.As(err, &me) {
					t.Fatalf("DecodeMapGPARange = %+v, %v; want *MapGPARangeError wrapping %v", got, err, c.wantErr)
				}
				if me.GPA != c.gpa || me.Pages != c.pages || me.Attributes != c.attrs {
					t.Errorf("error carries %+v", me)
				}
				if !errors.Is(verr, c.wantErr) {
					t.Errorf("via exit: %v", verr)
				}
				return
			}
			if err != nil || verr != nil {
				t.Fatalf("DecodeMapGPARange: %v; via exit: %v", err, verr)
			}
			if diff := cmp.Diff(c.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(got, viaExit); diff != "" {
				t.Errorf("via exit differs:\n%s", diff)
			}
			if r := got.Range(); r.Start != c.gpa || r.End-r.Start != c.pages*4096 || got.Size() != c.pages*4096 {
				t.Errorf("Range = %+v, Size = %#x", r, got.Size())
			}
		})
	}
	_, err := HypercallExit{Nr: 11, Args: [6]uint64{0x1000, 1}}.MapGPARange()
	if !errors.Is(err, ErrNotMapGPARange) {
		t.Errorf("MapGPARange on hypercall 11: %v", err)
	}
}

// runErrs are the KVM_RUN outcomes the fuzz target chooses from.
var runErrs = []error{nil, unix.EINTR, unix.EFAULT, unix.EHWPOISON, unix.EINVAL, unix.EAGAIN}

// FuzzDecodeExit feeds arbitrary kvm_run headers (the first 512 bytes of the
// mapping; the rest holds a fill byte) and KVM_RUN outcomes to DecodeExit and
// checks the decoder's promises: no panic, no exit with an error, data
// inside the mapping and after kvm_run, memory faults only with EFAULT or
// EHWPOISON, MAP_GPA_RANGE results that respect their own rules, and a ret
// that SetHypercallRet writes and DecodeExit reads back.
func FuzzDecodeExit(f *testing.F) {
	seeds := []img{
		ioImg(1, 1, 0x3f8, 1, 4096), ioImg(0, 4, 0x10, 3, 4096), ioImg(1, 2, 1, 1, mapSize-2),
		ioImg(2, 1, 1, 1, 4096), ioImg(1, 4, 1, 1, 100),
		mmioImg(0xfee00000, 4, 1), mmioImg(0x1000, 9, 0),
		newImg(5), newImg(8), newImg(17).u32(36, 3), newImg(24).u32(36, 16),
		hcImg(12, [6]uint64{0x1000, 1, 0x10}, 0, 1), hcImg(12, [6]uint64{0x1001, 0, 0x3}, 0, 2),
		mfImg(8, 0x1000, 0x1000), mfImg(0, ^uint64(0), 2),
	}
	for i, s := range seeds {
		f.Add([]byte(s[:512]), byte(0x5a), uint8(i%len(runErrs)))
	}
	f.Add([]byte(mfImg(8, 0x1000, 0x1000)[:512]), byte(0), uint8(2))
	f.Fuzz(func(t *testing.T, head []byte, fill byte, errSel uint8) {
		run := make([]byte, mapSize)
		for i := range run {
			run[i] = fill
		}
		copy(run, head)
		runErr := runErrs[int(errSel)%len(runErrs)]
		ex, err := DecodeExit(run, runErr)
		if err != nil {
			if ex != nil {
				t.Fatalf("exit %#v with error %v", ex, err)
			}
			return
		}
		again, err2 := DecodeExit(run, runErr)
		if err2 != nil || !cmp.Equal(ex, again) {
			t.Fatalf("decoding twice differs: %#v/%v vs %#v/%v", ex, err, again, err2)
		}
		if runErr != nil && ex.Reason() != ExitIntr && ex.Reason() != ExitMemoryFault {
			t.Fatalf("exit %v decoded after %v", ex.Reason(), runErr)
		}
		switch e := ex.(type) {
		case IOExit:
			n := uint64(e.Size) * uint64(e.Count)
			if uint64(len(e.Data)) != n || n == 0 || e.DataOffset < 2352 || e.DataOffset+n > mapSize {
				t.Fatalf("io data %d bytes at %#x (size %d count %d)", len(e.Data), e.DataOffset, e.Size, e.Count)
			}
		case MMIOExit:
			if len(e.Data) < 1 || len(e.Data) > 8 {
				t.Fatalf("mmio data %d bytes", len(e.Data))
			}
		case MemoryFaultExit:
			if e.Errno != unix.EFAULT && e.Errno != unix.EHWPOISON {
				t.Fatalf("memory fault with errno %v", e.Errno)
			}
			if e.Size == 0 || e.GPA+e.Size < e.GPA || e.Range().Len() != e.Size {
				t.Fatalf("memory fault range %#x+%#x", e.GPA, e.Size)
			}
		case HypercallExit:
			if m, err := e.MapGPARange(); err == nil {
				if e.Nr != HCMapGPARange || m.GPA%4096 != 0 || m.Pages == 0 || m.Range().Len() != m.Pages*4096 {
					t.Fatalf("accepted MAP_GPA_RANGE %+v from %+v", m, e)
				}
			} else if me := (*MapGPARangeError)(nil); e.Nr == HCMapGPARange && !errors.As(err, &me) {
				t.Fatalf("refused MAP_GPA_RANGE with %v, not a *MapGPARangeError", err)
			}
			if err := SetHypercallRet(run, e.Ret+1); err != nil {
				t.Fatal(err)
			}
			ex2, err := DecodeExit(run, nil)
			if err != nil || ex2.(HypercallExit).Ret != e.Ret+1 {
				t.Fatalf("ret written back: %#v, %v", ex2, err)
			}
		}
	})
}

// FuzzDecodeMapGPARange checks DecodeMapGPARange against a naive model
// computed with big integers.
func FuzzDecodeMapGPARange(f *testing.F) {
	f.Add(uint64(0x1000), uint64(1), uint64(0))
	f.Add(uint64(0x200000), uint64(512), uint64(0x11))
	f.Add(uint64(0x1001), uint64(1), uint64(0))
	f.Add(uint64(0), uint64(0), uint64(0x10))
	f.Add(^uint64(0)&^0xfff, uint64(1), uint64(0))
	f.Add(uint64(0), uint64(1)<<52, uint64(2))
	f.Add(uint64(0), uint64(1), uint64(3))
	f.Add(uint64(0), uint64(1), uint64(0x20))
	f.Fuzz(func(t *testing.T, gpa, pages, attrs uint64) {
		got, err := DecodeMapGPARange(gpa, pages, attrs)
		end := new(big.Int).Mul(new(big.Int).SetUint64(pages), big.NewInt(4096))
		end.Add(end, new(big.Int).SetUint64(gpa))
		limit := new(big.Int).Lsh(big.NewInt(1), 64)
		var want error
		switch {
		case gpa%4096 != 0:
			want = ErrMapGPAUnaligned
		case pages == 0:
			want = ErrMapGPAZeroPages
		case end.Cmp(limit) >= 0:
			want = ErrMapGPAWrap
		case attrs > 0x1f || attrs&0xf > 2:
			want = ErrMapGPAAttributes
		}
		if want != nil {
			if !errors.Is(err, want) {
				t.Fatalf("(%#x, %#x, %#x) = %+v, %v; want %v", gpa, pages, attrs, got, err, want)
			}
			return
		}
		if err != nil {
			t.Fatalf("(%#x, %#x, %#x): %v", gpa, pages, attrs, err)
		}
		wantM := MapGPARange{GPA: gpa, Pages: pages, ToPrivate: attrs&0x10 != 0,
			PageSize: []uint64{4096, 2 << 20, 1 << 30}[attrs&0xf]}
		if got != wantM || got.Range().End != end.Uint64() {
			t.Fatalf("(%#x, %#x, %#x) = %+v, want %+v", gpa, pages, attrs, got, wantM)
		}
	})
}
