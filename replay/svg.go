package replay

import (
	"bufio"
	"fmt"
	"html"
	"io"
	"math"
	"strconv"

	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/trace"
)

// Drawing geometry, in SVG user units (pixels).
const (
	svgWidth     = 1000
	svgLeft      = 90 // room for row labels
	svgRight     = 20 //
	svgPlotWidth = svgWidth - svgLeft - svgRight
	svgMaxDevs   = 8    // device rows drawn
	svgMaxRects  = 4000 // entries drawn one by one up to this many per device
)

// Colours of the classes, MMIO holes and the two runs.
const (
	colShared    = "#2e86de"
	colPrivate   = "#e0e0e0"
	colUnplugged = "#ffffff"
	colMMIO      = "#f6d365"
	colBaseline  = "#e8590c"
	colGmem      = "#2e86de"
	colEntryA    = "#20c997"
	colEntryB    = "#087f5b"
)

// WriteSVG draws the end state of the gmem run and the history of both runs
// as a self-contained SVG document:
//
//   - the memory map: the guest physical address space with each RAM block's
//     shared, private and unplugged memory and the MMIO holes, and under it,
//     for each device (up to 8), gmem's IOMMU entries;
//   - the timeline: IOMMU entries of the busiest device after each event,
//     baseline and gmem, on a logarithmic scale, with the type1 entry limit
//     (which is per device) if a type1 device was attached.
//
// The drawing costs O(runs + entries + 1000) however large the guest is: the
// map is drawn at the resolution of its pixels.
func (rp *Replayer) WriteSVG(w io.Writer) error {
	bw := bufio.NewWriter(w)
	d := &drawing{w: bw, rp: rp}
	d.draw()
	return bw.Flush()
}

type drawing struct {
	w  *bufio.Writer
	rp *Replayer
	y  float64 // next free row
}

func (d *drawing) printf(format string, args ...any) { fmt.Fprintf(d.w, format, args...) }

func (d *drawing) text(x, y float64, anchor, class, s string) {
	d.printf(`<text x="%.1f" y="%.1f" text-anchor="%s" class="%s">%s</text>`+"\n", x, y, anchor, class, html.EscapeString(s))
}

func (d *drawing) rect(x, y, w, h float64, fill string) {
	d.printf(`<rect x="%.2f" y="%.2f" width="%.2f" height="%.2f" fill="%s"/>`+"\n", x, y, w, h, fill)
}

func (d *drawing) draw() {
	g := d.rp.runs[1]
	devs := min(len(g.order), svgMaxDevs)
	mapHeight := 40.0 + 30 + float64(devs)*22 + 40
	timeHeight := 260.0
	height := 60 + mapHeight + timeHeight + 40
	d.printf(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%.0f" viewBox="0 0 %d %.0f" font-family="sans-serif" font-size="11">`+"\n",
		svgWidth, height, svgWidth, height)
	d.printf("<style>.t{font-size:15px;font-weight:bold}.h{font-size:12px;font-weight:bold}.s{fill:#555}</style>\n")
	d.rect(0, 0, svgWidth, height, "#ffffff")
	res := d.rp.Result()
	d.text(svgLeft, 22, "start", "t", "gmem replay")
	d.text(svgLeft, 40, "start", "s", fmt.Sprintf("%s events, %s conversions, %s rejected, %s violations; IOMMU entries at the end (all devices): baseline %s, gmem %s",
		thousands(res.Events), thousands(res.Conversions), thousands(res.Rejected), thousands(res.Violations),
		thousands(res.Baseline.EntriesFinal), thousands(res.Gmem.EntriesFinal)))
	d.y = 60
	d.memoryMap(devs)
	d.y += 20
	d.timeline(timeHeight)
	d.printf("</svg>\n")
}

// addressSpace returns the guest physical range the map shows.
func (d *drawing) addressSpace() span.Range {
	if len(d.rp.layout) == 0 {
		return span.Range{}
	}
	return span.Range{Start: d.rp.layout[0].r.Start, End: d.rp.layout[len(d.rp.layout)-1].r.End}
}

// coverage accumulates, per pixel column, the bytes of each kind.
type coverage struct {
	space span.Range
	cols  [][svgPlotWidth]float64
}

func newCoverage(space span.Range, kinds int) *coverage {
	return &coverage{space: space, cols: make([][svgPlotWidth]float64, kinds)}
}

// x returns the position of address a in pixels from the plot's left edge.
func (c *coverage) x(a uint64) float64 {
	if c.space.Empty() {
		return 0
	}
	return float64(a-c.space.Start) / float64(c.space.Len()) * svgPlotWidth
}

