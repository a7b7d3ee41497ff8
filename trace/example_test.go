package trace_test

import (
	"fmt"
	"strings"

	"github.com/gmemproject/gmem/trace"
)

// ExampleParse reads a QEMU trace log: the machine comes from Options, the
// lines may carry any prefix, and a guest's bad request is kept as traced.
func ExampleParse() {
	log := `2026-12-01T19:50:00.000001Z 12@1700000000.000001:kvm_convert_memory start 0x200000 size 0x200000 private_to_shared
qemu-system-x86_64: a message of QEMU's own
12@1700000000.000002:kvm_convert_memory start 0x400800 size 0x1000 private_to_shared
`
	ram, err := trace.ParseRAMLayout("0:1GiB")
	if err != nil {
		panic(err)
	}
	tr, err := trace.Parse(strings.NewReader(log), trace.Options{RAM: ram})
	if err != nil {
		panic(err)
	}
	fmt.Println(tr.Format, "-", tr.FormatReason)
	for _, e := range tr.Events {
		fmt.Printf("%+v\n", e)
	}
	fmt.Println("unrecognised lines:", tr.Unrecognised)
	// Output:
	// qemu - detected from line 1: does not start with '{'
	// {Name:ram0 GPA:0 Size:1073741824 Mode:split Block:0}
	// {Dev:dev0 IOMMU:type1 Limit:0}
	// {GPA:2097152 Size:2097152 To:shared}
	// {GPA:4196352 Size:4096 To:shared}
	// unrecognised lines: 1
}
