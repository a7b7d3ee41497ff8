// Package iommufd wraps the Linux iommufd uAPI (/dev/iommu): IO address
// spaces (IOAS) and their mappings, and Space, an iommu.Space over one IOAS.
//
// One Go type per file descriptor and one method per ioctl, named after it.
// Constants and struct layouts are written by hand from the uAPI and checked
// by tests. Errors carry the kernel's unix.Errno, wrapped with the ioctl's
// name. A VFIO device joins an IOAS through its cdev (package vfio:
// Device.BindIOMMUFD with the number IOMMUFD.Control hands out, then
// Device.AttachIOMMUFDPT with the IOAS id); this package does not import
// vfio.
//
// IOMMUFD's methods are safe for concurrent use, Close included. Each
// ioctl runs with the descriptor held open (inside its RawConn.Control), so
// a Close racing it can never make it reach a recycled descriptor number:
// Close refuses new calls with ErrClosed (which matches fs.ErrClosed),
// waits for the calls in flight and then closes.
package iommufd

import (
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/internal/fdio"
)

// ioctl request numbers: _IO(IOMMUFD_TYPE ';', IOMMUFD_CMD_BASE 0x80 + n).
// Like VFIO's they carry no size bits; every struct starts with its size.
const (
	iommufdType = 0x3B

	ioctlDestroy        = iommufdType<<8 | 0x80 // IOMMU_DESTROY
	ioctlIOASAlloc      = iommufdType<<8 | 0x81 // IOMMU_IOAS_ALLOC
	ioctlIOASAllowIOVAs = iommufdType<<8 | 0x82 // IOMMU_IOAS_ALLOW_IOVAS
	ioctlIOASCopy       = iommufdType<<8 | 0x83 // IOMMU_IOAS_COPY
	ioctlIOASIOVARanges = iommufdType<<8 | 0x84 // IOMMU_IOAS_IOVA_RANGES
	ioctlIOASMap        = iommufdType<<8 | 0x85 // IOMMU_IOAS_MAP
	ioctlIOASUnmap      = iommufdType<<8 | 0x86 // IOMMU_IOAS_UNMAP
	ioctlOption         = iommufdType<<8 | 0x87 // IOMMU_OPTION
	ioctlVFIOIOAS       = iommufdType<<8 | 0x88 // IOMMU_VFIO_IOAS
	ioctlIOASMapFile    = iommufdType<<8 | 0x8f // IOMMU_IOAS_MAP_FILE (Linux 6.13)

	// ioctlVFIOUnmapDMA is VFIO_IOMMU_UNMAP_DMA, _IO(VFIO_TYPE ';',
	// VFIO_BASE 100 + 14): iommufd serves the VFIO type1 ioctls below its
	// own command range on the compat IOAS.
	ioctlVFIOUnmapDMA = iommufdType<<8 | (100 + 14)
)

// Path is the iommufd device.
const Path = "/dev/iommu"

// MapFlags are the flags of IOMMU_IOAS_MAP (enum iommufd_ioas_map_flags).
type MapFlags uint32

// IOMMU_IOAS_MAP_*.
const (
	// MapFixedIOVA maps at the given IOVA instead of letting the kernel pick
	// one (IOMMU_IOAS_MAP_FIXED_IOVA).
	MapFixedIOVA MapFlags = 1 << 0
	// MapWriteable lets the device write (IOMMU_IOAS_MAP_WRITEABLE).
	MapWriteable MapFlags = 1 << 1
	// MapReadable lets the device read (IOMMU_IOAS_MAP_READABLE).
	MapReadable MapFlags = 1 << 2
)

// OptionID names an IOMMU_OPTION (enum iommufd_option).
type OptionID uint32

// IOMMU_OPTION ids.
const (
	// OptionRlimitMode selects per-process (0) or per-user (1) pinned-page
	// accounting; global, object id 0 (IOMMU_OPTION_RLIMIT_MODE).
	OptionRlimitMode OptionID = 0
	// OptionHugePages allows (1, default) or forbids (0) IOMMU large pages
	// in an IOAS; object id = the IOAS (IOMMU_OPTION_HUGE_PAGES).
	OptionHugePages OptionID = 1
)

// IOMMU_OPTION operations (enum iommufd_option_ops).
const (
	optionOpSet = 0 // IOMMU_OPTION_OP_SET
	optionOpGet = 1 // IOMMU_OPTION_OP_GET
)

