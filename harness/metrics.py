"""Prometheus ``/metrics`` and the live status page of one controller.

``[metrics] listen = "127.0.0.1:9101"`` (harness/config.py; off unless
given) starts ``MetricsServer`` on the controller's own event loop: a small
HTTP/1.1 server (GET only, one request a connection) with

- ``/metrics``: the Prometheus text format, from ``ControllerCollector``,
  which reads the Primary's or Secondary's ``status()``, ``volumes_info()``
  and ``cache_stats()`` at scrape time. It runs on the loop that owns the
  firmware, so a scrape reads one consistent state (prometheus_client's own
  threaded server would read it from another thread while the loop changes
  it). The firmware never imports prometheus_client.
- ``/`` and ``/status.json``: the status page (harness/statuspage.py).

Histograms and the CG timeline come from the firmware's events
(``EventRecorder`` subscribes to the controller's EventBus), the NBD request
counters from the host port's ``on_request`` hook (drivers/nbd/server.py).

Names follow drbd-reactor's prometheus exporter and the Prometheus
conventions (a ``mirrorfw_`` prefix; ``_seconds``, ``_bytes``, ``_total``):

=========================================  =======================================================
mirrorfw_info{role,session}                1 (gauge)
mirrorfw_copy_state{state}                 1 for the current copy state, 0 for the others (primary)
mirrorfw_severity{severity}                1 for Normal, Warning or Severe, 0 for the others
mirrorfw_data_exposure_seconds             the RPO now: wall time since the consistent cut
mirrorfw_cg_seq / mirrorfw_committed_cg    the CG in flight or last formed / the last committed
mirrorfw_cgs_total / mirrorfw_cgs_failed_total  committed / failed CGs (kept in NVRAM)
mirrorfw_cg_consecutive_failures
mirrorfw_held_ack_seconds                  histogram: how long each CG held host acks (quiesce)
mirrorfw_cg_duration_seconds               histogram: a committed CG's create-to-commit time
mirrorfw_volume_oos_tracks{volume}         tracks out of sync (to drain)
mirrorfw_volume_cr_tracks{volume}          tracks changed since the cut (change recording)
mirrorfw_volume_size_bytes{volume}
mirrorfw_drain_bytes_total                 bytes sent by the drains
mirrorfw_cache_slots / _used_slots / _dirty_slots / _dual_slots, mirrorfw_cache_occupancy_ratio
mirrorfw_cache_hits_total / _misses_total / _destaged_total / _evictions_total
mirrorfw_link_up                           1 when the replication link is up
mirrorfw_session_member_up{member}         a master's members: 1 when the member's state is ok
mirrorfw_session_member_state{member,state}
mirrorfw_session_member_last_cg{member}
mirrorfw_nbd_requests_total{op,result}     host port requests answered (result ok or error)
mirrorfw_nbd_request_bytes_total{op}
mirrorfw_nbd_request_duration_seconds{op}  histogram: request received to answered
mirrorfw_nbd_connections                   open host connections
mirrorfw_received_bytes_total, mirrorfw_received_tracks_total, mirrorfw_cow_copies_total,
mirrorfw_pinned_bytes                      (secondary)
=========================================  =======================================================

The link's round-trip time is not measured by the firmware (no ping on the
replication link), so there is no RTT metric.

Beyond loopback the server needs ``[metrics] token_file``, as the console
does: a request must carry ``Authorization: Bearer TOKEN`` (Prometheus'
``authorization: credentials_file``) or, for a browser, ``?token=TOKEN``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from firmware.events import Event, EventBus

log = logging.getLogger(__name__)

COPY_STATES = ("Running", "Paused", "Pause in Progress", "Suspended", "Fatal")  # firmware/copystate.py
SEVERITIES = ("Normal", "Warning", "Severe")
MEMBER_STATES = ("joining", "ok", "failed", "unreachable", "in doubt")  # firmware/session_master.py
HELD_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CG_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 240.0)
NBD_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
NBD_OPS = {0: "read", 1: "write", 2: "disc", 3: "flush", 4: "trim", 5: "cache", 6: "write_zeroes",
           7: "block_status"}
TIMELINE_CGS = 200  # CGs kept for the status page
RPO_SAMPLES = 600  # data exposure samples kept for the status page (one a second: 10 minutes)
RPO_SAMPLE_S = 1.0
MAX_REQUEST_BYTES = 8192  # request line and headers
REQUEST_TIMEOUT_S = 5.0


class EventRecorder:
    """What the metrics and the status page need from the event stream:
    held-ack and CG-duration histograms, the last CGs as a timeline, and the
    data exposure sampled once a second (``sample``)."""

    def __init__(self, registry: CollectorRegistry | None, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.held_ack = Histogram("mirrorfw_held_ack_seconds", "how long a CG held the host's write "
                                  "acknowledgements (quiesce to change recording on)",
                                  buckets=HELD_BUCKETS_S, registry=registry)
        self.cg_duration = Histogram("mirrorfw_cg_duration_seconds", "a committed CG's time from "
                                     "quiesce to commit", buckets=CG_BUCKETS_S, registry=registry)
        self.cgs: deque[dict] = deque(maxlen=TIMELINE_CGS)
        self._by_seq: dict[Any, dict] = {}
        self.rpo: deque[tuple[float, float]] = deque(maxlen=RPO_SAMPLES)

    def on_event(self, event: Event) -> None:
        if event.obj != "cg" or "seq" not in event.fields:
            return
        f = event.fields
        role = f.get("role")
        if role not in (None, "secondary"):  # a master's own CG events: its Primary's are recorded
            return
        seq, now = f["seq"], self.wall()
        cg = self._by_seq.get(seq)
        if cg is None:
            if event.action == "destroy":
                return  # began before we listened
            cg = {"seq": seq, "start": now, "draining": None, "committing": None, "end": None,
                  "held_ms": None, "tracks": None, "result": None}
            self._by_seq[seq] = cg
            self.cgs.append(cg)
            while len(self._by_seq) > TIMELINE_CGS:
                self._by_seq.pop(next(iter(self._by_seq)))
        phase = f.get("phase")
        if phase in ("draining", "drained") and cg["draining"] is None:
            cg["draining"] = now
        if phase == "committing":
            cg["committing"] = now
        if "held_ms" in f:
            cg["held_ms"] = f["held_ms"]
            self.held_ack.observe(float(f["held_ms"]) / 1000.0)
        if event.action == "destroy":
            cg["end"] = now
            cg["result"] = f.get("result")
            cg["tracks"] = f.get("tracks")
            self._by_seq.pop(seq, None)
            if f.get("result") == "committed" and "cycle_s" in f:
                self.cg_duration.observe(float(f["cycle_s"]))

    def sample(self, exposure_s: float) -> None:
        self.rpo.append((self.wall(), exposure_s))


class NbdRecorder:
    """Counts the host port's requests (NbdServer.on_request)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("mirrorfw_nbd_requests", "host port (NBD) requests answered",
                                ["op", "result"], registry=registry)
        self.bytes = Counter("mirrorfw_nbd_request_bytes", "bytes in host port read, write, trim and "
                             "zero requests", ["op"], registry=registry)
        self.latency = Histogram("mirrorfw_nbd_request_duration_seconds", "host port requests: "
                                 "received to answered", ["op"], buckets=NBD_BUCKETS_S, registry=registry)

    def on_request(self, cmd: int, err: int, seconds: float, length: int) -> None:
        op = NBD_OPS.get(cmd, str(cmd))
        self.requests.labels(op, "error" if err else "ok").inc()
        if length and op != "flush":
            self.bytes.labels(op).inc(length)
        self.latency.labels(op).observe(seconds)


