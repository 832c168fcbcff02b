"""Events the firmware emits (CG formed/failed, state changes, link up/down).

Shaped like DRBD's ``drbdsetup events2``: an action on an object with
key:value fields. The console streams them; the harness records metrics from
them; tests wait on them instead of polling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Event:
    action: str  # exists | create | change | destroy | call
    obj: str  # session, cg, volume, link, cache
    fields: dict = field(default_factory=dict)

    def line(self) -> str:
        parts = [self.action, self.obj]
        parts += [f"{k}:{_text(v)}" for k, v in self.fields.items()]
        return " ".join(parts)


def _text(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace(" ", "_")


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Callable[[Event], None]] = []

    def subscribe(self, fn: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``fn`` with every event; returns the unsubscribe function."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    def emit(self, action: str, obj: str, **fields) -> None:
        event = Event(action, obj, fields)
        for fn in list(self._subscribers):
            fn(event)