// IOMMU_VFIO_IOAS operations (enum iommufd_vfio_ioas_op).
const (
	vfioIOASGet   = 0 // IOMMU_VFIO_IOAS_GET
	vfioIOASSet   = 1 // IOMMU_VFIO_IOAS_SET
	vfioIOASClear = 2 // IOMMU_VFIO_IOAS_CLEAR
)

// IOMMUFD is an open /dev/iommu. Its methods are safe for concurrent use,
// Close included; after Close they return ErrClosed.
type IOMMUFD struct {
	fd *fdio.FD
	// compat is the file's VFIO-compatibility IOAS as this IOMMUFD last
	// set it, and the lock that keeps it while a cut uses it.
	compat compatIOAS
}

// compatIOAS records the VFIO-compatibility IOAS of an iommufd file. The
// kernel keeps one per file, so Spaces that cut on one file take turns:
// each sets it to its own IOAS (when the record says another has it) and
// unmaps, both under mu.
type compatIOAS struct {
	mu sync.Mutex
	// ioas is the IOAS last set through this IOMMUFD, 0 when none is, or
	// when it was cleared or destroyed. IOAS ids start at 1.
	ioas uint32
}

// Open opens /dev/iommu.
func Open() (*IOMMUFD, error) {
	fd, err := unix.Open(Path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", Path, err)
	}
	return &IOMMUFD{fd: fdio.New(fd, Path, ErrClosed)}, nil
}

// Fd returns the file descriptor, what VFIO_DEVICE_BIND_IOMMUFD takes, or
// -1 after Close. The number is lent, not given: Close and the garbage
// collector (once the IOMMUFD is unreachable) close it, and it may then
// name another file, even another iommufd. Where Close may race, hand the
// number over inside Control.
func (f *IOMMUFD) Fd() int { return f.fd.Fd() }

// Control runs fn with the descriptor, which stays open until fn returns
// even if Close runs meanwhile (Close waits for fn); after Close it returns
// ErrClosed without running fn. Binding a VFIO cdev inside it,
//
//	err := f.Control(func(fd uintptr) { id, berr = dev.BindIOMMUFD(int(fd)) })
//
// makes sure the device is bound to this iommufd and not to whatever file
// a racing Close let reuse the number. fn must not Close the IOMMUFD.
func (f *IOMMUFD) Control(fn func(fd uintptr)) error { return f.fd.Control(fn) }

// Close closes the iommufd, after waiting for the calls in flight; the
// kernel destroys every object it holds once no device is bound to it.
// Later calls, a second Close included, return ErrClosed.
func (f *IOMMUFD) Close() error {
	if err := f.fd.Close(); err != nil {
		if err == ErrClosed {
			return err
		}
		return fmt.Errorf("iommufd: close: %w", err)
	}
	return nil
}

// Destroy destroys the object id: an IOAS, a hardware page table... It
// fails with EBUSY while the object is in use, e.g. an IOAS a device is
// attached to (IOMMU_DESTROY).
func (f *IOMMUFD) Destroy(id uint32) error {
	d := destroy{Size: sizeofDestroy, ID: id}
	if err := ioctlPtr(f.fd, ioctlDestroy, &d); err != nil {
		return fmt.Errorf("IOMMU_DESTROY %d: %w", id, err)
	}
	// Destroying the compat IOAS clears it in the kernel too.
	f.compat.mu.Lock()
	if f.compat.ioas == id {
		f.compat.ioas = 0
	}
	f.compat.mu.Unlock()
	return nil
}

// IOASAlloc creates an empty IO address space and returns its id
// (IOMMU_IOAS_ALLOC).
func (f *IOMMUFD) IOASAlloc() (uint32, error) {
	a := ioasAlloc{Size: sizeofIOASAlloc}
	if err := ioctlPtr(f.fd, ioctlIOASAlloc, &a); err != nil {
		return 0, fmt.Errorf("IOMMU_IOAS_ALLOC: %w", err)
	}
	return a.OutIOASID, nil
}

// IOVARange is one window of usable IOVAs, inclusive of Last (struct
// iommu_iova_range).
type IOVARange struct {
	Start, Last uint64
}

// IOVARanges is the answer of IOMMU_IOAS_IOVA_RANGES.
type IOVARanges struct {
	// Ranges are the IOVA windows a mapping may use, ascending.
	Ranges []IOVARange
	// Alignment is the IOVA alignment every mapping needs.
	Alignment uint64
}

