//go:build linux

package kvm

import (
	"testing"
	"unsafe"
)

// The numbers below are the reference's (kernel-uapi.md §1, printed by a C
// program compiled against 7.3 uAPI headers), or for kvm_regs/kvm_sregs the
// long-standing x86-64 layouts.

type field struct {
	name      string
	got, want uintptr
}

func checkFields(t *testing.T, what string, fs []field) {
	t.Helper()
	for _, f := range fs {
		if f.got != f.want {
			t.Errorf("%s: %s = %d, want %d", what, f.name, f.got, f.want)
		}
	}
}

func TestLayoutUserspaceMemoryRegion2(t *testing.T) {
	var r UserspaceMemoryRegion2
	checkFields(t, "kvm_userspace_memory_region2", []field{
		{"sizeof", unsafe.Sizeof(r), 160},
		{"slot", unsafe.Offsetof(r.Slot), 0},
		{"flags", unsafe.Offsetof(r.Flags), 4},
		{"guest_phys_addr", unsafe.Offsetof(r.GuestPhysAddr), 8},
		{"memory_size", unsafe.Offsetof(r.MemorySize), 16},
		{"userspace_addr", unsafe.Offsetof(r.UserspaceAddr), 24},
		{"guest_memfd_offset", unsafe.Offsetof(r.GuestMemfdOffset), 32},
		{"guest_memfd", unsafe.Offsetof(r.GuestMemfd), 40},
	})
}

func TestLayoutCreateGuestMemfd(t *testing.T) {
	var c createGuestMemfd
	checkFields(t, "kvm_create_guest_memfd", []field{
		{"sizeof", unsafe.Sizeof(c), 64},
		{"size", unsafe.Offsetof(c.Size), 0},
		{"flags", unsafe.Offsetof(c.Flags), 8},
	})
}

func TestLayoutMemoryAttributes(t *testing.T) {
	var a MemoryAttributes
	checkFields(t, "kvm_memory_attributes", []field{
		{"sizeof", unsafe.Sizeof(a), 32},
		{"address", unsafe.Offsetof(a.Address), 0},
		{"size", unsafe.Offsetof(a.Size), 8},
		{"attributes", unsafe.Offsetof(a.Attributes), 16},
		{"flags", unsafe.Offsetof(a.Flags), 24},
	})
}

func TestLayoutMemoryAttributes2(t *testing.T) {
	var a MemoryAttributes2
	checkFields(t, "kvm_memory_attributes2", []field{
		{"sizeof", unsafe.Sizeof(a), 128},
		{"offset", unsafe.Offsetof(a.Offset), 0},
		{"size", unsafe.Offsetof(a.Size), 8},
		{"attributes", unsafe.Offsetof(a.Attributes), 16},
		{"flags", unsafe.Offsetof(a.Flags), 24},
		{"error_offset", unsafe.Offsetof(a.ErrorOffset), 32},
	})
	// The first four fields are kvm_memory_attributes', as the uAPI
	// asserts statically.
	var old MemoryAttributes
	checkFields(t, "kvm_memory_attributes2 against kvm_memory_attributes", []field{
		{"size", unsafe.Offsetof(a.Size), unsafe.Offsetof(old.Size)},
		{"attributes", unsafe.Offsetof(a.Attributes), unsafe.Offsetof(old.Attributes)},
		{"flags", unsafe.Offsetof(a.Flags), unsafe.Offsetof(old.Flags)},
	})
}

func TestLayoutEnableCap(t *testing.T) {
	var c EnableCap
	checkFields(t, "kvm_enable_cap", []field{
		{"sizeof", unsafe.Sizeof(c), 104},
		{"cap", unsafe.Offsetof(c.Cap), 0},
		{"flags", unsafe.Offsetof(c.Flags), 4},
		{"args", unsafe.Offsetof(c.Args), 8},
	})
}

func TestLayoutRegs(t *testing.T) {
	var r Regs
	checkFields(t, "kvm_regs", []field{
		{"sizeof", unsafe.Sizeof(r), 144},
		{"rax", unsafe.Offsetof(r.RAX), 0},
		{"rsp", unsafe.Offsetof(r.RSP), 48},
		{"r8", unsafe.Offsetof(r.R8), 64},
		{"r15", unsafe.Offsetof(r.R15), 120},
		{"rip", unsafe.Offsetof(r.RIP), 128},
		{"rflags", unsafe.Offsetof(r.RFLAGS), 136},
	})
}

