package guestmem_test

import (
	"errors"
	"fmt"
	"io/fs"
	"reflect"
	"slices"
	"sync"
	"testing"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/memattr"
)

// closedCall is one exported method called on closed (or closing) memory.
// It returns the method's error, or nil for methods without one.
type closedCall func(m *guestmem.Memory, a *guestmem.Attachment, b *guestmem.Block) error

// closedCalls covers every exported method of Memory, Attachment, Block and
// GuestView; TestClosedCoversEveryMethod keeps it complete. errs says
// whether the method has an error result that must match ErrClosed after
// Close.
var closedCalls = map[string]struct {
	errs bool
	call closedCall
}{
	"Memory.AttachIOMMU": {true, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error {
		_, err := m.AttachIOMMU(iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2}), dma.Options{})
		return err
	}},
	"Memory.Block":       {false, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error { m.Block(0); return nil }},
	"Memory.Blocks":      {false, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error { m.Blocks(); return nil }},
	"Memory.Close":       {true, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error { return m.Close() }},
	"Memory.Enforcement": {false, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error { m.Enforcement(); return nil }},
	"Memory.Convert": {true, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error {
		_, err := m.Convert(guestmem.Request{GPA: 0, Size: page, To: memattr.Shared})
		return err
	}},
	"Memory.Guest": {true, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error {
		_, err := m.Guest().ReadAt(make([]byte, 8), 0)
		return err
	}},
	"Memory.Hole":   {false, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error { m.Hole(2 * mib); return nil }},
	"Memory.Holes":  {false, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error { m.Holes(); return nil }},
	"Memory.MaxGPA": {false, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error { m.MaxGPA(); return nil }},
	"Memory.Mode":   {false, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error { m.Mode(); return nil }},
	"Memory.Plug":   {true, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error { return m.Plug(8*mib, 2*mib) }},
	"Memory.ReadAt": {true, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error {
		_, err := m.ReadAt(make([]byte, 8), 0)
		return err
	}},
	"Memory.StateStats": {false, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error { m.StateStats(); return nil }},
	"Memory.Stats":      {false, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error { m.Stats(); return nil }},
	"Memory.Unplug": {true, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error {
		return m.Unplug(8*mib, 2*mib)
	}},
	"Memory.Walk": {true, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error {
		seq, err := m.Walk(0, 16*mib)
		if err == nil {
			for range seq {
			}
		}
		return err
	}},
	"Memory.WriteAt": {true, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error {
		_, err := m.WriteAt(make([]byte, 8), 0)
		return err
	}},
	"GuestView.ReadAt": {true, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error {
		_, err := m.Guest().ReadAt(make([]byte, 8), 0)
		return err
	}},
	"GuestView.WriteAt": {true, func(m *guestmem.Memory, _ *guestmem.Attachment, _ *guestmem.Block) error {
		_, err := m.Guest().WriteAt(make([]byte, 8), 0)
		return err
	}},
	"Attachment.Check": {true, func(_ *guestmem.Memory, a *guestmem.Attachment, _ *guestmem.Block) error {
		return a.Check()
	}},
	// Detach after Close is a no-op: Close detached it.
	"Attachment.Detach":  {false, func(_ *guestmem.Memory, a *guestmem.Attachment, _ *guestmem.Block) error { return a.Detach() }},
	"Attachment.Mappers": {false, func(_ *guestmem.Memory, a *guestmem.Attachment, _ *guestmem.Block) error { a.Mappers(); return nil }},
	"Attachment.Space":   {false, func(_ *guestmem.Memory, a *guestmem.Attachment, _ *guestmem.Block) error { a.Space(); return nil }},
	// The policy is the attach's answer, after Close too.
	"Attachment.Policy": {false, func(_ *guestmem.Memory, a *guestmem.Attachment, _ *guestmem.Block) error {
		if p := a.Policy(); p == dma.Auto {
			return fmt.Errorf("policy %v: never resolved", p)
		}
		return nil
	}},
	"Attachment.Stats": {false, func(_ *guestmem.Memory, a *guestmem.Attachment, _ *guestmem.Block) error { a.Stats(); return nil }},
	"Block.Attributes": {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error { b.Attributes(); return nil }},
	"Block.Backing":    {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error { b.Backing(); return nil }},
	"Block.GPA":        {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error { b.GPA(); return nil }},
	"Block.Hotplug":    {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error { b.Hotplug(); return nil }},
	"Block.Manager":    {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error { b.Manager(); return nil }},
	"Block.Name":       {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error { b.Name(); return nil }},
	"Block.PluggedBytes": {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error {
		b.PluggedBytes()
		return nil
	}},
	"Block.Range": {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error { b.Range(); return nil }},
	"Block.RecordedRuns": {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error {
		b.RecordedRuns()
		return nil
	}},
	"Block.Section": {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error { b.Section(); return nil }},
	"Block.SharedBacking": {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error {
		if b.SharedBacking() != nil {
			return errors.New("SharedBacking after Close is not nil")
		}
		return nil
	}},
	"Block.Size":      {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error { b.Size(); return nil }},
	"Block.Slot":      {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error { b.Slot(); return nil }},
	"Block.StateRuns": {false, func(_ *guestmem.Memory, _ *guestmem.Attachment, b *guestmem.Block) error { b.StateRuns(); return nil }},
}

