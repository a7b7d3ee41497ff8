package main

import (
	"bufio"
	"fmt"
	"io"
	"strings"
)

// newc cpio, the format the kernel unpacks an initramfs from
// (Documentation/driver-api/early-userspace/buffer-format.rst): each entry is
// a 110-byte ASCII header of "070701" and thirteen 8-digit hex fields, the
// NUL-terminated name padded to 4 bytes, and the data padded to 4 bytes. The
// archive ends with an entry named "TRAILER!!!".

// Mode bits of a cpio entry.
const (
	modeDir  = 0o040000
	modeReg  = 0o100000
	modeChar = 0o020000
)

// cpioWriter writes a newc archive.
type cpioWriter struct {
	w   *bufio.Writer
	off int64
	ino uint32
	err error
}

func newCPIOWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: bufio.NewWriter(w), ino: 1}
}

func (c *cpioWriter) write(b []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(b)
	c.off += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if r := c.off % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

// entry writes one entry. Names are relative ("init", "bin/busybox").
func (c *cpioWriter) entry(name string, mode uint32, data []byte, rmajor, rminor uint32) {
	if c.err == nil && (name == "" || strings.HasPrefix(name, "/") || strings.ContainsRune(name, 0)) {
		c.err = fmt.Errorf("cpio: bad entry name %q", name)
	}
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	c.ino++
	c.write([]byte(hdr))
	c.write(append([]byte(name), 0))
	c.pad()
	c.write(data)
	c.pad()
}

// Dir adds a directory.
func (c *cpioWriter) Dir(name string, perm uint32) { c.entry(name, modeDir|perm, nil, 0, 0) }

// File adds a regular file.
func (c *cpioWriter) File(name string, perm uint32, data []byte) {
	c.entry(name, modeReg|perm, data, 0, 0)
}

// CharDev adds a character device node.
func (c *cpioWriter) CharDev(name string, perm, major, minor uint32) {
	c.entry(name, modeChar|perm, nil, major, minor)
}

// Close writes the trailer and flushes.
func (c *cpioWriter) Close() error {
	c.entry("TRAILER!!!", 0, nil, 0, 0)
	if c.err != nil {
		return c.err
	}
	return c.w.Flush()
}
