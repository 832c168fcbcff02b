"""The firmware's exception family: everything the controller logic raises
on purpose derives from ``FirmwareError`` so the CLI and console can turn it
into one line."""

from __future__ import annotations


class FirmwareError(Exception):
    """Base of every error the firmware raises on purpose."""


class NvramError(FirmwareError):
    """The NVRAM region is unreadable, too small, or does not match the volumes."""


class InvalidTransition(FirmwareError):
    """An event arrived in a phase whose transition table has no entry for it."""

    def __init__(self, phase, event) -> None:
        p = getattr(phase, "value", phase)
        e = getattr(event, "value", event)
        super().__init__(f"event {e!r} is not allowed in phase {p!r}")
        self.phase = phase
        self.event = event


class CacheFull(FirmwareError):
    """No free or evictable cache slot right now (destage will make room)."""


class VolumeError(FirmwareError):
    """Unknown volume, or an offset/length outside it or not aligned."""


class CgFailed(FirmwareError):
    """A consistency group failed; the message says why."""
