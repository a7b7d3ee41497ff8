package vfio

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

// ContainerPath is the VFIO container device.
const ContainerPath = "/dev/vfio/vfio"

// Container is an open VFIO container (/dev/vfio/vfio): one IOMMU address
// space shared by the groups set to it. Its methods are safe for
// concurrent use, Close included; after Close they return ErrClosed.
type Container struct {
	fd *fdio.FD
}

// OpenContainer opens /dev/vfio/vfio.
func OpenContainer() (*Container, error) {
	fd, err := unix.Open(ContainerPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", ContainerPath, err)
	}
	return &Container{fd: newFD(fd, ContainerPath)}, nil
}

// Fd returns the container's file descriptor, or -1 after Close. The
// number is lent, not given: Close and the garbage collector (once the
// Container is unreachable) close it, and it may then name another file.
// Where Close may race, use Control.
func (c *Container) Fd() int { return c.fd.Fd() }

// Control runs fn with the descriptor, which stays open until fn returns
// even if Close runs meanwhile (Close waits for fn); after Close it returns
// ErrClosed without running fn. fn must not Close the Container.
func (c *Container) Control(fn func(fd uintptr)) error { return c.fd.Control(fn) }

// Close closes the container, after waiting for the calls in flight. The
// kernel removes every mapping once the last reference (the groups set to
// it hold one) is gone. Later calls, a second Close included, return
// ErrClosed.
func (c *Container) Close() error { return closeFd(c.fd) }

// GetAPIVersion returns the VFIO API version, APIVersion on every kernel
// (VFIO_GET_API_VERSION).
func (c *Container) GetAPIVersion() (int, error) {
	r, err := ioctlVal(c.fd, ioctlGetAPIVersion, 0)
	if err != nil {
		return 0, fmt.Errorf("VFIO_GET_API_VERSION: %w", err)
	}
	return int(r), nil
}

// CheckExtension returns the kernel's answer for ext: 0 if unsupported, a
// positive value if supported (VFIO_CHECK_EXTENSION). Before a group is set
// the answer covers every IOMMU driver; after, only the container's.
func (c *Container) CheckExtension(ext Extension) (int, error) {
	r, err := ioctlVal(c.fd, ioctlCheckExtension, uintptr(ext))
	if err != nil {
		return 0, fmt.Errorf("VFIO_CHECK_EXTENSION %d: %w", ext, err)
	}
	return int(r), nil
}

// SetIOMMU selects the container's IOMMU driver, e.g. Type1v2IOMMU
// (VFIO_SET_IOMMU). At least one group must be set to the container first.
// vfio_iommu_type1 reads its dma_entry_limit parameter here.
func (c *Container) SetIOMMU(typ Extension) error {
	if _, err := ioctlVal(c.fd, ioctlSetIOMMU, uintptr(typ)); err != nil {
		return fmt.Errorf("VFIO_SET_IOMMU %d: %w", typ, err)
	}
	return nil
}

// GetIOMMUInfo returns the type1 IOMMU information with its capability chain
// decoded (VFIO_IOMMU_GET_INFO). It starts with a small buffer and grows it
// to what the kernel asks for (argsz written back) when the chain does not
// fit.
func (c *Container) GetIOMMUInfo() (IOMMUInfo, error) {
	size := 64
	for range 4 {
		buf := make([]byte, size)
		binary.NativeEndian.PutUint32(buf, uint32(size))
		if _, err := ioctlBuf(c.fd, ioctlIOMMUGetInfo, buf); err != nil {
			return IOMMUInfo{}, fmt.Errorf("VFIO_IOMMU_GET_INFO: %w", err)
		}
		need := int(binary.NativeEndian.Uint32(buf))
		if need <= size {
			return ParseIOMMUInfo(buf)
		}
		size = need
	}
	return IOMMUInfo{}, fmt.Errorf("VFIO_IOMMU_GET_INFO: reply keeps growing past %d bytes", size)
}

// MapDMA maps [iova, iova+len(host)) to host (VFIO_IOMMU_MAP_DMA). The
// kernel pins host's pages; host must stay mapped in this process until the
// range is unmapped, and should not be Go heap memory. vaddr, iova and size
// must be multiples of the smallest IOMMU page.
func (c *Container) MapDMA(iova uint64, host []byte, flags MapFlags) error {
	m := dmaMap{
		Argsz: uint32(sizeofDMAMap),
		Flags: uint32(flags),
		Vaddr: addrOf(host),
		IOVA:  iova,
		Size:  uint64(len(host)),
	}
	if _, err := ioctlPtr(c.fd, ioctlIOMMUMapDMA, &m); err != nil {
		return fmt.Errorf("VFIO_IOMMU_MAP_DMA iova %#x size %#x: %w", iova, m.Size, err)
	}
	return nil
}

// UnmapDMA removes the mappings inside [iova, iova+size) and returns the
// bytes they covered (VFIO_IOMMU_UNMAP_DMA). Under type1 v2 a request that
// cuts a mapping fails with EINVAL and unmaps nothing; one that covers no
// mapping succeeds with 0.
func (c *Container) UnmapDMA(iova, size uint64, flags UnmapFlags) (uint64, error) {
	u := dmaUnmap{Argsz: uint32(sizeofDMAUnmap), Flags: uint32(flags), IOVA: iova, Size: size}
	if _, err := ioctlPtr(c.fd, ioctlIOMMUUnmapDMA, &u); err != nil {
		return 0, fmt.Errorf("VFIO_IOMMU_UNMAP_DMA iova %#x size %#x: %w", iova, size, err)
	}
	return u.Size, nil
}

// UnmapAllDMA removes every mapping of the container and returns the bytes
// they covered (VFIO_IOMMU_UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_ALL; needs the
// UnmapAll extension).
func (c *Container) UnmapAllDMA() (uint64, error) {
	return c.UnmapDMA(0, 0, UnmapFlagAll)
}
