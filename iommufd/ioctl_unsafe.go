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
	var pin runtime.Pinner
	defer pin.Unpin()
	if len(out) > 0 {
		r.AllowedIOVAs = pinnedAddr(&pin, &out[0])
	}
	return ioctlPtr(fd, req, r)
}

// ioctlAllow issues IOMMU_IOAS_ALLOW_IOVAS with a.AllowedIOVAs pointing at
// in.
func ioctlAllow(fd *fdio.FD, req uintptr, a *ioasAllowIOVAs, in []iovaRange) error {
	var pin runtime.Pinner
	defer pin.Unpin()
	if len(in) > 0 {
		a.AllowedIOVAs = pinnedAddr(&pin, &in[0])
	}
	return ioctlPtr(fd, req, a)
}

// pinnedAddr pins *p and returns its address for a struct field the kernel
// follows. The collector does not see a pointer held as an integer: unpinned,
// an array small enough to live on the goroutine's stack would move when the
// stack grows on the way to the syscall (the call runs inside the fd's
// Control), and the kernel would read and write where it used to be. A
// pinned object is a heap object (its pointer escapes to the Pinner), which
// the collector neither moves nor, until Unpin, frees.
func pinnedAddr[T any](pin *runtime.Pinner, p *T) uint64 {
	pin.Pin(p)
	return uint64(uintptr(unsafe.Pointer(p)))
}

// addrOf returns the user virtual address of b's first byte, 0 if b is
// empty.
func addrOf(b []byte) uint64 {
	if len(b) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b))))
}
