package main

import (
	"cmp"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/gmemproject/gmem/internal/bench"
	"github.com/gmemproject/gmem/replay"
)

func printResult(w io.Writer, name string, in inputStats, res replay.Result, took time.Duration) {
	fmt.Fprintf(w, "trace      %s (%s, %s): %s, %s, replayed in %s\n",
		name, in.Format, in.FormatReason, plural(res.Events, "event", "events"), plural(res.Conversions, "conversion", "conversions"), took.Round(time.Millisecond))
	fmt.Fprintf(w, "input      %s: %d malformed, %d comments skipped, %d unrecognised, %d folded; %s\n",
		plural(uint64(in.Lines), "line", "lines"), in.Malformed, in.Skipped, in.Unrecognised, in.Folded,
		plural(res.InputErrors, "impossible machine event", "impossible machine events"))
	fmt.Fprintf(w, "rejected   %s%s, %s by one run only\n",
		plural(res.Rejected, "guest request", "guest requests"), byReason(res.RejectedBy), commas(res.Diverged))
	fmt.Fprintf(w, "memory     %s of RAM: %s shared, %s private, %s unplugged; %s attached\n",
		human(res.RAMBytes), human(res.SharedBytes), human(res.PrivateBytes), human(res.UnpluggedBytes), plural(uint64(res.Devices), "device", "devices"))
	fmt.Fprintf(w, "policy     %s\n", policyLine(res))
	if res.RunErrors > 0 {
		fmt.Fprintf(w, "attach     %s a run could not attach (see below)\n", plural(res.RunErrors, "device", "devices"))
	}
	fmt.Fprintf(w, "checks     I1-I4 after every event: %s\n\n", plural(res.Violations, "violation", "violations"))

	// Counts that follow the events compare different traces once the runs
	// diverged; the bitmap's size does not depend on the events.
	diverged := res.Diverged > 0
	b, g := res.Baseline, res.Gmem
	const (
		exact   = iota // like with like: a ratio
		follows        // follows the events: not comparable once the runs diverged
		noRatio        // refusal counts, one timed run: no ratio
	)
	rows := []struct {
		name string
		b, g float64
		cell func(float64) string
		kind int
	}{
		{"IOMMU entries at the end", float64(b.EntriesFinal), float64(g.EntriesFinal), count, follows},
		{"IOMMU entries, peak", float64(b.EntriesPeak), float64(g.EntriesPeak), count, follows},
		{"map calls", float64(b.MapCalls), float64(g.MapCalls), count, follows},
		{"unmap calls", float64(b.UnmapCalls), float64(g.UnmapCalls), count, follows},
		{"cut calls", float64(b.CutCalls), float64(g.CutCalls), count, follows},
		{"entry splits", float64(b.Splits), float64(g.Splits), count, follows},
		{"state memory", float64(b.StateBytes), float64(g.StateBytes), bytesCell, exact},
		{"pinned", float64(b.PinnedBytes), float64(g.PinnedBytes), bytesCell, follows},
		{"re-pinned", float64(b.RepinnedBytes), float64(g.RepinnedBytes), bytesCell, follows},
		{"window", float64(b.WindowBytes), float64(g.WindowBytes), bytesCell, follows},
		{"largest window", float64(b.MaxWindow), float64(g.MaxWindow), bytesCell, follows},
		{"refused: out of entries", float64(b.LimitFailures), float64(g.LimitFailures), count, noRatio},
		{"  of them to private", float64(b.PrivateRefused), float64(g.PrivateRefused), count, noRatio},
		{"refused: any reason", float64(b.Failures), float64(g.Failures), count, noRatio},
		{"time per event, 1 run", b.NsPerEvent, g.NsPerEvent, func(v float64) string { return duration(v) }, noRatio},
	}
	if l := res.Limits; l != nil {
		rows = append(rows, struct {
			name string
			b, g float64
			cell func(float64) string
			kind int
		}{"entries needed, no limit", float64(l.Baseline.Peak), float64(l.Gmem.Peak), count, exact})
	}
	fmt.Fprintf(w, "%-27s %12s %12s %10s\n", "", "baseline", "gmem", "ratio")
	for _, r := range rows {
		bc := r.cell(r.b)
		if r.name == "state memory" && b.StateHow == replay.StateComputed {
			bc += "*"
		}
		rc := ratio(r.b, r.g)
		switch {
		case r.kind == noRatio:
			rc = "-"
		case r.kind == follows && diverged:
			rc = "n/c"
		}
		fmt.Fprintf(w, "%-27s %12s %12s %10s\n", r.name, bc, r.cell(r.g), rc)
	}
	fmt.Fprintln(w)
	legend(w, "ratio: ", "baseline / gmem (above 1: gmem needs less); -: none, for a zero on either side, refusal counts and one timed run")
	if diverged {
		legend(w, "n/c: ", fmt.Sprintf("not comparable: from event %s the runs replayed different traces (%s refused by one run only); "+
			"'entries needed, no limit' replays each policy with every request granted, like with like",
			commas(res.DivergedAt), plural(res.Diverged, "request", "requests")))
	}
	if b.Splits > 0 || g.Splits > 0 {
		legend(w, "splits: ", "entries a conversion to private cut, keeping the rest mapped: the extent policy unmaps the entry and maps the rest of its chunk again "+
			"(re-pinned, and hidden from the device meanwhile: the window), the cut policy removes only the range (no window, nothing re-pinned)")
	}
	legend(w, "refused: ", "each run's refusals of requests (all reasons: 'rejected' above); 'out of entries' is the type1 limit, 'to private' a guest giving memory back")
	if res.Limits != nil {
		legend(w, "entries needed: ", "the most IOMMU entries of one type1 device, with no limit")
	}
	if b.StateHow == replay.StateComputed {
		legend(w, "*: ", "computed, not allocated (see the note)")
	}
	for _, n := range res.Notes {
		legend(w, "note: ", n)
	}
	if l := res.Limits; l != nil {
		given := "the default, " + commas(l.Given)
		if l.Given != 65535 {
			given = commas(l.Given)
		}
		fmt.Fprintln(w)
		legend(w, "dma_entry_limit: ", fmt.Sprintf("%s, each its own container; the smallest limit the trace gives: %s",
			plural(uint64(l.Devices), "type1 device", "type1 devices"), given))
		for _, a := range []string{l.Baseline.Advice, l.Gmem.Advice} {
			indent := "  "
			for _, line := range wrap(a, lineWidth-4) {
				fmt.Fprintf(w, "%s%s\n", indent, line)
				indent = "    "
			}
		}
	}
	if len(res.RunErrorDetails) > 0 {
		fmt.Fprintln(w, "\ndevices not attached:")
		for _, e := range res.RunErrorDetails {
			fmt.Fprintf(w, "  %v\n", &e)
		}
		more(w, res.RunErrorsOmitted, res.RunErrors, len(res.RunErrorDetails))
	}
	if len(res.ViolationDetails) > 0 {
		fmt.Fprintln(w, "\nviolations:")
		for _, v := range res.ViolationDetails {
			fmt.Fprintf(w, "  %v\n", &v)
		}
		more(w, res.ViolationsOmitted, res.Violations, len(res.ViolationDetails))
	}
	if len(res.Rejections) > 0 {
		shown := min(len(res.Rejections), shownRejections)
		if uint64(shown) == res.Rejected {
			fmt.Fprintln(w, "\nrejections:")
		} else {
			fmt.Fprintf(w, "\nfirst %d of %s rejections:\n", shown, commas(res.Rejected))
		}
		for _, r := range res.Rejections[:shown] {
			where := "event " + strconv.FormatUint(r.Event, 10)
			if r.Line > 0 {
				where += ", line " + strconv.Itoa(r.Line)
			}
			fmt.Fprintf(w, "  %s, refused by %s (%s): %s\n", where, r.Run, r.Reason, r.Detail)
		}
		if left := res.Rejected - uint64(shown); left > 0 {
			described := fmt.Sprintf("%d of the %s", len(res.Rejections), commas(res.Rejected))
			if res.RejectionsOmitted == 0 {
				described = "all " + commas(res.Rejected)
			}
			fmt.Fprintf(w, "  ... %s more: --json describes %s", commas(left), described)
			if res.RejectionsOmitted > 0 {
				fmt.Fprint(w, ", --details all every one")
			}
			fmt.Fprintln(w)
		}
	}
}

