//go:build linux

package pagemap

import "golang.org/x/sys/unix"

// PhysicalMemory returns the machine's physical memory in bytes (sysinfo's
// totalram), 0 if it cannot be read. It is the limit of what a process can
// hold in memory at once; a cgroup may allow less.
func PhysicalMemory() uint64 {
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) != nil {
		return 0
	}
	unit := uint64(si.Unit)
	if unit == 0 {
		unit = 1
	}
	return uint64(si.Totalram) * unit
}
