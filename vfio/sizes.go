package vfio

// Sizes of the uAPI structs, the argsz values the kernel expects. Written
// out rather than taken with unsafe.Sizeof so the ioctl code stays free of
// unsafe; layout_unsafe_test.go checks they agree.
const (
	sizeofGroupStatus     = 8
	sizeofDeviceInfo      = 24
	sizeofRegionInfo      = 32
	sizeofIOMMUType1Info  = 24
	sizeofDMAMap          = 32
	sizeofDMAUnmap        = 24
	sizeofBindIOMMUFD     = 24
	sizeofAttachIOMMUFDPT = 16
	sizeofDetachIOMMUFDPT = 12
)
