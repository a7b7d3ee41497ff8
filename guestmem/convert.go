//go:build linux

package guestmem

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/span"
)

// Request asks for [GPA, GPA+Size) to become To.
type Request struct {
	GPA, Size uint64
	To        memattr.State
}

// String formats the request for logs.
func (r Request) String() string {
	return fmt.Sprintf("GPA [%#x, +%#x) to %v", r.GPA, r.Size, r.To)
}

// Result is what a successful conversion did.
type Result struct {
	Request Request
	// Changed is the bytes whose state changed; 0 for a same-state request.
	Changed uint64
	// Runs is the number of runs that changed (one listener notification
	// each).
	Runs int
	// Blocks is the number of RAM blocks the request touched.
	Blocks int
	// Ignored is the bytes outside RAM that a conversion to shared skipped.
	Ignored uint64
}

// Errors of Convert, wrapped in a *ConvertError.
var (
	// ErrInvalid is a malformed request: size 0, overflow, not page
	// aligned, beyond MaxGPA, or an unknown target state. It wraps the
	// span error that says which. Plug, Unplug, Walk and Backing.Discard
	// (an unknown Side) answer it for their malformed arguments too.
	ErrInvalid = errors.New("invalid request")
	// ErrNotRAM is a request to make an MMIO hole or unbacked range private.
	ErrNotRAM = errors.New("not guest RAM")
)

// ConvertError is a failed conversion.
type ConvertError struct {
	Request Request
	// Block is the block whose conversion failed, "" when the request was
	// refused before any block was touched.
	Block string
	Err   error
}

// Error implements error.
func (e *ConvertError) Error() string {
	if e.Block != "" {
		return fmt.Sprintf("guestmem: convert %v: block %s: %v", e.Request, e.Block, e.Err)
	}
	return fmt.Sprintf("guestmem: convert %v: %v", e.Request, e.Err)
}

// Unwrap returns the cause.
func (e *ConvertError) Unwrap() error { return e.Err }

// check validates a request without touching anything.
func (m *Memory) check(req Request) (span.Range, error) {
	if req.To != memattr.Shared && req.To != memattr.Private {
		return span.Range{}, fmt.Errorf("%w: target state %d", ErrInvalid, req.To)
	}
	r, err := span.Checked(req.GPA, req.Size, PageSize, m.maxGPA)
	if err != nil {
		return span.Range{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return r, nil
}

// Convert makes [req.GPA, req.GPA+req.Size) req.To. See the package
// documentation for the rules. On failure nothing has changed: state,
// attributes and IOMMU mappings are as before (freed backing pages stay
// freed), and the error is a *ConvertError; classify it with HypercallRet.
func (m *Memory) Convert(req Request) (Result, error) {
	res := Result{Request: req}
	if err := m.enter(); err != nil {
		return res, &ConvertError{Request: req, Err: err}
	}
	defer m.exit()
	m.requests.Add(1)
	r, err := m.check(req)
	if err != nil {
		m.rejected.Add(1)
		return res, &ConvertError{Request: req, Err: err}
	}
	var ram []piece
	for _, p := range m.split(r) {
		if p.b != nil {
			ram = append(ram, p)
			continue
		}
		if req.To == memattr.Private {
			m.rejected.Add(1)
			return res, &ConvertError{Request: req, Err: fmt.Errorf("%w: GPA %v is %s", ErrNotRAM, p.r, m.describe(p.r))}
		}
		res.Ignored += p.r.Len()
	}
	if len(ram) > 1 {
		m.convMu.Lock()
		defer m.convMu.Unlock()
	} else {
		m.convMu.RLock()
		defer m.convMu.RUnlock()
	}
	// Plug and Unplug hold convMu exclusively: the plug state is steady.
	for _, p := range ram {
		if p.b.unplugged(span.Range{Start: p.r.Start - p.b.gpa, End: p.r.End - p.b.gpa}) {
			m.rejected.Add(1)
			return res, &ConvertError{Request: req, Block: p.b.name, Err: fmt.Errorf("%w: GPA %v is not all plugged", ErrUnplugged, p.r)}
		}
	}
	type done struct {
		b    *Block
		runs []span.Range
	}
	var dones []done
	for _, p := range ram {
		changed, err := p.b.attrs.ConvertRuns(p.r.Start-p.b.gpa, p.r.Len(), req.To)
		if err != nil {
			var undo []error
			for i := len(dones) - 1; i >= 0; i-- {
				for _, c := range dones[i].runs {
					if uerr := dones[i].b.attrs.Convert(c.Start, c.Len(), opposite(req.To)); uerr != nil {
						undo = append(undo, fmt.Errorf("undo block %s at offset %v: %w", dones[i].b.name, c, uerr))
					}
				}
			}
			if len(undo) > 0 {
				m.undoFailures.Add(uint64(len(undo)))
				m.log.Error("guestmem: undoing a failed conversion failed", "request", req, "err", errors.Join(undo...))
			}
			m.failed.Add(1)
			m.log.Warn("guestmem: conversion failed", "request", req, "block", p.b.name, "err", err)
			return Result{Request: req}, &ConvertError{Request: req, Block: p.b.name, Err: errors.Join(append([]error{err}, undo...)...)}
		}
		dones = append(dones, done{p.b, changed})
		res.Runs += len(changed)
		for _, c := range changed {
			res.Changed += c.Len()
		}
	}
	res.Blocks = len(ram)
	m.conversions.Add(1)
	if res.Changed == 0 {
		m.noops.Add(1)
	}
	if req.To == memattr.Shared {
		m.pagesShared.Add(res.Changed / PageSize)
	} else {
		m.pagesPrivate.Add(res.Changed / PageSize)
	}
	m.ignored.Add(res.Ignored)
	return res, nil
}

// Transient reports whether err is a failure worth retrying: the IOMMU or
// the kernel ran out of something for the moment (ENOSPC, ENOMEM), was busy
// (EBUSY, EAGAIN) or was interrupted (EINTR).
func Transient(err error) bool {
	for _, e := range []unix.Errno{unix.ENOSPC, unix.ENOMEM, unix.EBUSY, unix.EAGAIN, unix.EINTR} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// HypercallRet returns the KVM_HC_MAP_GPA_RANGE result for the outcome of a
// guest's conversion request: 0 for success, EAGAIN (11) for a transient
// failure the guest may retry, EINVAL (22) for a bad request (malformed,
// not RAM, unplugged) or any other failure (ErrClosed among them). These are the only values KVM accepts for the exits it
// synthesises from TDX and SEV-SNP requests.
func HypercallRet(err error) uint64 {
	switch {
	case err == nil:
		return kvm.HypercallRetOK
	case errors.Is(err, ErrInvalid), errors.Is(err, ErrNotRAM), errors.Is(err, ErrUnplugged):
		return kvm.HypercallRetEINVAL
	case Transient(err):
		return kvm.HypercallRetEAGAIN
	}
	return kvm.HypercallRetEINVAL
}
