// Package kvm is a thin typed wrapper over the Linux KVM ioctls gmem needs:
// VMs on the default x86-64 VM type, guest_memfd files, memslots bound to
// them, memory attributes where the kernel has them, and vCPUs run with a
// decoded view of their kvm_run page.
//
// There is one Go type per file descriptor ([System] for /dev/kvm, [VM],
// [VCPU], [GuestMemfd]) and one method per ioctl, named after it. Constants
// and struct layouts are written out by hand from the uAPI (the machine's
// installed headers are older than the kernel and are not used); tests check
// every size and offset. Capabilities are probed on the fd they belong to,
// never assumed.
//
// The exit decoder ([DecodeExit]) works on the raw bytes of a kvm_run page,
// so it runs equally on a live vCPU and on recorded contents; that is how the
// hypercall and memory-fault paths are exercised on hosts whose guests cannot
// raise those exits.
//
// Errors returned by ioctls are unix.Errno values wrapped with the ioctl's
// name; test them with errors.Is(err, unix.EINVAL) and so on.
//
// Every type's methods are safe for concurrent use, Close included. Each
// ioctl runs with the descriptor held open (inside its RawConn.Control), so
// a Close racing it can never make it reach a recycled descriptor number:
// Close refuses new calls with [ErrClosed] (which matches fs.ErrClosed),
// waits for the calls in flight and then closes. A vCPU's Close first
// interrupts a KVM_RUN in progress, as [VCPU.Kick] does. Fd returns a
// number that is only lent; hand it to another call (a memslot's
// guest_memfd) inside the owner's Control where Close may race.
package kvm
