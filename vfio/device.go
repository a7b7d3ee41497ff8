package vfio

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

// DeviceInfo is the answer of VFIO_DEVICE_GET_INFO.
type DeviceInfo struct {
	// Flags are VFIO_DEVICE_FLAGS_* (DeviceReset, DevicePCI, DeviceCaps...).
	Flags uint32
	// NumRegions is the number of regions (for vfio-pci at least 9: six
	// BARs, ROM, config space, VGA).
	NumRegions uint32
	// NumIRQs is the number of IRQ index kinds.
	NumIRQs uint32
}

// RegionInfo is the answer of VFIO_DEVICE_GET_REGION_INFO.
type RegionInfo struct {
	// Index is the region index (PCIBAR0RegionIndex...).
	Index uint32
	// Flags are RegionRead, RegionWrite, RegionMmap, RegionCaps.
	Flags uint32
	// Size is the region size in bytes (0 if the region does not exist).
	Size uint64
	// Offset is where the region lies in the device file descriptor, for
	// pread, pwrite and mmap.
	Offset uint64
}

// Device is an open VFIO device file descriptor, obtained from a group
// (Group.GetDeviceFD) or by opening the device cdev (OpenCdev). Its
// methods are safe for concurrent use, Close included; after Close they
// return ErrClosed.
type Device struct {
	fd   *fdio.FD
	name string
}

// OpenCdev opens a VFIO device cdev such as /dev/vfio/devices/vfio0. The
// device is usable once bound to an iommufd (BindIOMMUFD) and attached to
// an IOAS (AttachIOMMUFDPT).
func OpenCdev(path string) (*Device, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return &Device{fd: newFD(fd, path), name: path}, nil
}

// Fd returns the device's file descriptor, or -1 after Close. The number
// is lent, not given: Close and the garbage collector (once the Device is
// unreachable) close it, and it may then name another file. Where Close
// may race, use Control.
func (d *Device) Fd() int { return d.fd.Fd() }

// Control runs fn with the descriptor, which stays open until fn returns
// even if Close runs meanwhile (Close waits for fn); after Close it returns
// ErrClosed without running fn. fn must not Close the Device.
func (d *Device) Control(fn func(fd uintptr)) error { return d.fd.Control(fn) }

// Name returns the device name or cdev path the device was opened with.
func (d *Device) Name() string { return d.name }

// Close closes the device, after waiting for the calls in flight. For a
// cdev this also unbinds it from its iommufd. Mappings of its regions
// (MmapRegion) stay valid until unmapped. A second Close returns
// ErrClosed.
func (d *Device) Close() error { return closeFd(d.fd) }

// GetInfo returns the device's flags and region and IRQ counts
// (VFIO_DEVICE_GET_INFO).
func (d *Device) GetInfo() (DeviceInfo, error) {
	i := deviceInfo{Argsz: sizeofDeviceInfo}
	if _, err := ioctlPtr(d.fd, ioctlDeviceGetInfo, &i); err != nil {
		return DeviceInfo{}, fmt.Errorf("VFIO_DEVICE_GET_INFO %s: %w", d.name, err)
	}
	return DeviceInfo{Flags: i.Flags, NumRegions: i.NumRegions, NumIRQs: i.NumIRQs}, nil
}

// GetRegionInfo returns the size, offset and flags of region index
// (VFIO_DEVICE_GET_REGION_INFO). Capability chains are not decoded.
func (d *Device) GetRegionInfo(index uint32) (RegionInfo, error) {
	r := regionInfo{Argsz: sizeofRegionInfo, Index: index}
	if _, err := ioctlPtr(d.fd, ioctlDeviceGetRegionInfo, &r); err != nil {
		return RegionInfo{}, fmt.Errorf("VFIO_DEVICE_GET_REGION_INFO %s region %d: %w", d.name, index, err)
	}
	return RegionInfo{Index: r.Index, Flags: r.Flags, Size: r.Size, Offset: r.Offset}, nil
}

