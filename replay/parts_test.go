package replay

import (
	"bytes"
	"encoding/xml"
	"io"
	"strings"
	"testing"

	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/span"
	"github.com/gmemproject/gmem/trace"
)

func TestSeries(t *testing.T) {
	var s series
	const n = 5000
	for i := range uint64(n) {
		s.add(i % 1000)
	}
	s.add(7777)
	pts, per := s.points()
	if len(pts) > maxPoints || per < 4 {
		t.Fatalf("%d points of %d events", len(pts), per)
	}
	if got := pts[len(pts)-1]; got != 7777 {
		t.Errorf("last point %d, want the last value's peak 7777", got)
	}
	if uint64(len(pts)-1)*per > n || uint64(len(pts))*per < n+1 {
		t.Errorf("%d points of %d do not cover %d events", len(pts), per, n+1)
	}
	for i, v := range pts[:len(pts)-1] {
		// Each bucket holds the largest i%1000 of its events.
		lo, hi := uint64(i)*per, min(uint64(i+1)*per, n)
		want := uint64(0)
		for e := lo; e < hi; e++ {
			want = max(want, e%1000)
		}
		if v != want {
			t.Fatalf("bucket %d = %d, want %d", i, v, want)
		}
	}
}

// TestHull checks the entries a range meets and the range grown over them,
// for both rule sets.
func TestHull(t *testing.T) {
	for _, rules := range []iommu.Rules{iommu.Type1v2, iommu.IOMMUFD} {
		m := iommu.NewModel(iommu.Caps{Rules: rules})
		for _, x := range []iommu.Mapping{{IOVA: 0x1000, Size: 0x1000}, {IOVA: 0x2000, Size: 0x2000}, {IOVA: 0x6000, Size: 0x3000}, {IOVA: 0x10000, Size: 0x1000}} {
			if err := m.Map(x.IOVA, x.Size, nil); err != nil {
				t.Fatal(err)
			}
		}
		if got := m.MappingsIn(span.Range{Start: 0x7000, End: 0x11000}); len(got) != 2 || got[0].IOVA != 0x6000 || got[1].IOVA != 0x10000 {
			t.Errorf("%v: MappingsIn = %v", rules, got)
		}
		if got := m.MappingsIn(span.Range{Start: 0x4000, End: 0x6000}); len(got) != 0 {
			t.Errorf("%v: MappingsIn of a gap = %v", rules, got)
		}
		if h := hull(m, span.Range{Start: 0x7000, End: 0x8000}); h != (span.Range{Start: 0x6000, End: 0x9000}) {
			t.Errorf("%v: hull = %v", rules, h)
		}
		if h := hull(m, span.Range{Start: 0x1800, End: 0x2800}); h != (span.Range{Start: 0x1000, End: 0x4000}) {
			t.Errorf("%v: hull over two entries = %v", rules, h)
		}
	}
}

// TestSVG checks that the drawing is well-formed XML with the parts it
// promises, for a replay with hot-pluggable memory and two devices, and for
// an empty one.
func TestSVG(t *testing.T) {
	seq, err := trace.Hotplug(trace.HotplugOptions{Common: trace.Common{RAM: 1 << 30, Events: 400, Devices: 2, Seed: 5}})
	if err != nil {
		t.Fatal(err)
	}
	rp := New(Options{})
	for e := range seq {
		if err := rp.Apply(e, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := rp.Finish(); err != nil {
		t.Fatal(err)
	}
	for name, r := range map[string]*Replayer{"hotplug": rp, "empty": New(Options{})} {
		var b bytes.Buffer
		if err := r.WriteSVG(&b); err != nil {
			t.Fatal(err)
		}
		elems := map[string]int{}
		d := xml.NewDecoder(bytes.NewReader(b.Bytes()))
		for {
			tok, err := d.Token()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("%s: not well-formed: %v", name, err)
			}
			if se, ok := tok.(xml.StartElement); ok {
				elems[se.Name.Local]++
			}
		}
		if elems["svg"] != 1 || elems["rect"] == 0 || elems["text"] == 0 {
			t.Errorf("%s: elements %v", name, elems)
		}
		s := b.String()
		if name == "hotplug" {
			for _, want := range []string{"dev0", "dev1", "IOMMU entries", "type1 entry limit per device: 65,535", colUnplugged, colMMIO, "<polyline"} {
				if !strings.Contains(s, want) {
					t.Errorf("%s: drawing lacks %q", name, want)
				}
			}
			if len(s) > 1<<20 {
				t.Errorf("drawing of %d bytes", len(s))
			}
		}
	}
}
