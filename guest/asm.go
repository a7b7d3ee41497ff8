// Package guest holds the building blocks of gmem's built-in x86-64 test
// guest: a small instruction encoder ([Asm]) for the handful of instructions
// such a guest needs, and [LongMode], which writes page tables and a GDT
// into guest memory and gives the register state that starts a vCPU directly
// in 64-bit mode.
//
// The guest talks to its VMM only through port I/O and hlt: hypercall
// instructions (vmcall, vmmcall) hang KVM_RUN under nested KVM of the PVM
// kind, and real-mode start-up code is unreliable there, so guests start in
// long mode and never leave it.
package guest

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Reg is a 64-bit general-purpose register, numbered as in the instruction
// encoding (the low three bits go in ModRM, the fourth in REX).
type Reg uint8

// The general-purpose registers.
const (
	RAX Reg = iota
	RCX
	RDX
	RBX
	RSP
	RBP
	RSI
	RDI
	R8
	R9
	R10
	R11
	R12
	R13
	R14
	R15
)

var regNames = [...]string{"rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
	"r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"}

// String returns the register's assembler name.
func (r Reg) String() string {
	if int(r) < len(regNames) {
		return regNames[r]
	}
	return fmt.Sprintf("reg(%d)", uint8(r))
}

// Width is the operand size of a port I/O instruction, in bytes.
type Width uint8

// Port I/O widths: al, ax, eax.
const (
	Byte  Width = 1
	Word  Width = 2
	Dword Width = 4
)

// Cond is a jcc condition, the low nibble of its opcode.
type Cond uint8

// Conditions. Unsigned comparisons use Below/Above, signed ones Less/Greater.
const (
	Overflow       Cond = 0x0
	NoOverflow     Cond = 0x1
	Below          Cond = 0x2 // CF=1 (unsigned <)
	AboveOrEqual   Cond = 0x3 // CF=0 (unsigned >=)
	Equal          Cond = 0x4 // ZF=1
	NotEqual       Cond = 0x5 // ZF=0
	BelowOrEqual   Cond = 0x6 // unsigned <=
	Above          Cond = 0x7 // unsigned >
	Sign           Cond = 0x8
	NoSign         Cond = 0x9
	Parity         Cond = 0xA
	NoParity       Cond = 0xB
	Less           Cond = 0xC // signed <
	GreaterOrEqual Cond = 0xD // signed >=
	LessOrEqual    Cond = 0xE // signed <=
	Greater        Cond = 0xF // signed >
)

// Label names a position in the code for jumps and RIP-relative addresses.
// The zero Label is not a label; make them with [Asm.NewLabel].
type Label int

// Asm assembles x86-64 machine code. The zero value is ready to use.
// Instructions are appended in call order; the first encoding error is kept
// and reported by Assemble, so a program can be written without checking
// every call. All memory operands are [base+disp32] and all immediates and
// branch displacements full-width, so each instruction has exactly one
// encoding and the output is easy to check by hand.
type Asm struct {
	buf    []byte
	labels []int // position of each label, -1 until bound
	fixups []fixup
	err    error
}

// fixup is a rel32 field at buf[at:at+4] that must point at label, counted
// from the end of the instruction, end.
type fixup struct {
	at, end int
	label   Label
}

// Errors kept by Asm and returned by Assemble (wrapped with detail).
var (
	// ErrOperand is a register, width or condition out of range.
	ErrOperand = errors.New("guest asm: invalid operand")
	// ErrLabel is a label that was never made, bound twice, or never bound.
	ErrLabel = errors.New("guest asm: bad label")
)

func (a *Asm) fail(err error, format string, args ...any) {
	if a.err == nil {
		a.err = fmt.Errorf("%w: "+format, append([]any{err}, args...)...)
	}
}

// Len returns the number of bytes emitted so far: the offset the next
// instruction will have.
func (a *Asm) Len() int { return len(a.buf) }

// NewLabel returns a new, unbound label.
func (a *Asm) NewLabel() Label {
	a.labels = append(a.labels, -1)
	return Label(len(a.labels))
}

