package vmm

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
)

// GuestMemory is what a vCPU reaches: every RAM page, private ones
// included (guestmem.GuestView).
type GuestMemory interface {
	io.ReaderAt
	io.WriterAt
}

// Interpret runs vCPU cpu's program from Go instead of on a vCPU: the same
// port accesses as the compiled code, in the same order, to the same
// machine, and the same guest memory accesses through mem. It stops early
// when ctx is done or a memory access fails (where the guest would fault).
func Interpret(ctx context.Context, m *Machine, cpu int, p Program, firstID int, mem GuestMemory) error {
	id := firstID
	out := func(port uint16, v uint32) { m.PortOut(cpu, port, 4, v) }
	out64 := func(lo uint16, v uint64) {
		out(lo, uint32(v))
		out(lo+4, uint32(v>>32))
	}
	report := func(passed bool, detail uint32) {
		if passed {
			detail = 0 // the compiled code sends the bare id
		}
		out(ConsolePort, ResultWord(id, passed, detail))
		id++
	}
	status := func(port uint16, want uint32) {
		s := m.PortIn(cpu, port, 4)
		report(s == want, s)
	}
	for i, st := range p.Steps {
		if err := ctx.Err(); err != nil {
			return err
		}
		switch st.Kind {
		case StepConvert:
			out64(convPort(cpu, ConvGPALo), st.GPA)
			out64(convPort(cpu, ConvSizeLo), st.Size)
			out(convPort(cpu, ConvAttr), st.Attr)
			out(convPort(cpu, ConvDoorbell), 1)
			status(convPort(cpu, ConvStatus), st.Want)
		case StepDeviceFill:
			out64(dmaPort(cpu, DMASeedLo), st.Seed)
			out(dmaPort(cpu, DMACmd), DMACmdFill)
		case StepDMA:
			reg := uint16(DMADstLo)
			if st.Cmd == DMACmdToBuffer {
				reg = DMASrcLo
			}
			out64(dmaPort(cpu, reg), st.GPA)
			out(dmaPort(cpu, DMALen), uint32(st.Size))
			out(dmaPort(cpu, DMACmd), st.Cmd)
			status(dmaPort(cpu, DMAStatus), st.Want)
		case StepHost:
			out(HostCallPort, uint32(st.Seed))
		case StepTouch:
			v := ^uint64(0) // nothing decodes what is not RAM
			if m.Memory().Block(st.GPA) != nil {
				var b [8]byte
				if _, err := mem.ReadAt(b[:], int64(st.GPA)); err != nil {
					return fmt.Errorf("vmm: vCPU %d step %d: %w", cpu, i, err)
				}
				v = binary.LittleEndian.Uint64(b[:])
			}
			report(v == st.Seed, uint32(v))
		case StepFill:
			if _, err := mem.WriteAt(pattern(st.Size, st.Seed), int64(st.GPA)); err != nil {
				return fmt.Errorf("vmm: vCPU %d step %d: %w", cpu, i, err)
			}
		case StepVerify:
			buf := make([]byte, st.Size)
			if _, err := mem.ReadAt(buf, int64(st.GPA)); err != nil {
				return fmt.Errorf("vmm: vCPU %d step %d: %w", cpu, i, err)
			}
			n := st.Size / 8
			bad := n
			for q := range n {
				if binary.LittleEndian.Uint64(buf[8*q:]) != st.Seed+q {
					bad = q
					break
				}
			}
			report(bad == n, uint32(bad))
		default:
			return fmt.Errorf("%w: vCPU %d step %d: kind %d", ErrScenario, cpu, i, st.Kind)
		}
	}
	out(ConsolePort, ResultDone)
	return nil
}

// pattern returns size bytes of little-endian qwords seed, seed+1, ...
func pattern(size, seed uint64) []byte {
	b := make([]byte, size)
	for q := range size / 8 {
		binary.LittleEndian.PutUint64(b[8*q:], seed+q)
	}
	return b
}
