package vmm

// Report sums up a run of the machine. The JSON names are those of
// gmem demo --json.
type Report struct {
	// GuestRan is true when a real guest ran on KVM, false for a
	// host-driven run.
	GuestRan bool `json:"guest_ran"`
	// Mode is the memory's backing, VCPUs the number of vCPUs.
	Mode  string `json:"mode"`
	VCPUs int    `json:"vcpus"`
	// Enforcement is who kept the attributes: "kvm-attributes",
	// "guest_memfd-attributes" (in place with private memory) or
	// "user-space" (guestmem.Enforcement).
	Enforcement string `json:"enforcement"`

	// Conversions is the conversion requests that succeeded, out of
	// ConversionRequests; Rejected were refused as invalid before any
	// change, Failed were valid but undone after a step failed.
	Conversions        uint64 `json:"conversions"`
	ConversionRequests uint64 `json:"conversion_requests"`
	Rejected           uint64 `json:"conversions_rejected"`
	Failed             uint64 `json:"conversions_failed"`
	// PagesToShared and PagesToPrivate count pages whose state changed.
	PagesToShared  uint64 `json:"pages_to_shared"`
	PagesToPrivate uint64 `json:"pages_to_private"`
	// Punches counts hole punches of backing files (split mode).
	Punches uint64 `json:"punches"`

	// DMAAllowed and DMABlocked count device transfers the IOMMU let
	// through and refused.
	DMAAllowed uint64 `json:"dma_allowed"`
	DMABlocked uint64 `json:"dma_blocked"`
	// IOMMURules are the kernel rules the model IOMMU follows ("type1" or
	// "iommufd"), IOMMUCut whether it cuts (an iommufd IOAS with huge
	// pages off), and IOMMUPolicy the policy its mappers resolved
	// ("granule", "extent" or "cut"; MachineConfig.Policy, Auto resolved
	// against the model).
	IOMMURules  string `json:"iommu_rules"`
	IOMMUCut    bool   `json:"iommu_cut"`
	IOMMUPolicy string `json:"iommu_policy"`
	// IOMMUEntriesPeak is the most IOMMU entries at once, IOMMUEntriesNow
	// what is left at the end; IOMMUSplits counts entries a conversion cut
	// while keeping the rest mapped (mapped again in pieces, or cut in
	// place), IOMMUCutCalls the cut requests (the cut policy).
	IOMMUEntriesPeak int    `json:"iommu_entries_peak"`
	IOMMUEntriesNow  int    `json:"iommu_entries_now"`
	IOMMUSplits      uint64 `json:"iommu_splits"`
	IOMMUCutCalls    uint64 `json:"iommu_cut_calls"`
	// StateRuns is the number of same-state runs in the state maps at the
	// end.
	StateRuns int `json:"state_runs"`

	// Violations counts invariant violations (I1/I2) found after
	// conversions.
	Violations uint64 `json:"violations"`
	// ChecksPassed and ChecksFailed count the scenario's checks; a check
	// never reported, a stray result word and a vCPU that did not finish
	// count as failed. FailedChecks describes each failure.
	ChecksPassed int      `json:"checks_passed"`
	ChecksFailed int      `json:"checks_failed"`
	FailedChecks []string `json:"failed_checks,omitempty"`
	// Error is what stopped the run early, if anything.
	Error string `json:"error,omitempty"`
}

// OK reports whether every check passed, at least one ran, no invariant
// was violated and nothing stopped the run.
func (r Report) OK() bool {
	return r.ChecksFailed == 0 && r.ChecksPassed > 0 && r.Violations == 0 && r.Error == ""
}

// buildReport collects a Report from the machine.
func buildReport(m *Machine, guestRan bool, runErr error) Report {
	mem := m.Memory()
	ms, st, ss, ast := mem.Stats(), m.Stats(), mem.StateStats(), m.att.Stats()
	passed, failed := m.Verdict()
	r := Report{
		GuestRan:           guestRan,
		Mode:               mem.Mode().String(),
		VCPUs:              m.VCPUs(),
		Enforcement:        string(mem.Enforcement()),
		ConversionRequests: st.PortRequests + st.HypercallRequests + st.MemoryFaultRequests,
		Conversions:        st.AnsweredOK,
		Rejected:           st.Rejected,
		Failed:             st.Failed,
		PagesToShared:      ms.PagesToShared,
		PagesToPrivate:     ms.PagesToPrivate,
		Punches:            ms.Punches,
		DMAAllowed:         st.DMAAllowed,
		DMABlocked:         st.DMABlocked,
		IOMMUEntriesPeak:   st.PeakEntries,
		IOMMUEntriesNow:    st.IOMMUEntries,
		IOMMURules:         m.model.Caps().Rules.String(),
		IOMMUCut:           m.model.Caps().Cut,
		IOMMUPolicy:        m.Policy().String(),
		IOMMUSplits:        ast.Splits,
		IOMMUCutCalls:      ast.CutCalls,
		StateRuns:          ss.Runs,
		Violations:         st.Violations,
		ChecksPassed:       passed,
		ChecksFailed:       len(failed),
		FailedChecks:       failed,
	}
	if runErr != nil {
		r.Error = runErr.Error()
	}
	return r
}