// Bind binds l to the current position.
func (a *Asm) Bind(l Label) {
	if !a.validLabel(l) {
		return
	}
	if a.labels[l-1] >= 0 {
		a.fail(ErrLabel, "label %d bound twice", l)
		return
	}
	a.labels[l-1] = len(a.buf)
}

func (a *Asm) validLabel(l Label) bool {
	if l <= 0 || int(l) > len(a.labels) {
		a.fail(ErrLabel, "label %d was not made by NewLabel", l)
		return false
	}
	return true
}

// Assemble resolves the labels and returns the machine code, or the first
// error met while building it.
func (a *Asm) Assemble() ([]byte, error) {
	if a.err != nil {
		return nil, a.err
	}
	out := append([]byte(nil), a.buf...)
	for _, f := range a.fixups {
		pos := a.labels[f.label-1]
		if pos < 0 {
			return nil, fmt.Errorf("%w: label %d used but never bound", ErrLabel, f.label)
		}
		binary.LittleEndian.PutUint32(out[f.at:], uint32(int32(pos-f.end)))
	}
	return out, nil
}

// Raw appends bytes as they are, for data or instructions Asm lacks.
func (a *Asm) Raw(b ...byte) { a.buf = append(a.buf, b...) }

func (a *Asm) checkReg(rs ...Reg) bool {
	for _, r := range rs {
		if r > R15 {
			a.fail(ErrOperand, "register %d", r)
			return false
		}
	}
	return true
}

// rex emits a REX prefix for operand size w (REX.W), ModRM.reg extension
// from reg and ModRM.rm/SIB.base extension from rm, if any bit is needed.
func (a *Asm) rex(w bool, reg, rm Reg) {
	b := byte(0x40)
	if w {
		b |= 0x08
	}
	b |= byte(reg>>3) << 2
	b |= byte(rm >> 3)
	if b != 0x40 {
		a.buf = append(a.buf, b)
	}
}

func (a *Asm) u32(v uint32) { a.buf = binary.LittleEndian.AppendUint32(a.buf, v) }

// regReg emits op with ModRM mod=11: reg field reg, rm field rm.
func (a *Asm) regReg(w bool, op byte, reg, rm Reg) {
	if !a.checkReg(reg, rm) {
		return
	}
	a.rex(w, reg, rm)
	a.buf = append(a.buf, op, 0xC0|byte(reg&7)<<3|byte(rm&7))
}

// mem emits op with a [base+disp32] operand (ModRM mod=10). RSP and R12 as
// base need a SIB byte (0x24: no index, that base).
func (a *Asm) mem(w bool, op byte, reg, base Reg, disp int32) {
	if !a.checkReg(reg, base) {
		return
	}
	a.rex(w, reg, base)
	a.buf = append(a.buf, op, 0x80|byte(reg&7)<<3|byte(base&7))
	if base&7 == 4 {
		a.buf = append(a.buf, 0x24)
	}
	a.u32(uint32(disp))
}

// MovImm64 is mov dst, imm64 (REX.W B8+r io).
func (a *Asm) MovImm64(dst Reg, imm uint64) {
	if !a.checkReg(dst) {
		return
	}
	a.rex(true, 0, dst)
	a.buf = append(a.buf, 0xB8+byte(dst&7))
	a.buf = binary.LittleEndian.AppendUint64(a.buf, imm)
}

// MovImm32 is mov dst32, imm32 (B8+r id), which zero-extends into the full
// 64-bit register.
func (a *Asm) MovImm32(dst Reg, imm uint32) {
	if !a.checkReg(dst) {
		return
	}
	a.rex(false, 0, dst)
	a.buf = append(a.buf, 0xB8+byte(dst&7))
	a.u32(imm)
}

// Mov is mov dst, src (REX.W 89 /r).
func (a *Asm) Mov(dst, src Reg) { a.regReg(true, 0x89, src, dst) }

// Store is mov qword [base+disp], src (REX.W 89 /r).
func (a *Asm) Store(base Reg, disp int32, src Reg) { a.mem(true, 0x89, src, base, disp) }

// Load is mov dst, qword [base+disp] (REX.W 8B /r).
func (a *Asm) Load(dst, base Reg, disp int32) { a.mem(true, 0x8B, dst, base, disp) }

// Store32 is mov dword [base+disp], src32 (89 /r).
func (a *Asm) Store32(base Reg, disp int32, src Reg) { a.mem(false, 0x89, src, base, disp) }

