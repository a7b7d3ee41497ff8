package bench

import (
	"fmt"
	"time"

	"github.com/gmemproject/gmem/discard"
	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
	"github.com/gmemproject/gmem/trace"
)

// The floor of a round trip is what the kernel must spend to let a device
// reach a range and take it back: one map call of the whole range (pinning
// every page) and one unmap call. gmem's policies do the same pinning in
// more calls, with its bookkeeping around them; what they take over the
// floor is their cost.

// FloorSide is one way of making a range reachable by a device and
// unreachable again: the floor itself, or a gmem policy through the whole
// stack (attributes, manager, mapper).
type FloorSide struct {
	Name    string
	Floor   bool        // one map call of the whole range, one unmap
	Options dma.Options // the mapper's, for a policy
	Default bool        // the policy a zero dma.Options gives
}

// FloorSides are the sides of the floor comparison: the floor, granule
// mapping (QEMU's), extents bounded at dma.DefaultMaxExtent (the default)
// and unbounded extents.
func FloorSides() []FloorSide {
	return []FloorSide{
		{Name: "one-map", Floor: true},
		{Name: "granule", Options: dma.Options{Policy: dma.Granule}},
		{Name: "extent", Options: dma.Options{}, Default: true},
		{Name: "extent-unbounded", Options: dma.Options{Policy: dma.Extent, MaxExtent: dma.Unbounded}},
	}
}

// FloorRig is a range of guest memory and the IOMMU space a device reaches
// it through: a model, or a real kernel's (in the rig).
type FloorRig struct {
	Space iommu.Space
	Host  []byte // the memory behind the range (nil on a model without DMA)
	GPA   uint64 // the range's IOVA (IOVA = GPA)
	Size  uint64
	// Pinned returns the pages pinned now: the model's count, or the
	// kernel's accounting of the process.
	Pinned func() (uint64, error)
}

// FloorSample is one round trip of one side.
type FloorSample struct {
	ToShared, ToPrivate time.Duration // the two directions
	MapCalls            uint64
	UnmapCalls          uint64
	Pinned              uint64 // pages pinned while the range was reachable, over those before
}

// Round runs one round trip of side. Only the two directions are timed:
// building the stack and reading the pinned pages are not.
func (r FloorRig) Round(side FloorSide) (FloorSample, error) {
	before, err := r.Pinned()
	if err != nil {
		return FloorSample{}, err
	}
	var s FloorSample
	if side.Floor {
		t0 := time.Now()
		if err := r.Space.Map(r.GPA, r.Size, r.Host); err != nil {
			return s, fmt.Errorf("floor: map of %s: %w", trace.FormatSize(r.Size), err)
		}
		s.ToShared = time.Since(t0)
		if s.Pinned, err = r.pinnedSince(before); err != nil {
			return s, err
		}
		t1 := time.Now()
		n, err := r.Space.Unmap(r.GPA, r.Size)
		s.ToPrivate = time.Since(t1)
		if err != nil || n != r.Size {
			return s, fmt.Errorf("floor: unmap of %s: %d bytes, %v", trace.FormatSize(r.Size), n, err)
		}
		s.MapCalls, s.UnmapCalls = 1, 1
		return s, r.noPinsLeft(before)
	}
	m := discard.New(r.Size, nil)
	attrs, err := memattr.New(m, memattr.Config{})
	if err != nil {
		return s, err
	}
	mapper, err := dma.New(r.Space, r.Host, side.Options)
	if err != nil {
		return s, err
	}
	if err := m.Register(mapper, discard.Section{Size: r.Size, GPA: r.GPA}); err != nil {
		return s, err
	}
	t0 := time.Now()
	if err := attrs.Convert(0, r.Size, memattr.Shared); err != nil {
		return s, fmt.Errorf("%s: to shared: %w", side.Name, err)
	}
	s.ToShared = time.Since(t0)
	if s.Pinned, err = r.pinnedSince(before); err != nil {
		return s, err
	}
	t1 := time.Now()
	if err := attrs.Convert(0, r.Size, memattr.Private); err != nil {
		return s, fmt.Errorf("%s: to private: %w", side.Name, err)
	}
	s.ToPrivate = time.Since(t1)
	st := mapper.Stats()
	if st.Entries != 0 {
		return s, fmt.Errorf("%s: %d entries left after the round trip", side.Name, st.Entries)
	}
	s.MapCalls, s.UnmapCalls = st.MapCalls, st.UnmapCalls
	if err := m.Unregister(mapper); err != nil {
		return s, err
	}
	return s, r.noPinsLeft(before)
}

