package vfio

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// PCIDevicesDir is where sysfs lists PCI devices.
const PCIDevicesDir = "/sys/bus/pci/devices"

// PCIID returns the vendor and device id of the PCI device at address bdf
// (such as "0000:00:03.0"), read from sysfs.
func PCIID(bdf string) (vendor, device uint16, err error) {
	v, err := readHex(filepath.Join(PCIDevicesDir, bdf, "vendor"))
	if err != nil {
		return 0, 0, err
	}
	d, err := readHex(filepath.Join(PCIDevicesDir, bdf, "device"))
	if err != nil {
		return 0, 0, err
	}
	return uint16(v), uint16(d), nil
}

// FindPCI returns the addresses of the PCI devices with the given vendor and
// device id.
func FindPCI(vendor, device uint16) ([]string, error) {
	entries, err := os.ReadDir(PCIDevicesDir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		v, d, err := PCIID(e.Name())
		if err != nil {
			return nil, err
		}
		if v == vendor && d == device {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// BindVFIOPCI hands the PCI device bdf to the vfio-pci driver: it unbinds
// any current driver, sets driver_override and asks the PCI core to probe
// again. It is a no-op if vfio-pci already drives the device.
func BindVFIOPCI(bdf string) error {
	dev := filepath.Join(PCIDevicesDir, bdf)
	if drv, err := os.Readlink(filepath.Join(dev, "driver")); err == nil {
		if filepath.Base(drv) == "vfio-pci" {
			return nil
		}
		if err := os.WriteFile(filepath.Join(dev, "driver", "unbind"), []byte(bdf), 0); err != nil {
			return fmt.Errorf("unbind %s from %s: %w", bdf, filepath.Base(drv), err)
		}
	}
	if err := os.WriteFile(filepath.Join(dev, "driver_override"), []byte("vfio-pci"), 0); err != nil {
		return fmt.Errorf("driver_override %s: %w", bdf, err)
	}
	if err := os.WriteFile("/sys/bus/pci/drivers_probe", []byte(bdf), 0); err != nil {
		return fmt.Errorf("drivers_probe %s: %w", bdf, err)
	}
	drv, err := os.Readlink(filepath.Join(dev, "driver"))
	if err != nil || filepath.Base(drv) != "vfio-pci" {
		return fmt.Errorf("%s is not bound to vfio-pci after drivers_probe (driver %q, %v)", bdf, filepath.Base(drv), err)
	}
	return nil
}

// IOMMUGroup returns the IOMMU group number of the PCI device bdf, the N of
// /dev/vfio/N.
func IOMMUGroup(bdf string) (int, error) {
	l, err := os.Readlink(filepath.Join(PCIDevicesDir, bdf, "iommu_group"))
	if err != nil {
		return 0, fmt.Errorf("iommu group of %s: %w", bdf, err)
	}
	n, err := strconv.Atoi(filepath.Base(l))
	if err != nil {
		return 0, fmt.Errorf("iommu group of %s: %q: %w", bdf, l, err)
	}
	return n, nil
}

// CdevPath returns the VFIO device cdev of the PCI device bdf, such as
// /dev/vfio/devices/vfio0, as listed under its vfio-dev sysfs directory.
func CdevPath(bdf string) (string, error) {
	entries, err := os.ReadDir(filepath.Join(PCIDevicesDir, bdf, "vfio-dev"))
	if err != nil {
		return "", fmt.Errorf("vfio cdev of %s: %w", bdf, err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "vfio") {
			return filepath.Join("/dev/vfio/devices", e.Name()), nil
		}
	}
	return "", fmt.Errorf("vfio cdev of %s: none under vfio-dev", bdf)
}

func readHex(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(string(b)), "0x"), 16, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return v, nil
}
