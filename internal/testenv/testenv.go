// Package testenv reads the environment the project's tests share. It is
// imported only by tests.
package testenv

import (
	"os"
	"strconv"
	"testing"
)

// Ops is a randomized test's number of operations: GMEM_RANDOM_OPS where it
// is set (CI sets 1,000,000), scaled to the cost of the test's operations,
// else a quick default.
type Ops struct {
	// Short and Full are the defaults under -short and otherwise.
	Short, Full int
	// Div divides GMEM_RANDOM_OPS (1 when 0), for operations that cost
	// more than most; Min is the least the quotient gives.
	Div, Min int
}

// Count answers the number of operations. A GMEM_RANDOM_OPS that is not a
// positive number fails the test.
func (o Ops) Count(t testing.TB) int {
	t.Helper()
	if s := os.Getenv("GMEM_RANDOM_OPS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("GMEM_RANDOM_OPS=%q: want a positive number", s)
		}
		return max(n/max(o.Div, 1), o.Min)
	}
	if testing.Short() {
		return o.Short
	}
	return o.Full
}
