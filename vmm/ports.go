package vmm

// Port I/O map of the machine. Every register is 32 bits wide and is
// accessed with 4-byte in/out; 64-bit values are split into a low and a high
// register. Other access sizes are ignored (writes) or read as all ones.
const (
	// ConvPortBase is vCPU 0's conversion-port bank; vCPU i's is at
	// ConvPortBase + i*ConvPortStride.
	ConvPortBase   = 0x0C00
	ConvPortStride = 0x20

	// DMAPortBase is vCPU 0's DMA test device; vCPU i's is at
	// DMAPortBase + i*DMAPortStride.
	DMAPortBase   = 0x0D00
	DMAPortStride = 0x40

	// ConsolePort takes result words (see ResultWord).
	ConsolePort = 0x0E00
	// HostCallPort: a 4-byte write stops the vCPU while the VMM runs the
	// host call with that number (MachineConfig.OnHostCall), so a test can
	// act between two guest steps (drive a real device, look at the
	// backing memory).
	HostCallPort = 0x0E04

	// MaxVCPUs is the most vCPUs the port map has banks for.
	MaxVCPUs = 8
)

// Conversion-port registers, offsets from the vCPU's bank.
const (
	ConvGPALo  = 0x00 // GPA bits 31:0
	ConvGPAHi  = 0x04 // GPA bits 63:32
	ConvSizeLo = 0x08 // size in bytes, bits 31:0
	ConvSizeHi = 0x0C // size bits 63:32
	// ConvAttr is the target: ConvToShared or ConvToPrivate; anything else
	// makes the request invalid.
	ConvAttr = 0x10
	// ConvDoorbell: any 4-byte write executes the request in the registers.
	ConvDoorbell = 0x14
	// ConvStatus reads the last request's result: ConvStatusOK,
	// ConvStatusEINVAL, ConvStatusEAGAIN, or ConvStatusNone before the first.
	ConvStatus = 0x18
)

// ConvAttr values.
const (
	ConvToShared  = 0
	ConvToPrivate = 1
)

// ConvStatus values: the KVM_HC_MAP_GPA_RANGE answers.
const (
	ConvStatusOK     = 0
	ConvStatusEAGAIN = 11
	ConvStatusEINVAL = 22
	ConvStatusNone   = 0xFFFF_FFFF
)

// DMA test device registers, offsets from the vCPU's device.
const (
	DMASrcLo = 0x00 // source IOVA (RAM to buffer)
	DMASrcHi = 0x04
	DMADstLo = 0x08 // destination IOVA (buffer to RAM)
	DMADstHi = 0x0C
	// DMALen is the transfer length in bytes, 1 to DMABufferSize.
	DMALen = 0x10
	// DMACmd: a write runs the command (DMACmd*) at once.
	DMACmd = 0x14
	// DMAStatus reads the last command's result (DMAStatus*).
	DMAStatus = 0x18
	// DMASeedLo/Hi are the seed of DMACmdFill.
	DMASeedLo = 0x1C
	DMASeedHi = 0x20
)

// DMA commands.
const (
	// DMACmdToBuffer reads DMALen bytes at IOVA DMASrc into the buffer.
	DMACmdToBuffer = 1
	// DMACmdToRAM writes the first DMALen bytes of the buffer at IOVA DMADst.
	DMACmdToRAM = 2
	// DMACmdFill fills the buffer with little-endian qwords seed, seed+1, ...
	// It moves no data over the bus.
	DMACmdFill = 3
)

// DMA status values.
const (
	DMAStatusOK = 0
	// DMAStatusBlocked: the IOMMU refused the transfer; nothing moved.
	DMAStatusBlocked = 2
	// DMAStatusBadRequest: unknown command or length out of range.
	DMAStatusBadRequest = 3
	// DMAStatusNone is read before the first command.
	DMAStatusNone = 0xFFFF_FFFF
)

// DMABufferSize is the size of the device-side buffer.
const DMABufferSize = 4096

// Result words on ConsolePort: bits 15:0 the check id, bits 30:16 a detail
// (the observed status, or the index of the first wrong qword), bit 31 set
// when the check failed. ResultDone ends a vCPU's program.
const (
	ResultFail   = 1 << 31
	ResultDone   = 0xFFFF
	resultIDMask = 0xFFFF
	detailMask   = 0x7FFF
	detailShift  = 16
)

// ResultWord builds a result word.
func ResultWord(id int, passed bool, detail uint32) uint32 {
	w := uint32(id)&resultIDMask | (detail&detailMask)<<detailShift
	if !passed {
		w |= ResultFail
	}
	return w
}

// convPort returns vCPU cpu's port for conversion register reg.
func convPort(cpu int, reg uint16) uint16 {
	return ConvPortBase + uint16(cpu)*ConvPortStride + reg
}

// dmaPort returns vCPU cpu's port for DMA device register reg.
func dmaPort(cpu int, reg uint16) uint16 {
	return DMAPortBase + uint16(cpu)*DMAPortStride + reg
}
