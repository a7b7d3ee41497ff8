//go:build linux

package guest

import (
	"fmt"

	"github.com/gmemproject/gmem/kvm"
)

// Load puts the vCPU in the state b describes: it reads the special
// registers, replaces what long mode needs (see [Boot.Sregs]) and writes
// them back, then writes the general-purpose registers.
func (b *Boot) Load(v *kvm.VCPU) error {
	cur, err := v.GetSregs()
	if err != nil {
		return fmt.Errorf("guest: load vCPU %d: %w", v.ID(), err)
	}
	if err := v.SetSregs(b.Sregs(cur)); err != nil {
		return fmt.Errorf("guest: load vCPU %d: %w", v.ID(), err)
	}
	if err := v.SetRegs(b.Regs); err != nil {
		return fmt.Errorf("guest: load vCPU %d: %w", v.ID(), err)
	}
	return nil
}
