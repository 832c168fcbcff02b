"""QuiesceGate: holds host write acknowledgements while a CG switches to
change recording. Writes still land in the cache while the gate is closed;
only their completion waits. Reads never pass through the gate.

The gate is bounded: ``close`` arms a timer of the maximum coordination
time on the hal Clock; if the gate is still closed when it fires,
``on_timeout`` is called (the primary fails the CG, which opens the gate).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from hal.clock import Clock, Handle


class QuiesceGate:
    def __init__(self, clock: Clock, history: int = 4096) -> None:
        self.clock = clock
        self._closed_at: float | None = None
        self._waiters: list[asyncio.Future] = []
        self._timer: Handle | None = None
        self.held_ms: deque[float] = deque(maxlen=history)  # one entry per close/open

    @property
    def closed(self) -> bool:
        return self._closed_at is not None

    def close(self, max_hold_s: float, on_timeout: Callable[[], None]) -> None:
        if self._closed_at is not None:
            return
        self._closed_at = self.clock.now()
        self._timer = self.clock.call_later(max_hold_s, lambda: self._expired(on_timeout))

    def _expired(self, on_timeout: Callable[[], None]) -> None:
        if self._closed_at is not None:
            on_timeout()

    def open(self) -> float:
        """Release every held acknowledgement; returns how long the gate was closed (ms)."""
        if self._closed_at is None:
            return 0.0
        held = (self.clock.now() - self._closed_at) * 1000.0
        self._closed_at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.held_ms.append(held)
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        return held

    async def wait(self) -> None:
        """Return when a write that has landed may be acknowledged."""
        if self._closed_at is None:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def stats(self) -> dict:
        values = sorted(self.held_ms)
        if not values:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0, "last": 0.0, "count": 0}
        def pct(p: float) -> float:
            return values[min(len(values) - 1, int(p * (len(values) - 1) + 0.5))]
        return {"p50": pct(0.50), "p99": pct(0.99), "max": values[-1], "last": self.held_ms[-1],
                "count": len(values)}
