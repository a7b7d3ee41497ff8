package vmm

import "github.com/gmemproject/gmem/guestmem"

// Guest physical memory map of the machine.
//
//	[0, 4 MiB)           RAM block "ram0": tables, code, stacks, buffers
//	[4 MiB, 8 MiB)       RAM block "ram1": buffers (adjacent to ram0, so
//	                     requests can span both)
//	[8 MiB, 9 MiB)       MMIO hole "dev" (no device decodes it)
//	[9 MiB, ...)         unbacked
//
// The guest maps the first MapSize bytes one to one with 2 MiB pages.
const (
	mib = 1 << 20

	RAM0GPA  = 0
	RAM0Size = 4 * mib
	RAM1GPA  = 4 * mib
	RAM1Size = 4 * mib
	HoleGPA  = 8 * mib
	HoleSize = 1 * mib
	// MaxGPA is the guest's physical address space: conversions beyond it
	// are invalid.
	MaxGPA = 1 << 40

	// TablesGPA holds the page tables, GDT and TSS.
	TablesGPA = 0x10000
	// CodeGPA is where the vCPUs' programs are loaded, one after another
	// (page aligned), up to StacksGPA.
	CodeGPA = 0x20000
	// StacksGPA is the bottom of the stacks: vCPU i's stack is the page
	// [StacksGPA + i*4 KiB, +4 KiB).
	StacksGPA = 0xC0000
	// BuffersGPA is the first address the built-in scenario converts;
	// everything below it stays private (tables, code, stacks).
	BuffersGPA = 1 * mib

	// MapSize is how much the guest's page tables map.
	MapSize = 16 * mib
)

// memoryConfig is the guestmem layout of the machine.
func memoryConfig(mode guestmem.Mode) guestmem.Config {
	return guestmem.Config{
		Mode: mode,
		Blocks: []guestmem.BlockConfig{
			{Name: "ram0", GPA: RAM0GPA, Size: RAM0Size},
			{Name: "ram1", GPA: RAM1GPA, Size: RAM1Size},
		},
		MMIO:   []guestmem.Hole{{Name: "dev", GPA: HoleGPA, Size: HoleSize}},
		MaxGPA: MaxGPA,
	}
}
