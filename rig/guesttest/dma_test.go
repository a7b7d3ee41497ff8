package guesttest

import (
	"testing"

	"github.com/gmemproject/gmem/iommu"
)

// dmaChecks proves on a bare Space that the edu device's DMA moves bytes
// through mapped IOVAs and cannot reach memory whose IOVA is not mapped.
// base is a free IOVA window of 1 MiB below the 28-bit DMA mask.
func dmaChecks(t *testing.T, backend string, space iommu.Space, edu *Edu, base uint64) {
	const n = EduMaxCount
	mem := mmapShared(t, 1<<20)
	a, bOff := uint64(0), uint64(0x10000) // region offsets of buffers A and B

	check(t, backend, "dma-round-trip", func(t *testing.T) {
		if err := space.Map(base, 0x10000, mem[:0x10000]); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if _, err := space.Unmap(base, 0x10000); err != nil {
				t.Error(err)
			}
		}()
		pattern(mem[:n], 0x11)
		if err := edu.ToDevice(base, n); err != nil {
			t.Fatal(err)
		}
		if err := edu.ToRAM(base+0x8000, n); err != nil {
			t.Fatal(err)
		}
		expectBytes(t, "RAM -> edu -> RAM", mem[0x8000:0x8000+n], mem[:n])
	})

	// A and B are two one-page mappings; B is unmapped before the device
	// writes to it.
	check(t, backend, "dma-unmapped-write", func(t *testing.T) {
		if err := space.Map(base+a, 0x1000, mem[a:a+0x1000]); err != nil {
			t.Fatal(err)
		}
		if err := space.Map(base+bOff, 0x1000, mem[bOff:bOff+0x1000]); err != nil {
			t.Fatal(err)
		}
		pattern(mem[a:a+n], 0x22)
		want := append([]byte(nil), mem[a:a+n]...)
		if err := edu.ToDevice(base+a, n); err != nil {
			t.Fatal(err)
		}
		if got, err := space.Unmap(base+bOff, 0x1000); err != nil || got != 0x1000 {
			t.Fatalf("unmap B = %#x, %v", got, err)
		}
		pattern(mem[bOff:bOff+0x1000], 0x5a) // sentinel
		sentinel := append([]byte(nil), mem[bOff:bOff+0x1000]...)
		if err := edu.ToRAM(base+bOff, n); err != nil {
			t.Fatal(err)
		}
		expectBytes(t, "RAM behind an unmapped IOVA after a device write", mem[bOff:bOff+0x1000], sentinel)
		// DMA to a still-mapped IOVA works after the fault.
		clear(mem[a : a+0x1000])
		if err := edu.ToRAM(base+a, n); err != nil {
			t.Fatal(err)
		}
		expectBytes(t, "device write to a mapped IOVA after a fault", mem[a:a+n], want)
	})

	// The device reads B (unmapped, holding the sentinel) into its buffer,
	// then writes the buffer to A: A must hold zeros, nothing of B.
	check(t, backend, "dma-unmapped-read", func(t *testing.T) {
		pattern(mem[bOff:bOff+0x1000], 0x5a)
		pattern(mem[a:a+0x1000], 0x33)
		if err := edu.ToDevice(base+bOff, n); err != nil {
			t.Fatal(err)
		}
		if err := edu.ToRAM(base+a, n); err != nil {
			t.Fatal(err)
		}
		if !allZero(mem[a : a+n]) {
			t.Errorf("device read of an unmapped IOVA did not yield zeros: A starts % x", mem[a:a+16])
		}
		if got, err := space.Unmap(base+a, 0x1000); err != nil || got != 0x1000 {
			t.Fatalf("unmap A = %#x, %v", got, err)
		}
	})
}
