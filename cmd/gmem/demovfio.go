package main

import (
	"errors"
	"fmt"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/iommufd"
	"github.com/gmemproject/gmem/vfio"
	"github.com/gmemproject/gmem/vmm"
)

// demoReport is the demo's report: the machine's, and what gmem did to a
// real IOMMU when --vfio is given.
type demoReport struct {
	vmm.Report
	// Flavour says which kind of in-place or split memory ran (flavour).
	Flavour string `json:"flavour"`
	// VFIO is the kernel interface of the real IOMMU ("type1" or
	// "iommufd"), VFIODevice the PCI device it is attached for.
	VFIO       string `json:"vfio,omitempty"`
	VFIODevice string `json:"vfio_device,omitempty"`
	// VFIOMapCalls, VFIOUnmapCalls and VFIOEntriesPeak are the dma.Mapper
	// counters of the real space; VFIOEntriesNow its entries at the end.
	VFIOMapCalls    uint64 `json:"vfio_map_calls,omitempty"`
	VFIOUnmapCalls  uint64 `json:"vfio_unmap_calls,omitempty"`
	VFIOCutCalls    uint64 `json:"vfio_cut_calls,omitempty"`
	VFIOSplits      uint64 `json:"vfio_splits,omitempty"`
	VFIOEntriesPeak uint64 `json:"vfio_entries_peak,omitempty"`
	VFIOEntriesNow  uint64 `json:"vfio_entries_now,omitempty"`
	// VFIOPolicy is the policy the real space's mappers resolved
	// ("granule", "extent" or "cut"); VFIOCut says whether the space could
	// cut (nil without --vfio) (an iommufd IOAS with huge pages off, set as its file's compat
	// IOAS), and VFIOCutReason, for an iommufd space that could not, why
	// (iommufd.Space.CutReason).
	VFIOPolicy    string `json:"vfio_policy,omitempty"`
	VFIOCut       *bool  `json:"vfio_cut,omitempty"`
	VFIOCutReason string `json:"vfio_cut_reason,omitempty"`
}

// realIOMMU is a device's IOMMU opened through VFIO type1 or iommufd.
type realIOMMU struct {
	kind, bdf string
	space     iommu.Space
	// cutReason says why an iommufd space does not cut, "" if it does
	// (and for type1, which never does).
	cutReason string
	closers   []func() error
	att       *guestmem.Attachment
}

// openRealIOMMU opens the IOMMU of PCI device bdf (bound to vfio-pci) the
// given way and returns its space, empty. An iommufd space cuts where the
// kernel lets it, unless hugePages keeps the IOAS's large pages.
func openRealIOMMU(kind, bdf string, hugePages bool) (_ *realIOMMU, err error) {
	r := &realIOMMU{kind: kind, bdf: bdf}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	switch kind {
	case "type1":
		group, err := vfio.IOMMUGroup(bdf)
		if err != nil {
			return nil, err
		}
		c, err := vfio.OpenContainer()
		if err != nil {
			return nil, err
		}
		r.closers = append(r.closers, c.Close)
		g, err := vfio.OpenGroup(group)
		if err != nil {
			return nil, err
		}
		r.closers = append(r.closers, g.Close)
		if err := g.SetContainer(c); err != nil {
			return nil, err
		}
		r.closers = append(r.closers, g.UnsetContainer)
		if err := c.SetIOMMU(vfio.Type1v2IOMMU); err != nil {
			return nil, err
		}
		if r.space, err = vfio.NewSpace(c); err != nil {
			return nil, err
		}
		d, err := g.GetDeviceFD(bdf)
		if err != nil {
			return nil, err
		}
		r.closers = append(r.closers, d.Close)
	case "iommufd":
		f, err := iommufd.Open()
		if err != nil {
			return nil, err
		}
		r.closers = append(r.closers, f.Close)
		ioas, err := f.IOASAlloc()
		if err != nil {
			return nil, err
		}
		path, err := vfio.CdevPath(bdf)
		if err != nil {
			return nil, err
		}
		d, err := vfio.OpenCdev(path)
		if err != nil {
			return nil, err
		}
		r.closers = append(r.closers, d.Close)
		// The iommufd's number is held open for the bind.
		var berr error
		if err := f.Control(func(fd uintptr) { _, berr = d.BindIOMMUFD(int(fd)) }); err != nil {
			return nil, err
		}
		if berr != nil {
			return nil, berr
		}
		if _, err := d.AttachIOMMUFDPT(ioas); err != nil {
			return nil, err
		}
		sp, err := iommufd.NewSpaceOptions(f, ioas, iommufd.SpaceOptions{HugePages: hugePages})
		if err != nil {
			return nil, err
		}
		r.space, r.cutReason = sp, sp.CutReason()
	default:
		return nil, fmt.Errorf("unknown VFIO interface %q", kind)
	}
	return r, nil
}

