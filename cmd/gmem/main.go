// Command gmem answers, for a confidential VM with assigned devices, how many
// DMA mappings, how much tracking memory and how many ioctls its guest's
// memory conversions need, from a trace of those conversions.
//
// Usage:
//
//	gmem COMMAND [arguments]
//	gmem help [COMMAND]
//
// Exit status: 0 success, 1 failed checks or a run-time failure, 2 usage or
// input errors.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// Exit codes shared by every command.
const (
	exitOK    = 0 // done, all checks passed
	exitFail  = 1 // a check failed or the work could not be done
	exitUsage = 2 // bad command line or bad input
)

// command is one subcommand. run gets the arguments after the command name
// and returns the exit code; it writes results to stdout and diagnostics to
// stderr, and stops early when ctx is cancelled. "-h" among the arguments
// asks for its help, on stdout, with exit code 0.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) int
}

// commands lists the subcommands in the order help shows them. A new
// subcommand is one entry here.
func commands() []command {
	return []command{
		{name: "gen", summary: "write a generated conversion trace (JSON Lines) to stdout", run: runGen},
		{name: "replay", summary: "replay a trace through the baseline and gmem, checking the invariants", run: runReplay},
		{name: "bench", summary: "compare gmem with the baseline on the standard scenarios", run: runBench},
		{name: "demo", summary: "boot the built-in guest on KVM: conversions and DMA through the IOMMU, checked", run: runDemo},
		{name: "version", summary: "print gmem's version and the revision it was built from", run: runVersion},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// After the first signal the next one kills at once, as without gmem's
	// handler: the command is already stopping.
	context.AfterFunc(ctx, stop)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run dispatches to a subcommand and returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return exitUsage
	}
	name := args[0]
	switch name {
	case "help", "-h", "-help", "--help":
		if name == "help" && len(args) > 1 {
			c, ok := lookup(args[1])
			if !ok {
				fmt.Fprintf(stderr, "gmem: unknown command %q\n", args[1])
				usage(stderr)
				return exitUsage
			}
			return c.run(ctx, []string{"-h"}, stdout, stderr)
		}
		usage(stdout)
		return exitOK
	}
	c, ok := lookup(name)
	if !ok {
		fmt.Fprintf(stderr, "gmem: unknown command %q\n", name)
		usage(stderr)
		return exitUsage
	}
	return c.run(ctx, args[1:], stdout, stderr)
}

func lookup(name string) (command, bool) {
	for _, c := range commands() {
		if c.name == name {
			return c, true
		}
	}
	return command{}, false
}

func usage(w io.Writer) {
	fmt.Fprint(w, `usage: gmem COMMAND [arguments]

gmem models the guest memory of confidential VMs with assigned devices:
shared/private page state, KVM attributes and IOMMU mappings kept
consistent through every conversion.

commands:
`)
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprint(w, `
Run 'gmem help COMMAND' or 'gmem COMMAND -h' for a command's help.
Exit status: 0 success, 1 failed checks, 2 usage or input errors.
`)
}
