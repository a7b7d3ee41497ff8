package trace

import (
	"errors"
	"strings"
	"testing"

	"github.com/gmemproject/gmem/span"
)

func TestValidator(t *testing.T) {
	machine := []Event{
		RAM{Name: "low", GPA: 0, Size: 2 << 30, Mode: Split},
		MMIO{GPA: 2 << 30, Size: 2 << 30},
		RAM{Name: "high", GPA: 4 << 30, Size: 2 << 30, Mode: Split},
		RAM{Name: "vmem", GPA: 8 << 30, Size: 1 << 30, Mode: Split, Block: 2 << 20},
	}
	attach := Attach{Dev: "d", IOMMU: Type1}
	for _, c := range []struct {
		name  string
		steps []Event
		why   string // "" if the last step is valid
	}{
		// Guest requests are the executor's to answer, whatever they ask.
		{"convert in RAM", []Event{Convert{GPA: 0, Size: 4096, To: Shared}}, ""},
		{"convert across the hole to private", []Event{Convert{GPA: 2<<30 - 4096, Size: 8192, To: Private}}, ""},
		{"convert outside everything", []Event{Convert{GPA: 6 << 30, Size: 4096, To: Private}}, ""},
		{"convert misaligned", []Event{Convert{GPA: 6<<30 + 1, Size: 0, To: Shared}}, ""},
		{"convert unplugged", []Event{Convert{GPA: 8 << 30, Size: 4096, To: Shared}}, ""},
		{"plug twice", []Event{Plug{GPA: 8 << 30, Size: 4 << 20}, Plug{GPA: 8<<30 + 2<<20, Size: 4 << 20}}, ""},
		{"plug misaligned", []Event{Plug{GPA: 8<<30 + 4096, Size: 2 << 20}}, ""},
		{"plug past the end", []Event{Plug{GPA: 9<<30 - 2<<20, Size: 4 << 20}}, ""},
		{"unplug unplugged", []Event{Unplug{GPA: 8 << 30, Size: 2 << 20}}, ""},
		// The machine is the trace's to get right.
		{"plug ordinary RAM", []Event{Plug{GPA: 0, Size: 2 << 20}}, "not hot-pluggable"},
		{"unplug ordinary RAM", []Event{Unplug{GPA: 4 << 30, Size: 2 << 20}}, "not hot-pluggable"},
		{"plug MMIO", []Event{Plug{GPA: 2 << 30, Size: 2 << 20}}, "no RAM block there"},
		{"plug nowhere", []Event{Plug{GPA: 7 << 30, Size: 2 << 20}}, "no RAM block there"},
		{"RAM name reused", []Event{RAM{Name: "low", GPA: 16 << 30, Size: 4096, Mode: Split}}, "declared twice"},
		{"RAM overlapping RAM", []Event{RAM{Name: "x", GPA: 1 << 30, Size: 4096, Mode: Split}}, "overlaps RAM block \"low\""},
		{"RAM overlapping MMIO", []Event{RAM{Name: "x", GPA: 3 << 30, Size: 4096, Mode: Split}}, "overlaps MMIO"},
		{"MMIO overlapping RAM", []Event{MMIO{GPA: 5 << 30, Size: 2 << 30}}, "overlaps RAM block \"high\""},
		{"MMIO inside RAM", []Event{MMIO{GPA: 1 << 30, Size: 16 << 20}}, "overlaps RAM block \"low\""},
		{"RAM added", []Event{RAM{Name: "x", GPA: 16 << 30, Size: 4096, Mode: Split}, Convert{GPA: 16 << 30, Size: 4096, To: Shared}}, ""},
		{"RAM after a request", []Event{Convert{GPA: 0, Size: 4096, To: Shared}, RAM{Name: "x", GPA: 16 << 30, Size: 4096, Mode: Split}}, "declared first"},
		{"MMIO after an attach", []Event{attach, MMIO{GPA: 16 << 30, Size: 4096}}, "declared first"},
		{"RAM of another mode", []Event{RAM{Name: "x", GPA: 16 << 30, Size: 4096, Mode: InPlace}}, "backed one way"},
		{"attach", []Event{attach}, ""},
		{"attach twice", []Event{attach, Attach{Dev: "d", IOMMU: IOMMUFD}}, "attached twice"},
		{"detach unknown", []Event{attach, Detach{Dev: "e"}}, "not attached"},
		{"detach twice", []Event{attach, Detach{Dev: "d"}, Detach{Dev: "d"}}, "not attached"},
		{"reattach", []Event{attach, Detach{Dev: "d"}, Attach{Dev: "d", IOMMU: IOMMUFD}}, ""},
	} {
		v := NewValidator()
		for _, e := range machine {
			if err := v.Check(e); err != nil {
				t.Fatalf("machine event %+v: %v", e, err)
			}
		}
		for i, e := range c.steps[:len(c.steps)-1] {
			if err := v.Check(e); err != nil {
				t.Fatalf("%s: step %d %+v: %v", c.name, i, e, err)
			}
		}
		err := v.Check(c.steps[len(c.steps)-1])
		switch {
		case c.why == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.why != "" && (!errors.Is(err, ErrMachine) || !strings.Contains(err.Error(), c.why)):
			t.Errorf("%s: error %v, want ErrMachine mentioning %q", c.name, err, c.why)
		}
	}
	for _, e := range []Event{nil, RAM{Name: "r", GPA: 1, Size: 4096, Mode: Split}, MMIO{GPA: 0, Size: 0}} {
		if err := NewValidator().Check(e); !errors.Is(err, ErrValue) {
			t.Errorf("%#v: error %v, want ErrValue", e, err)
		}
	}
	for _, e := range []Event{attach, Convert{GPA: 0, Size: 4096, To: Shared}, Detach{Dev: "d"}} {
		if err := NewValidator().Check(e); !errors.Is(err, ErrMachine) || !strings.Contains(err.Error(), "before any RAM") {
			t.Errorf("%#v first: error %v, want ErrMachine: before any RAM", e, err)
		}
	}
}