// Load32 is mov dst32, dword [base+disp] (8B /r), zero-extending.
func (a *Asm) Load32(dst, base Reg, disp int32) { a.mem(false, 0x8B, dst, base, disp) }

// LeaLabel is lea dst, [rip+rel32] with the displacement pointing at l
// (REX.W 8D /r, ModRM mod=00 rm=101): the run-time address of l, whatever
// address the code is loaded at.
func (a *Asm) LeaLabel(dst Reg, l Label) {
	if !a.checkReg(dst) || !a.validLabel(l) {
		return
	}
	a.rex(true, dst, 0)
	a.buf = append(a.buf, 0x8D, byte(dst&7)<<3|0x05)
	a.rel32(l)
}

// ALU operations: the /digit of opcode 81 and the opcode of the reg, reg form.
type aluOp struct {
	digit byte
	rr    byte
}

var (
	opAdd = aluOp{0, 0x01}
	opOr  = aluOp{1, 0x09}
	opAnd = aluOp{4, 0x21}
	opSub = aluOp{5, 0x29}
	opXor = aluOp{6, 0x31}
	opCmp = aluOp{7, 0x39}
)

func (a *Asm) aluImm(op aluOp, dst Reg, imm int32) {
	if !a.checkReg(dst) {
		return
	}
	a.rex(true, 0, dst)
	a.buf = append(a.buf, 0x81, 0xC0|op.digit<<3|byte(dst&7))
	a.u32(uint32(imm))
}

// AddImm is add dst, imm32 (REX.W 81 /0 id; imm sign-extended).
func (a *Asm) AddImm(dst Reg, imm int32) { a.aluImm(opAdd, dst, imm) }

// SubImm is sub dst, imm32 (REX.W 81 /5 id).
func (a *Asm) SubImm(dst Reg, imm int32) { a.aluImm(opSub, dst, imm) }

// CmpImm is cmp dst, imm32 (REX.W 81 /7 id).
func (a *Asm) CmpImm(dst Reg, imm int32) { a.aluImm(opCmp, dst, imm) }

// AndImm is and dst, imm32 (REX.W 81 /4 id).
func (a *Asm) AndImm(dst Reg, imm int32) { a.aluImm(opAnd, dst, imm) }

// OrImm is or dst, imm32 (REX.W 81 /1 id).
func (a *Asm) OrImm(dst Reg, imm int32) { a.aluImm(opOr, dst, imm) }

// XorImm is xor dst, imm32 (REX.W 81 /6 id).
func (a *Asm) XorImm(dst Reg, imm int32) { a.aluImm(opXor, dst, imm) }

// Add is add dst, src (REX.W 01 /r).
func (a *Asm) Add(dst, src Reg) { a.regReg(true, opAdd.rr, src, dst) }

// Sub is sub dst, src (REX.W 29 /r).
func (a *Asm) Sub(dst, src Reg) { a.regReg(true, opSub.rr, src, dst) }

// Cmp is cmp dst, src (REX.W 39 /r): flags from dst - src.
func (a *Asm) Cmp(dst, src Reg) { a.regReg(true, opCmp.rr, src, dst) }

// And is and dst, src (REX.W 21 /r).
func (a *Asm) And(dst, src Reg) { a.regReg(true, opAnd.rr, src, dst) }

// Or is or dst, src (REX.W 09 /r).
func (a *Asm) Or(dst, src Reg) { a.regReg(true, opOr.rr, src, dst) }

// Xor is xor dst, src (REX.W 31 /r).
func (a *Asm) Xor(dst, src Reg) { a.regReg(true, opXor.rr, src, dst) }

// Inc is inc dst (REX.W FF /0).
func (a *Asm) Inc(dst Reg) { a.regReg(true, 0xFF, 0, dst) }

// Dec is dec dst (REX.W FF /1).
func (a *Asm) Dec(dst Reg) { a.regReg(true, 0xFF, 1, dst) }

func (a *Asm) shift(digit byte, dst Reg, n uint8) {
	if !a.checkReg(dst) {
		return
	}
	if n > 63 {
		a.fail(ErrOperand, "shift count %d", n)
		return
	}
	a.rex(true, 0, dst)
	a.buf = append(a.buf, 0xC1, 0xC0|digit<<3|byte(dst&7), n)
}