// policyLine says which policy each run mapped with, and on what: "gmem:
// cut (iommufd, huge pages off); baseline: granule", the gmem run's devices
// grouped by policy and space where they differ.
func policyLine(res replay.Result) string {
	g := res.Gmem.DevicePolicies
	if len(g) == 0 && len(res.Baseline.DevicePolicies) == 0 {
		return "no device attached"
	}
	type group struct {
		policy, space string
		n             uint64
	}
	var groups []group
	for _, d := range g {
		i := slices.IndexFunc(groups, func(x group) bool { return x.policy == d.Policy && x.space == d.Space() })
		if i < 0 {
			groups = append(groups, group{policy: d.Policy, space: d.Space()})
			i = len(groups) - 1
		}
		groups[i].n++
	}
	parts := make([]string, len(groups))
	for i, x := range groups {
		if len(groups) == 1 {
			parts[i] = fmt.Sprintf("%s (%s)", x.policy, x.space)
		} else {
			parts[i] = fmt.Sprintf("%s (%s: %s)", x.policy, x.space, plural(x.n, "device", "devices"))
		}
	}
	gmem := strings.Join(parts, ", ")
	if gmem == "" {
		gmem = "no device attached"
	}
	return "gmem: " + gmem + "; baseline: granule"
}

// legend writes a paragraph wrapped to 80 columns, the lines after the
// first indented under its text.
func legend(w io.Writer, head, text string) {
	for i, l := range wrap(text, lineWidth-len(head)) {
		if i == 0 {
			fmt.Fprintf(w, "%s%s\n", head, l)
		} else {
			fmt.Fprintf(w, "%*s%s\n", len(head), "", l)
		}
	}
}

