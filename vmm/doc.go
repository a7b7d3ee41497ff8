// Package vmm is a minimal virtual machine monitor for gmem's built-in test
// guest: it boots the guest in 64-bit long mode on guestmem memory with one
// or more vCPUs, takes the guest's conversion requests, and gives it a DMA
// test device behind an IOMMU, so that a running guest can show that a
// device reaches the pages it made shared and never the ones it made private.
//
// # Conversion requests
//
// Requests arrive three ways and all go to the same executor
// (guestmem.Memory.Convert):
//
//   - KVM_EXIT_HYPERCALL with KVM_HC_MAP_GPA_RANGE: the result goes back in
//     the hypercall's return value (0, EINVAL or EAGAIN); a malformed request
//     is answered EINVAL and the guest runs on;
//   - KVM_EXIT_MEMORY_FAULT: an implicit conversion of the faulting range,
//     after which the vCPU re-enters (a request that keeps failing the same
//     way stops the vCPU rather than spin);
//   - the paravirtual conversion port (see the Conv* registers), which the
//     built-in guest uses because hypercall instructions hang the vCPU under
//     this host's nested KVM.
//
// The first two are exercised by feeding recorded kvm_run contents to
// [Machine.HandleExit].
//
// # Devices
//
// Each vCPU i has its own bank of conversion-port registers at
// ConvPortBase+i*ConvPortStride and its own DMA test device at
// DMAPortBase+i*DMAPortStride, so vCPUs never share device state. The DMA
// device is modelled on QEMU's edu device: a 4 KiB device-side buffer and
// commands that copy RAM to the buffer and the buffer to RAM, through an
// IOMMU space kept by a dma.Mapper per block (IOVA = GPA). A transfer the
// IOMMU blocks moves nothing and sets DMAStatusBlocked. The console port
// takes one result word per scenario check.
//
// # Scenarios
//
// A [Scenario] is one [Program] of [Step]s per vCPU. [Compile] turns a
// program into x86-64 machine code (with package guest's encoder) that does
// the steps and reports each check on the console port; [Interpret] does the
// same steps from Go, through the same devices, for hosts without KVM.
// [Builtin] is the scenario gmem demo runs.
package vmm