// Shl is shl dst, imm8 (REX.W C1 /4 ib), n at most 63.
func (a *Asm) Shl(dst Reg, n uint8) { a.shift(4, dst, n) }

// Shr is shr dst, imm8 (REX.W C1 /5 ib), n at most 63.
func (a *Asm) Shr(dst Reg, n uint8) { a.shift(5, dst, n) }

// rel32 emits a 4-byte displacement to l, counted from the end of these 4
// bytes (the end of every instruction that uses it here).
func (a *Asm) rel32(l Label) {
	at := len(a.buf)
	a.buf = append(a.buf, 0, 0, 0, 0)
	a.fixups = append(a.fixups, fixup{at: at, end: at + 4, label: l})
}

// Jmp is jmp rel32 to l (E9 cd).
func (a *Asm) Jmp(l Label) {
	if !a.validLabel(l) {
		return
	}
	a.buf = append(a.buf, 0xE9)
	a.rel32(l)
}

// J is jcc rel32 to l (0F 80+cc cd).
func (a *Asm) J(c Cond, l Label) {
	if c > 0xF {
		a.fail(ErrOperand, "condition %d", c)
		return
	}
	if !a.validLabel(l) {
		return
	}
	a.buf = append(a.buf, 0x0F, 0x80+byte(c))
	a.rel32(l)
}

// Loop is dec counter; jnz l: run the code from l again until counter,
// decremented each time, reaches zero.
func (a *Asm) Loop(counter Reg, l Label) {
	a.Dec(counter)
	a.J(NotEqual, l)
}

// ioOp emits a port I/O opcode: base is the byte form, base+1 the word and
// dword form, and a 66 prefix selects word.
func (a *Asm) ioOp(w Width, base byte) bool {
	switch w {
	case Byte:
		a.buf = append(a.buf, base)
	case Word:
		a.buf = append(a.buf, 0x66, base+1)
	case Dword:
		a.buf = append(a.buf, base+1)
	default:
		a.fail(ErrOperand, "port I/O width %d", w)
		return false
	}
	return true
}

// Out is out imm8, al/ax/eax (E6, 66 E7, E7 ib).
func (a *Asm) Out(port uint8, w Width) {
	if a.ioOp(w, 0xE6) {
		a.buf = append(a.buf, port)
	}
}

// OutDX is out dx, al/ax/eax (EE, 66 EF, EF): the port is in dx.
func (a *Asm) OutDX(w Width) { a.ioOp(w, 0xEE) }

// In is in al/ax/eax, imm8 (E4, 66 E5, E5 ib).
func (a *Asm) In(port uint8, w Width) {
	if a.ioOp(w, 0xE4) {
		a.buf = append(a.buf, port)
	}
}

// InDX is in al/ax/eax, dx (EC, 66 ED, ED).
func (a *Asm) InDX(w Width) { a.ioOp(w, 0xEC) }

// Hlt is hlt (F4). Without an in-kernel irqchip it exits to the VMM, and
// running the vCPU again continues after it.
func (a *Asm) Hlt() { a.buf = append(a.buf, 0xF4) }

// Ud2 is ud2 (0F 0B). With no IDT it ends in a triple fault, which the VMM
// sees as a shutdown exit.
func (a *Asm) Ud2() { a.buf = append(a.buf, 0x0F, 0x0B) }

// Vmmcall is vmmcall (0F 01 D9), AMD's hypercall instruction: rax the
// hypercall number, rbx, rcx, rdx, rsi its arguments, the result in rax.
// Under SVM without NRIPS, KVM finds the instruction's length by decoding
// it through the memslot's userspace mapping, so it must run from a page
// whose userspace alias holds the same bytes (a shared page).
func (a *Asm) Vmmcall() { a.buf = append(a.buf, 0x0F, 0x01, 0xD9) }

// Nop is nop (90).
func (a *Asm) Nop() { a.buf = append(a.buf, 0x90) }

// Pause is pause (F3 90), for spin loops.
func (a *Asm) Pause() { a.buf = append(a.buf, 0xF3, 0x90) }
