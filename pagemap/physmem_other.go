//go:build !linux

package pagemap

// PhysicalMemory returns 0: the machine's memory is read on Linux only.
func PhysicalMemory() uint64 { return 0 }