// IOASIOVARanges returns the IOVA windows of ioas and the alignment a
// mapping needs (IOMMU_IOAS_IOVA_RANGES). They narrow when a device is
// attached; query again after every attach or detach.
func (f *IOMMUFD) IOASIOVARanges(ioas uint32) (IOVARanges, error) {
	// Start with room for one range (a fresh IOAS has one); the kernel says
	// how many there are when the array is too small.
	n := uint32(1)
	for range 4 {
		ranges := make([]iovaRange, n)
		r := ioasIOVARanges{Size: sizeofIOASIOVARanges, IOASID: ioas, NumIOVAs: n}
		err := ioctlRanges(f.fd, ioctlIOASIOVARanges, &r, ranges)
		if errors.Is(err, unix.EMSGSIZE) && r.NumIOVAs > n {
			n = r.NumIOVAs // the kernel wrote how many there are
			continue
		}
		if err != nil {
			return IOVARanges{}, fmt.Errorf("IOMMU_IOAS_IOVA_RANGES ioas %d: %w", ioas, err)
		}
		out := IOVARanges{Alignment: r.OutIOVAAlignment, Ranges: make([]IOVARange, r.NumIOVAs)}
		for i := range out.Ranges {
			out.Ranges[i] = IOVARange{Start: ranges[i].Start, Last: ranges[i].Last}
		}
		return out, nil
	}
	return IOVARanges{}, fmt.Errorf("IOMMU_IOAS_IOVA_RANGES ioas %d: range count keeps growing past %d: %w", ioas, n, unix.EMSGSIZE)
}

// IOASMap maps host into ioas and returns the IOVA used
// (IOMMU_IOAS_MAP). With MapFixedIOVA the mapping goes at iova (EEXIST if
// anything is mapped there); without, the kernel picks the IOVA. flags need
// MapReadable and/or MapWriteable. The kernel pins host's pages once a
// device is attached; host should be mmap'ed memory, not the Go heap.
func (f *IOMMUFD) IOASMap(ioas uint32, iova uint64, host []byte, flags MapFlags) (uint64, error) {
	m := ioasMap{
		Size:   sizeofIOASMap,
		Flags:  uint32(flags),
		IOASID: ioas,
		UserVA: addrOf(host),
		Length: uint64(len(host)),
		IOVA:   iova,
	}
	if err := ioctlPtr(f.fd, ioctlIOASMap, &m); err != nil {
		return 0, fmt.Errorf("IOMMU_IOAS_MAP ioas %d iova %#x length %#x: %w", ioas, iova, m.Length, err)
	}
	return m.IOVA, nil
}

// IOASMapFile maps [start, start+length) of the file fd at iova in ioas and
// returns the IOVA used (IOMMU_IOAS_MAP_FILE, Linux 6.13); flags are
// IOASMap's. The kernel pins the file's pages itself (memfd_pin_folios), so
// nothing needs to be mapped in user space. It accepts shmem files (memfd)
// and hugetlbfs files; guest_memfd is refused (EINVAL), so shared
// guest_memfd is mapped by address (IOASMap). Kernels before 6.13 answer
// ENOTTY.
func (f *IOMMUFD) IOASMapFile(ioas uint32, iova uint64, fd int, start, length uint64, flags MapFlags) (uint64, error) {
	m := ioasMapFile{
		Size:   sizeofIOASMapFile,
		Flags:  uint32(flags),
		IOASID: ioas,
		FD:     int32(fd),
		Start:  start,
		Length: length,
		IOVA:   iova,
	}
	if err := ioctlPtr(f.fd, ioctlIOASMapFile, &m); err != nil {
		return 0, fmt.Errorf("IOMMU_IOAS_MAP_FILE ioas %d iova %#x fd %d start %#x length %#x: %w", ioas, iova, fd, start, length, err)
	}
	return m.IOVA, nil
}

// IOASCopy maps into dst, at dstIOVA, the pages src maps at [srcIOVA,
// srcIOVA+length), and returns the IOVA used (IOMMU_IOAS_COPY). The range
// must be mapped in src, and may be part of an area; the new area shares the
// source's pinned pages, so nothing is pinned again. flags are those of
// IOASMap (MapFixedIOVA, MapWriteable, MapReadable).
func (f *IOMMUFD) IOASCopy(dst uint32, dstIOVA uint64, src uint32, srcIOVA, length uint64, flags MapFlags) (uint64, error) {
	c := ioasCopy{
		Size:      sizeofIOASCopy,
		Flags:     uint32(flags),
		DstIOASID: dst,
		SrcIOASID: src,
		Length:    length,
		DstIOVA:   dstIOVA,
		SrcIOVA:   srcIOVA,
	}
	if err := ioctlPtr(f.fd, ioctlIOASCopy, &c); err != nil {
		return 0, fmt.Errorf("IOMMU_IOAS_COPY ioas %d iova %#x to ioas %d iova %#x length %#x: %w", src, srcIOVA, dst, dstIOVA, length, err)
	}
	return c.DstIOVA, nil
}