func TestLayoutSregs(t *testing.T) {
	var seg Segment
	checkFields(t, "kvm_segment", []field{
		{"sizeof", unsafe.Sizeof(seg), 24},
		{"base", unsafe.Offsetof(seg.Base), 0},
		{"limit", unsafe.Offsetof(seg.Limit), 8},
		{"selector", unsafe.Offsetof(seg.Selector), 12},
		{"type", unsafe.Offsetof(seg.Type), 14},
		{"present", unsafe.Offsetof(seg.Present), 15},
		{"dpl", unsafe.Offsetof(seg.DPL), 16},
		{"db", unsafe.Offsetof(seg.DB), 17},
		{"s", unsafe.Offsetof(seg.S), 18},
		{"l", unsafe.Offsetof(seg.L), 19},
		{"g", unsafe.Offsetof(seg.G), 20},
		{"avl", unsafe.Offsetof(seg.AVL), 21},
		{"unusable", unsafe.Offsetof(seg.Unusable), 22},
	})
	var dt DTable
	checkFields(t, "kvm_dtable", []field{
		{"sizeof", unsafe.Sizeof(dt), 16},
		{"base", unsafe.Offsetof(dt.Base), 0},
		{"limit", unsafe.Offsetof(dt.Limit), 8},
	})
	var s Sregs
	checkFields(t, "kvm_sregs", []field{
		{"sizeof", unsafe.Sizeof(s), 312},
		{"cs", unsafe.Offsetof(s.CS), 0},
		{"ds", unsafe.Offsetof(s.DS), 24},
		{"ss", unsafe.Offsetof(s.SS), 120},
		{"tr", unsafe.Offsetof(s.TR), 144},
		{"ldt", unsafe.Offsetof(s.LDT), 168},
		{"gdt", unsafe.Offsetof(s.GDT), 192},
		{"idt", unsafe.Offsetof(s.IDT), 208},
		{"cr0", unsafe.Offsetof(s.CR0), 224},
		{"cr3", unsafe.Offsetof(s.CR3), 240},
		{"cr4", unsafe.Offsetof(s.CR4), 248},
		{"cr8", unsafe.Offsetof(s.CR8), 256},
		{"efer", unsafe.Offsetof(s.EFER), 264},
		{"apic_base", unsafe.Offsetof(s.APICBase), 272},
		{"interrupt_bitmap", unsafe.Offsetof(s.InterruptBitmap), 280},
	})
}

// TestLayoutRun checks the kvm_run offsets the decoder uses against the
// reference: size 2352, exit_reason @8, flags @14, the exit union @32 (256
// bytes, so kvm_valid_regs follows @288), and the members of each exit.
func TestLayoutRun(t *testing.T) {
	checkFields(t, "kvm_run", []field{
		{"sizeof", runSize, 2352},
		{"immediate_exit", runOffImmediate, 1},
		{"exit_reason", runOffExitReason, 8},
		{"flags", runOffFlags, 14},
		{"exit union", runOffExit, 32},
		{"kvm_valid_regs", runOffValidRegs, 288},
		{"io.direction", runOffIODirection, 32},
		{"io.size", runOffIOSize, 33},
		{"io.port", runOffIOPort, 34},
		{"io.count", runOffIOCount, 36},
		{"io.data_offset", runOffIODataOffset, 40},
		{"mmio.phys_addr", runOffMMIOPhysAddr, 32},
		{"mmio.data", runOffMMIOData, 40},
		{"mmio.len", runOffMMIOLen, 48},
		{"mmio.is_write", runOffMMIOIsWrite, 52},
		{"hypercall.nr", runOffHypercallNr, 32},
		{"hypercall.args", runOffHypercallArgs, 40},
		{"hypercall.ret", runOffHypercallRet, 88},
		{"hypercall.flags", runOffHypercallFlags, 96},
		{"internal.suberror", runOffInternalSuberror, 32},
		{"internal.ndata", runOffInternalNData, 36},
		{"internal.data", runOffInternalData, 40},
		{"fail_entry.reason", runOffFailEntryReason, 32},
		{"fail_entry.cpu", runOffFailEntryCPU, 40},
		{"hw.hardware_exit_reason", runOffUnknownReason, 32},
		{"memory_fault.flags", runOffMemoryFaultFlags, 32},
		{"memory_fault.gpa", runOffMemoryFaultGPA, 40},
		{"memory_fault.size", runOffMemoryFaultSize, 48},
	})
	// The largest decoded member must stay inside the 256-byte union.
	if end := runOffInternalData + 8*runMaxInternalData; end > runOffValidRegs {
		t.Errorf("internal.data ends at %d, past the union", end)
	}
}

