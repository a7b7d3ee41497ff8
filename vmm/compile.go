package vmm

import (
	"fmt"

	"github.com/gmemproject/gmem/guest"
	"github.com/gmemproject/gmem/kvm"
)

// Compile turns vCPU cpu's program into x86-64 machine code that runs at
// any address (it uses no absolute code addresses), does the steps, writes
// one result word per check to ConsolePort (check ids starting at firstID),
// writes ResultDone and halts. The port accesses are exactly those Interpret
// makes for the same program.
func Compile(p Program, cpu, firstID int) ([]byte, error) {
	return CompileFor(p, cpu, firstID, ViaPort)
}

// RequestPath is how compiled code asks for conversions.
type RequestPath int

const (
	// ViaPort rings the conversion port and reads its status.
	ViaPort RequestPath = iota
	// ViaHypercall executes vmmcall with KVM_HC_MAP_GPA_RANGE (rax 12, rbx
	// the GPA, rcx the page count, rdx the attributes) and takes the answer
	// from rax. It needs a VM with KVM_CAP_EXIT_HYPERCALL enabled for it
	// (on the default VM type of some hosts the instruction hangs the vCPU),
	// and code in shared pages (see guest.Asm.Vmmcall).
	ViaHypercall
)

// CompileFor is Compile with conversions asked for the given way. With
// ViaHypercall a Convert step's size becomes a page count (a size below a
// page asks for 0 pages) and its ConvAttr becomes the attributes word
// (ConvToPrivate: KVM_MAP_GPA_RANGE_ENCRYPTED; ConvToShared: 0; any other
// value passes through as is). A step that wants ConvStatusEINVAL also
// passes when KVM itself refuses the request (-KVM_EINVAL in rax, for
// requests it never passes on: unaligned GPA, no pages, wrap-around).
func CompileFor(p Program, cpu, firstID int, path RequestPath) ([]byte, error) {
	if cpu < 0 || cpu >= MaxVCPUs {
		return nil, fmt.Errorf("%w: vCPU %d", ErrScenario, cpu)
	}
	if path != ViaPort && path != ViaHypercall {
		return nil, fmt.Errorf("%w: request path %d", ErrScenario, path)
	}
	c := compiler{cpu: cpu, id: firstID, path: path}
	for _, st := range p.Steps {
		c.step(st)
	}
	c.out(ConsolePort, ResultDone)
	c.a.Hlt()
	// A vCPU run again after its final hlt must not run into whatever
	// follows: halt for good.
	spin := c.a.NewLabel()
	c.a.Bind(spin)
	c.a.Hlt()
	c.a.Jmp(spin)
	return c.a.Assemble()
}

type compiler struct {
	a    guest.Asm
	cpu  int
	id   int
	path RequestPath
}

// kvmEINVAL is -KVM_EINVAL in rax: KVM's own refusal of a hypercall.
const kvmEINVAL = ^uint64(kvm.HypercallRetEINVAL - 1)

// hypercallAttrs is the KVM_HC_MAP_GPA_RANGE attributes word for a raw
// ConvAttr value.
func hypercallAttrs(attr uint32) uint64 {
	switch attr {
	case ConvToShared:
		return 0
	case ConvToPrivate:
		return kvm.MapGPARangeEncrypted
	}
	return uint64(attr)
}

// convertHypercall emits a Convert step as vmmcall.
func (c *compiler) convertHypercall(st Step) {
	c.a.MovImm32(guest.RAX, kvm.HCMapGPARange)
	c.a.MovImm64(guest.RBX, st.GPA)
	c.a.MovImm64(guest.RCX, st.Size/kvm.PageSize)
	c.a.MovImm64(guest.RDX, hypercallAttrs(st.Attr))
	c.a.Vmmcall()
	c.a.Mov(guest.RBX, guest.RAX)
	done := c.a.NewLabel()
	if st.Want == ConvStatusEINVAL {
		c.a.MovImm64(guest.RCX, kvmEINVAL)
		c.a.Cmp(guest.RBX, guest.RCX)
		c.a.J(guest.Equal, done)
	}
	c.a.MovImm32(guest.RCX, st.Want)
	c.a.Cmp(guest.RBX, guest.RCX)
	c.a.Bind(done)
	c.report()
}

// out emits out dx, eax with constant port and value.
func (c *compiler) out(port uint16, v uint32) {
	c.a.MovImm32(guest.RDX, uint32(port))
	c.a.MovImm32(guest.RAX, v)
	c.a.OutDX(guest.Dword)
}