def _gauge(name: str, doc: str, value: Any, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
    g.add_metric(list(labels.values()) if labels else [], float(value or 0))
    return g


def _counter(name: str, doc: str, value: Any) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value or 0))


def _enum(name: str, doc: str, label: str, choices: tuple[str, ...], current: Any) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=[label])
    for choice in choices + (() if current in choices or current is None else (str(current),)):
        g.add_metric([choice], 1.0 if choice == current else 0.0)
    return g


class ControllerCollector:
    """A prometheus_client collector over one Primary or Secondary: reads
    its state when scraped (on the controller's loop, see MetricsServer)."""

    def __init__(self, role: str, firmware: Any, *, session_id: str, nbd: Any = None) -> None:
        self.role = role
        self.firmware = firmware
        self.session_id = session_id
        self.nbd = nbd  # the NbdServer, for its connection count

    def describe(self) -> list:
        return []  # collected at scrape time only (the registry must not call collect() early)

    def collect(self):
        info = GaugeMetricFamily("mirrorfw_info", "this controller", labels=["role", "session"])
        info.add_metric([self.role, str(self.session_id)], 1.0)
        yield info
        status = self.firmware.status()
        if self.role == "primary":
            yield from self._primary(status)
        else:
            yield from self._secondary(status)
        if self.nbd is not None:
            yield _gauge("mirrorfw_nbd_connections", "open host port (NBD) connections",
                         self.nbd.status().get("connections"))

    def _primary(self, s: dict):
        yield _enum("mirrorfw_copy_state", "the session's copy state (1: current)", "state", COPY_STATES,
                    s.get("copy_state"))
        yield _enum("mirrorfw_severity", "the session's severity (1: current)", "severity", SEVERITIES,
                    s.get("severity"))
        yield _gauge("mirrorfw_data_exposure_seconds", "data exposure (RPO): wall time since the cut of "
                     "the last committed CG, 0 when nothing is out of sync", s.get("data_exposure_s"))
        yield _gauge("mirrorfw_cg_seq", "the CG in flight, or the last one formed", s.get("cg_seq"))
        yield _gauge("mirrorfw_committed_cg", "the last committed CG", s.get("committed_seq"))
        yield _counter("mirrorfw_cgs", "CGs committed (kept in NVRAM)", s.get("total_successful_cgs"))
        yield _counter("mirrorfw_cgs_failed", "CGs failed (kept in NVRAM)", s.get("total_failed_cgs"))
        yield _gauge("mirrorfw_cg_consecutive_failures", "CGs failed in a row", s.get("consecutive_failures"))
        if s.get("last_cg_time"):
            yield _gauge("mirrorfw_last_cg_timestamp_seconds", "when the last CG committed (Unix time)",
                         s.get("last_cg_time"))
        yield _counter("mirrorfw_drain_bytes", "bytes sent to the secondary by the drains", s.get("drain_bytes"))
        yield _gauge("mirrorfw_link_up", "1 when the replication link is up", s.get("link") == "up")
        yield from self._volumes(self.firmware.volumes_info())
        yield from self._cache(self.firmware.cache_stats())
        members = s.get("members")
        if members is not None:
            yield from self._members(members)

    def _volumes(self, vols: list[dict]):
        families = {
            "oos_tracks": GaugeMetricFamily("mirrorfw_volume_oos_tracks", "tracks out of sync (to drain)",
                                            labels=["volume"]),
            "cr_tracks": GaugeMetricFamily("mirrorfw_volume_cr_tracks", "tracks written since the cut "
                                           "(change recording)", labels=["volume"]),
            "size_bytes": GaugeMetricFamily("mirrorfw_volume_size_bytes", "volume size", labels=["volume"]),
        }
        for v in vols:
            for key, family in families.items():
                family.add_metric([str(v.get("name"))], float(v.get(key) or 0))
        yield from families.values()

    def _cache(self, c: dict):
        yield _gauge("mirrorfw_cache_slots", "write cache slots (tracks) in NVRAM", c.get("slots"))
        yield _gauge("mirrorfw_cache_used_slots", "write cache slots in use", c.get("used"))
        yield _gauge("mirrorfw_cache_dirty_slots", "write cache slots not yet destaged", c.get("dirty"))
        yield _gauge("mirrorfw_cache_dual_slots", "tracks held as two images (collisions)", c.get("dual"))
        yield _gauge("mirrorfw_cache_occupancy_ratio", "used / slots", c.get("occupancy"))
        for key in ("hits", "misses", "destaged", "evictions"):
            yield _counter(f"mirrorfw_cache_{key}", f"write cache {key}", c.get(key))

    def _members(self, members: list[dict]):
        up = GaugeMetricFamily("mirrorfw_session_member_up", "a session master's members: 1 when its "
                               "state is ok", labels=["member"])
        state = GaugeMetricFamily("mirrorfw_session_member_state", "a member's state (1: current)",
                                  labels=["member", "state"])
        last = GaugeMetricFamily("mirrorfw_session_member_last_cg", "a member's last committed CG",
                                 labels=["member"])
        for m in members:
            name = str(m.get("name"))
            up.add_metric([name], 1.0 if m.get("state") == "ok" else 0.0)
            for choice in MEMBER_STATES:
                state.add_metric([name, choice], 1.0 if m.get("state") == choice else 0.0)
            last.add_metric([name], float(m.get("last_cg") or 0))
        yield _gauge("mirrorfw_session_members", "members of this master's session", len(members))
        yield from (up, state, last)

    def _secondary(self, s: dict):
        yield _gauge("mirrorfw_committed_cg", "the last committed CG", s.get("committed_cg"))
        if s.get("last_commit_time"):
            yield _gauge("mirrorfw_last_cg_timestamp_seconds", "when the last CG committed (Unix time)",
                         s.get("last_commit_time"))
        yield _counter("mirrorfw_received_bytes", "bytes received from the primary", s.get("received_bytes"))
        yield _counter("mirrorfw_received_tracks", "tracks received from the primary", s.get("received_tracks"))
        yield _counter("mirrorfw_cow_copies", "copy-on-write copies B -> C", s.get("cow_copies"))
        pins = s.get("pins") or {}
        yield _gauge("mirrorfw_pinned_bytes", "bytes kept in memory for pinned CGs (snapshots)",
                     pins.get("pinned_bytes"))


