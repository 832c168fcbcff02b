"""Which errors the CLI reports as one line, and with which exit code."""

from __future__ import annotations

from hal.block import DeviceError
from hal.link import LinkDown
from hal.url import UrlError


class ConfigError(ValueError):
    """A configuration file or option is wrong; the message names the key and file."""


def exit_code_for(exc: BaseException) -> int | None:
    """2 for bad input (URL, config, missing file, permission, busy), 1 for
    runtime failures; None for a bug, which keeps its traceback."""
    if isinstance(exc, (UrlError, ConfigError, FileNotFoundError, PermissionError, IsADirectoryError)):
        return 2
    if isinstance(exc, DeviceError):
        return 2
    if isinstance(exc, (LinkDown, ConnectionError, TimeoutError, OSError)):
        return 1
    # Layers add their error families here as they grow (ProtocolError, ...).
    for family in _extra_families:
        if isinstance(exc, family[0]):
            return family[1]
    return None


_extra_families: list[tuple[type[BaseException], int]] = []


def register(exc_type: type[BaseException], code: int) -> None:
    _extra_families.append((exc_type, code))
