package bench

import (
	"errors"
	"fmt"
	"sync/atomic"
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
	Default bool        // the policy a zero dma.Options gives on the space
}

// FloorSides are the sides of the floor comparison on a space with caps:
// the floor, granule mapping (QEMU's), extents bounded at
// dma.DefaultMaxExtent and unbounded extents, and where the space can cut,
// the Cut policy. The default is the policy a zero dma.Options resolves to
// there (dma.Auto): Cut where the space cuts, else Extent.
func FloorSides(caps iommu.Caps) []FloorSide {
	sides := []FloorSide{
		{Name: "one-map", Floor: true},
		{Name: "granule", Options: dma.Options{Policy: dma.Granule}},
		{Name: "extent", Options: dma.Options{Policy: dma.Extent}, Default: !caps.Cut},
		{Name: "extent-unbounded", Options: dma.Options{Policy: dma.Extent, MaxExtent: dma.Unbounded}},
	}
	if caps.Cut {
		sides = append(sides, FloorSide{Name: "cut", Options: dma.Options{Policy: dma.Cut}, Default: true})
	}
	return sides
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
	// MinRound, if set, repeats a side's round trip within one round until
	// its timed parts add up to this much, and the round is their mean: on
	// the model the floor is a few microseconds, too short to time once.
	MinRound time.Duration
}

// FloorSample is one round trip of one side.
type FloorSample struct {
	ToShared, ToPrivate time.Duration // the two directions
	InSpace             time.Duration // of both, the time inside the space's Map, Unmap and Cut
	MapCalls            uint64
	UnmapCalls          uint64 // unmap or cut requests
	Pinned              uint64 // pages pinned while the range was reachable, over those before
}