// more says how many items of a list were counted but not described.
func more(w io.Writer, omitted, total uint64, listed int) {
	if omitted > 0 {
		fmt.Fprintf(w, "  ... %s more (%d of %s described: --details all for every one)\n", commas(omitted), listed, commas(total))
	}
}

// byReason formats the rejection counts, most frequent first: " (3 size
// 0, 1 misaligned)"; "" for none.
func byReason(m map[string]uint64) string {
	if len(m) == 0 {
		return ""
	}
	keys := slices.Collect(maps.Keys(m))
	slices.SortFunc(keys, func(a, b string) int {
		if c := cmp.Compare(m[b], m[a]); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = commas(m[k]) + " " + k
	}
	return " (" + strings.Join(parts, ", ") + ")"
}

// ratio formats baseline/gmem, or "-" if either is zero: a ratio to or
// from nothing says nothing.
func ratio(b, g float64) string {
	switch r := b / g; {
	case b == 0 || g == 0:
		return "-"
	case r >= 1000:
		return commas(uint64(math.Round(r))) + "x"
	default:
		return fmt.Sprintf("%.2fx", r)
	}
}

func count(v float64) string { return commas(uint64(v)) }

func bytesCell(v float64) string { return human(uint64(v)) }

// plural formats a count with the noun that agrees with it: "1 device",
// "2 devices", "1,024 devices".
func plural(n uint64, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return commas(n) + " " + many
}

// commas formats n with thousands separators.
func commas(n uint64) string { return bench.Commas(n) }

// human formats a byte count with a binary unit and three significant
// digits.
func human(n uint64) string { return bench.Human(n) }

// duration formats nanoseconds with a unit.
func duration(ns float64) string { return bench.Duration(ns) }

// sortInputErrors orders input errors by line, then by event.
func sortInputErrors(es []replay.InputError) {
	slices.SortStableFunc(es, func(a, b replay.InputError) int {
		if c := cmp.Compare(a.Line, b.Line); c != 0 {
			return c
		}
		return cmp.Compare(a.Event, b.Event)
	})
}

func replayHelp(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprint(w, `usage: gmem replay [flags] FILE|-

Replays a conversion trace (gmem's JSON Lines, e.g. from 'gmem gen', or a
QEMU trace log with kvm_convert_memory / kvm_memory_fault lines) through
the gmem library twice, side by side:

  baseline  QEMU's algorithm: one bit per 4 KiB page, one IOMMU entry per
            4 KiB granule
  gmem      page state stored as runs, one IOMMU entry per converted extent;
            a conversion to private inside an entry is one cut where the
            device's IOMMU can cut (iommufd, with huge pages off, as gmem
            sets it up), an unmap and a remap of the entry's 2 MiB chunk
            elsewhere (--policy, --iommufd-huge-pages)

and prints which policy each run mapped with and what each needed: IOMMU
entries (final and peak), map, unmap and cut calls, entry splits, state
memory, pinned and re-pinned bytes, the window (memory still shared that a
device could not reach for a moment), conversions refused for want of type1
entries, and time per event. After every event it checks the invariants:
the IOMMU maps exactly the shared, plugged pages (I1) and never a private
or unplugged one (I2), a refused event changes nothing (I3), and the page
state is what the events asked for, the same in both runs (I4).

A JSON Lines trace is replayed as it is read; a QEMU log is read whole
first, and describes no machine, so --ram, --devices, --iommu, --limit and
--mode describe it. The format is detected from the first line that is
neither blank nor a '#' comment ('{' starts JSON Lines), unless --format
says which; the output says which and why. A QEMU log's lines may carry any
prefix before the event name (timestamps, journal headers).

Two kinds of bad input: a malformed line, or an event describing an
impossible machine (RAM or MMIO overlapping, a RAM name or a device
attached twice, a plug where there is no hot-pluggable RAM), is an input
error. A well-formed guest request the VMM refuses (misaligned, size 0,
an MMIO hole or unbacked memory made private, ...) is replayed as the
refusal it is: counted by reason, listed with --json.

flags:
`)
	printFlags(w, fs)
	fmt.Fprint(w, `
Exit status: 0 all checks passed (refused guest requests included), 1 an
invariant was violated, a run could not attach a device, or the replay was
interrupted (SIGINT, SIGTERM: within a second, even inside a long event), 2
usage, input or output errors: empty or binary input, a malformed line or an
impossible machine event (reported with its line number; with --keep-going
every one is reported and skipped, and the exit status is 2 at the end unless
a violation makes it 1), an output file that cannot be written, a device the
gmem run cannot map with the --policy given (cut on type1, or on iommufd with
--iommufd-huge-pages: the replay stops there unless --keep-going). With --json
stdout is one object whatever the exit status, with an "error" object (kind,
message, line) whenever it is not 0.
`)
}
