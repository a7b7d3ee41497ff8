package iommufd

import (
	"fmt"
	"io/fs"
	"os"

	"github.com/gmemproject/gmem/internal/fdio"
)

// ErrClosed is returned by methods called on a closed IOMMUFD, and by a
// second Close. errors.Is(err, fs.ErrClosed) holds for it too.
var ErrClosed = fmt.Errorf("iommufd: %w", fs.ErrClosed)

// FdError is a descriptor NewIOMMUFD refused because it is not an
// iommufd. The descriptor was not taken: it is still the caller's.
type FdError struct {
	Fd  int
	Err error
}

// Error implements error.
func (e *FdError) Error() string {
	return fmt.Sprintf("iommufd: fd %d is not an iommufd: %v", e.Fd, e.Err)
}

// Unwrap returns the reason, the kernel's errno.
func (e *FdError) Unwrap() error { return e.Err }

// NewIOMMUFD returns an IOMMUFD for fd, an open /dev/iommu, and takes
// ownership of fd: Close closes it. The kind is checked with IOMMU_OPTION
// getting IOMMU_OPTION_RLIMIT_MODE of object 0, which reads a global
// setting and changes nothing; a wrong kind gives an *FdError and fd stays
// the caller's.
func NewIOMMUFD(fd int) (*IOMMUFD, error) {
	d, err := fdio.Own(fd, Path, ErrClosed, func(view *fdio.FD) error {
		_, err := (&IOMMUFD{fd: view}).GetOption(OptionRlimitMode, 0)
		return err
	})
	if err != nil {
		return nil, &FdError{Fd: fd, Err: err}
	}
	return &IOMMUFD{fd: d}, nil
}

// FromFile returns an IOMMUFD for a duplicate of f's descriptor. f remains
// the caller's: closing the IOMMUFD does not close f, nor the reverse; the
// kernel keeps the iommufd and its objects until both are closed.
func FromFile(f *os.File) (*IOMMUFD, error) {
	return fdio.Adopt(f, NewIOMMUFD)
}
