"""Device drivers, one module per URL scheme (after pyserial's serial_for_url).

Every caller, test and config opens devices through ``open_device``; a lab
device is just another URL.

The OS primitives the file, blk and nvram drivers share (errno
classification, aligned buffers, positional I/O and O_DIRECT, the I/O thread
pool, the cffi ioctl module, io_uring and ``DeviceIo``) live in the
``drivers.osio`` sub-package, one module per concern; hal/ holds only the
interfaces the firmware programs against.
"""

from __future__ import annotations

import importlib

from hal.block import BlockDevice
from hal.nvram import NvramRegion
from hal.url import UrlError, parse_url

BLOCK_SCHEMES = {
    "mem": "drivers.mem",
    "file": "drivers.file",
    "blk": "drivers.blk",
    "nvme": "drivers.blk",
    "sata": "drivers.blk",
    "nbd": "drivers.nbd.client",
    "nbd+unix": "drivers.nbd.client",
}
VOLATILE = "volatile+"  # a scheme prefix: drivers.powerloss in front of the inner URL's driver


def open_device(url: str, *, read_only: bool = False) -> BlockDevice:
    """Open the block device a URL names. Raises UrlError or DeviceError."""
    scheme = parse_url(url).scheme
    if scheme.startswith(VOLATILE):
        return importlib.import_module("drivers.powerloss").open(url, read_only=read_only)
    if scheme not in BLOCK_SCHEMES:
        raise UrlError(
            f"{url}: unknown device scheme {scheme!r}; known: {', '.join(sorted(BLOCK_SCHEMES))}, "
            f"each also as {VOLATILE}<scheme> (a volatile write cache that can lose power)"
        )
    return importlib.import_module(BLOCK_SCHEMES[scheme]).open(url, read_only=read_only)


def open_nvram(url: str) -> NvramRegion:
    """Open the NVRAM region a URL names (``nvram:///path?size=64MiB``)."""
    scheme = parse_url(url).scheme
    if scheme == VOLATILE + "nvram":
        return importlib.import_module("drivers.powerloss").open_nvram(url)
    if scheme != "nvram":
        raise UrlError(f"{url}: unknown NVRAM scheme {scheme!r}; known: nvram, {VOLATILE}nvram "
                       f"(e.g. nvram:///path/p.nvram?size=64MiB)")
    from drivers import nvram

    return nvram.open(url)