// TestValidatorRefusalLeavesState checks that a refused event changes
// nothing: a RAM block refused for its overlap does not take its name.
func TestValidatorRefusalLeavesState(t *testing.T) {
	v := NewValidator()
	if err := v.Check(RAM{Name: "a", GPA: 0, Size: 8 << 20, Mode: Split}); err != nil {
		t.Fatal(err)
	}
	if err := v.Check(RAM{Name: "b", GPA: 4 << 20, Size: 8 << 20, Mode: Split}); err == nil {
		t.Fatal("overlapping RAM accepted")
	}
	if err := v.Check(RAM{Name: "b", GPA: 8 << 20, Size: 8 << 20, Mode: Split}); err != nil {
		t.Errorf("a refused block kept its name or its range: %v", err)
	}
}

// FuzzValidator feeds arbitrary JSON Lines traces to the Validator: it must
// never panic, and must accept exactly what a naive per-page model of the
// machine accepts in a small guest.
func FuzzValidator(f *testing.F) {
	f.Add(goldenJSONL)
	f.Add(`{"op":"ram","name":"v","gpa":0,"size":"64KiB","mode":"split","block":"8KiB"}
{"op":"plug","gpa":"8KiB","size":"16KiB"}
{"op":"convert","gpa":"12KiB","size":"4KiB","to":"shared"}
{"op":"unplug","gpa":"8KiB","size":"8KiB"}
{"op":"convert","gpa":"8KiB","size":"8KiB","to":"shared"}
{"op":"mmio","gpa":"64KiB","size":"8KiB"}
{"op":"convert","gpa":"60KiB","size":"8KiB","to":"shared"}`)
	f.Fuzz(func(t *testing.T, in string) {
		tr, _ := Parse(strings.NewReader(in), Options{KeepGoing: true})
		if tr == nil || tr.Format != JSONLines {
			return
		}
		// The model judges guests below 1 MiB only; beyond, the target
		// checks that the Validator does not panic.
		judge := true
		for _, e := range tr.Events {
			judge = judge && eventRange(e).End <= modelLimit
		}
		v := NewValidator()
		m := newPageModel()
		for _, e := range tr.Events {
			err := v.Check(e)
			if !judge {
				continue
			}
			if want := m.check(e); (err == nil) != want {
				t.Fatalf("%#v: validator says %v, model says ok=%v", e, err, want)
			}
		}
	})
}

// eventRange returns the guest physical range an event names, if any.
func eventRange(e Event) span.Range {
	switch e := e.(type) {
	case RAM:
		return e.Range()
	case MMIO:
		return e.Range()
	case Convert:
		return e.Range()
	case Plug:
		return e.Range()
	case Unplug:
		return e.Range()
	}
	return span.Range{}
}

// pageModel is a naive model of the Validator's rules for guests below
// 1 MiB, page by page.
type pageModel struct {
	kind    map[uint64]byte // page -> 'r' RAM, 'h' hot-pluggable RAM, 'm' MMIO
	names   map[string]bool
	devs    map[string]bool
	mode    Mode
	running bool
}

func newPageModel() *pageModel {
	return &pageModel{kind: map[uint64]byte{}, names: map[string]bool{}, devs: map[string]bool{}}
}

const modelLimit = 1 << 20

func (m *pageModel) pages(r span.Range) []uint64 {
	var out []uint64
	for p := r.Start; p < r.End; p += PageSize {
		out = append(out, p)
	}
	return out
}

// check returns whether the Validator should accept e, and applies it.
func (m *pageModel) check(e Event) bool {
	if checkParsed(e) != nil {
		return false
	}
	_, ram := e.(RAM)
	_, mmio := e.(MMIO)
	machine := ram || mmio
	if machine && m.running || !machine && m.mode == 0 {
		return false
	}
	if !m.apply(e) {
		return false
	}
	m.running = m.running || !machine
	return true
}

// apply checks and applies e in the machine's current phase.
func (m *pageModel) apply(e Event) bool {
	r := eventRange(e)
	switch e := e.(type) {
	case RAM:
		if m.names[e.Name] || m.mode != 0 && e.Mode != m.mode {
			return false
		}
		for _, p := range m.pages(r) {
			if _, ok := m.kind[p]; ok {
				return false
			}
		}
		for _, p := range m.pages(r) {
			m.kind[p] = 'r'
			if e.Block != 0 {
				m.kind[p] = 'h'
			}
		}
		m.names[e.Name] = true
		m.mode = e.Mode
	case MMIO:
		for _, p := range m.pages(r) {
			if _, ok := m.kind[p]; ok {
				return false
			}
		}
		for _, p := range m.pages(r) {
			m.kind[p] = 'm'
		}
	case Attach:
		if m.devs[e.Dev] {
			return false
		}
		m.devs[e.Dev] = true
	case Detach:
		if !m.devs[e.Dev] {
			return false
		}
		delete(m.devs, e.Dev)
	case Plug:
		return m.kind[e.GPA&^(PageSize-1)] == 'h'
	case Unplug:
		return m.kind[e.GPA&^(PageSize-1)] == 'h'
	}
	return true
}
