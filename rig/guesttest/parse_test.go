package guesttest

import (
	"slices"
	"strings"
	"testing"
)

// TestParseGoTest reads the shape of go test -v output the inplace checks
// see from /vmmtest: subtest verdicts after their parent's, log lines
// before the verdicts, a failure inside a passing parent.
func TestParseGoTest(t *testing.T) {
	out := `=== RUN   TestBuiltinInPlacePrivate
    private_test.go:234: needs in-place conversion with private memory (Linux 7.4 ...): kernel has no cap
--- SKIP: TestBuiltinInPlacePrivate (0.00s)
=== RUN   TestBuiltinKVM
=== RUN   TestBuiltinKVM/inplace/1
    vmm_test.go:139: needs guest_memfd
=== RUN   TestBuiltinKVM/split/1
--- PASS: TestBuiltinKVM (0.00s)
    --- SKIP: TestBuiltinKVM/inplace/1 (0.00s)
    --- PASS: TestBuiltinKVM/split/1 (0.31s)
=== RUN   TestFaultInjectionKVM
=== RUN   TestFaultInjectionKVM/split
    vmm_test.go:300: conversion 3 failed but changed state
--- FAIL: TestFaultInjectionKVM (0.52s)
    --- FAIL: TestFaultInjectionKVM/split (0.50s)
=== RUN   TestScenarioValidate
--- PASS: TestScenarioValidate (0.00s)
FAIL
`
	order, tests := parseGoTest([]byte(out))
	if want := []string{"TestBuiltinInPlacePrivate", "TestBuiltinKVM", "TestFaultInjectionKVM", "TestScenarioValidate"}; !slices.Equal(order, want) {
		t.Fatalf("order %v, want %v", order, want)
	}
	if r := tests["TestBuiltinInPlacePrivate"]; r.Verdict != "SKIP" || len(r.Log) != 1 || !strings.Contains(r.Log[0], sevenFour) {
		t.Errorf("7.4 test: %+v", r)
	}
	if r := tests["TestBuiltinKVM"]; r.Verdict != "PASS" || len(r.Skipped) != 1 || !strings.Contains(r.Skipped[0], "needs guest_memfd") || r.SubtestCount != 2 {
		t.Errorf("a passing parent with a skipped subtest: %+v", r)
	}
	if r := tests["TestFaultInjectionKVM"]; r.Verdict != "FAIL" || len(r.Failed) != 1 || !strings.Contains(r.Failed[0], "changed state") {
		t.Errorf("a failing subtest: %+v", r)
	}
	if r := tests["TestScenarioValidate"]; r.Verdict != "PASS" || len(r.Skipped)+len(r.Failed) != 0 {
		t.Errorf("a plain pass: %+v", r)
	}
}