// Round runs one round trip of side. Only the two directions are timed:
// building the stack and reading the pinned pages are not. The time inside
// the space's calls is measured too: the rest is gmem's own work.
func (r FloorRig) Round(side FloorSide) (FloorSample, error) {
	before, err := r.Pinned()
	if err != nil {
		return FloorSample{}, err
	}
	var s FloorSample
	space := &TimedSpace{Space: r.Space}
	if side.Floor {
		t0 := time.Now()
		if err := space.Map(r.GPA, r.Size, r.Host); err != nil {
			return s, fmt.Errorf("floor: map of %s: %w", trace.FormatSize(r.Size), err)
		}
		s.ToShared = time.Since(t0)
		if s.Pinned, err = r.pinnedSince(before); err != nil {
			return s, err
		}
		t1 := time.Now()
		n, err := space.Unmap(r.GPA, r.Size)
		s.ToPrivate, s.InSpace = time.Since(t1), space.Spent()
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
	mapper, err := dma.New(space, r.Host, side.Options)
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
	s.ToPrivate, s.InSpace = time.Since(t1), space.Spent()
	st := mapper.Stats()
	if st.Entries != 0 {
		return s, fmt.Errorf("%s: %d entries left after the round trip", side.Name, st.Entries)
	}
	s.MapCalls, s.UnmapCalls = st.MapCalls, st.UnmapCalls+st.CutCalls
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
	Side     FloorSide
	Samples  []FloorSample // in the order run (none when read from a log)
	Rounds   int
	Time     Summary // of both directions, in nanoseconds
	InSpace  float64 // the median nanoseconds inside the space's calls
	MapCalls uint64  // of one round
	Pinned   uint64  // pages pinned while reachable, the same every round
}

// Measure runs rounds round trips of every side, interleaved (Rounds: the
// order rotated each round, each side after a collection), after one
// untimed round each with warmup; a side's round is one round trip, or
// the mean of as many as fill MinRound. Every round trip of every side must
// pin the same pages: the sides differ in how they map, not in what.
func (r FloorRig) Measure(rounds int, warmup bool, sides []FloorSide) ([]FloorResult, error) {
	out := make([]FloorResult, len(sides))
	runs := make([]Side, len(sides))
	calls, warm := make([]int, len(sides)), make([]int, len(sides))
	for i, side := range sides {
		out[i].Side = side
		runs[i] = Side{side.Name, func() (float64, error) {
			defer func() {
				if calls[i]++; warmup && calls[i] == 1 {
					warm[i] = len(out[i].Samples) // the untimed first call's
				}
			}()
			return Repeated(r.MinRound, func() (time.Duration, error) {
				s, err := r.Round(side)
				if err != nil {
					return 0, err
				}
				out[i].Samples = append(out[i].Samples, s)
				return s.ToShared + s.ToPrivate, nil
			})
		}}
	}
	vs, err := Rounds("floor", rounds, warmup, runs...)
	if err != nil {
		return nil, err
	}
	pinned := out[0].Samples[0].Pinned
	for i := range out {
		if warmup {
			out[i].Samples = out[i].Samples[warm[i]:]
		}
		r := &out[i]
		r.Rounds, r.Time, r.MapCalls, r.Pinned = len(vs[i]), Summarize(vs[i]), r.Samples[0].MapCalls, pinned
		var in []float64
		for _, s := range r.Samples {
			in = append(in, float64(s.InSpace.Nanoseconds()))
		}
		r.InSpace = Summarize(in).Median
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
// limit, cutting), so that gmem's user-space cost is seen without any
// kernel's.
func FloorModel(sz Sizes) ([]Row, error) {
	model := iommu.NewModelSpan(iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}, 2*sz.RoundTrip)
	rig := FloorRig{Space: model, Size: sz.RoundTrip, MinRound: MinRound, Pinned: func() (uint64, error) {
		p := model.Pins()
		return p.Pinned - p.Unpinned, nil
	}}
	res, err := rig.Measure(sz.Rounds, sz.Warmup, FloorSides(model.Caps()))
	if err != nil {
		return nil, err
	}
	return FloorRows(res, FloorWhere{Scale: trace.FormatSize(sz.RoundTrip) + ", model IOMMU", Space: "the model IOMMU"}), nil
}

// FloorWhere says where floor rows were measured.
type FloorWhere struct {
	Prefix string // of the row names ("rig type1: ")
	Scale  string // the rows' Scale
	Space  string // the space, for the notes ("the model IOMMU")
	Source string // the rows' Source
}

// FloorRows turns measured sides (the floor first) into rows: each policy's
// round trip time against the floor's, and the pinned pages of the floor
// against those of the default policy.
func FloorRows(res []FloorResult, at FloorWhere) []Row {
	floor := res[0]
	var rows []Row
	var def *FloorResult
	for i, r := range res[1:] {
		if r.Side.Default {
			def = &res[1+i]
		}
		row := Row{
			Name: at.Prefix + "floor: " + r.Side.Name + " round trip time", Unit: "ns", Better: "lower", Scale: at.Scale, Source: at.Source,
			Note: fmt.Sprintf("baseline column: the floor, one map call of the whole range and one unmap on %s; gmem: the %s policy through attributes, manager and mapper, %.2fx the floor's time (map calls: %s",
				at.Space, r.Side.Name, r.Time.Median/floor.Time.Median, Commas(r.MapCalls)),
		}
		if over := r.Time.Median - floor.Time.Median; over > 0 {
			row.Note += fmt.Sprintf("; %s a call over the floor", Duration(over/float64(max(r.MapCalls, 1))))
		}
		row.Note += ")"
		if r.InSpace > 0 && floor.InSpace > 0 {
			row.Note += fmt.Sprintf("; inside the space's calls %s (the floor %s), gmem's own work %s",
				Duration(r.InSpace), Duration(floor.InSpace), Duration(r.Time.Median-r.InSpace))
		}
		if r.Side.Default {
			row.Note += "; the default policy"
		}
		row.SetSides(r.Rounds, floor.Time, r.Time)
		row.BaselineHow, row.ToFloor = Floor, r.Time.Median/floor.Time.Median
		row.Ratio = Improvement(row)
		rows = append(rows, row)
	}
	if def != nil {
		row := Row{
			Name: at.Prefix + "floor: round trip pinned pages", Unit: "pages", Baseline: float64(floor.Pinned), Gmem: float64(def.Pinned),
			Better: "lower", Scale: at.Scale, Source: at.Source,
			Note: "pages pinned while the range was reachable, the floor against the default policy: the same on every side (checked), so the time rows compare calls and bookkeeping, not pinning",
		}
		row.Ratio = Improvement(row)
		rows = append(rows, row)
	}
	return rows
}

// TimedSpace is an iommu.Space (and Cutter) that adds up the time its Map,
// Unmap and Cut calls take: what a conversion spends in the kernel's (or the model's)
// IOMMU calls, against what gmem spends around them.
type TimedSpace struct {
	iommu.Space
	spent atomic.Int64 // nanoseconds
}

// Map maps and counts the time.
func (s *TimedSpace) Map(iova, size uint64, host []byte) error {
	start := time.Now()
	defer func() { s.spent.Add(int64(time.Since(start))) }()
	return s.Space.Map(iova, size, host)
}

// Unmap unmaps and counts the time.
func (s *TimedSpace) Unmap(iova, size uint64) (uint64, error) {
	start := time.Now()
	defer func() { s.spent.Add(int64(time.Since(start))) }()
	return s.Space.Unmap(iova, size)
}

// Cut cuts and counts the time, where the space is an iommu.Cutter.
func (s *TimedSpace) Cut(iova, size uint64) (uint64, error) {
	c, ok := s.Space.(iommu.Cutter)
	if !ok {
		return 0, fmt.Errorf("bench: %T cannot cut: %w", s.Space, errors.ErrUnsupported)
	}
	start := time.Now()
	defer func() { s.spent.Add(int64(time.Since(start))) }()
	return c.Cut(iova, size)
}

// Caps are the space's, and say it cuts only where it is an iommu.Cutter.
func (s *TimedSpace) Caps() iommu.Caps {
	c := s.Space.Caps()
	_, cutter := s.Space.(iommu.Cutter)
	c.Cut = c.Cut && cutter
	return c
}

// Spent returns the time spent in Map, Unmap and Cut so far.
func (s *TimedSpace) Spent() time.Duration { return time.Duration(s.spent.Load()) }