// IOASUnmap removes the whole areas inside [iova, iova+length) from ioas
// and returns the bytes they covered (IOMMU_IOAS_UNMAP). A range that cuts
// an area, or contains none, fails with ENOENT. iova 0 with length
// math.MaxUint64 removes everything and succeeds even when nothing is
// mapped.
func (f *IOMMUFD) IOASUnmap(ioas uint32, iova, length uint64) (uint64, error) {
	u := ioasUnmap{Size: sizeofIOASUnmap, IOASID: ioas, IOVA: iova, Length: length}
	if err := ioctlPtr(f.fd, ioctlIOASUnmap, &u); err != nil {
		return 0, fmt.Errorf("IOMMU_IOAS_UNMAP ioas %d iova %#x length %#x: %w", ioas, iova, length, err)
	}
	return u.Length, nil
}

// IOASAllowIOVAs promises that ranges stay usable in ioas: attaching a
// device that would reserve part of them then fails instead of narrowing
// the IOAS, and IOVAs the kernel picks (IOASMap without MapFixedIOVA) come
// from them. It fails if part of them is reserved already. Fixed-IOVA maps
// outside them are still accepted. An empty list lifts the promise
// (IOMMU_IOAS_ALLOW_IOVAS).
func (f *IOMMUFD) IOASAllowIOVAs(ioas uint32, ranges []IOVARange) error {
	rs := make([]iovaRange, len(ranges))
	for i, r := range ranges {
		rs[i] = iovaRange(r)
	}
	a := ioasAllowIOVAs{Size: sizeofIOASAllowIOVAs, IOASID: ioas, NumIOVAs: uint32(len(rs))}
	if err := ioctlAllow(f.fd, ioctlIOASAllowIOVAs, &a, rs); err != nil {
		return fmt.Errorf("IOMMU_IOAS_ALLOW_IOVAS ioas %d: %w", ioas, err)
	}
	return nil
}

// SetOption sets option id of object (0 for global options) to val
// (IOMMU_OPTION with IOMMU_OPTION_OP_SET).
func (f *IOMMUFD) SetOption(id OptionID, object uint32, val uint64) error {
	o := option{Size: sizeofOption, OptionID: uint32(id), Op: optionOpSet, ObjectID: object, Val64: val}
	if err := ioctlPtr(f.fd, ioctlOption, &o); err != nil {
		return fmt.Errorf("IOMMU_OPTION set %d object %d = %d: %w", id, object, val, err)
	}
	return nil
}

// GetOption returns option id of object (IOMMU_OPTION with
// IOMMU_OPTION_OP_GET).
func (f *IOMMUFD) GetOption(id OptionID, object uint32) (uint64, error) {
	o := option{Size: sizeofOption, OptionID: uint32(id), Op: optionOpGet, ObjectID: object}
	if err := ioctlPtr(f.fd, ioctlOption, &o); err != nil {
		return 0, fmt.Errorf("IOMMU_OPTION get %d object %d: %w", id, object, err)
	}
	return o.Val64, nil
}

// SetHugePages allows (on) or forbids (off) IOMMU large pages in ioas
// (IOMMU_OPTION set IOMMU_OPTION_HUGE_PAGES). Forbidding them is what lets
// the VFIO-compatibility unmap cut an area (VFIOUnmapDMA); the kernel
// refuses it with EINVAL once a device is attached and anything is mapped,
// so it is a set-up step. Allowing them again is always accepted.
func (f *IOMMUFD) SetHugePages(ioas uint32, on bool) error {
	var v uint64
	if on {
		v = 1
	}
	return f.SetOption(OptionHugePages, ioas, v)
}

// HugePages reports whether ioas allows IOMMU large pages (IOMMU_OPTION get
// IOMMU_OPTION_HUGE_PAGES); a new IOAS does.
func (f *IOMMUFD) HugePages(ioas uint32) (bool, error) {
	v, err := f.GetOption(OptionHugePages, ioas)
	return v != 0, err
}

