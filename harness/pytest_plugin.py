"""pytest plugin: ``--hil-device=URL`` runs the device contract suite on a
real lab device (read-only unless ``--hil-destructive``)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser) -> None:
    group = parser.getgroup("mirrorfw")
    group.addoption("--hil-device", action="append", default=[], metavar="URL",
                    help="also run the device contract suite on this device URL")
    group.addoption("--hil-destructive", action="store_true",
                    help="allow the contract suite to write to --hil-device devices")


@pytest.fixture(scope="session")
def hil_devices(request) -> list[str]:
    """The --hil-device URLs (may be empty)."""
    return list(request.config.getoption("hil_device"))


@pytest.fixture(scope="session")
def hil_destructive(request) -> bool:
    """True when --hil-destructive allows writing to the --hil-device devices."""
    return bool(request.config.getoption("hil_destructive"))