func TestClosedCoversEveryMethod(t *testing.T) {
	var want []string
	for _, v := range []any{(*guestmem.Memory)(nil), (*guestmem.Attachment)(nil), (*guestmem.Block)(nil), guestmem.GuestView{}} {
		ty := reflect.TypeOf(v)
		name := ty.Name()
		if ty.Kind() == reflect.Pointer {
			name = ty.Elem().Name()
		}
		for i := range ty.NumMethod() {
			want = append(want, name+"."+ty.Method(i).Name)
		}
	}
	var have []string
	for k := range closedCalls {
		have = append(have, k)
	}
	slices.Sort(want)
	slices.Sort(have)
	if !slices.Equal(want, have) {
		t.Errorf("closedCalls covers\n%v\nthe exported methods are\n%v", have, want)
	}
}

// closeMemory is memory with a hot-pluggable block, a device attached and
// shared pages mapped.
func closeMemory(t *testing.T) (*guestmem.Memory, *guestmem.Attachment, *iommu.Model) {
	t.Helper()
	mem, err := guestmem.New(guestmem.Config{
		Blocks: []guestmem.BlockConfig{
			{Name: "ram", GPA: 0, Size: 2 * mib},
			{Name: "vmem", GPA: 8 * mib, Size: 4 * mib, Hotplug: 2 * mib},
		},
		MMIO: []guestmem.Hole{{Name: "dev", GPA: 2 * mib, Size: 64 * kib}},
	})
	if err != nil {
		t.Fatal(err)
	}
	model, att := attachModel(t, mem, iommu.Caps{Rules: iommu.Type1v2}, dma.Options{})
	if _, err := mem.Convert(guestmem.Request{GPA: 0, Size: 16 * page, To: memattr.Shared}); err != nil {
		t.Fatal(err)
	}
	if err := mem.Plug(8*mib, 2*mib); err != nil {
		t.Fatal(err)
	}
	return mem, att, model
}

// TestAfterClose: Close with a live attachment detaches it, and every
// method afterwards answers ErrClosed or the final state; the model's DMA,
// which reached the memory before, now faults instead of touching unmapped
// memory.
func TestAfterClose(t *testing.T) {
	mem, att, model := closeMemory(t)
	if err := model.DMAWrite(0, []byte("before")); err != nil {
		t.Fatal(err)
	}
	b := mem.Blocks()[0]
	if err := mem.Close(); err != nil {
		t.Fatal(err)
	}
	if model.Len() != 0 {
		t.Errorf("Close left %d IOMMU entries", model.Len())
	}
	var f *iommu.DMAFault
	if err := model.DMAWrite(0, []byte("after")); !errors.As(err, &f) {
		t.Errorf("DMA after Close: %v, want a DMAFault", err)
	}
	for name, c := range closedCalls {
		err := c.call(mem, att, b)
		switch {
		case c.errs && !errors.Is(err, guestmem.ErrClosed):
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		case c.errs && !errors.Is(err, fs.ErrClosed):
			t.Errorf("%s after Close: %v does not match fs.ErrClosed", name, err)
		case !c.errs && err != nil:
			t.Errorf("%s after Close: %v", name, err)
		}
	}
	var ce *guestmem.ConvertError
	if _, err := mem.Convert(guestmem.Request{GPA: 0, Size: page, To: memattr.Private}); !errors.As(err, &ce) {
		t.Errorf("Convert after Close: %v, want a *ConvertError", err)
	}
	var ae *guestmem.AccessError
	if _, err := mem.ReadAt(make([]byte, 1), 0); !errors.As(err, &ae) {
		t.Errorf("ReadAt after Close: %v, want an *AccessError", err)
	}
	// The state a closed memory answers from is the final one.
	if got := b.StateRuns(); len(got) != 2 {
		t.Errorf("StateRuns after Close: %v", got)
	}
}

// TestConcurrentClose calls every method from several goroutines while
// Close runs (go test -race): nothing may panic or race, and each call
// either works or answers ErrClosed.
func TestConcurrentClose(t *testing.T) {
	for range 5 {
		mem, att, _ := closeMemory(t)
		b := mem.Blocks()[1]
		var wg sync.WaitGroup
		start := make(chan struct{})
		for name, c := range closedCalls {
			if name == "Memory.Close" {
				continue
			}
			wg.Go(func() {
				<-start
				for range 20 {
					c.call(mem, att, b)
				}
			})
		}
		wg.Go(func() {
			<-start
			if err := mem.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
		close(start)
		wg.Wait()
		if err := mem.Close(); !errors.Is(err, guestmem.ErrClosed) {
			t.Errorf("second Close: %v", err)
		}
	}
}
