package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"runtime/debug"
)

// versionInfo is what gmem version reports, from the build information Go
// embeds in the binary.
type versionInfo struct {
	Module    string `json:"module"`             // the main module's path
	Version   string `json:"version"`            // its version: a tag, a pseudo-version, or (devel)
	Revision  string `json:"revision,omitempty"` // the VCS revision built, if known
	Time      string `json:"time,omitempty"`     // the revision's commit time
	Modified  bool   `json:"modified"`           // the tree had uncommitted changes
	GoVersion string `json:"go_version"`         // the toolchain
	Platform  string `json:"platform,omitempty"` // GOOS/GOARCH
}

// buildVersion reads the version from bi (debug.ReadBuildInfo's).
func buildVersion(bi *debug.BuildInfo) versionInfo {
	v := versionInfo{Module: bi.Main.Path, Version: bi.Main.Version, GoVersion: bi.GoVersion}
	var goos, goarch string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Revision = s.Value
		case "vcs.time":
			v.Time = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		case "GOOS":
			goos = s.Value
		case "GOARCH":
			goarch = s.Value
		}
	}
	if goos != "" && goarch != "" {
		v.Platform = goos + "/" + goarch
	}
	if v.Version == "" {
		v.Version = "(devel)"
	}
	return v
}

// runVersion implements "gmem version".
func runVersion(_ context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("gmem version")
	asJSON := fs.Bool("json", false, "print the version as one JSON object")
	if err := parseFlags(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, "usage: gmem version [--json]\n\nPrints gmem's module version, the VCS revision it was built from (with\n\"modified\" if the tree had uncommitted changes) and the Go toolchain.\n\nflags:\n")
			printFlags(stdout, fs)
			return exitOK
		}
		flagUsage(stderr, "gmem version", err)
		return exitUsage
	}
	if fs.NArg() > 0 {
		flagUsage(stderr, "gmem version", fmt.Errorf("unexpected argument %q", fs.Arg(0)))
		return exitUsage
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		fmt.Fprintln(stderr, "gmem version: the binary carries no build information")
		return exitFail
	}
	v := buildVersion(bi)
	if *asJSON {
		if err := json.NewEncoder(stdout).Encode(v); err != nil {
			fmt.Fprintf(stderr, "gmem version: %v\n", err)
			return exitFail
		}
		return exitOK
	}
	fmt.Fprintln(stdout, formatVersion(v))
	return exitOK
}

// formatVersion is the one line of gmem version.
func formatVersion(v versionInfo) string {
	s := fmt.Sprintf("gmem %s (%s)", v.Version, v.Module)
	if v.Revision != "" {
		s += ", revision " + v.Revision
		if v.Time != "" {
			s += " of " + v.Time
		}
		if v.Modified {
			s += ", modified"
		}
	}
	s += ", " + v.GoVersion
	if v.Platform != "" {
		s += " " + v.Platform
	}
	return s
}