func (r FloorRig) pinnedSince(before uint64) (uint64, error) {
	now, err := r.Pinned()
	if err != nil {
		return 0, err
	}
	return now - before, nil
}

func (r FloorRig) noPinsLeft(before uint64) error {
	now, err := r.Pinned()
	if err != nil {
		return err
	}
	if now != before {
		return fmt.Errorf("%d pages pinned before the round trip, %d after", before, now)
	}
	return nil
}

// FloorResult is one side's rounds.
type FloorResult struct {
	Side    FloorSide
	Samples []FloorSample // in the order run
	Time    Summary       // of both directions, in nanoseconds
}

// Measure runs rounds round trips of every side, interleaved (Rounds: the
// order rotated each round, each side after a collection), after one
// untimed round each with warmup. Every round of every side must pin the
// same pages: the sides differ in how they map, not in what.
func (r FloorRig) Measure(rounds int, warmup bool, sides []FloorSide) ([]FloorResult, error) {
	out := make([]FloorResult, len(sides))
	runs := make([]Side, len(sides))
	for i, side := range sides {
		out[i].Side = side
		runs[i] = Side{side.Name, func() (float64, error) {
			s, err := r.Round(side)
			if err != nil {
				return 0, err
			}
			out[i].Samples = append(out[i].Samples, s)
			return float64((s.ToShared + s.ToPrivate).Nanoseconds()), nil
		}}
	}
	vs, err := Rounds("floor", rounds, warmup, runs...)
	if err != nil {
		return nil, err
	}
	pinned := out[0].Samples[0].Pinned
	for i := range out {
		if warmup {
			out[i].Samples = out[i].Samples[1:]
		}
		out[i].Time = Summarize(vs[i])
		for _, s := range out[i].Samples {
			if s.Pinned != pinned {
				return nil, fmt.Errorf("floor: %s pinned %d pages, %s %d", out[i].Side.Name, s.Pinned, out[0].Side.Name, pinned)
			}
		}
	}
	if pinned == 0 {
		return nil, fmt.Errorf("floor: no side pinned a page")
	}
	return out, nil
}

// FloorModel is the floor comparison on the model IOMMU: the round trip of
// sz.RoundTrip by every side on one model space (iommufd rules, no entry
// limit), so that gmem's user-space cost is seen without any kernel's.
func FloorModel(sz Sizes) ([]Row, error) {
	model := iommu.NewModelSpan(iommu.Caps{Rules: iommu.IOMMUFD}, 2*sz.RoundTrip)
	rig := FloorRig{Space: model, Size: sz.RoundTrip, Pinned: func() (uint64, error) {
		p := model.Pins()
		return p.Pinned - p.Unpinned, nil
	}}
	res, err := rig.Measure(sz.Rounds, sz.Warmup, FloorSides())
	if err != nil {
		return nil, err
	}
	return FloorRows(res, trace.FormatSize(sz.RoundTrip)+", model IOMMU", "the model IOMMU", ""), nil
}

// FloorRows turns measured sides (the floor first) into rows: each policy's
// round trip time against the floor's, and the pinned pages of the floor
// against those of the default policy. scale and where say where they were
// measured; source is the rows' Source.
func FloorRows(res []FloorResult, scale, where, source string) []Row {
	floor := res[0]
	var rows []Row
	var def FloorResult
	for _, r := range res[1:] {
		if r.Side.Default {
			def = r
		}
		row := Row{
			Name: "floor: " + r.Side.Name + " round trip time", Unit: "ns", Better: "lower", Scale: scale, Source: source,
			Note: fmt.Sprintf("baseline column: the floor, one map call of the whole range and one unmap on %s; gmem: the %s policy through attributes, manager and mapper, %.2fx the floor's time (map calls: %s; %.0f ns a call over the floor)",
				where, r.Side.Name, r.Time.Median/floor.Time.Median, Commas(r.Samples[0].MapCalls),
				(r.Time.Median-floor.Time.Median)/float64(r.Samples[0].MapCalls)),
		}
		if r.Side.Default {
			row.Note += "; the default policy"
		}
		row.SetSides(len(r.Samples), floor.Time, r.Time)
		row.Ratio = Improvement(row)
		rows = append(rows, row)
	}
	if def.Samples != nil {
		rows = append(rows, Row{
			Name: "floor: round trip pinned pages", Unit: "pages", Baseline: float64(floor.Samples[0].Pinned), Gmem: float64(def.Samples[0].Pinned),
			Better: "lower", Scale: scale, Source: source, Ratio: 1,
			Note: "pages pinned while the range was reachable: the same on every side (checked), so the time rows compare calls and bookkeeping, not pinning",
		})
	}
	return rows
}
