package guest

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// The expected bytes are written by hand from the Intel SDM encodings
// (REX = 0100WRXB; ModRM = mod:2 reg:3 rm:3; SIB 0x24 = no index, base
// rsp/r12), not produced by an assembler.
func TestEncodings(t *testing.T) {
	for _, c := range []struct {
		name string
		emit func(a *Asm)
		want []byte
	}{
		{"mov rax, imm64", func(a *Asm) { a.MovImm64(RAX, 0x1122334455667788) },
			[]byte{0x48, 0xB8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11}},
		{"mov r9, 1", func(a *Asm) { a.MovImm64(R9, 1) },
			[]byte{0x49, 0xB9, 1, 0, 0, 0, 0, 0, 0, 0}},
		{"mov edx, 0x3f8", func(a *Asm) { a.MovImm32(RDX, 0x3f8) },
			[]byte{0xBA, 0xF8, 0x03, 0, 0}},
		{"mov r10d, imm32", func(a *Asm) { a.MovImm32(R10, 0x12345678) },
			[]byte{0x41, 0xBA, 0x78, 0x56, 0x34, 0x12}},
		{"mov rbx, rax", func(a *Asm) { a.Mov(RBX, RAX) }, []byte{0x48, 0x89, 0xC3}},
		{"mov r8, rsp", func(a *Asm) { a.Mov(R8, RSP) }, []byte{0x49, 0x89, 0xE0}},
		{"mov rdi, r15", func(a *Asm) { a.Mov(RDI, R15) }, []byte{0x4C, 0x89, 0xFF}},
		{"mov [rbx+0x10], rax", func(a *Asm) { a.Store(RBX, 0x10, RAX) },
			[]byte{0x48, 0x89, 0x83, 0x10, 0, 0, 0}},
		{"mov [rsp+8], rcx", func(a *Asm) { a.Store(RSP, 8, RCX) },
			[]byte{0x48, 0x89, 0x8C, 0x24, 0x08, 0, 0, 0}},
		{"mov [r12-8], r8", func(a *Asm) { a.Store(R12, -8, R8) },
			[]byte{0x4D, 0x89, 0x84, 0x24, 0xF8, 0xFF, 0xFF, 0xFF}},
		{"mov rdx, [r13+0]", func(a *Asm) { a.Load(RDX, R13, 0) },
			[]byte{0x49, 0x8B, 0x95, 0, 0, 0, 0}},
		{"mov rax, [rbp+0x1000]", func(a *Asm) { a.Load(RAX, RBP, 0x1000) },
			[]byte{0x48, 0x8B, 0x85, 0x00, 0x10, 0, 0}},
		{"mov [rbp+0x100], r15d", func(a *Asm) { a.Store32(RBP, 0x100, R15) },
			[]byte{0x44, 0x89, 0xBD, 0x00, 0x01, 0, 0}},
		{"mov eax, [rsi+4]", func(a *Asm) { a.Load32(RAX, RSI, 4) },
			[]byte{0x8B, 0x86, 0x04, 0, 0, 0}},
		{"mov r9d, [rsp]", func(a *Asm) { a.Load32(R9, RSP, 0) },
			[]byte{0x44, 0x8B, 0x8C, 0x24, 0, 0, 0, 0}},
		{"add rax, rbx", func(a *Asm) { a.Add(RAX, RBX) }, []byte{0x48, 0x01, 0xD8}},
		{"sub r11, rcx", func(a *Asm) { a.Sub(R11, RCX) }, []byte{0x49, 0x29, 0xCB}},
		{"cmp rax, rbx", func(a *Asm) { a.Cmp(RAX, RBX) }, []byte{0x48, 0x39, 0xD8}},
		{"or rdx, r8", func(a *Asm) { a.Or(RDX, R8) }, []byte{0x4C, 0x09, 0xC2}},
		{"and rcx, rdx", func(a *Asm) { a.And(RCX, RDX) }, []byte{0x48, 0x21, 0xD1}},
		{"xor rax, rax", func(a *Asm) { a.Xor(RAX, RAX) }, []byte{0x48, 0x31, 0xC0}},
		{"cmp rcx, 0x1000", func(a *Asm) { a.CmpImm(RCX, 0x1000) },
			[]byte{0x48, 0x81, 0xF9, 0x00, 0x10, 0, 0}},
		{"add rsp, -16", func(a *Asm) { a.AddImm(RSP, -16) },
			[]byte{0x48, 0x81, 0xC4, 0xF0, 0xFF, 0xFF, 0xFF}},
		{"sub rdi, 1", func(a *Asm) { a.SubImm(RDI, 1) },
			[]byte{0x48, 0x81, 0xEF, 1, 0, 0, 0}},
		{"and r8, 0xfff", func(a *Asm) { a.AndImm(R8, 0xfff) },
			[]byte{0x49, 0x81, 0xE0, 0xFF, 0x0F, 0, 0}},
		{"or rbx, 1", func(a *Asm) { a.OrImm(RBX, 1) },
			[]byte{0x48, 0x81, 0xCB, 1, 0, 0, 0}},
		{"xor r14, -1", func(a *Asm) { a.XorImm(R14, -1) },
			[]byte{0x49, 0x81, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF}},
		{"inc rcx", func(a *Asm) { a.Inc(RCX) }, []byte{0x48, 0xFF, 0xC1}},
		{"dec r15", func(a *Asm) { a.Dec(R15) }, []byte{0x49, 0xFF, 0xCF}},
		{"shl rax, 32", func(a *Asm) { a.Shl(RAX, 32) }, []byte{0x48, 0xC1, 0xE0, 0x20}},
		{"shr r9, 12", func(a *Asm) { a.Shr(R9, 12) }, []byte{0x49, 0xC1, 0xE9, 0x0C}},
		{"out 0x10, al", func(a *Asm) { a.Out(0x10, Byte) }, []byte{0xE6, 0x10}},
		{"out 0x10, ax", func(a *Asm) { a.Out(0x10, Word) }, []byte{0x66, 0xE7, 0x10}},
		{"out 0x10, eax", func(a *Asm) { a.Out(0x10, Dword) }, []byte{0xE7, 0x10}},
		{"out dx, al", func(a *Asm) { a.OutDX(Byte) }, []byte{0xEE}},
		{"out dx, ax", func(a *Asm) { a.OutDX(Word) }, []byte{0x66, 0xEF}},
		{"out dx, eax", func(a *Asm) { a.OutDX(Dword) }, []byte{0xEF}},
		{"in al, 0x60", func(a *Asm) { a.In(0x60, Byte) }, []byte{0xE4, 0x60}},
		{"in ax, 0x60", func(a *Asm) { a.In(0x60, Word) }, []byte{0x66, 0xE5, 0x60}},
		{"in eax, 0x60", func(a *Asm) { a.In(0x60, Dword) }, []byte{0xE5, 0x60}},
		{"in al, dx", func(a *Asm) { a.InDX(Byte) }, []byte{0xEC}},
		{"in eax, dx", func(a *Asm) { a.InDX(Dword) }, []byte{0xED}},
		{"hlt", func(a *Asm) { a.Hlt() }, []byte{0xF4}},
		{"ud2", func(a *Asm) { a.Ud2() }, []byte{0x0F, 0x0B}},
		{"vmmcall", func(a *Asm) { a.Vmmcall() }, []byte{0x0F, 0x01, 0xD9}},
		{"nop", func(a *Asm) { a.Nop() }, []byte{0x90}},
		{"pause", func(a *Asm) { a.Pause() }, []byte{0xF3, 0x90}},
		{"raw", func(a *Asm) { a.Raw(1, 2, 3) }, []byte{1, 2, 3}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var a Asm
			c.emit(&a)
			got, err := a.Assemble()
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(c.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
			if a.Len() != len(c.want) {
				t.Errorf("Len = %d, want %d", a.Len(), len(c.want))
			}
		})
	}
}

