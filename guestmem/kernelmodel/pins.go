//go:build linux

package kernelmodel

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
)

// Pinner is a source of pins on a guest_memfd's pages.
type Pinner interface {
	// FirstPinned returns the first offset in r (file offsets, page
	// aligned) whose page it pins.
	FirstPinned(r span.Range) (off uint64, ok bool)
}

// iommuPins is an IOMMU mapping the file's shared view.
type iommuPins struct {
	m    *iommu.Model
	iova uint64
}

// IOMMUPins is the pins of an IOMMU that maps the file's shared view with
// file offset 0 at IOVA iova (guestmem maps IOVA = GPA, so iova is the GPA
// of file offset 0): every page a mapping covers is pinned, as VFIO type1
// and iommufd pin the memory of a mapping by address for as long as it
// exists.
func IOMMUPins(m *iommu.Model, iova uint64) Pinner { return iommuPins{m, iova} }

func (p iommuPins) FirstPinned(r span.Range) (uint64, bool) {
	if r.Empty() {
		return 0, false
	}
	ms := p.m.MappingsIn(span.Range{Start: p.iova + r.Start, End: p.iova + r.End})
	if len(ms) == 0 {
		return 0, false
	}
	return max(ms[0].IOVA, p.iova+r.Start) - p.iova, true
}

// HostFault is a host access to a page the kernel would have refused it
// (a private page of a model guest_memfd), caught by Catch: what a VMM gets
// as SIGBUS.
type HostFault struct {
	// Addr is the faulting address.
	Addr uintptr
}

// Error implements error.
func (f *HostFault) Error() string {
	return fmt.Sprintf("kernelmodel: host access to a private page at %#x (SIGBUS)", f.Addr)
}

// Catch runs fn and returns a *HostFault if fn faulted on memory, which a
// model guest_memfd's private page does on any host access. Other panics
// pass through.
func Catch(fn func()) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		if re, ok := r.(runtime.Error); ok {
			if a, ok := re.(interface{ Addr() uintptr }); ok {
				err = &HostFault{Addr: a.Addr()}
				return
			}
		}
		panic(r)
	}()
	fn()
	return nil
}
