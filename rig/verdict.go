package main

import (
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Marker starts every line the guest reports on the serial console, each
// written in one write so kernel messages cannot split it:
//
//	GMEM-RIG boot <details>                   (from /init, before the tests)
//	GMEM-RIG check <backend> <check> pass|fail|skip
//	GMEM-RIG end rc=<exit status of the test binary>
//	GMEM-RIG demo rc=<exit status of gmem demo>   (-demo boots)
//
// Kernel messages may still land in front of a marker on the same console
// line, so the marker is searched anywhere in a line.
const Marker = "GMEM-RIG"

// maxWhy bounds the test log lines kept for one failing check: enough for
// the messages that say why it failed, not a flood from a loop.
const maxWhy = 6

// maxWhyLen bounds one kept line.
const maxWhyLen = 240

var (
	checkRE = regexp.MustCompile(Marker + ` check (type1|iommufd|kvm|inplace) (\S+) (pass|fail|skip)\b`)
	endRE   = regexp.MustCompile(Marker + ` end rc=(-?\d+)\b`)
	bootRE  = regexp.MustCompile(Marker + ` boot\b`)
	demoRE  = regexp.MustCompile(Marker + ` demo rc=(-?\d+)\b`)
	// logRE matches what t.Error, t.Fatal and t.Log print: an indented
	// "file_test.go:line: message".
	logRE = regexp.MustCompile(`^\s+(\S+_test\.go:\d+: .*)$`)
	runRE = regexp.MustCompile(`^=== (RUN|CONT|NAME) `)
)

// Backends are the backends "all" runs, in the order the guest runs them.
var Backends = []string{"type1", "iommufd", "kvm"}

// InPlace is the backend of the in-place checks, which need a kernel with
// mmap-able guest_memfd (6.18 or later: the rig's linux-source-7.3), so
// "all" (which the 6.12 kernel runs) leaves it out.
const InPlace = "inplace"

// Verdicts collects what the guest reported.
type Verdicts struct {
	checks map[string][]checkResult // by backend
	booted bool
	ended  bool
	rc     int
	// demoEnded and demoRC are the demo's end; json is the last console
	// line that is a JSON object.
	demoEnded bool
	demoRC    int
	json      string
	// pending holds the test log lines since the last check started, the
	// messages of the check that reports next.
	pending []string
}

type checkResult struct {
	name, result string
	why          []string // test log lines of a check that did not pass
}

// NewVerdicts returns an empty collection.
func NewVerdicts() *Verdicts {
	return &Verdicts{checks: map[string][]checkResult{}}
}

// Line feeds one console line and reports whether it carried a verdict.
func (v *Verdicts) Line(line string) bool {
	if m := checkRE.FindStringSubmatch(line); m != nil {
		c := checkResult{name: m[2], result: m[3]}
		if c.result != "pass" {
			c.why = v.pending
		}
		v.checks[m[1]] = append(v.checks[m[1]], c)
		v.pending = nil
		return true
	}
	if runRE.MatchString(line) && strings.Count(line, "/") == 2 {
		// A check (a subtest two levels down) starts: what was logged
		// before belongs to no check.
		v.pending = nil
		return false
	}
	if m := logRE.FindStringSubmatch(line); m != nil {
		if len(v.pending) < maxWhy {
			w := strings.TrimSpace(m[1])
			if len(w) > maxWhyLen {
				w = w[:maxWhyLen] + "..."
			}
			v.pending = append(v.pending, w)
		}
		return false
	}
	if m := demoRE.FindStringSubmatch(line); m != nil {
		rc, err := strconv.Atoi(m[1])
		if err != nil {
			rc = -1
		}
		v.demoEnded, v.demoRC = true, rc
		return true
	}
	if t := strings.TrimSpace(line); strings.HasPrefix(t, "{") && json.Valid([]byte(t)) {
		v.json = t
		return false
	}
	if bootRE.MatchString(line) {
		v.booted = true
		return true
	}
	if m := endRE.FindStringSubmatch(line); m != nil {
		rc, err := strconv.Atoi(m[1])
		if err != nil {
			rc = -1
		}
		v.ended, v.rc = true, rc
		return true
	}
	return false
}

// Demo returns gmem demo's exit status and whether the guest reported it.
func (v *Verdicts) Demo() (rc int, ended bool) { return v.demoRC, v.demoEnded }

// JSON returns the last console line that was a JSON object, or "".
func (v *Verdicts) JSON() string { return v.json }

// Booted reports whether the guest's /init announced itself.
func (v *Verdicts) Booted() bool { return v.booted }

// Summary returns one line per requested backend and whether all passed. A
// backend passes when it reported at least one check, every check passed,
// and the test binary ended, with status 0 or with a failing check of
// another backend to account for a non-zero status. A skipped check is a
// failure: everything the rig runs must run. A check that did not pass is
// followed by the test log lines it printed ("rig:   check: file:line: ..."),
// so the summary alone says why.
func (v *Verdicts) Summary(backends []string) ([]string, bool) {
	var lines []string
	ok := true
	for _, b := range backends {
		cs := v.checks[b]
		var bad, why []string
		pass := 0
		for _, c := range cs {
			switch c.result {
			case "pass":
				pass++
			default:
				bad = append(bad, c.name+"("+c.result+")")
				for _, w := range c.why {
					why = append(why, fmt.Sprintf("rig:   %s: %s", c.name, w))
				}
			}
		}
		switch {
		case len(cs) == 0 && !v.ended:
			lines = append(lines, fmt.Sprintf("rig: %s fail: the guest never reported", b))
			ok = false
		case len(cs) == 0:
			lines = append(lines, fmt.Sprintf("rig: %s fail: no checks reported (test binary rc=%d)", b, v.rc))
			ok = false
		case len(bad) > 0:
			lines = append(lines, fmt.Sprintf("rig: %s fail %d of %d checks: %s", b, len(bad), len(cs), strings.Join(bad, " ")))
			lines = append(lines, why...)
			ok = false
		case !v.ended:
			lines = append(lines, fmt.Sprintf("rig: %s fail: %d checks passed, then the guest stopped reporting", b, pass))
			ok = false
		case v.rc != 0 && !v.failedCheck():
			lines = append(lines, fmt.Sprintf("rig: %s fail: %d checks passed but the test binary exited with rc=%d", b, pass, v.rc))
			ok = false
		default:
			lines = append(lines, fmt.Sprintf("rig: %s pass %d checks", b, pass))
		}
	}
	return lines, ok
}

// failedCheck reports whether any backend reported a check that did not
// pass; a non-zero exit status is then put down to that check, not to the
// backends whose checks all passed.
func (v *Verdicts) failedCheck() bool {
	for _, cs := range v.checks {
		for _, c := range cs {
			if c.result != "pass" {
				return true
			}
		}
	}
	return false
}

// parseBackend turns the --backend value into the list of backends.
func parseBackend(s string) ([]string, error) {
	if s == "all" {
		return slices.Clone(Backends), nil
	}
	if slices.Contains(Backends, s) || s == InPlace {
		return []string{s}, nil
	}
	return nil, fmt.Errorf("backend must be type1, iommufd, kvm, inplace or all, not %q", s)
}
