"""The console's ``events`` command: the state as drbdsetup-events2 lines,
then the changes as they happen.

``snapshot`` turns a controller's status into ``exists ...`` events (the
caller appends ``exists -``); ``EventStream`` buffers the live events for
one reader so the firmware never waits on a slow console.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from firmware.console_format import jsonable, present
from firmware.events import Event, EventBus

STREAM_QUEUE_EVENTS = 4096  # events buffered for one slow events reader before dropping


class EventStream:
    """Events for one ``events`` reader, buffered so the firmware never
    waits on a slow console. Overflow drops events and says how many."""

    def __init__(self, bus: EventBus, *, as_json: bool, limit: int = STREAM_QUEUE_EVENTS) -> None:
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=limit)
        self._as_json = as_json
        self.dropped = 0
        self._unsubscribe = bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    async def next_line(self) -> str:
        """The next event as one line (waits for it)."""
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            event = Event("call", "overflow", {"dropped": dropped})
        else:
            event = await self._queue.get()
        if self._as_json:
            return json.dumps({"event": {"action": event.action, "object": event.obj,
                                         "fields": jsonable(event.fields)}}, sort_keys=True)
        return event.line()

    def close(self) -> None:
        self._unsubscribe()


def snapshot(role: str, status: dict, volumes: list[dict], cache: dict, *, session_id: Any,
             stats: bool) -> list[Event]:
    """One ``exists`` event per object (session, volumes; on the primary also
    link and cache: every field of ``cache`` with ``stats``, else its size and
    use); ``stats`` adds the counters (``events --statistics``)."""
    s = status
    if role == "secondary":
        fields = {"name": s.get("session_id", "default"), "role": "secondary",
                  "committed_cg": s.get("committed_cg"), "receiving_cg": s.get("receiving_cg")}
        if stats:
            fields |= {k: s.get(k) for k in ("last_commit_time", "received_tracks", "received_bytes",
                                             "cow_copies")}
        out = [Event("exists", "session", present(fields))]
        out += [Event("exists", "volume", {k: v for k, v in vol.items() if not isinstance(v, (dict, list))})
                for vol in volumes]
        return out
    session = {"name": session_id, "role": "primary"}
    session |= {k: s.get(k) for k in ("copy_state", "phase", "cg_seq", "severity", "recoverable",
                                      "fatal_reason")}
    if stats:
        session |= {k: s.get(k) for k in ("total_successful_cgs", "total_failed_cgs",
                                          "consecutive_failures", "data_exposure_s", "last_cg_time",
                                          "drain_bytes")}
        held = s.get("held_ack_ms") or {}
        session |= {f"held_ack_ms_{k}": v for k, v in held.items()}
    out = [Event("exists", "session", present(session))]
    for vol in volumes:
        fields = {"name": vol.get("name")}
        keys = ("oos_tracks", "cr_tracks") + (("size_bytes", "tracks") if stats else ())
        fields |= {k: vol.get(k) for k in keys}
        out.append(Event("exists", "volume", present(fields)))
    out.append(Event("exists", "link", present({"state": s.get("link")})))
    shown = cache if stats else {k: cache.get(k) for k in ("slots", "used", "occupancy")}
    out.append(Event("exists", "cache", present(shown)))
    for m in s.get("members") or []:  # a session's master: one per member (changes: `change member name:...`)
        fields = {k: m.get(k) for k in ("state", "phase", "link", "last_cg", "oos_tracks", "cr_tracks")}
        fields |= {"in_doubt_seq": m.get("in_doubt_seq") or None, "reason": m.get("reason") or None}
        out.append(Event("exists", f"member name:{m.get('name')}", present(fields)))
    return out