// add spreads r over the columns it crosses, as a fraction of each column.
func (c *coverage) add(kind int, r span.Range) {
	x0, x1 := c.x(r.Start), c.x(r.End)
	for col := int(x0); col < svgPlotWidth && float64(col) < x1; col++ {
		lo, hi := math.Max(x0, float64(col)), math.Min(x1, float64(col+1))
		if hi > lo {
			c.cols[kind][col] += hi - lo
		}
	}
}

// bars draws the columns as stacked bars of height h at y, kinds bottom up in
// the order given, merging neighbouring columns that look the same.
func (d *drawing) bars(c *coverage, y, h float64, colours []string) {
	const steps = 40 // quantisation of the heights
	kinds := len(colours)
	col := func(i int) []int {
		q := make([]int, kinds)
		for k := range kinds {
			q[k] = int(math.Round(c.cols[k][i] * steps))
		}
		return q
	}
	equal := func(a, b []int) bool {
		for i := range a {
			if a[i] != b[i] {
				return false
			}
		}
		return true
	}
	for i := 0; i < svgPlotWidth; {
		q := col(i)
		j := i + 1
		for j < svgPlotWidth && equal(col(j), q) {
			j++
		}
		base := y + h
		for k := range kinds {
			if q[k] == 0 {
				continue
			}
			bh := h * float64(q[k]) / steps
			d.rect(svgLeft+float64(i), base-bh, float64(j-i), bh, colours[k])
			base -= bh
		}
		i = j
	}
}

// marks draws a short bar over every run of columns whose value is not zero.
func (d *drawing) marks(cols []float64, y, h float64, colour string) {
	for i := 0; i < len(cols); {
		if cols[i] == 0 {
			i++
			continue
		}
		j := i + 1
		for j < len(cols) && cols[j] != 0 {
			j++
		}
		d.rect(svgLeft+float64(i), y, float64(j-i), h, colour)
		i = j
	}
}