// out64 writes v to the register pair lo, lo+4.
func (c *compiler) out64(lo uint16, v uint64) {
	c.out(lo, uint32(v))
	c.out(lo+4, uint32(v>>32))
}

// in emits in eax, dx: the value lands zero-extended in rax.
func (c *compiler) in(port uint16) {
	c.a.MovImm32(guest.RDX, uint32(port))
	c.a.InDX(guest.Dword)
}

// report emits the result word of the current check: ZF set means passed;
// rbx holds the detail. The id moves on.
func (c *compiler) report() {
	pass := c.a.NewLabel()
	id := uint32(c.id)
	c.id++
	c.a.MovImm32(guest.RAX, id) // mov keeps the flags of the comparison
	c.a.J(guest.Equal, pass)
	c.a.AndImm(guest.RBX, detailMask)
	c.a.Shl(guest.RBX, detailShift)
	c.a.Or(guest.RAX, guest.RBX)
	c.a.OrImm(guest.RAX, -1<<31) // ResultFail; only eax goes out
	c.a.Bind(pass)
	c.a.MovImm32(guest.RDX, ConsolePort)
	c.a.OutDX(guest.Dword)
}

// status reads a status register into rbx and compares it with want.
func (c *compiler) status(port uint16, want uint32) {
	c.in(port)
	c.a.Mov(guest.RBX, guest.RAX)
	c.a.MovImm32(guest.RCX, want)
	c.a.Cmp(guest.RBX, guest.RCX)
	c.report()
}

func (c *compiler) step(st Step) {
	switch st.Kind {
	case StepConvert:
		if c.path == ViaHypercall {
			c.convertHypercall(st)
			return
		}
		c.out64(convPort(c.cpu, ConvGPALo), st.GPA)
		c.out64(convPort(c.cpu, ConvSizeLo), st.Size)
		c.out(convPort(c.cpu, ConvAttr), st.Attr)
		c.out(convPort(c.cpu, ConvDoorbell), 1)
		c.status(convPort(c.cpu, ConvStatus), st.Want)
	case StepDeviceFill:
		c.out64(dmaPort(c.cpu, DMASeedLo), st.Seed)
		c.out(dmaPort(c.cpu, DMACmd), DMACmdFill)
	case StepDMA:
		reg := uint16(DMADstLo)
		if st.Cmd == DMACmdToBuffer {
			reg = DMASrcLo
		}
		c.out64(dmaPort(c.cpu, reg), st.GPA)
		c.out(dmaPort(c.cpu, DMALen), uint32(st.Size))
		c.out(dmaPort(c.cpu, DMACmd), st.Cmd)
		c.status(dmaPort(c.cpu, DMAStatus), st.Want)
	case StepHost:
		c.out(HostCallPort, uint32(st.Seed))
	case StepTouch:
		c.a.MovImm64(guest.RSI, st.GPA)
		c.a.Load(guest.RBX, guest.RSI, 0)
		c.a.MovImm64(guest.RAX, st.Seed)
		c.a.Cmp(guest.RBX, guest.RAX)
		c.report()
	case StepFill:
		// for rcx = n; rcx != 0; rcx-- { [rsi] = rax; rsi += 8; rax++ }
		c.a.MovImm64(guest.RSI, st.GPA)
		c.a.MovImm64(guest.RAX, st.Seed)
		c.a.MovImm32(guest.RCX, uint32(st.Size/8))
		loop := c.a.NewLabel()
		c.a.Bind(loop)
		c.a.Store(guest.RSI, 0, guest.RAX)
		c.a.AddImm(guest.RSI, 8)
		c.a.Inc(guest.RAX)
		c.a.Loop(guest.RCX, loop)
	case StepVerify:
		// rbx counts qwords checked; on a mismatch it is the index of the
		// wrong one and ZF is clear.
		c.a.MovImm64(guest.RSI, st.GPA)
		c.a.MovImm64(guest.RAX, st.Seed)
		c.a.MovImm32(guest.RCX, uint32(st.Size/8))
		c.a.Xor(guest.RBX, guest.RBX)
		loop := c.a.NewLabel()
		end := c.a.NewLabel()
		c.a.Bind(loop)
		c.a.Load(guest.RDI, guest.RSI, 0)
		c.a.Cmp(guest.RDI, guest.RAX)
		c.a.J(guest.NotEqual, end)
		c.a.AddImm(guest.RSI, 8)
		c.a.Inc(guest.RAX)
		c.a.Inc(guest.RBX)
		c.a.Dec(guest.RCX)
		c.a.J(guest.NotEqual, loop)
		// Fell through with rcx = 0: dec left ZF set, which reads as pass.
		c.a.Bind(end)
		c.report()
	}
}
