"""The controller's console command set: text lines in, replies out.

Pure firmware: no sockets, no terminals. A transport (drivers/console.py)
delivers lines; ``CommandSet.execute`` parses one line against the single
command table (``CommandSet._table``: each command holds its handler, bound
once when the CommandSet is made), the handler calls the Primary or
Secondary method, and a ``Reply`` comes back. ``help`` is generated from the
same table, so a command cannot exist without its help text and usage:
adding a command is one row in ``CommandSet._table`` plus its handler.

Rules every line obeys: a bad line (unknown command, wrong arguments, more
than ``MAX_LINE_CHARS``, binary bytes, unbalanced quotes) gets one clear
error and never reaches the controller; every argument is validated before
any controller method runs; no exception escapes ``execute``.

``--json`` on any command gives one line of JSON with a stable shape:
``{"ok": true, "command": "...", "data": {...}}`` or
``{"ok": false, "command": "..." | null, "error": "..."}``.

Here: the table, ``execute`` and the handlers. Beside it: console_grammar.py
(``Command``, ``Arg``, how a line becomes one), console_events.py (the
``events`` snapshot, ``EventStream``), console_format.py (text and JSON).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from firmware import console_format as fmt
from firmware.console_events import EventStream, format_event, snapshot, timestamp
from firmware.console_grammar import (
    BOTH,
    MAX_LINE_CHARS,
    SECONDARY,
    Arg,
    Command,
    CommandError,
    Grammar,
)
from firmware.crashpoints import POINTS, UnknownCrashPoint
from firmware.events import Event, EventBus
from firmware.member import MemberError
from firmware.params import describe
from firmware.pins import SnapshotError

# Importers (harness/console_session.py, tests, the fuzzer) take these from here.
__all__ = ["MAX_LINE_CHARS", "CommandError", "CommandSet", "EventStream", "Reply"]

log = logging.getLogger(__name__)

MAP_CELLS = 64

# Parameters `set` may change live (the rest of SessionParams is fixed at format time).
SETTABLE = ("cg_interval_s", "max_coord_ms", "max_drain_s", "collision_policy", "rpo_warning_s", "rpo_severe_s")
# `help set` shows each one's range (firmware/params.py RANGES, the one place they live).
SET_HELP = "change a session parameter live (a change wakes the CG loop): " + "; ".join(
    f"{name} {describe(name)}" for name in SETTABLE)

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


@dataclass
class Reply:
    ok: bool
    text: str  # what the operator sees (the JSON line when --json was given)
    data: dict | None = None
    command: str | None = None
    stream: EventStream | None = field(default=None, repr=False)  # `events` without --now


class CommandSet:
    def __init__(self, controller: Any, *, role: str = "primary", allow_faults: bool = False,
                 crashpoints: Any = None, events: EventBus | None = None,
                 power_cut: Callable[[int | None], None] | None = None) -> None:
        if role not in ("primary", "secondary"):
            raise ValueError(f"role {role!r}: expected primary or secondary")
        self.controller = controller
        self.role = role
        self.allow_faults = allow_faults
        # `power cut`: what the harness gives (it cuts the volatile devices'
        # power domain and ends the process); the firmware cannot do it itself.
        self.power_cut = power_cut
        self.crashpoints = crashpoints if crashpoints is not None else getattr(controller, "crashpoints", None)
        self.events = events if events is not None else getattr(controller, "events", None)
        every = self._table()
        self._grammar = Grammar([c for c in every if role in c.roles],
                                other_role_words={c.name.split()[0] for c in every if role not in c.roles},
                                other_role="secondary" if role == "primary" else "primary")
        self.commands = self._grammar.commands
        self._by_name = self._grammar.by_name

    def _table(self) -> tuple[Command, ...]:
        """The one command table, each command holding its handler. Order is
        the order `help` lists them in. A new command is one row here (roles:
        PRIMARY by default, BOTH or SECONDARY from console_grammar) and its
        handler method, ``async def _x(self, args, flags, as_json)`` returning
        (data, text, None); parsing, checks, help and --json come from the row."""
        return (
            Command("help", self._help, "list commands, or show one command's usage",
                    (Arg("COMMAND", "text", optional=True),), roles=BOTH),
            Command("auth", self._auth,
                    "a TCP console with a token: the first line must be this (the transport checks it); "
                    "afterwards it changes nothing",
                    (Arg("TOKEN", "text"),), roles=BOTH),
            Command("status", self._status,
                    "session state: copy state, CG counters, exposure, bitmaps, cache, link", roles=BOTH),
            Command("cg start", self._cg_start, "start forming consistency groups"),
            Command("cg pause", self._cg_pause,
                    "pause CG formation after the current CG (Pause in Progress -> Paused)"),
            Command("cg resume", self._cg_resume, "resume CG formation after a pause"),
            Command("cg run", self._cg_run,
                    "while a CG quiesces: switch on change recording and release the held acks (the "
                    "drain follows); when paused or pausing: resume forming CGs"),
            Command("cg fail", self._cg_fail, "fail the CG in flight (its CR tracks fold back into OOS)",
                    (Arg("REASON", "text", optional=True),)),
            Command("run", self._cg_run, "same as: cg run"),
            Command("pause", self._cg_pause, "same as: cg pause"),
            Command("session recover", self._session_recover,
                    "the session's master: bring every member's C to one CG after a crash between prepare "
                    "and commit (commit it everywhere when any member committed it, else revert it), then "
                    "tell each member in doubt; prints what each member did"),
            Command("session failover", self._session_failover,
                    "the session's master: fast reverse restore C -> B on every member's secondary "
                    "(refused while CGs form or a CG is in doubt: cg pause, session recover first)"),
            Command("pair suspend", self._pair_suspend, "suspend the pair: stop draining, keep recording OOS"),
            Command("pair resume", self._pair_resume, "resume a suspended pair (resends OOS tracks)"),
            Command("volume list", self._volume_list, "volumes with size and OOS/CR track counts", roles=BOTH),
            Command("volume show", self._volume_show, "one volume in detail", (Arg("NAME"),)),
            Command("bitmap show", self._bitmap_show,
                    "OOS or CR bitmap of a volume: count, runs and a 64-cell map "
                    "('#' all set, '+' some, '.' none); tracks START..END-1",
                    (Arg("KIND", "choice", ("oos", "cr")), Arg("VOLUME"),
                     Arg("START[-END]", "range", optional=True))),
            Command("cache stats", self._cache_stats, "write cache: slots used, dual images, dirty, hit rate"),
            Command("link status", self._link_status, "replication link state"),
            Command("snapshot create", self._snapshot_create,
                    "pin the last committed CG of every volume as NAME, read-only over NBD as VOLUME@NAME; "
                    "kept in memory while replication runs, up to the pinned-bytes budget (a restart drops it)",
                    (Arg("NAME"),), roles=SECONDARY),
            Command("snapshot delete", self._snapshot_delete, "drop snapshot NAME and the grains it keeps",
                    (Arg("NAME"),), roles=SECONDARY),
            Command("snapshot list", self._snapshot_list,
                    "snapshots with their CG and the bytes each keeps in memory", roles=SECONDARY),
            Command("set", self._set, SET_HELP,
                    (Arg("PARAMETER", "choice", SETTABLE), Arg("VALUE"))),
            Command("fault arm", self._fault_arm, "arm a crash point (tests only); fires on hit number N+1",
                    (Arg("CRASHPOINT"), Arg("N", "int", optional=True, keyword="after")), roles=BOTH,
                    faults=True),
            Command("fault disarm", self._fault_disarm, "disarm a crash point", (Arg("CRASHPOINT"),),
                    roles=BOTH, faults=True),
            Command("fault list", self._fault_list, "declared crash points and which are armed", roles=BOTH,
                    faults=True),
            Command("power cut", self._power_cut,
                    "cut this controller's power (tests only): its volatile+ devices and NVRAM drop, keep or "
                    "tear what is not yet durable, drawn from SEED, and the process ends (no reply)",
                    (Arg("SEED", "int", optional=True),), roles=BOTH, faults=True),
            Command("log level", self._log_level, "show or set the log level (of LOGGER, default all)",
                    (Arg("LEVEL", "choice", tuple(LOG_LEVELS), optional=True), Arg("LOGGER", optional=True)),
                    roles=BOTH),
            Command("events", self._events,
                    "state as drbdsetup-events2 lines ('exists ...', then 'exists -'); without --now, "
                    "then stream changes until you send a line; --timestamps: each line starts with its "
                    "time; CGs that drained nothing are counted ('call cg empty:yes count:N') unless "
                    "--all-cgs",
                    flags=("--now", "--statistics", "--timestamps", "--all-cgs"), roles=BOTH),
        )

    @property
    def prompt(self) -> str:
        return "mirrorfw> " if self.role == "primary" else "mirrorfw-sec> "

    @property
    def banner(self) -> str:
        return f"mirrorfw {self.role} console \N{EM DASH} type help"

    # ---- the one entry point ------------------------------------------------

    async def execute(self, line: str) -> Reply:
        as_json = False
        command: Command | None = None
        try:
            if not isinstance(line, str):
                raise CommandError("a line must be text")
            as_json = len(line) <= MAX_LINE_CHARS and "--json" in line.split()
            command, args, flags = self.parse(line)
            if command is None:  # blank or comment; "--json" anywhere on the line still asks for JSON
                return Reply(True, json.dumps({"ok": True, "command": None, "data": None}) if as_json else "",
                             None, None)
            data, text, stream = await command.run(args, flags, as_json)
        except CommandError as exc:
            return self._error(command, str(exc), as_json)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the console's one catch-all: a reply, never a crash
            log.warning("console: %r failed", line[:200], exc_info=True)
            what = command.name if command else "console"
            return self._error(command, f"{what} failed: {type(exc).__name__}: {fmt.one_line(exc)}", as_json)
        if as_json:
            text = json.dumps({"ok": True, "command": command.name, "data": fmt.jsonable(data)},
                              sort_keys=True)
        return Reply(True, text, data, command.name, stream)

    def _error(self, command: Command | None, message: str, as_json: bool) -> Reply:
        name = command.name if command else None
        if as_json:
            text = json.dumps({"ok": False, "command": name, "error": message}, sort_keys=True)
        else:
            text = f"error: {message}"
        return Reply(False, text, None, name)

    def parse(self, line: str) -> tuple[Command | None, dict, set]:
        """(command, args, flags); (None, {}, set()) for a blank or comment line."""
        return self._grammar.parse(line, allow_faults=self.allow_faults)

    # ---- help ---------------------------------------------------------------

    async def _help(self, args, flags, as_json):
        topic = args.get("COMMAND", "").strip().lower()
        if topic:
            shown = [c for c in self.commands if c.name == topic or c.name.split()[0] == topic]
            if not shown:
                raise CommandError(f"help: no command {fmt.short(topic)!r}; type help for the list")
        else:
            shown = self.commands
        entries = [{"name": c.name, "usage": c.usage(), "help": c.help,
                    **({"requires": "allow_faults"} if c.faults else {})} for c in shown]
        return {"commands": entries}, fmt.help_text(entries, listing_all=not topic), None

    # ---- auth (checked by the transport, drivers/console.py) -----------------

    async def _auth(self, args, flags, as_json):
        return {"authorized": True}, "auth: this session is already authorized", None

    # ---- status -------------------------------------------------------------

    async def _status(self, args, flags, as_json):
        raw = self.controller.status()
        if self.role == "secondary":
            data = {k: raw.get(k) for k in fmt.SECONDARY_STATUS_KEYS}
            data["role"] = "secondary"
            text = fmt.table([(k, fmt.show(k, data[k])) for k in fmt.SECONDARY_STATUS_KEYS])
            return data, text, None
        data = {k: raw.get(k) for k in fmt.STATUS_KEYS}
        cache = self._cache()
        data["cache"] = cache
        rows = [(k, fmt.show(k, data[k])) for k in fmt.STATUS_KEYS]
        rows.append(("cache", fmt.cache_line(cache)))
        session = self._session_role()
        text = fmt.table(rows + ([("session", fmt.session_line(session))] if session else []))
        if session is not None:
            data["session"] = session
        if "members" in raw:
            data["members"] = raw["members"]
            text += "\nmembers:\n" + fmt.members_table(raw["members"])
        return data, text, None

    def _session_role(self) -> dict | None:
        """What this primary is in a multi-controller session (None: on its own)."""
        master = getattr(self.controller, "session_master", None)
        if master is not None:
            st = master.status()
            return {"role": "master", "members": len(st["members"]), "cg_seq": st["seq"],
                    "successful": st["successful"], "failed": st["failed"], "last_reason": st["last_reason"],
                    "unresolved": st["unresolved"], "recovery": st["recovery"]}
        member = getattr(self.controller, "session_member", None)
        if member is not None:
            return {"role": "subordinate", "name": member.name, "master": member.master or None,
                    "master_link": "up" if member.master else "down",
                    "master_down_reason": member.master_down_reason or None,
                    "in_doubt_seq": member.in_doubt_seq}
        return None

    def _cache(self) -> dict:
        stats = getattr(self.controller, "cache_stats", None)
        raw = stats() if stats else {}
        return {k: raw.get(k) for k in fmt.CACHE_KEYS}

    # ---- cg / pair ----------------------------------------------------------

    async def _after(self, done: Awaitable[None]) -> dict:
        """Await one controller command, then the session fields its reply shows."""
        await done
        status = self.controller.status()
        return {k: status.get(k) for k in ("copy_state", "phase", "cg_seq", "total_successful_cgs",
                                           "total_failed_cgs", "severity")}

    async def _cg_start(self, args, flags, as_json):
        data = await self._after(self.controller.cg_start())
        return data, f"cg start: done; copy_state {data['copy_state']}", None

    async def _cg_pause(self, args, flags, as_json):
        data = await self._after(self.controller.cg_pause())
        return data, f"cg pause: done; copy_state {data['copy_state']}", None

    async def _cg_resume(self, args, flags, as_json):
        data = await self._after(self.controller.cg_resume())
        return data, f"cg resume: done; copy_state {data['copy_state']}", None

    async def _cg_run(self, args, flags, as_json):
        data = await self._after(self.controller.run())
        return data, (f"cg run: done; copy_state {data['copy_state']}, phase {data['phase']}, "
                      f"cg_seq {data['cg_seq']}"), None

    async def _cg_fail(self, args, flags, as_json):
        reason = args.get("REASON") or "operator"
        data = await self._after(self.controller.cg_fail(reason))
        data["reason"] = reason
        return data, f"cg fail: done ({reason}); failed CGs {data['total_failed_cgs']}", None

    async def _pair_suspend(self, args, flags, as_json):
        data = await self._after(self.controller.suspend())
        return data, f"pair suspend: done; copy_state {data['copy_state']}", None

    async def _pair_resume(self, args, flags, as_json):
        data = await self._after(self.controller.resume_pair())
        return data, f"pair resume: done; copy_state {data['copy_state']}", None

    # ---- session (the master of a multi-controller session) -------------------

    def _master(self):
        master = getattr(self.controller, "session_master", None)
        if master is None:
            member = getattr(self.controller, "session_member", None)
            where = (f"; it is a subordinate (master {member.master or 'not connected'}): run it on the master"
                     if member is not None else "")
            raise CommandError(f"this primary is not a session's master{where}")
        return master

    async def _session_recover(self, args, flags, as_json):
        master = self._master()
        try:
            rows = await master.recover_session("operator")
        except MemberError as exc:
            raise CommandError(f"session recover: {fmt.one_line(exc)}") from None
        cg = rows[0]["committed"] if rows else 0
        return {"members": rows, "cg": cg}, fmt.recovery_text(rows, cg), None

    async def _session_failover(self, args, flags, as_json):
        master = self._master()
        try:
            grains = await master.failover_session()
        except MemberError as exc:
            raise CommandError(f"session failover: {fmt.one_line(exc)}") from None
        lines = [f"{name}: B restored from C ({n} grains)" for name, n in grains.items()]
        return {"grains": grains}, "\n".join(lines + ["session failover: done; every B is its C"]), None

    # ---- volumes and bitmaps ------------------------------------------------

    def _volumes(self) -> list[dict]:
        if self.role == "secondary":
            vols = self.controller.status().get("volumes") or []
            if isinstance(vols, dict):
                return [{"name": k, **(v if isinstance(v, dict) else {"info": v})} for k, v in vols.items()]
            return [v if isinstance(v, dict) else {"name": str(v)} for v in vols]
        return list(self.controller.volumes_info())

    def _volume(self, name: str) -> dict:
        vols = self._volumes()
        for v in vols:
            if v.get("name") == name:
                return v
        names = ", ".join(str(v.get("name")) for v in vols) or "none"
        raise CommandError(f"no volume {fmt.short(name)!r}; volumes: {names}")

    async def _volume_list(self, args, flags, as_json):
        vols = self._volumes()
        if not vols:
            return {"volumes": []}, "no volumes", None
        keys = [k for k in ("name", "size_bytes", "tracks", "oos_tracks", "cr_tracks", "copied_grains",
                            "url", "b_url", "c_url")
                if any(k in v for v in vols)] or sorted({k for v in vols for k in v})
        return {"volumes": vols}, fmt.columns(keys, vols), None

    async def _volume_show(self, args, flags, as_json):
        vol = self._volume(args["NAME"])
        return {"volume": vol}, fmt.table([(k, fmt.show(k, v)) for k, v in vol.items()]), None

    async def _bitmap_show(self, args, flags, as_json):
        kind, name = args["KIND"], args["VOLUME"]
        tracks_total = int(self._volume(name).get("tracks") or 0)
        start, end = args.get("START[-END]", (0, None))
        end = tracks_total if end is None else end
        if start >= tracks_total or end > tracks_total:
            raise CommandError(f"range {start}-{end}: volume {name} has tracks 0..{tracks_total - 1}")
        whole = self.controller.bitmap(kind, name, start, end)
        n = end - start
        cells = min(MAP_CELLS, n)
        chars = []
        for i in range(cells):
            cs, ce = start + i * n // cells, start + (i + 1) * n // cells
            count = whole["count"] if (cs, ce) == (start, end) else \
                self.controller.bitmap(kind, name, cs, ce)["count"]
            chars.append("#" if count == ce - cs else "+" if count else ".")
        bitmap_map = "".join(chars)
        runs = [list(r) for r in whole.get("runs", [])]
        data = {"kind": kind, "volume": name, "start_track": start, "end_track": end,
                "count": whole["count"], "tracks": n, "runs": runs, "map": bitmap_map,
                "cell_tracks": n / cells}
        return data, fmt.bitmap_text(data), None

    async def _cache_stats(self, args, flags, as_json):
        cache = self._cache()
        rows = [(k, fmt.show(k, cache[k])) for k in fmt.CACHE_KEYS]
        hits, misses = cache.get("hits") or 0, cache.get("misses") or 0
        hit_rate = hits / (hits + misses) if hits + misses else None
        cache["hit_rate"] = hit_rate
        rows.append(("hit_rate", "-" if hit_rate is None else f"{100 * hit_rate:.1f}%"))
        return cache, fmt.table(rows), None

    async def _link_status(self, args, flags, as_json):
        s = self.controller.status()
        data = {k: s.get(k) for k in ("link", "copy_state", "phase", "cg_seq", "drain_bytes",
                                      "consecutive_failures", "data_exposure_s")}
        return data, fmt.table([(k, fmt.show(k, v)) for k, v in data.items()]), None

    # ---- snapshots (secondary) ------------------------------------------------

    async def _snapshot_create(self, args, flags, as_json):
        try:
            made = self.controller.snapshot_create(args["NAME"])
        except SnapshotError as exc:
            raise CommandError(f"snapshot create: {fmt.one_line(exc)}") from None
        return made, f"snapshot {made['name']}: CG {made['cg']}, exported as {', '.join(made['exports'])}", None

    async def _snapshot_delete(self, args, flags, as_json):
        try:
            gone = self.controller.snapshot_delete(args["NAME"])
        except SnapshotError as exc:
            raise CommandError(f"snapshot delete: {fmt.one_line(exc)}") from None
        return gone, f"snapshot {gone['name']} (CG {gone['cg']}) deleted", None

    async def _snapshot_list(self, args, flags, as_json):
        snaps = self.controller.snapshot_list()
        pins = self.controller.status().get("pins") or {}
        data = {"snapshots": snaps, "pinned_bytes": pins.get("pinned_bytes"),
                "max_pinned_bytes": pins.get("max_pinned_bytes")}
        table = fmt.columns(["name", "cg", "kept_bytes", "lost"], snaps) if snaps else "no snapshots"
        budget = (f"kept in memory by every pin: {data['pinned_bytes']} of max_pinned_bytes "
                  f"{data['max_pinned_bytes']} bytes")
        return data, f"{table}\n{budget}", None

    # ---- parameters, faults, logging ----------------------------------------

    async def _set(self, args, flags, as_json):
        name, value = args["PARAMETER"], args["VALUE"]
        try:
            self.controller.set_param(name, value)
        except ValueError as exc:
            message = fmt.one_line(exc).removeprefix(f"{name}: ")
            raise CommandError(f"set {name}: {message}") from None
        params = getattr(self.controller, "params", None)
        now = getattr(params, name, value) if params is not None else value
        return {"parameter": name, "value": now}, f"{name} = {now}", None

    def _points(self):
        if self.crashpoints is None:
            raise CommandError("this controller has no crash points")
        return self.crashpoints

    async def _fault_arm(self, args, flags, as_json):
        cp = self._points()
        after = args.get("N", 0)
        try:
            cp.arm(args["CRASHPOINT"], after)
        except UnknownCrashPoint as exc:
            raise CommandError(exc.args[0] if exc.args else str(exc)) from None
        return ({"crashpoint": args["CRASHPOINT"], "after": after},
                f"armed {args['CRASHPOINT']} (fires on hit {after + 1})", None)

    async def _fault_disarm(self, args, flags, as_json):
        cp = self._points()
        name = args["CRASHPOINT"]
        if name not in POINTS:
            raise CommandError(f"unknown crash point {fmt.short(name)!r}; fault list shows them")
        was = name in cp.armed
        cp.disarm(name)
        return {"crashpoint": name, "was_armed": was}, f"disarmed {name}" + ("" if was else " (was not armed)"), None

    async def _fault_list(self, args, flags, as_json):
        cp = self._points()
        points = [{"name": n, "why": why, "armed": n in cp.armed, "after": cp.armed.get(n)}
                  for n, why in sorted(POINTS.items())]
        if not points:
            return {"crashpoints": []}, "no crash points declared", None
        return {"crashpoints": points}, fmt.crashpoint_lines(points), None

    async def _power_cut(self, args, flags, as_json):
        if self.power_cut is None:
            raise CommandError("this controller has no power switch (started without a harness)")
        seed = args.get("SEED")
        log.warning("console: power cut (seed %s)", seed)
        self.power_cut(seed)  # a controller's switch does not return; a test's may
        return {"seed": seed}, f"power cut (seed {seed})", None

    async def _log_level(self, args, flags, as_json):
        name = args.get("LOGGER", "")
        if name and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,200}", name):
            raise CommandError(f"logger {fmt.short(name)!r}: expected a dotted module name, e.g. firmware.primary")
        logger = logging.getLogger(name)
        if "LEVEL" in args:
            logger.setLevel(LOG_LEVELS[args["LEVEL"]])
        level = logging.getLevelName(logger.getEffectiveLevel()).lower()
        shown = name or "root"
        return {"logger": shown, "level": level}, f"log level {shown}: {level}", None

    # ---- events -------------------------------------------------------------

    async def _events(self, args, flags, as_json):
        stats = "--statistics" in flags
        status = self.controller.status()
        volumes = self._volumes()
        cache = self._cache() if self.role == "primary" else {}
        now = snapshot(self.role, status, volumes, cache, stats=stats,
                       session_id=getattr(self.controller, "session_id", "default"))
        now.append(Event("exists", "-", {}))
        clock = getattr(self.controller, "clock", None)
        wall = getattr(clock, "wall", None)
        stamp = (wall() if wall else time.time()) if "--timestamps" in flags else None
        data = {"events": [{"action": e.action, "object": e.obj, "fields": e.fields}
                           | ({"timestamp": timestamp(stamp)} if stamp is not None else {}) for e in now]}
        text = "\n".join(format_event(e, as_json=False, stamp=stamp) for e in now)
        stream = None
        if "--now" not in flags:
            if self.events is None:
                raise CommandError("this controller has no event bus; use events --now")
            stream = EventStream(self.events, as_json=as_json, timestamps="--timestamps" in flags,
                                 coalesce="--all-cgs" not in flags, wall=wall,
                                 now=getattr(clock, "now", None))
        return data, text, stream
