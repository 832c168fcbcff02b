"""Clock: the firmware's only source of time.

``AsyncioClock`` reads the event loop's monotonic clock. ``VirtualClock``
runs time only when told to, so a firmware test is deterministic from its
seed and a failing seed replays exactly.
"""

from __future__ import annotations

import abc
import asyncio
import heapq
import itertools
import time
from collections.abc import Callable


class Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock(abc.ABC):
    @abc.abstractmethod
    def now(self) -> float:
        """Monotonic seconds."""

    @abc.abstractmethod
    async def sleep(self, seconds: float) -> None: ...

    @abc.abstractmethod
    def call_later(self, seconds: float, fn: Callable[[], None]) -> Handle: ...

    def wall(self) -> float:
        """Wall-clock seconds since the epoch, for reports only."""
        return time.time()


class AsyncioClock(Clock):
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def call_later(self, seconds: float, fn: Callable[[], None]) -> Handle:
        handle = Handle()
        timer = asyncio.get_running_loop().call_later(max(0.0, seconds), fn)
        handle.cancel = timer.cancel  # type: ignore[method-assign]
        return handle


class VirtualClock(Clock):
    """Time advances only through ``advance``/``run_until_idle``.

    ``sleep`` parks the coroutine on a future that ``advance`` resolves when
    virtual time reaches its deadline.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, Handle, Callable[[], None]]] = []

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now

    def call_later(self, seconds: float, fn: Callable[[], None]) -> Handle:
        handle = Handle()
        heapq.heappush(self._timers, (self._now + max(0.0, seconds), next(self._seq), handle, fn))
        return handle

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        self.call_later(seconds, wake)
        await fut

    def next_deadline(self) -> float | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def advance(self, seconds: float) -> None:
        """Move time forward, firing every timer that falls due, in order."""
        target = self._now + seconds
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > target:
                break
            when, _, handle, fn = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            if not handle.cancelled:
                fn()
        self._now = target