// ioc is the asm-generic _IOC encoding.
func ioc(dir, nr, size uintptr) uintptr { return dir<<30 | size<<16 | 0xAE<<8 | nr }

// TestLayoutCPUID checks struct kvm_cpuid_entry2 (40 bytes: function,
// index, flags, eax, ebx, ecx, edx, 3 words of padding) and the 8-byte
// kvm_cpuid2 header before the entries.
func TestLayoutCPUID(t *testing.T) {
	var e CPUIDEntry2
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"sizeof entry", unsafe.Sizeof(e), 40},
		{"function", unsafe.Offsetof(e.Function), 0},
		{"index", unsafe.Offsetof(e.Index), 4},
		{"flags", unsafe.Offsetof(e.Flags), 8},
		{"eax", unsafe.Offsetof(e.EAX), 12},
		{"edx", unsafe.Offsetof(e.EDX), 24},
		{"entries", unsafe.Offsetof(cpuid2{}.Entries), 8},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
}

// TestIoctlNumbers checks each request number twice: against the value in
// the reference table, and against _IOC recomputed from the Go struct size,
// so a struct and its ioctl cannot drift apart.
func TestIoctlNumbers(t *testing.T) {
	const none, w, r, rw = 0, 1, 2, 3
	for _, c := range []struct {
		name          string
		got, table    uintptr
		dir, nr, size uintptr
	}{
		{"KVM_GET_API_VERSION", kvmGetAPIVersion, 0xAE00, none, 0x00, 0},
		{"KVM_CREATE_VM", kvmCreateVM, 0xAE01, none, 0x01, 0},
		{"KVM_CHECK_EXTENSION", kvmCheckExtension, 0xAE03, none, 0x03, 0},
		{"KVM_GET_VCPU_MMAP_SIZE", kvmGetVCPUMmapSize, 0xAE04, none, 0x04, 0},
		{"KVM_CREATE_VCPU", kvmCreateVCPU, 0xAE41, none, 0x41, 0},
		{"KVM_GET_SUPPORTED_CPUID", kvmGetSupportedCPUID, 0xC008AE05, rw, 0x05, unsafe.Offsetof(cpuid2{}.Entries)},
		{"KVM_SET_CPUID2", kvmSetCPUID2, 0x4008AE90, w, 0x90, unsafe.Offsetof(cpuid2{}.Entries)},
		{"KVM_SET_USER_MEMORY_REGION2", kvmSetUserMemoryRegion2, 0x40A0AE49, w, 0x49, unsafe.Sizeof(UserspaceMemoryRegion2{})},
		{"KVM_RUN", kvmRun, 0xAE80, none, 0x80, 0},
		{"KVM_GET_REGS", kvmGetRegs, 0x8090AE81, r, 0x81, unsafe.Sizeof(Regs{})},
		{"KVM_SET_REGS", kvmSetRegs, 0x4090AE82, w, 0x82, unsafe.Sizeof(Regs{})},
		{"KVM_GET_SREGS", kvmGetSregs, 0x8138AE83, r, 0x83, unsafe.Sizeof(Sregs{})},
		{"KVM_SET_SREGS", kvmSetSregs, 0x4138AE84, w, 0x84, unsafe.Sizeof(Sregs{})},
		{"KVM_ENABLE_CAP", kvmEnableCap, 0x4068AEA3, w, 0xA3, unsafe.Sizeof(EnableCap{})},
		{"KVM_SET_MEMORY_ATTRIBUTES", kvmSetMemoryAttributes, 0x4020AED2, w, 0xD2, unsafe.Sizeof(MemoryAttributes{})},
		{"KVM_SET_MEMORY_ATTRIBUTES2", kvmSetMemoryAttributes2, 0xC080AED2, rw, 0xD2, unsafe.Sizeof(MemoryAttributes2{})},
		{"KVM_CREATE_GUEST_MEMFD", kvmCreateGuestMemfd, 0xC040AED4, rw, 0xD4, unsafe.Sizeof(createGuestMemfd{})},
	} {
		if c.got != c.table {
			t.Errorf("%s = %#x, reference table says %#x", c.name, c.got, c.table)
		}
		if enc := ioc(c.dir, c.nr, c.size); c.got != enc {
			t.Errorf("%s = %#x, _IOC from the Go struct gives %#x", c.name, c.got, enc)
		}
	}
}
