package bench

import (
	"math"
	"slices"
	"strings"
	"testing"
)

func TestTimedAlternates(t *testing.T) {
	var order []string
	vals := map[string][]float64{"b": {5, 1, 3, 4, 2}, "g": {12, 30, 18, 50, 42}}
	side := func(name string) func() (float64, error) {
		return func() (float64, error) {
			order = append(order, name)
			v := vals[name][0]
			vals[name] = vals[name][1:]
			return v, nil
		}
	}
	row, err := Timed(Sizes{Rounds: 5}, Row{Name: "x"}, side("b"), side("g"))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(order, ""); got != "bggbbggbbg" {
		t.Errorf("order %q, want the sides swapped every round", got)
	}
	if row.Baseline != 3 || row.Gmem != 30 || row.Rounds != 5 {
		t.Errorf("medians %v %v rounds %d, want 3 30 5", row.Baseline, row.Gmem, row.Rounds)
	}
	if row.BaselineRange[0] != 1 || row.BaselineRange[1] != 5 || row.GmemRange[0] != 12 || row.GmemRange[1] != 50 {
		t.Errorf("ranges %v %v", row.BaselineRange, row.GmemRange)
	}
	if !slices.Equal(row.BaselineIQR, []float64{2, 4}) || !slices.Equal(row.GmemIQR, []float64{18, 42}) {
		t.Errorf("quartiles %v %v, want [2 4] [18 42]", row.BaselineIQR, row.GmemIQR)
	}
	// (4-2)/3 against (42-18)/30: the worse side's.
	if want := 24.0 / 30; math.Abs(row.Spread-want) > 1e-12 {
		t.Errorf("spread %v, want %v", row.Spread, want)
	}
}

// TestImprovement: the ratio of each kind of row, none for a cost the
// baseline does not pay.
func TestImprovement(t *testing.T) {
	for _, c := range []struct {
		r    Row
		want float64
	}{
		{Row{Baseline: 10, Gmem: 2, Better: "lower"}, 5},
		{Row{Baseline: 2, Gmem: 10, Better: "higher"}, 5},
		{Row{Baseline: 3, Gmem: 3, Better: "lower"}, 1},
		{Row{Baseline: 3, Gmem: 0, Better: "lower"}, math.Inf(1)},
		{Row{Baseline: 0, Gmem: 4096, Better: "lower"}, math.NaN()},
		{Row{Gmem: 7, Better: "lower", BaselineHow: NotRun}, math.NaN()},
	} {
		got := Improvement(c.r)
		if got != c.want && !(math.IsNaN(got) && math.IsNaN(c.want)) {
			t.Errorf("Improvement(%+v) = %v, want %v", c.r, got, c.want)
		}
	}
}

// TestRoundsRotates: with three sides every side runs first, second and
// third in turn, after one untimed run each with warmup, and each side's
// values come back in its own slice.
func TestRoundsRotates(t *testing.T) {
	var order []string
	n := map[string]float64{}
	side := func(name string) Side {
		return Side{name, func() (float64, error) {
			order = append(order, name)
			n[name]++
			return n[name], nil
		}}
	}
	vs, err := Rounds("x", 3, true, side("a"), side("b"), side("c"))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(order, ""); got != "abc"+"abc"+"bca"+"cab" {
		t.Errorf("order %q", got)
	}
	for i, want := range [][]float64{{2, 3, 4}, {2, 3, 4}, {2, 3, 4}} {
		if !slices.Equal(vs[i], want) {
			t.Errorf("side %d: %v, want %v", i, vs[i], want)
		}
	}
}
