//go:build linux

package replay_test

import (
	"fmt"

	"github.com/gmemproject/gmem/replay"
	"github.com/gmemproject/gmem/trace"
)

// ExampleEvents replays a generated trace, then a request the VMM refuses.
func ExampleEvents() {
	seq, err := trace.Churn(trace.ChurnOptions{Common: trace.Common{RAM: 1 << 30, Events: 200, Seed: 1}})
	if err != nil {
		panic(err)
	}
	res := replay.Events(func(yield func(trace.Event) bool) {
		for e := range seq {
			if !yield(e) {
				return
			}
		}
		yield(trace.Convert{GPA: 0x1800, Size: 4096, To: trace.Shared})
	}, replay.Options{})
	fmt.Println("violations:", res.Violations)
	fmt.Println("rejected:", res.RejectedBy)
	fmt.Println("gmem needs fewer entries:", res.Gmem.EntriesPeak < res.Baseline.EntriesPeak)
	// Output:
	// violations: 0
	// rejected: map[misaligned:1]
	// gmem needs fewer entries: true
}