func (d *drawing) memoryMap(devs int) {
	space := d.addressSpace()
	g := d.rp.runs[1]
	d.text(svgLeft, d.y+12, "start", "h", "Memory map at the end (gmem run)")
	d.legend(svgLeft+260, d.y+12, []string{colShared, colPrivate, colUnplugged, colMMIO},
		[]string{"shared", "private", "unplugged", "MMIO hole"})
	d.y += 28
	if space.Empty() {
		d.text(svgLeft, d.y+20, "start", "s", "no RAM declared")
		d.y += 40
		return
	}
	const kinds = numClasses + 1 // and MMIO
	c := newCoverage(space, kinds)
	for _, a := range d.rp.layout {
		if !a.ram {
			c.add(numClasses, a.r)
			continue
		}
		for _, x := range g.state(a.r) {
			c.add(class(x.kind), x.r)
		}
	}
	const bandH = 40
	d.text(svgLeft-6, d.y+bandH/2+4, "end", "", "state")
	d.printf(`<rect x="%d" y="%.1f" width="%d" height="%d" fill="none" stroke="#999"/>`+"\n", svgLeft, d.y, svgPlotWidth, bandH)
	d.bars(c, d.y, bandH, []string{colShared, colPrivate, colUnplugged, colMMIO})
	// Shared memory is often a sliver of the guest: mark every column that
	// holds any, so that a single shared page still shows.
	d.marks(c.cols[classShared][:], d.y-7, 5, colShared)
	for _, a := range d.rp.layout[1:] {
		x := svgLeft + c.x(a.r.Start)
		d.printf(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#555"/>`+"\n", x, d.y, x, d.y+bandH)
	}
	d.y += bandH + 4
	d.axis(space)
	d.y += 18
	for i := range devs {
		dev := g.order[i]
		entries := dev.model.Mappings()
		const rowH = 16
		d.text(svgLeft-6, d.y+rowH-4, "end", "", dev.name)
		d.printf(`<rect x="%d" y="%.1f" width="%d" height="%d" fill="#f8f9fa" stroke="#ddd"/>`+"\n", svgLeft, d.y, svgPlotWidth, rowH)
		if len(entries) <= svgMaxRects {
			for k, e := range entries {
				x0, x1 := c.x(e.IOVA), c.x(e.IOVA+e.Size)
				fill := colEntryA
				if k%2 == 1 {
					fill = colEntryB
				}
				d.rect(svgLeft+x0, d.y+2, math.Max(x1-x0, 0.6), rowH-4, fill)
			}
		} else {
			ec := newCoverage(space, 1)
			for _, e := range entries {
				ec.add(0, e.Range())
			}
			d.bars(ec, d.y+2, rowH-4, []string{colEntryB})
		}
		d.text(svgLeft+svgPlotWidth, d.y+rowH+10, "end", "s", fmt.Sprintf("%d IOMMU entries", len(entries)))
		d.y += rowH + 14
	}
	if len(g.order) > devs {
		d.text(svgLeft, d.y+8, "start", "s", fmt.Sprintf("(%d more devices not drawn)", len(g.order)-devs))
		d.y += 14
	}
	if len(g.order) == 0 {
		d.text(svgLeft, d.y+8, "start", "s", "no device attached at the end")
		d.y += 14
	}
}

// axis draws the boundaries of the areas under the map, skipping labels that
// would overlap.
func (d *drawing) axis(space span.Range) {
	c := newCoverage(space, 0)
	last := -1e9
	mark := func(a uint64) {
		x := svgLeft + c.x(a)
		d.printf(`<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#666"/>`+"\n", x, d.y-4, x, d.y+2)
		if x-last < 55 {
			return
		}
		last = x
		anchor := "middle"
		if x > svgLeft+svgPlotWidth-30 {
			anchor = "end"
		}
		d.text(x, d.y+13, anchor, "s", trace.FormatSize(a))
	}
	for _, a := range d.rp.layout {
		mark(a.r.Start)
	}
	mark(space.End)
}

func (d *drawing) legend(x, y float64, colours, names []string) {
	for i := range colours {
		d.printf(`<rect x="%.1f" y="%.1f" width="10" height="10" fill="%s" stroke="#999"/>`+"\n", x, y-9, colours[i])
		d.text(x+14, y, "start", "", names[i])
		x += 24 + 6.5*float64(len(names[i]))
	}
}

// timeline plots the entries of both runs against events.
func (d *drawing) timeline(h float64) {
	d.text(svgLeft, d.y+12, "start", "h", "IOMMU entries of the busiest device after each event")
	d.legend(svgLeft+390, d.y+12, []string{colBaseline, colGmem}, []string{"baseline (bitmap, one entry per 4 KiB)", "gmem (runs, one entry per extent)"})
	d.y += 24
	top, plotH := d.y, h-50
	b := &d.rp.runs[0].timeline
	g := &d.rp.runs[1].timeline
	bp, bper := b.points()
	gp, gper := g.points()
	events := max(b.n, 1)
	var peak uint64
	for _, v := range bp {
		peak = max(peak, v)
	}
	for _, v := range gp {
		peak = max(peak, v)
	}
	peak = max(peak, d.rp.limit, 1)
	decades := math.Ceil(math.Log10(float64(peak) + 1))
	yOf := func(v uint64) float64 { return top + plotH - math.Log10(float64(v)+1)/decades*plotH }
	d.printf(`<rect x="%d" y="%.1f" width="%d" height="%.1f" fill="none" stroke="#999"/>`+"\n", svgLeft, top, svgPlotWidth, plotH)
	for k := 0.0; k <= decades; k++ {
		v := uint64(math.Pow(10, k))
		if k == 0 {
			v = 0
		}
		y := yOf(v)
		d.printf(`<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#eee"/>`+"\n", svgLeft, y, svgLeft+svgPlotWidth, y)
		d.text(svgLeft-6, y+4, "end", "s", thousands(v))
	}
	if lim := d.rp.limit; lim > 0 {
		y := yOf(lim)
		d.printf(`<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#c92a2a" stroke-dasharray="6,4"/>`+"\n", svgLeft, y, svgLeft+svgPlotWidth, y)
		d.text(svgLeft+svgPlotWidth-4, y+14, "end", "", "type1 entry limit per device: "+thousands(lim))
	}
	line := func(pts []uint64, per uint64, colour string) {
		if len(pts) == 0 {
			return
		}
		d.printf(`<polyline fill="none" stroke="%s" stroke-width="1.5" points="`, colour)
		for i, v := range pts {
			x0 := svgLeft + float64(uint64(i)*per)/float64(events)*svgPlotWidth
			x1 := svgLeft + math.Min(float64(uint64(i+1)*per)/float64(events), 1)*svgPlotWidth
			y := yOf(v)
			d.printf("%.1f,%.1f %.1f,%.1f ", x0, y, x1, y)
		}
		d.printf("\"/>\n")
	}
	line(bp, bper, colBaseline)
	line(gp, gper, colGmem)
	d.y = top + plotH
	for k := range 5 {
		ev := events * uint64(k) / 4
		x := svgLeft + float64(k)/4*svgPlotWidth
		anchor := "middle"
		switch k {
		case 0:
			anchor = "start"
		case 4:
			anchor = "end"
		}
		d.text(x, d.y+14, anchor, "s", thousands(ev))
	}
	d.text(svgLeft+svgPlotWidth/2, d.y+30, "middle", "s", fmt.Sprintf("events (each point: the most entries in %d consecutive events)", max(bper, gper)))
	d.y += 36
}

// thousands formats n with thousands separators.
func thousands(n uint64) string {
	s := strconv.FormatUint(n, 10)
	out := make([]byte, 0, len(s)+len(s)/3)
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	return string(out)
}
