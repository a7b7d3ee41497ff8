package guestmem_test

import (
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/gmemproject/gmem/dma"
	"github.com/gmemproject/gmem/guestmem"
	"github.com/gmemproject/gmem/iommu"
	"github.com/gmemproject/gmem/kvm"
	"github.com/gmemproject/gmem/memattr"
)

// exported lists the package's exported functions and the exported types
// that have exported methods, from its source.
func exported(t *testing.T) (funcs, types []string) {
	t.Helper()
	ents, err := os.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, e.Name(), nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			fd, ok := d.(*ast.FuncDecl)
			if !ok || !fd.Name.IsExported() {
				continue
			}
			if fd.Recv == nil {
				funcs = append(funcs, fd.Name.Name)
				continue
			}
			rt := fd.Recv.List[0].Type
			if s, ok := rt.(*ast.StarExpr); ok {
				rt = s.X
			}
			if id, ok := rt.(*ast.Ident); ok && id.IsExported() && !slices.Contains(types, id.Name) {
				types = append(types, id.Name)
			}
		}
	}
	slices.Sort(funcs)
	slices.Sort(types)
	return funcs, types
}

// zeroFuncs are the package's functions, called with zero arguments by
// TestZeroArguments.
var zeroFuncs = map[string]any{
	"BitmapBytes":     guestmem.BitmapBytes,
	"HypercallRet":    guestmem.HypercallRet,
	"New":             guestmem.New,
	"NewKVMBacking":   guestmem.NewKVMBacking,
	"NewMemfdBacking": guestmem.NewMemfdBacking,
	"NewModelBacking": guestmem.NewModelBacking,
	"ParseMode":       guestmem.ParseMode,
	"Transient":       guestmem.Transient,
}

// zeroReceivers makes the receivers of every exported type with methods:
// live ones, and zero values where a caller can make one.
func zeroReceivers(t *testing.T) map[string][]any {
	t.Helper()
	mem, att, _ := closeMemory(t)
	t.Cleanup(func() { mem.Close() })
	memfd, err := guestmem.NewMemfdBacking("args", 4*page, guestmem.Split)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { memfd.Close() })
	model, err := guestmem.NewModelBacking(4*page, guestmem.InPlace)
	if err != nil {
		t.Fatal(err)
	}
	return map[string][]any{
		"AccessError":  {&guestmem.AccessError{}},
		"Attachment":   {att},
		"Block":        {mem.Blocks()[0], mem.Blocks()[1]},
		"Config":       {guestmem.Config{}},
		"ConvertError": {&guestmem.ConvertError{}},
		"Enforcement":  {guestmem.Enforcement(""), guestmem.EnforceGuestMemfd},
		"GuestView":    {mem.Guest(), guestmem.GuestView{}},
		"Hole":         {guestmem.Hole{}},
		"KVMBacking":   {new(guestmem.KVMBacking)},
		"Kind":         {guestmem.Kind(0)},
		"MemfdBacking": {memfd, new(guestmem.MemfdBacking)},
		"Memory":       {mem},
		"Mode":         {guestmem.Mode(0)},
		"ModelBacking": {model, new(guestmem.ModelBacking)},
		"Op":           {guestmem.Op(0)},
		"PinnedError":  {&guestmem.PinnedError{}},
		"PlugError":    {&guestmem.PlugError{}},
		"Request":      {guestmem.Request{}},
		"Side":         {guestmem.Side(0)},
		"Violation":    {&guestmem.Violation{}},
	}
}

// zeroOK are the calls whose zero arguments are valid, so that a nil
// error is the right answer.
var zeroOK = map[string]string{
	"Attachment.Check":    "nothing is wrong",
	"Attachment.Detach":   "detaching works",
	"Memory.Close":        "closing works",
	"Memory.ReadAt":       "an empty read is no error (io.ReaderAt)",
	"Memory.WriteAt":      "an empty write is no error (io.WriterAt)",
	"GuestView.ReadAt":    "an empty read is no error (io.ReaderAt)",
	"GuestView.WriteAt":   "an empty write is no error (io.WriterAt)",
	"MemfdBacking.Close":  "closing a backing works, even one never opened",
	"KVMBacking.Close":    "closing a backing works, even one never opened",
	"AccessError.Unwrap":  "a zero error wraps nothing",
	"ConvertError.Unwrap": "a zero error wraps nothing",
	"PlugError.Unwrap":    "a zero error wraps nothing",
	"PinnedError.Unwrap":  "a zero error wraps nothing",
}

// sentinels are the classes of failure a call may answer.
var sentinels = []error{
	guestmem.ErrInvalid, guestmem.ErrLayout, guestmem.ErrOptions, guestmem.ErrIOMMUPage,
	guestmem.ErrClosed, guestmem.ErrNotRAM, guestmem.ErrUnplugged, guestmem.ErrPlugged,
	guestmem.ErrPrivate, guestmem.ErrNoRAM, guestmem.ErrAddress, guestmem.ErrNoHostMemory,
}