class MetricsServer:
    """The HTTP server of one controller: /metrics, / and /status.json."""

    def __init__(self, role: str, firmware: Any, events: EventBus | None, *, session_id: str,
                 nbd: Any = None, token: bytes | None = None) -> None:
        from harness import statuspage

        self.role = role
        self.firmware = firmware
        self.token = token
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ControllerCollector(role, firmware, session_id=session_id, nbd=nbd))
        # Held acks and CG durations are the primary's to measure (a secondary's
        # recorder keeps only the timeline for its page).
        self.recorder = EventRecorder(self.registry if role == "primary" else None)
        self.nbd_recorder = NbdRecorder(self.registry)
        if nbd is not None:
            nbd.on_request = self.nbd_recorder.on_request
        self._unsubscribe = events.subscribe(self.recorder.on_event) if events is not None else None
        self._page = statuspage.page_html()
        self._status_doc = statuspage.status_document
        self.session_id = session_id
        self._server: asyncio.AbstractServer | None = None
        self._sampler: asyncio.Task | None = None
        self.address: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_BYTES)
        self.address = self._server.sockets[0].getsockname()[:2]
        self._sampler = asyncio.ensure_future(self._sample())
        log.info("metrics and status page on %s", self.url)
        return self.address

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _sample(self) -> None:
        while True:
            if self.role == "primary":
                with contextlib.suppress(Exception):  # a status read mid-restart: next second
                    self.recorder.sample(float(self.firmware.status().get("data_exposure_s") or 0.0))
            await asyncio.sleep(RPO_SAMPLE_S)

    # -- HTTP ---------------------------------------------------------------------
    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    def status_json(self) -> bytes:
        doc = self._status_doc(self.role, self.firmware, session_id=self.session_id, recorder=self.recorder)
        return json.dumps(doc, default=str).encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body = await asyncio.wait_for(self._respond(reader), REQUEST_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                ConnectionError):
            status, ctype, body = "400 Bad Request", "text/plain; charset=utf-8", b"bad request\n"
        try:
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Cache-Control: no-store\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        line = (await reader.readuntil(b"\r\n")).decode("latin-1").split()
        headers: dict[str, str] = {}
        while True:
            raw = await reader.readuntil(b"\r\n")
            if raw == b"\r\n":
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(line) != 3 or not line[2].startswith("HTTP/"):
            raise ValueError("not an HTTP request line")
        method, target = line[0], urlsplit(line[1])
        if method != "GET":
            return "405 Method Not Allowed", "text/plain; charset=utf-8", b"GET only\n"
        if not self._authorized(headers, target.query):
            return "401 Unauthorized", "text/plain; charset=utf-8", b"a token is needed (Bearer or ?token=)\n"
        if target.path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self.metrics_text()
        if target.path == "/status.json":
            return "200 OK", "application/json", self.status_json()
        if target.path in ("/", "/index.html"):
            return "200 OK", "text/html; charset=utf-8", self._page
        return "404 Not Found", "text/plain; charset=utf-8", b"not found: try /metrics or /\n"

    def _authorized(self, headers: dict[str, str], query: str) -> bool:
        if self.token is None:
            return True
        given = ""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        else:
            given = (parse_qs(query).get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.token)


async def serve_metrics(host: str, port: int, role: str, firmware: Any, events: EventBus | None, *,
                        session_id: str, nbd: Any = None, token: bytes | None = None) -> MetricsServer:
    disable_created_metrics()  # no *_created series: this process has one registry, ours
    server = MetricsServer(role, firmware, events, session_id=session_id, nbd=nbd, token=token)
    await server.start(host, port)
    return server