// Reset resets the device (VFIO_DEVICE_RESET).
func (d *Device) Reset() error {
	if _, err := ioctlVal(d.fd, ioctlDeviceReset, 0); err != nil {
		return fmt.Errorf("VFIO_DEVICE_RESET %s: %w", d.name, err)
	}
	return nil
}

// regionIO checks that [off, off+n) lies inside r.
func regionIO(r RegionInfo, off uint64, n int) error {
	if off > r.Size || uint64(n) > r.Size-off {
		return fmt.Errorf("vfio: access [%#x, +%#x) outside region %d of size %#x: %w", off, n, r.Index, r.Size, unix.EINVAL)
	}
	return nil
}

// ReadRegion reads len(b) bytes at offset off of region r with pread on the
// device fd. vfio-pci turns aligned 1, 2, 4 and 8 byte reads into accesses
// of that width, which device registers need.
func (d *Device) ReadRegion(r RegionInfo, off uint64, b []byte) error {
	if err := regionIO(r, off, len(b)); err != nil {
		return err
	}
	n, err := fdio.Call(d.fd, func(fd int) (int, error) { return unix.Pread(fd, b, int64(r.Offset+off)) })
	if err != nil {
		return fmt.Errorf("read %s region %d at %#x: %w", d.name, r.Index, off, err)
	}
	if n != len(b) {
		return fmt.Errorf("read %s region %d at %#x: %d of %d bytes: %w", d.name, r.Index, off, n, len(b), unix.EIO)
	}
	return nil
}

// WriteRegion writes b at offset off of region r with pwrite on the device
// fd, with the access widths of ReadRegion.
func (d *Device) WriteRegion(r RegionInfo, off uint64, b []byte) error {
	if err := regionIO(r, off, len(b)); err != nil {
		return err
	}
	n, err := fdio.Call(d.fd, func(fd int) (int, error) { return unix.Pwrite(fd, b, int64(r.Offset+off)) })
	if err != nil {
		return fmt.Errorf("write %s region %d at %#x: %w", d.name, r.Index, off, err)
	}
	if n != len(b) {
		return fmt.Errorf("write %s region %d at %#x: %d of %d bytes: %w", d.name, r.Index, off, n, len(b), unix.EIO)
	}
	return nil
}