// attach has a dma.Mapper per block keep the real space equal to the
// shared pages of mem.
func (r *realIOMMU) attach(mem *guestmem.Memory, policy dma.Policy) error {
	att, err := mem.AttachIOMMU(r.space, dma.Options{Policy: policy})
	switch {
	case policy == dma.Cut && errors.Is(err, dma.ErrOptions) && r.cutReason != "":
		return fmt.Errorf("--policy cut: the iommufd space does not cut (%s); --policy auto maps bounded extents there: %w", r.cutReason, err)
	case err != nil:
		return err
	}
	r.att = att
	return nil
}

// policyNote says which policy the real space is mapped with, and whether
// it cuts: "cut, the IOAS cuts" or "extent, the IOAS does not cut: why".
func (r *realIOMMU) policyNote() string {
	if r.att == nil {
		return "not attached"
	}
	switch p := r.att.Policy(); {
	case r.space.Caps().Cut:
		return p.String() + ", the IOAS cuts"
	case r.cutReason != "":
		return fmt.Sprintf("%s, the IOAS does not cut: %s", p, r.cutReason)
	default:
		return p.String()
	}
}

// detach unmaps everything and fills in the report's VFIO fields first.
func (r *realIOMMU) detach(rep *demoReport) error {
	if r.att == nil {
		return nil
	}
	st := r.att.Stats()
	rep.VFIO, rep.VFIODevice = r.kind, r.bdf
	rep.VFIOMapCalls, rep.VFIOUnmapCalls, rep.VFIOCutCalls, rep.VFIOSplits = st.MapCalls, st.UnmapCalls, st.CutCalls, st.Splits
	cut := r.space.Caps().Cut
	rep.VFIOPolicy, rep.VFIOCut, rep.VFIOCutReason = r.att.Policy().String(), &cut, r.cutReason
	rep.VFIOEntriesPeak, rep.VFIOEntriesNow = st.PeakEntries, st.Entries
	err := r.att.Detach()
	r.att = nil
	return err
}

// close releases the fds, newest first.
func (r *realIOMMU) close() error {
	var errs []error
	for i := len(r.closers) - 1; i >= 0; i-- {
		errs = append(errs, r.closers[i]())
	}
	r.closers = nil
	return errors.Join(errs...)
}

// flavour names the memory that ran: the mode, and who kept the attributes
// (for in-place memory, the in-place flavour: the guest_memfd's own
// attributes on a VM with private memory, or gmem's on a default VM).
func flavour(mode, enforcement string, guestRan bool) string {
	switch {
	case !guestRan:
		return mode + ", memfd memory without KVM, attributes in user space"
	case mode == guestmem.InPlace.String() && enforcement == string(guestmem.EnforceGuestMemfd):
		return "in place with private memory: per-guest_memfd attributes (KVM_SET_MEMORY_ATTRIBUTES2)"
	case mode == guestmem.InPlace.String():
		return "in place on a default VM: mmap-able guest_memfd (MMAP|INIT_SHARED), attributes in user space"
	case enforcement == string(guestmem.EnforceKVM):
		return "split with private memory: guest_memfd and a shared memfd, KVM attributes (KVM_SET_MEMORY_ATTRIBUTES)"
	}
	return "split on a default VM: guest_memfd and a shared memfd, attributes in user space"
}
