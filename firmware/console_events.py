"""The console's ``events`` command: the state as drbdsetup-events2 lines,
then the changes as they happen.

``snapshot`` turns a controller's status into ``exists ...`` events (the
caller appends ``exists -``); ``EventStream`` buffers the live events for
one reader so the firmware never waits on a slow console.

``--timestamps`` puts the wall time each event was emitted in front of its
line, as ``drbdsetup events2 --timestamps`` does (ISO 8601, microseconds,
local offset); with ``--json`` it is the event's ``timestamp`` field.

Empty CGs are coalesced: with ``cg_interval_s = 0`` an idle primary forms
CGs back to back, four events each, and a reader would see nothing else. A
CG of the primary's own cycle whose events say it drained nothing (its
``change cg phase:draining`` has ``oos_tracks:0`` and its ``destroy cg`` is
``result:committed tracks:0``) is withheld, and counted: one line
``call cg empty:yes count:N first_seq:A last_seq:B`` stands for them, written
``EMPTY_CG_REPORT_S`` after the first one it counts, or before the next event
of a CG that did drain something (so the order of CGs stays as it was). A
CG's events are withheld only until it is known to carry tracks (its draining
event) or to have failed: those are written as they were, with their own
timestamps. ``events --all-cgs`` writes every CG's events (the demo's report
and the benchmarks count every CG). A session master's and a secondary's CG
events carry no track count, so they are never coalesced.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from firmware.console_format import jsonable, present
from firmware.events import Event, EventBus

STREAM_QUEUE_EVENTS = 4096  # events buffered for one slow events reader before dropping
EMPTY_CG_REPORT_S = 10.0  # at most this long between an empty CG and the line that counts it


def timestamp(wall: float) -> str:
    """As drbdsetup events2 --timestamps: 2024-05-01T12:00:00.123456+02:00."""
    return datetime.fromtimestamp(wall).astimezone().isoformat(timespec="microseconds")


class _EmptyCgs:
    """Withholds the primary's own CG events until it is known whether the CG
    drained anything; counts the ones that did not."""

    def __init__(self) -> None:
        self.held: dict[Any, list[tuple[float, Event]]] = {}  # seq -> its events so far
        self.count = 0
        self.first_seq: Any = None
        self.last_seq: Any = None
        self.since: float | None = None  # clock.now() of the first empty CG not yet reported

    def take(self, stamp: float, event: Event, now: float) -> list[tuple[float, Event]]:
        """What to write now for ``event`` (maybe nothing, maybe several)."""
        f = event.fields
        if event.obj != "cg" or "role" in f or "seq" not in f:
            return [(stamp, event)]
        seq = f["seq"]
        if event.action == "create" and f.get("phase") == "quiescing":
            return self._release(seq) + self._hold(seq, stamp, event)
        held = self.held.get(seq)
        if held is None:
            return self._report() + [(stamp, event)]
        phase = f.get("phase")
        if event.action == "change" and (
                (phase == "draining" and f.get("oos_tracks", 0) == 0) or phase == "committing"):
            return self._hold(seq, stamp, event)
        if event.action == "destroy" and f.get("result") == "committed" and f.get("tracks") == 0:
            del self.held[seq]
            self.count += 1
            self.first_seq = seq if self.first_seq is None else self.first_seq
            self.last_seq = seq
            if self.since is None:
                self.since = now
            return []
        return self._report() + self._release(seq) + [(stamp, event)]

    def _hold(self, seq: Any, stamp: float, event: Event) -> list[tuple[float, Event]]:
        self.held.setdefault(seq, []).append((stamp, event))
        return []

    def _release(self, seq: Any) -> list[tuple[float, Event]]:
        return self.held.pop(seq, [])

    def due(self, now: float) -> float | None:
        """Seconds until the count is due (0: now), None when nothing is counted."""
        if self.since is None:
            return None
        return max(0.0, self.since + EMPTY_CG_REPORT_S - now)

    def report(self, stamp: float) -> list[tuple[float, Event]]:
        return [(stamp, e) for _, e in self._report()]

    def _report(self) -> list[tuple[float, Event]]:
        if not self.count:
            return []
        event = Event("call", "cg", {"empty": True, "count": self.count, "first_seq": self.first_seq,
                                     "last_seq": self.last_seq})
        self.count, self.first_seq, self.last_seq, self.since = 0, None, None, None
        return [(0.0, event)]


class EventStream:
    """Events for one ``events`` reader, buffered so the firmware never
    waits on a slow console. Overflow drops events and says how many.
    ``wall``/``now``: the controller clock's (for timestamps and the
    empty-CG count's interval)."""

    def __init__(self, bus: EventBus, *, as_json: bool, limit: int = STREAM_QUEUE_EVENTS,
                 timestamps: bool = False, coalesce: bool = True,
                 wall: Callable[[], float] | None = None, now: Callable[[], float] | None = None) -> None:
        from hal.clock import AsyncioClock

        clock = AsyncioClock()
        self._wall = wall or clock.wall
        self._now = now or clock.now
        self._queue: asyncio.Queue[tuple[float, Event]] = asyncio.Queue(maxsize=limit)
        self._as_json = as_json
        self._timestamps = timestamps
        self._empty = _EmptyCgs() if coalesce else None
        self._ready: list[tuple[float, Event]] = []  # decided, not yet written
        self.dropped = 0
        self._unsubscribe = bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        try:
            self._queue.put_nowait((self._wall(), event))
        except asyncio.QueueFull:
            self.dropped += 1

    async def next_line(self) -> str:
        """The next event as one line (waits for it)."""
        while not self._ready:
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                self._ready.append((self._wall(), Event("call", "overflow", {"dropped": dropped})))
                break
            due = self._empty.due(self._now()) if self._empty is not None else None
            if due == 0.0:
                self._ready += self._empty.report(self._wall())
                break
            try:
                if due is None:
                    stamp, event = await self._queue.get()
                else:
                    stamp, event = await asyncio.wait_for(self._queue.get(), due)
            except TimeoutError:
                continue
            if self._empty is None:
                self._ready.append((stamp, event))
            else:
                self._ready += [(s or stamp, e) for s, e in self._empty.take(stamp, event, self._now())]
        stamp, event = self._ready.pop(0)
        return format_event(event, as_json=self._as_json, stamp=stamp if self._timestamps else None)

    def close(self) -> None:
        self._unsubscribe()


def format_event(event: Event, *, as_json: bool, stamp: float | None = None) -> str:
    """One event as an events2 line (``stamp``: its wall time, shown first) or one JSON line."""
    if as_json:
        doc: dict[str, Any] = {"action": event.action, "object": event.obj, "fields": jsonable(event.fields)}
        if stamp is not None:
            doc["timestamp"] = timestamp(stamp)
        return json.dumps({"event": doc}, sort_keys=True)
    return event.line() if stamp is None else f"{timestamp(stamp)} {event.line()}"


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
