package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"regexp"
	"strings"
)

// newFlagSet returns the flag set of a command ("gmem replay"). It prints
// nothing itself: parseFlags returns its errors, and printFlags lays its
// flags out for help, the same way for every command.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

// parseFlags parses args with fs. It returns flag.ErrHelp for -h, -help and
// --help, and otherwise an error that names flags as help does (--ram, not
// the -ram of package flag).
func parseFlags(fs *flag.FlagSet, args []string) error {
	err := fs.Parse(args)
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return err
	}
	return errors.New(boolFor.ReplaceAllString(dashes.Replace(err.Error()), "$1--$2"))
}

// dashes rewrites package flag's messages ("flag provided but not defined:
// -x", "invalid value "1" for flag -x: ...", "invalid boolean value "y" for
// -x: ...", "flag needs an argument: -x") with two dashes.
var dashes = strings.NewReplacer(
	"defined: -", "defined: --",
	" for flag -", " for flag --",
	"argument: -", "argument: --",
)

// boolFor is the one message whose flag follows a quoted value: invalid
// boolean value "y" for -x.
var boolFor = regexp.MustCompile(`^(invalid boolean value ".*" for )-([^-])`)

// flagUsage writes a command's usage error: what is wrong, and where its
// flags are described.
func flagUsage(w io.Writer, cmd string, err error) {
	fmt.Fprintf(w, "%s: %v\nRun '%s -h' for its flags.\n", cmd, err, cmd)
}

// printFlags writes the flags of fs for help, one a line and aligned:
//
//	--name KIND   usage (default X)
//
// KIND is the back-quoted word of the usage, else NAME for an enum, N for
// a number, VALUE for another, nothing for a boolean; the default is added when it is not the zero value and the
// usage does not state one.
func printFlags(w io.Writer, fs *flag.FlagSet) {
	type row struct{ head, usage string }
	var rows []row
	width := 0
	fs.VisitAll(func(f *flag.Flag) {
		kind, usage := flag.UnquoteUsage(f)
		switch kind {
		case "value", "string":
			kind = "VALUE"
			if _, ok := f.Value.(interface{ isEnum() }); ok {
				kind = "NAME"
			}
		case "int", "uint":
			kind = "N"
		case "duration":
			kind = "DURATION"
		case "float":
			kind = "X"
		}
		head := "  --" + f.Name
		if kind != "" {
			head += " " + kind
		}
		switch f.DefValue {
		case "", "0", "false", "0s":
		default:
			if !strings.Contains(usage, "default") {
				usage += " (default " + f.DefValue + ")"
			}
		}
		rows = append(rows, row{head, usage})
		width = max(width, len(head))
	})
	// Usage in a column after the heads, wrapped; a head wider than the
	// column puts its usage on the next line.
	col := min(width, maxHead) + 2
	for _, r := range rows {
		lines := wrap(r.usage, lineWidth-col)
		if len(r.head) > col-2 {
			fmt.Fprintln(w, r.head)
		} else {
			fmt.Fprintf(w, "%-*s%s\n", col, r.head, lines[0])
			lines = lines[1:]
		}
		for _, l := range lines {
			fmt.Fprintf(w, "%*s%s\n", col, "", l)
		}
	}
}

// The layout of printFlags: the widest head beside its usage, and the width
// of a line.
const (
	maxHead   = 24
	lineWidth = 80
)

// wrap breaks s into lines of at most width bytes at spaces (a longer word
// keeps a line of its own).
func wrap(s string, width int) []string {
	var lines []string
	line := ""
	for _, word := range strings.Fields(s) {
		switch {
		case line == "":
			line = word
		case len(line)+1+len(word) <= width:
			line += " " + word
		default:
			lines = append(lines, line)
			line = word
		}
	}
	return append(lines, line)
}