// MmapRegion maps all of region r (which must have RegionMmap) shared and
// read-write. Unmap it with unix.Munmap; the mapping outlives Close. Access
// device registers in it with Load32/Store32/Load64/Store64, which use one
// access of the right width.
func (d *Device) MmapRegion(r RegionInfo) ([]byte, error) {
	if r.Flags&RegionMmap == 0 {
		return nil, fmt.Errorf("mmap %s region %d: region is not mmap-able: %w", d.name, r.Index, unix.EINVAL)
	}
	b, err := fdio.Call(d.fd, func(fd int) ([]byte, error) {
		return unix.Mmap(fd, int64(r.Offset), int(r.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	})
	if err != nil {
		return nil, fmt.Errorf("mmap %s region %d: %w", d.name, r.Index, err)
	}
	return b, nil
}

// Read32 reads a 32-bit little-endian value at off of region r.
func (d *Device) Read32(r RegionInfo, off uint64) (uint32, error) {
	var b [4]byte
	if err := d.ReadRegion(r, off, b[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(b[:]), nil
}

// Write32 writes a 32-bit little-endian value at off of region r.
func (d *Device) Write32(r RegionInfo, off uint64, v uint32) error {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	return d.WriteRegion(r, off, b[:])
}

// Read64 reads a 64-bit little-endian value at off of region r.
func (d *Device) Read64(r RegionInfo, off uint64) (uint64, error) {
	var b [8]byte
	if err := d.ReadRegion(r, off, b[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// Write64 writes a 64-bit little-endian value at off of region r.
func (d *Device) Write64(r RegionInfo, off uint64, v uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	return d.WriteRegion(r, off, b[:])
}

// ReadConfig16 reads a 16-bit register of the PCI configuration space.
func (d *Device) ReadConfig16(off uint64) (uint16, error) {
	r, err := d.GetRegionInfo(PCIConfigRegionIndex)
	if err != nil {
		return 0, err
	}
	var b [2]byte
	if err := d.ReadRegion(r, off, b[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint16(b[:]), nil
}

// WriteConfig16 writes a 16-bit register of the PCI configuration space.
func (d *Device) WriteConfig16(off uint64, v uint16) error {
	r, err := d.GetRegionInfo(PCIConfigRegionIndex)
	if err != nil {
		return err
	}
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	return d.WriteRegion(r, off, b[:])
}

// ReadConfig32 reads a 32-bit register of the PCI configuration space.
func (d *Device) ReadConfig32(off uint64) (uint32, error) {
	r, err := d.GetRegionInfo(PCIConfigRegionIndex)
	if err != nil {
		return 0, err
	}
	return d.Read32(r, off)
}

// WriteConfig32 writes a 32-bit register of the PCI configuration space.
func (d *Device) WriteConfig32(off uint64, v uint32) error {
	r, err := d.GetRegionInfo(PCIConfigRegionIndex)
	if err != nil {
		return err
	}
	return d.Write32(r, off, v)
}

// EnableBusMaster sets the memory-space and bus-master bits of PCI_COMMAND,
// without which the device's DMA goes nowhere. It returns the new value.
func (d *Device) EnableBusMaster() (uint16, error) {
	cmd, err := d.ReadConfig16(PCICommand)
	if err != nil {
		return 0, err
	}
	cmd |= PCICommandMemory | PCICommandBusMaster
	if err := d.WriteConfig16(PCICommand, cmd); err != nil {
		return 0, err
	}
	return d.ReadConfig16(PCICommand)
}

// BindIOMMUFD binds a cdev-opened device to the iommufd iommufd and returns
// the device id iommufd gave it (VFIO_DEVICE_BIND_IOMMUFD). After it the
// device fd accepts no other VFIO ioctl until AttachIOMMUFDPT. The kernel
// looks the number up during the call and keeps its own reference after,
// so the number must name the iommufd only for the call: where the
// iommufd's Close may race, call BindIOMMUFD inside its Control
// (iommufd.IOMMUFD.Control).
func (d *Device) BindIOMMUFD(iommufd int) (uint32, error) {
	b := bindIOMMUFD{Argsz: sizeofBindIOMMUFD, IOMMUFD: int32(iommufd)}
	if _, err := ioctlPtr(d.fd, ioctlDeviceBindIOMMUFD, &b); err != nil {
		return 0, fmt.Errorf("VFIO_DEVICE_BIND_IOMMUFD %s: %w", d.name, err)
	}
	return b.OutDevID, nil
}

// AttachIOMMUFDPT attaches the bound device to the IOAS or hardware page
// table ptID and returns the id of the page table it ended up in: for an
// IOAS, the domain the kernel created or reused
// (VFIO_DEVICE_ATTACH_IOMMUFD_PT).
func (d *Device) AttachIOMMUFDPT(ptID uint32) (uint32, error) {
	a := attachIOMMUFDPT{Argsz: sizeofAttachIOMMUFDPT, PtID: ptID}
	if _, err := ioctlPtr(d.fd, ioctlDeviceAttachIOMMUFD, &a); err != nil {
		return 0, fmt.Errorf("VFIO_DEVICE_ATTACH_IOMMUFD_PT %s pt %d: %w", d.name, ptID, err)
	}
	return a.PtID, nil
}

// DetachIOMMUFDPT detaches the device from its page table
// (VFIO_DEVICE_DETACH_IOMMUFD_PT).
func (d *Device) DetachIOMMUFDPT() error {
	a := detachIOMMUFDPT{Argsz: sizeofDetachIOMMUFDPT}
	if _, err := ioctlPtr(d.fd, ioctlDeviceDetachIOMMUFD, &a); err != nil {
		return fmt.Errorf("VFIO_DEVICE_DETACH_IOMMUFD_PT %s: %w", d.name, err)
	}
	return nil
}