// callZero calls fn with the zero value of every argument and returns the
// error result (nil if it has none) or the panic.
func callZero(fn reflect.Value) (panicked any, err error) {
	defer func() { panicked = recover() }()
	ft := fn.Type()
	args := make([]reflect.Value, ft.NumIn())
	for i := range args {
		args[i] = reflect.Zero(ft.In(i))
	}
	out := fn.Call(args)
	errType := reflect.TypeFor[error]()
	if n := len(out); n > 0 && ft.Out(n-1) == errType && !out[n-1].IsNil() {
		return nil, out[n-1].Interface().(error)
	}
	return nil, nil
}

// TestZeroArguments calls every exported function, and every exported
// method of every receiver zeroReceivers makes, with nil or zero
// arguments: nothing may panic, and an error result is nil only where
// zeroOK says zero arguments are valid, and otherwise matches one of the
// package's sentinels. The source decides what "every" is.
func TestZeroArguments(t *testing.T) {
	funcs, types := exported(t)
	var have []string
	for name := range zeroFuncs {
		have = append(have, name)
	}
	slices.Sort(have)
	if !slices.Equal(funcs, have) {
		t.Errorf("zeroFuncs covers\n%v\nthe exported functions are\n%v", have, funcs)
	}
	check := func(name string, recv any, hasErr bool, err error, panicked any) {
		t.Helper()
		label := name
		if recv != nil {
			label = fmt.Sprintf("%s (receiver %T)", name, recv)
		}
		switch {
		case panicked != nil:
			t.Errorf("%s with zero arguments panicked: %v", label, panicked)
		case !hasErr:
		case err == nil:
			if _, ok := zeroOK[name]; !ok {
				t.Errorf("%s with zero arguments answered no error", label)
			}
		case !slices.ContainsFunc(sentinels, func(s error) bool { return errors.Is(err, s) }):
			t.Errorf("%s with zero arguments: %v matches no sentinel", label, err)
		}
	}
	errType := reflect.TypeFor[error]()
	returnsErr := func(ft reflect.Type) bool { return ft.NumOut() > 0 && ft.Out(ft.NumOut()-1) == errType }
	for _, name := range funcs {
		fn := reflect.ValueOf(zeroFuncs[name])
		if !fn.IsValid() {
			continue
		}
		p, err := callZero(fn)
		check(name, nil, returnsErr(fn.Type()), err, p)
	}
	for _, ty := range types {
		// A fresh world for every type: Close and Detach change it.
		recvs, ok := zeroReceivers(t)[ty]
		if !ok {
			t.Errorf("no receiver for type %s, which has exported methods", ty)
			continue
		}
		for _, r := range recvs {
			v := reflect.ValueOf(r)
			for i := range v.NumMethod() {
				name := ty + "." + v.Type().Method(i).Name
				if name == "Memory.Close" {
					continue // last, below
				}
				p, err := callZero(v.Method(i))
				check(name, r, returnsErr(v.Method(i).Type()), err, p)
			}
		}
	}
	mem, _, _ := closeMemory(t)
	p, err := callZero(reflect.ValueOf(mem.Close))
	check("Memory.Close", mem, true, err, p)
}

// TestNilArguments: the nil pointers a VMM can hand over by mistake answer
// a typed error; none panics.
func TestNilArguments(t *testing.T) {
	var nilBacking *guestmem.MemfdBacking
	withNilBacking := guestmem.Config{Blocks: []guestmem.BlockConfig{{Name: "ram", Size: 2 * mib, Backing: nilBacking}}}
	if err := withNilBacking.Validate(); !errors.Is(err, guestmem.ErrLayout) {
		t.Errorf("Validate with a nil *MemfdBacking: %v, want ErrLayout", err)
	}
	if _, err := guestmem.New(withNilBacking); !errors.Is(err, guestmem.ErrLayout) {
		t.Errorf("New with a nil *MemfdBacking: %v, want ErrLayout", err)
	}
	var nilVM *fakeVM
	mem, err := guestmem.New(guestmem.Config{VM: nilVM, Blocks: []guestmem.BlockConfig{{Name: "ram", Size: 2 * mib}}})
	if err != nil {
		t.Fatalf("New with a nil *fakeVM: %v, want no VM", err)
	}
	defer mem.Close()
	if mem.Enforcement() != guestmem.EnforceUserSpace {
		t.Errorf("a nil VM enforces %v", mem.Enforcement())
	}
	if _, err := guestmem.NewKVMBacking((*kvm.VM)(nil), "ram", 2*mib, guestmem.Split); !errors.Is(err, guestmem.ErrLayout) {
		t.Errorf("NewKVMBacking with a nil *kvm.VM: %v, want ErrLayout", err)
	}
	for _, space := range []iommu.Space{nil, (*iommu.Model)(nil)} {
		if _, err := mem.AttachIOMMU(space, dma.Options{}); !errors.Is(err, guestmem.ErrOptions) {
			t.Errorf("AttachIOMMU(%T(nil)): %v, want ErrOptions", space, err)
		}
	}
}

