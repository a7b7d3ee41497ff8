package vfio

import (
	"fmt"
	"sync/atomic"
	"unsafe"
)

// Device registers must be accessed with one load or store of their width;
// a byte-wise copy would reach the device as several narrower accesses,
// which devices such as QEMU's edu reject. The atomic operations below
// compile to single aligned MOVs on amd64.

func mmioCheck(b []byte, off, width int) {
	if off < 0 || off > len(b)-width || off%width != 0 {
		panic(fmt.Sprintf("vfio: %d-byte MMIO access at %#x outside or misaligned in a %#x-byte mapping", width, off, len(b)))
	}
}

// Load32 reads the 32-bit register at off of a mapped region (MmapRegion)
// with one aligned 4-byte load. It panics if off is misaligned or outside b.
func Load32(b []byte, off int) uint32 {
	mmioCheck(b, off, 4)
	return atomic.LoadUint32((*uint32)(unsafe.Pointer(&b[off])))
}

// Store32 writes the 32-bit register at off of a mapped region with one
// aligned 4-byte store. It panics if off is misaligned or outside b.
func Store32(b []byte, off int, v uint32) {
	mmioCheck(b, off, 4)
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&b[off])), v)
}

// Load64 reads the 64-bit register at off of a mapped region with one
// aligned 8-byte load. It panics if off is misaligned or outside b.
func Load64(b []byte, off int) uint64 {
	mmioCheck(b, off, 8)
	return atomic.LoadUint64((*uint64)(unsafe.Pointer(&b[off])))
}

// Store64 writes the 64-bit register at off of a mapped region with one
// aligned 8-byte store. It panics if off is misaligned or outside b.
func Store64(b []byte, off int, v uint64) {
	mmioCheck(b, off, 8)
	atomic.StoreUint64((*uint64)(unsafe.Pointer(&b[off])), v)
}