// VFIOIOASGet returns the file's VFIO-compatibility IOAS, the one the VFIO
// type1 ioctls issued on this iommufd act on (IOMMU_VFIO_IOAS with
// IOMMU_VFIO_IOAS_GET): ENODEV when none is set.
func (f *IOMMUFD) VFIOIOASGet() (uint32, error) {
	v := vfioIOAS{Size: sizeofVFIOIOAS, Op: vfioIOASGet}
	if err := ioctlPtr(f.fd, ioctlVFIOIOAS, &v); err != nil {
		return 0, fmt.Errorf("IOMMU_VFIO_IOAS get: %w", err)
	}
	return v.IOASID, nil
}

// VFIOIOASSet makes ioas the file's VFIO-compatibility IOAS (IOMMU_VFIO_IOAS
// with IOMMU_VFIO_IOAS_SET). There is one per iommufd file, shared by every
// descriptor of it: a cutting Space sets it again before its next cut.
func (f *IOMMUFD) VFIOIOASSet(ioas uint32) error {
	f.compat.mu.Lock()
	defer f.compat.mu.Unlock()
	return f.setCompat(ioas)
}

// VFIOIOASClear leaves the file without a VFIO-compatibility IOAS
// (IOMMU_VFIO_IOAS with IOMMU_VFIO_IOAS_CLEAR); the IOAS itself stays.
func (f *IOMMUFD) VFIOIOASClear() error {
	f.compat.mu.Lock()
	defer f.compat.mu.Unlock()
	v := vfioIOAS{Size: sizeofVFIOIOAS, Op: vfioIOASClear}
	if err := ioctlPtr(f.fd, ioctlVFIOIOAS, &v); err != nil {
		return fmt.Errorf("IOMMU_VFIO_IOAS clear: %w", err)
	}
	f.compat.ioas = 0
	return nil
}

// setCompat is IOMMU_VFIO_IOAS_SET with f.compat.mu held.
func (f *IOMMUFD) setCompat(ioas uint32) error {
	v := vfioIOAS{Size: sizeofVFIOIOAS, IOASID: ioas, Op: vfioIOASSet}
	if err := ioctlPtr(f.fd, ioctlVFIOIOAS, &v); err != nil {
		f.compat.ioas = 0 // unknown now
		return fmt.Errorf("IOMMU_VFIO_IOAS set %d: %w", ioas, err)
	}
	f.compat.ioas = ioas
	return nil
}

// VFIOUnmapDMA unmaps [iova, iova+size) of the file's VFIO-compatibility
// IOAS and returns the bytes unmapped (VFIO_IOMMU_UNMAP_DMA issued on the
// iommufd). When that IOAS forbids large pages the kernel first cuts the
// areas the range's ends fall in (iopt_cut_iova), so only the pages inside
// the range are unmapped and unpinned and the rest of those areas stays
// mapped with the same pinned pages; a range with nothing mapped succeeds
// with 0. With large pages allowed a range that cuts an area fails with
// ENOENT, as IOMMU_IOAS_UNMAP does. ENODEV: no compat IOAS is set (see
// VFIOIOASSet); EINVAL: size 0, an unaligned end, or an area the kernel
// will not split (large pages, in-kernel accesses); EBUSY: an area without
// pages or locked.
func (f *IOMMUFD) VFIOUnmapDMA(iova, size uint64) (uint64, error) {
	u := dmaUnmap{Argsz: sizeofDMAUnmap, IOVA: iova, Size: size}
	if err := ioctlPtr(f.fd, ioctlVFIOUnmapDMA, &u); err != nil {
		return 0, fmt.Errorf("VFIO_IOMMU_UNMAP_DMA (iommufd compat) iova %#x size %#x: %w", iova, size, err)
	}
	return u.Size, nil
}

// cutIn unmaps [iova, iova+size) of ioas through the VFIO-compatibility
// unmap, making ioas the compat IOAS first unless this IOMMUFD set it last.
// The lock keeps another Space of the file from taking the compat IOAS
// between the set and the unmap. If the kernel has none (cleared or
// destroyed by a call that did not go through this IOMMUFD), it is set once
// more and the unmap retried.
func (f *IOMMUFD) cutIn(ioas uint32, iova, size uint64) (uint64, error) {
	f.compat.mu.Lock()
	defer f.compat.mu.Unlock()
	if f.compat.ioas != ioas {
		if err := f.setCompat(ioas); err != nil {
			return 0, err
		}
	}
	n, err := f.VFIOUnmapDMA(iova, size)
	if errors.Is(err, unix.ENODEV) {
		if err := f.setCompat(ioas); err != nil {
			return 0, err
		}
		n, err = f.VFIOUnmapDMA(iova, size)
	}
	return n, err
}