// TestAttachBadOptions: options dma refuses answer ErrOptions, wrapping
// dma's error, and map nothing.
func TestAttachBadOptions(t *testing.T) {
	mem, err := guestmem.New(testLayout)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	if _, err := mem.Convert(guestmem.Request{GPA: 0, Size: 4 * page, To: memattr.Shared}); err != nil {
		t.Fatal(err)
	}
	for _, opts := range []dma.Options{
		{MaxExtent: 3 * mib},
		{MaxExtent: kib},
		{Policy: dma.Granule, Granularity: 3000},
		{Policy: 7},
	} {
		model := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2})
		att, err := mem.AttachIOMMU(model, opts)
		if !errors.Is(err, guestmem.ErrOptions) || att != nil {
			t.Errorf("AttachIOMMU(%+v) = %v, %v; want ErrOptions", opts, att, err)
		}
		if guestmem.Transient(err) {
			t.Errorf("AttachIOMMU(%+v): %v is transient", opts, err)
		}
		if n := model.Len(); n != 0 {
			t.Errorf("AttachIOMMU(%+v) left %d entries", opts, n)
		}
	}
}

// TestAttachIOMMUPage: a space whose smallest page is not a divisor of the
// conversion page is refused at attach (ErrIOMMUPage), before anything is
// mapped: otherwise every 4 KiB conversion, to private included, would
// fail with EINVAL. Smaller pages that divide it work.
func TestAttachIOMMUPage(t *testing.T) {
	mem, err := guestmem.New(testLayout)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	if _, err := mem.Convert(guestmem.Request{GPA: 0, Size: 16 * page, To: memattr.Shared}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		pageSize uint64
		ok       bool
	}{
		{64 * kib, false},
		{16 * kib, false},
		{2 * page, false},
		{3000, false},
		{page, true},
		{page / 2, true},
	} {
		model := iommu.NewModel(iommu.Caps{Rules: iommu.Type1v2, PageSize: c.pageSize})
		att, err := mem.AttachIOMMU(model, dma.Options{})
		if !c.ok {
			if !errors.Is(err, guestmem.ErrIOMMUPage) {
				t.Errorf("IOMMU page %#x: %v, want ErrIOMMUPage", c.pageSize, err)
			}
			if n := model.Len(); n != 0 {
				t.Errorf("IOMMU page %#x: refused attach left %d entries", c.pageSize, n)
			}
			continue
		}
		if err != nil {
			t.Errorf("IOMMU page %#x: %v", c.pageSize, err)
			continue
		}
		// One page back to private and shared again: both directions work.
		for _, to := range []memattr.State{memattr.Private, memattr.Shared} {
			if _, err := mem.Convert(guestmem.Request{GPA: 4 * page, Size: page, To: to}); err != nil {
				t.Errorf("IOMMU page %#x: convert to %v: %v", c.pageSize, to, err)
			}
		}
		if err := att.Check(); err != nil {
			t.Error(err)
		}
		if err := att.Detach(); err != nil {
			t.Error(err)
		}
	}
}

// TestAttachPolicy: an attachment reports the policy dma.New resolved for
// its space, before and after Detach: Auto cuts where the space cuts and
// maps bounded extents elsewhere; Cut on a space that cannot cut is
// refused as options, wrapping dma's error.
func TestAttachPolicy(t *testing.T) {
	mem, err := guestmem.New(testLayout)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	type1 := iommu.Caps{Rules: iommu.Type1v2}
	cutting := iommu.Caps{Rules: iommu.IOMMUFD, Cut: true}
	for _, c := range []struct {
		caps iommu.Caps
		in   dma.Policy
		want dma.Policy
	}{
		{type1, dma.Auto, dma.Extent},
		{iommu.Caps{Rules: iommu.IOMMUFD}, dma.Auto, dma.Extent},
		{cutting, dma.Auto, dma.Cut},
		{cutting, dma.Extent, dma.Extent},
		{cutting, dma.Granule, dma.Granule},
		{cutting, dma.Cut, dma.Cut},
	} {
		att, err := mem.AttachIOMMU(iommu.NewModel(c.caps), dma.Options{Policy: c.in})
		if err != nil {
			t.Errorf("%+v, %v: %v", c.caps, c.in, err)
			continue
		}
		if got := att.Policy(); got != c.want {
			t.Errorf("%+v, %v: attached with %v, want %v", c.caps, c.in, got, c.want)
		}
		if err := att.Detach(); err != nil {
			t.Fatal(err)
		}
		if got := att.Policy(); got != c.want {
			t.Errorf("%+v, %v: after Detach %v, want %v", c.caps, c.in, got, c.want)
		}
	}
	_, err = mem.AttachIOMMU(iommu.NewModel(type1), dma.Options{Policy: dma.Cut})
	if !errors.Is(err, guestmem.ErrOptions) || !errors.Is(err, dma.ErrOptions) {
		t.Errorf("Cut on type1: %v, want guestmem.ErrOptions wrapping dma.ErrOptions", err)
	}
}
