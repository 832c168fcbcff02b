"""Crash points: named places in the firmware where a test may kill the
controller to prove recovery. The firmware only calls ``hit(name)``; the
harness decides what an armed point does (SIGKILL of the own process), so
the firmware never touches the OS.

Every name is declared in ``POINTS`` so the console can list them and a
typo in a test is an error, not a point that never fires.
"""

from __future__ import annotations

from collections.abc import Callable

POINTS: dict[str, str] = {}


def declare(name: str, why: str) -> str:
    POINTS[name] = why
    return name


class UnknownCrashPoint(KeyError):
    pass


class CrashPoints:
    def __init__(self, on_hit: Callable[[str], None] | None = None) -> None:
        self.armed: dict[str, int] = {}  # name -> hits to skip before firing
        self.on_hit = on_hit

    def arm(self, name: str, after: int = 0) -> None:
        if name not in POINTS:
            raise UnknownCrashPoint(f"unknown crash point {name!r}; known: {', '.join(sorted(POINTS))}")
        self.armed[name] = after

    def disarm(self, name: str) -> None:
        self.armed.pop(name, None)

    def hit(self, name: str) -> None:
        if name not in self.armed:
            return
        if self.armed[name] > 0:
            self.armed[name] -= 1
            return
        del self.armed[name]
        if self.on_hit is not None:
            self.on_hit(name)
