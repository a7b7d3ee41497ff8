package iommufd

import (
	"runtime"
	"unsafe"

	"github.com/gmemproject/gmem/internal/fdio"
)

// ioctlPtr issues ioctl(fd, req, p) inside the fd's Control; the kernel
// reads and writes *p. After Close it answers ErrClosed and issues nothing.
func ioctlPtr[T any](fd *fdio.FD, req uintptr, p *T) error {
	_, err := fdio.IoctlPtr(fd, req, p)
	return err
}

// ioctlRanges issues IOMMU_IOAS_IOVA_RANGES with r.AllowedIOVAs pointing at
// out, which the kernel fills (up to r.NumIOVAs entries).
func ioctlRanges(fd *fdio.FD, req uintptr, r *ioasIOVARanges, out []iovaRange) error {
	if len(out) > 0 {
		r.AllowedIOVAs = uint64(uintptr(unsafe.Pointer(&out[0])))
	}
	err := ioctlPtr(fd, req, r)
	// The kernel wrote through a pointer the garbage collector cannot see.
	runtime.KeepAlive(out)
	return err
}

// ioctlAllow issues IOMMU_IOAS_ALLOW_IOVAS with a.AllowedIOVAs pointing at
// in.
func ioctlAllow(fd *fdio.FD, req uintptr, a *ioasAllowIOVAs, in []iovaRange) error {
	if len(in) > 0 {
		a.AllowedIOVAs = uint64(uintptr(unsafe.Pointer(&in[0])))
	}
	err := ioctlPtr(fd, req, a)
	runtime.KeepAlive(in)
	return err
}

// addrOf returns the user virtual address of b's first byte, 0 if b is
// empty.
func addrOf(b []byte) uint64 {
	if len(b) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b))))
}
