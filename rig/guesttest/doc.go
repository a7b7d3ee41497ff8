// Package guesttest holds the tests that scripts/rig runs inside its QEMU
// guest, against real VFIO type1 and iommufd and QEMU's edu DMA device, and
// the small edu driver they use.
//
// The tests only run when the guest's /init sets GMEM_RIG=1; elsewhere they
// skip and name scripts/rig. scripts/rig builds them with
// `CGO_ENABLED=0 go test -c`, packs the binary into the guest's initramfs
// and reads the verdict line each check prints:
//
//	GMEM-RIG check <type1|iommufd> <check> pass|fail|skip
//
// The cut checks (cut_test.go) also print what each stream of splits did,
// for the log, not the verdict:
//
//	GMEM-RIG split iommufd <cut|extent> <spread|sequential> cuts=N writes=N lost=N ...
package guesttest