func TestBranches(t *testing.T) {
	for _, c := range []struct {
		name string
		emit func(a *Asm)
		want []byte
	}{
		// 0: nop; 1: jne fwd (ends at 7, rel 5); 7: jmp top (ends at 12, rel
		// -12); 12: fwd: hlt.
		{"forward and backward", func(a *Asm) {
			top, fwd := a.NewLabel(), a.NewLabel()
			a.Bind(top)
			a.Nop()
			a.J(NotEqual, fwd)
			a.Jmp(top)
			a.Bind(fwd)
			a.Hlt()
		}, []byte{0x90, 0x0F, 0x85, 5, 0, 0, 0, 0xE9, 0xF4, 0xFF, 0xFF, 0xFF, 0xF4}},
		{"jump to itself", func(a *Asm) {
			l := a.NewLabel()
			a.Bind(l)
			a.Jmp(l)
		}, []byte{0xE9, 0xFB, 0xFF, 0xFF, 0xFF}},
		{"jb and jg to next instruction", func(a *Asm) {
			l := a.NewLabel()
			a.J(Below, l)
			a.J(Greater, l)
			a.Bind(l)
		}, []byte{0x0F, 0x82, 6, 0, 0, 0, 0x0F, 0x8F, 0, 0, 0, 0}},
		// 0: nop; 1: dec rcx (3 bytes); 4: jnz top (ends at 10, rel -10).
		{"loop", func(a *Asm) {
			top := a.NewLabel()
			a.Bind(top)
			a.Nop()
			a.Loop(RCX, top)
		}, []byte{0x90, 0x48, 0xFF, 0xC9, 0x0F, 0x85, 0xF6, 0xFF, 0xFF, 0xFF}},
		// lea rax, [rip+1] ends at 7; hlt at 7; data at 8.
		{"lea label", func(a *Asm) {
			data := a.NewLabel()
			a.LeaLabel(RAX, data)
			a.Hlt()
			a.Bind(data)
			a.Raw(0xAA)
		}, []byte{0x48, 0x8D, 0x05, 1, 0, 0, 0, 0xF4, 0xAA}},
		{"lea r12 backward", func(a *Asm) {
			l := a.NewLabel()
			a.Bind(l)
			a.LeaLabel(R12, l)
		}, []byte{0x4C, 0x8D, 0x25, 0xF9, 0xFF, 0xFF, 0xFF}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var a Asm
			c.emit(&a)
			got, err := a.Assemble()
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(c.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestAsmErrors(t *testing.T) {
	for _, c := range []struct {
		name string
		emit func(a *Asm)
		want error
	}{
		{"register 16", func(a *Asm) { a.MovImm64(16, 0) }, ErrOperand},
		{"store base 16", func(a *Asm) { a.Store(16, 0, RAX) }, ErrOperand},
		{"add src 200", func(a *Asm) { a.Add(RAX, 200) }, ErrOperand},
		{"width 3", func(a *Asm) { a.Out(0x10, 3) }, ErrOperand},
		{"width 8", func(a *Asm) { a.InDX(8) }, ErrOperand},
		{"condition 16", func(a *Asm) { l := a.NewLabel(); a.Bind(l); a.J(16, l) }, ErrOperand},
		{"shift 64", func(a *Asm) { a.Shl(RAX, 64) }, ErrOperand},
		{"unbound label", func(a *Asm) { a.Jmp(a.NewLabel()) }, ErrLabel},
		{"label bound twice", func(a *Asm) { l := a.NewLabel(); a.Bind(l); a.Nop(); a.Bind(l) }, ErrLabel},
		{"zero label", func(a *Asm) { a.Jmp(0) }, ErrLabel},
		{"label from elsewhere", func(a *Asm) { a.Bind(Label(3)) }, ErrLabel},
		{"first error kept", func(a *Asm) { a.Out(1, 5); a.Jmp(0) }, ErrOperand},
	} {
		t.Run(c.name, func(t *testing.T) {
			var a Asm
			c.emit(&a)
			a.Hlt()
			code, err := a.Assemble()
			if !errors.Is(err, c.want) || code != nil {
				t.Errorf("Assemble = %x, %v; want %v", code, err, c.want)
			}
		})
	}
}

// TestAssembleTwice checks that Assemble leaves the program usable and
// returns a copy.
func TestAssembleTwice(t *testing.T) {
	var a Asm
	l := a.NewLabel()
	a.Jmp(l)
	a.Bind(l)
	first, err := a.Assemble()
	if err != nil {
		t.Fatal(err)
	}
	first[0] = 0
	a.Hlt()
	second, err := a.Assemble()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]byte{0xE9, 0, 0, 0, 0, 0xF4}, second); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}
