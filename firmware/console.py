"""The controller's console command set: text lines in, replies out.

Pure firmware: no sockets, no terminals. A transport (drivers/console.py)
delivers lines; ``CommandSet.execute`` parses one line against the single
command table (``CommandSet._table``: each command holds its handler, bound
once when the CommandSet is made), the handler calls the Primary or
Secondary method, and a ``Reply`` comes back. ``help`` is generated from the
same table, so a command cannot exist without its help text and usage.

Rules every line obeys: a bad line (unknown command, wrong arguments, more
than ``MAX_LINE_CHARS``, binary bytes, unbalanced quotes) gets one clear
error and never reaches the controller; every argument is validated before
any controller method runs; no exception escapes ``execute``.

``--json`` on any command gives one line of JSON with a stable shape:
``{"ok": true, "command": "...", "data": {...}}`` or
``{"ok": false, "command": "..." | null, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import math
import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from firmware.crashpoints import POINTS, UnknownCrashPoint
from firmware.events import Event, EventBus

log = logging.getLogger(__name__)

MAX_LINE_CHARS = 4096
MAP_CELLS = 64
HELP_USAGE_CHARS = 40  # wider usages go on a line of their own in `help`
STREAM_QUEUE_EVENTS = 4096  # events buffered for one slow events reader before dropping

PRIMARY = frozenset({"primary"})
BOTH = frozenset({"primary", "secondary"})

# Parameters `set` may change live (the rest of SessionParams is fixed at format time).
SETTABLE = ("cg_interval_s", "max_coord_ms", "max_drain_s", "collision_policy")

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# The status fields every primary status reply carries, in display order
# (IBM Copy Services Manager vocabulary first). Missing values show as null.
STATUS_KEYS = (
    "copy_state", "fatal_reason", "severity", "recoverable", "phase", "cg_seq",
    "last_cg_time", "data_exposure_s", "total_successful_cgs", "total_failed_cgs",
    "consecutive_failures", "cg_interval_s", "max_coord_ms", "max_drain_s",
    "collision_policy", "oos_tracks", "cr_tracks", "held_ack_ms", "drain_bytes", "link",
)
CACHE_KEYS = ("slots", "used", "dual", "dirty", "hits", "misses", "destaged", "occupancy")
SECONDARY_STATUS_KEYS = ("role", "session_id", "committed_cg", "last_commit_time", "prepared_cg",
                         "established", "receiving_cg", "received_tracks", "received_bytes", "cow_copies",
                         "volumes")


class CommandError(Exception):
    """A line the console refuses; the message is shown to the operator."""


@dataclass(frozen=True)
class Arg:
    """One positional argument. ``keyword`` makes it the pair ``KEYWORD VALUE``."""

    name: str
    kind: str = "word"  # word | int | choice | range | text (the rest of the line)
    choices: tuple[str, ...] = ()
    optional: bool = False
    keyword: str | None = None

    def usage(self) -> str:
        shown = "|".join(self.choices) if self.kind == "choice" else self.name
        if self.kind == "text":
            shown += "..."
        if self.keyword:
            shown = f"{self.keyword} {shown}"
        return f"[{shown}]" if self.optional else shown


# What a command runs: the parsed arguments, flags and --json in; (data, text, stream) out.
Handler = Callable[[dict, set, bool], Awaitable[tuple[Any, str, "EventStream | None"]]]


@dataclass(frozen=True)
class Command:
    name: str  # one or two words: "status", "cg start"
    run: Handler = field(repr=False)
    help: str
    args: tuple[Arg, ...] = ()
    flags: tuple[str, ...] = ()  # command-specific options besides --json
    roles: frozenset = PRIMARY
    faults: bool = False  # refused unless the console was started with allow_faults

    def usage(self) -> str:
        parts = [self.name, *(f"[{f}]" for f in self.flags), *(a.usage() for a in self.args), "[--json]"]
        return " ".join(parts)


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
                                         "fields": _jsonable(event.fields)}}, sort_keys=True)
        return event.line()

    def close(self) -> None:
        self._unsubscribe()


@dataclass
class Reply:
    ok: bool
    text: str  # what the operator sees (the JSON line when --json was given)
    data: dict | None = None
    command: str | None = None
    stream: EventStream | None = field(default=None, repr=False)  # `events` without --now


class CommandSet:
    def __init__(self, controller: Any, *, role: str = "primary", allow_faults: bool = False,
                 crashpoints: Any = None, events: EventBus | None = None) -> None:
        if role not in ("primary", "secondary"):
            raise ValueError(f"role {role!r}: expected primary or secondary")
        self.controller = controller
        self.role = role
        self.allow_faults = allow_faults
        self.crashpoints = crashpoints if crashpoints is not None else getattr(controller, "crashpoints", None)
        self.events = events if events is not None else getattr(controller, "events", None)
        every = self._table()
        self._other_role_words = {c.name.split()[0] for c in every if role not in c.roles}
        self.commands = [c for c in every if role in c.roles]
        self._by_name = {c.name: c for c in self.commands}
        self._groups = {c.name.split()[0] for c in self.commands if " " in c.name}

    def _table(self) -> tuple[Command, ...]:
        """The one command table, each command holding its handler. Order is
        the order `help` lists them in."""
        return (
            Command("help", self._help, "list commands, or show one command's usage",
                    (Arg("COMMAND", "text", optional=True),), roles=BOTH),
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
            Command("set", self._set, "change a session parameter live",
                    (Arg("PARAMETER", "choice", SETTABLE), Arg("VALUE"))),
            Command("fault arm", self._fault_arm, "arm a crash point (tests only); fires on hit number N+1",
                    (Arg("CRASHPOINT"), Arg("N", "int", optional=True, keyword="after")), roles=BOTH,
                    faults=True),
            Command("fault disarm", self._fault_disarm, "disarm a crash point", (Arg("CRASHPOINT"),),
                    roles=BOTH, faults=True),
            Command("fault list", self._fault_list, "declared crash points and which are armed", roles=BOTH,
                    faults=True),
            Command("log level", self._log_level, "show or set the log level (of LOGGER, default all)",
                    (Arg("LEVEL", "choice", tuple(LOG_LEVELS), optional=True), Arg("LOGGER", optional=True)),
                    roles=BOTH),
            Command("events", self._events,
                    "state as drbdsetup-events2 lines ('exists ...', then 'exists -'); without --now, "
                    "then stream changes until you send a line",
                    flags=("--now", "--statistics"), roles=BOTH),
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
            return self._error(command, f"{what} failed: {type(exc).__name__}: {_one_line(exc)}", as_json)
        if as_json:
            text = json.dumps({"ok": True, "command": command.name, "data": _jsonable(data)},
                              sort_keys=True)
        return Reply(True, text, data, command.name, stream)

    def _error(self, command: Command | None, message: str, as_json: bool) -> Reply:
        name = command.name if command else None
        if as_json:
            text = json.dumps({"ok": False, "command": name, "error": message}, sort_keys=True)
        else:
            text = f"error: {message}"
        return Reply(False, text, None, name)

    # ---- parsing ------------------------------------------------------------

    def parse(self, line: str) -> tuple[Command | None, dict, set]:
        """(command, args, flags); (None, {}, set()) for a blank or comment line."""
        if len(line) > MAX_LINE_CHARS:
            raise CommandError(f"line too long (more than {MAX_LINE_CHARS} characters)")
        line = line.strip(" \t\r\n")
        for column, ch in enumerate(line, 1):
            if _is_binary(ch):
                raise CommandError(f"line holds binary data (U+{ord(ch):04X} at column {column}); "
                                   "commands are printable text, type help")
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            raise CommandError(f"cannot parse the line: {exc}") from None
        if not tokens:
            return None, {}, set()
        tokens = [t for t in tokens if t != "--json"]
        if not tokens:
            raise CommandError("--json needs a command, e.g. status --json")
        command, rest = self._find(tokens)
        if command.faults and not self.allow_faults:
            raise CommandError("fault injection is disabled on this console "
                               "(set allow_faults = true in the [console] config section)")
        flags = {t for t in rest if t.startswith("--")}
        for flag in flags:
            if flag not in command.flags:
                known = ", ".join([*command.flags, "--json"])
                raise CommandError(f"{command.name}: unknown option {flag}; options: {known}")
        positional = [t for t in rest if not t.startswith("--")]
        return command, self._bind(command, positional), flags

    def _find(self, tokens: list[str]) -> tuple[Command, list[str]]:
        word = tokens[0].lower()
        if len(tokens) > 1 and f"{word} {tokens[1].lower()}" in self._by_name:
            return self._by_name[f"{word} {tokens[1].lower()}"], tokens[2:]
        if word in self._by_name:
            return self._by_name[word], tokens[1:]
        if word in self._groups:
            subs = [c.name.split()[1] for c in self.commands if c.name.split()[0] == word]
            given = f" {tokens[1]!r}" if len(tokens) > 1 else ""
            raise CommandError(f"{word}: unknown or missing subcommand{given}; expected one of: "
                               f"{', '.join(subs)}")
        other = " (it is a primary command)" if word in self._other_role_words else ""
        raise CommandError(f"unknown command {_short(tokens[0])!r}{other}; type help")

    def _bind(self, command: Command, tokens: list[str]) -> dict:
        args: dict[str, Any] = {}
        i = 0
        for spec in command.args:
            if spec.kind == "text":
                if i < len(tokens):
                    args[spec.name] = " ".join(tokens[i:])
                    i = len(tokens)
                elif not spec.optional:
                    raise CommandError(f"missing {spec.name}; usage: {command.usage()}")
                continue
            if spec.keyword:
                if i < len(tokens) and tokens[i].lower() == spec.keyword:
                    if i + 1 >= len(tokens):
                        raise CommandError(f"{spec.keyword} needs {spec.name}; usage: {command.usage()}")
                    args[spec.name] = self._value(command, spec, tokens[i + 1])
                    i += 2
                elif not spec.optional:
                    raise CommandError(f"missing {spec.keyword} {spec.name}; usage: {command.usage()}")
                continue
            if i < len(tokens):
                args[spec.name] = self._value(command, spec, tokens[i])
                i += 1
            elif not spec.optional:
                raise CommandError(f"missing {spec.name}; usage: {command.usage()}")
        if i < len(tokens):
            raise CommandError(f"unexpected argument {_short(tokens[i])!r}; usage: {command.usage()}")
        return args

    @staticmethod
    def _value(command: Command, spec: Arg, token: str) -> Any:
        if spec.kind == "choice":
            if token.lower() not in spec.choices:
                raise CommandError(f"{spec.name.lower()} {_short(token)!r}: expected one of "
                                   f"{', '.join(spec.choices)}")
            return token.lower()
        if spec.kind == "int":
            if not re.fullmatch(r"\d{1,18}", token):
                raise CommandError(f"{spec.name} {_short(token)!r}: expected a whole number >= 0")
            return int(token)
        if spec.kind == "range":
            m = re.fullmatch(r"(\d{1,18})(?:-(\d{0,18}))?", token)
            if not m:
                raise CommandError(f"{spec.name} {_short(token)!r}: expected START or START-END "
                                   "(track numbers, END exclusive)")
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else None
            if end is not None and end <= start:
                raise CommandError(f"range {token}: END must be greater than START (END is exclusive)")
            return (start, end)
        return token

    # ---- help ---------------------------------------------------------------

    async def _help(self, args, flags, as_json):
        topic = args.get("COMMAND", "").strip().lower()
        if topic:
            shown = [c for c in self.commands if c.name == topic or c.name.split()[0] == topic]
            if not shown:
                raise CommandError(f"help: no command {_short(topic)!r}; type help for the list")
        else:
            shown = self.commands
        entries = [{"name": c.name, "usage": c.usage(), "help": c.help,
                    **({"requires": "allow_faults"} if c.faults else {})} for c in shown]
        width = min(HELP_USAGE_CHARS, max(len(e["usage"]) for e in entries))
        lines = []
        for e in entries:
            about = e["help"] + ("  (needs allow_faults)" if "requires" in e else "")
            if len(e["usage"]) > width:  # a long usage gets its own line
                lines += [e["usage"], f"{'':<{width}}  {about}"]
            else:
                lines.append(f"{e['usage']:<{width}}  {about}")
        if not topic:
            lines.append("every command takes --json: one line of JSON {ok, command, data|error}")
        return {"commands": entries}, "\n".join(lines), None

    # ---- status -------------------------------------------------------------

    async def _status(self, args, flags, as_json):
        raw = self.controller.status()
        if self.role == "secondary":
            data = {k: raw.get(k) for k in SECONDARY_STATUS_KEYS}
            data["role"] = "secondary"
            text = _table([(k, _show(k, data[k])) for k in SECONDARY_STATUS_KEYS])
            return data, text, None
        data = {k: raw.get(k) for k in STATUS_KEYS}
        cache = self._cache()
        data["cache"] = cache
        rows = [(k, _show(k, data[k])) for k in STATUS_KEYS]
        rows.append(("cache", _cache_line(cache)))
        return data, _table(rows), None

    def _cache(self) -> dict:
        stats = getattr(self.controller, "cache_stats", None)
        raw = stats() if stats else {}
        return {k: raw.get(k) for k in CACHE_KEYS}

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
        raise CommandError(f"no volume {_short(name)!r}; volumes: {names}")

    async def _volume_list(self, args, flags, as_json):
        vols = self._volumes()
        if not vols:
            return {"volumes": []}, "no volumes", None
        keys = [k for k in ("name", "size_bytes", "tracks", "oos_tracks", "cr_tracks", "copied_grains",
                            "url", "b_url", "c_url")
                if any(k in v for v in vols)] or sorted({k for v in vols for k in v})
        rows = [keys] + [[_show(k, v.get(k)) for k in keys] for v in vols]
        widths = [max(len(r[i]) for r in rows) for i in range(len(keys))]
        text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
        return {"volumes": vols}, text, None

    async def _volume_show(self, args, flags, as_json):
        vol = self._volume(args["NAME"])
        return {"volume": vol}, _table([(k, _show(k, v)) for k, v in vol.items()]), None

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
        pct = 100.0 * whole["count"] / n
        text = "\n".join([
            f"{kind} {name} tracks {start}..{end - 1}: {whole['count']} of {n} set ({pct:.1f}%)",
            f"map ({cells} cells of ~{n / cells:.4g} tracks): [{bitmap_map}]",
            "runs: " + (" ".join(f"{a}-{b}" for a, b in runs) or "none")
            + (" (first 64, END exclusive)" if runs else ""),
        ])
        return data, text, None

    async def _cache_stats(self, args, flags, as_json):
        cache = self._cache()
        rows = [(k, _show(k, cache[k])) for k in CACHE_KEYS]
        hits, misses = cache.get("hits") or 0, cache.get("misses") or 0
        hit_rate = hits / (hits + misses) if hits + misses else None
        cache["hit_rate"] = hit_rate
        rows.append(("hit_rate", "-" if hit_rate is None else f"{100 * hit_rate:.1f}%"))
        return cache, _table(rows), None

    async def _link_status(self, args, flags, as_json):
        s = self.controller.status()
        data = {k: s.get(k) for k in ("link", "copy_state", "phase", "cg_seq", "drain_bytes",
                                      "consecutive_failures", "data_exposure_s")}
        return data, _table([(k, _show(k, v)) for k, v in data.items()]), None

    # ---- parameters, faults, logging ----------------------------------------

    async def _set(self, args, flags, as_json):
        name, value = args["PARAMETER"], args["VALUE"]
        try:
            self.controller.set_param(name, value)
        except ValueError as exc:
            message = _one_line(exc).removeprefix(f"{name}: ")
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
            raise CommandError(f"unknown crash point {_short(name)!r}; fault list shows them")
        was = name in cp.armed
        cp.disarm(name)
        return {"crashpoint": name, "was_armed": was}, f"disarmed {name}" + ("" if was else " (was not armed)"), None

    async def _fault_list(self, args, flags, as_json):
        cp = self._points()
        points = [{"name": n, "why": why, "armed": n in cp.armed, "after": cp.armed.get(n)}
                  for n, why in sorted(POINTS.items())]
        if not points:
            return {"crashpoints": []}, "no crash points declared", None
        width = max(len(p["name"]) for p in points)
        text = "\n".join(f"{p['name']:<{width}}  {'armed after ' + str(p['after']) if p['armed'] else '-':<14}"
                         f"  {p['why']}" for p in points)
        return {"crashpoints": points}, text, None

    async def _log_level(self, args, flags, as_json):
        name = args.get("LOGGER", "")
        if name and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,200}", name):
            raise CommandError(f"logger {_short(name)!r}: expected a dotted module name, e.g. firmware.primary")
        logger = logging.getLogger(name)
        if "LEVEL" in args:
            logger.setLevel(LOG_LEVELS[args["LEVEL"]])
        level = logging.getLevelName(logger.getEffectiveLevel()).lower()
        shown = name or "root"
        return {"logger": shown, "level": level}, f"log level {shown}: {level}", None

    # ---- events -------------------------------------------------------------

    async def _events(self, args, flags, as_json):
        stats = "--statistics" in flags
        snapshot = self._snapshot(stats)
        snapshot.append(Event("exists", "-", {}))
        data = {"events": [{"action": e.action, "object": e.obj, "fields": e.fields} for e in snapshot]}
        text = "\n".join(e.line() for e in snapshot)
        stream = None
        if "--now" not in flags:
            if self.events is None:
                raise CommandError("this controller has no event bus; use events --now")
            stream = EventStream(self.events, as_json=as_json)
        return data, text, stream

    def _snapshot(self, stats: bool) -> list[Event]:
        s = self.controller.status()
        if self.role == "secondary":
            fields = {"name": s.get("session_id", "default"), "role": "secondary",
                      "committed_cg": s.get("committed_cg"), "receiving_cg": s.get("receiving_cg")}
            if stats:
                fields |= {k: s.get(k) for k in ("last_commit_time", "received_tracks", "received_bytes",
                                                 "cow_copies")}
            out = [Event("exists", "session", _present(fields))]
            out += [Event("exists", "volume", {k: v for k, v in vol.items() if not isinstance(v, (dict, list))})
                    for vol in self._volumes()]
            return out
        session = {"name": getattr(self.controller, "session_id", "default"), "role": "primary"}
        session |= {k: s.get(k) for k in ("copy_state", "phase", "cg_seq", "severity", "recoverable",
                                          "fatal_reason")}
        if stats:
            session |= {k: s.get(k) for k in ("total_successful_cgs", "total_failed_cgs",
                                              "consecutive_failures", "data_exposure_s", "last_cg_time",
                                              "drain_bytes")}
            held = s.get("held_ack_ms") or {}
            session |= {f"held_ack_ms_{k}": v for k, v in held.items()}
        out = [Event("exists", "session", _present(session))]
        for vol in self._volumes():
            fields = {"name": vol.get("name")}
            keys = ("oos_tracks", "cr_tracks") + (("size_bytes", "tracks") if stats else ())
            fields |= {k: vol.get(k) for k in keys}
            out.append(Event("exists", "volume", _present(fields)))
        out.append(Event("exists", "link", _present({"state": s.get("link")})))
        cache = self._cache()
        keys = CACHE_KEYS if stats else ("slots", "used", "occupancy")
        out.append(Event("exists", "cache", _present({k: cache.get(k) for k in keys})))
        return out


# ---- formatting helpers (module-private) -----------------------------------

def _present(fields: dict) -> dict:
    """events2 lines show an absent value as '-', never as Python's None."""
    return {k: ("-" if v is None or v == "" else v) for k, v in fields.items()}


def _is_binary(ch: str) -> bool:
    o = ord(ch)
    return (o < 32 and ch != "\t") or 0x7F <= o <= 0x9F or ch == "\ufffd" or 0xD800 <= o <= 0xDFFF


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return (text.splitlines() or [type(exc).__name__])[0]


def _table(rows: list[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _show(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_time") and isinstance(value, (int, float)):
        when = datetime.datetime.fromtimestamp(value, tz=datetime.UTC)
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={_show(k, v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_show(key, v) for v in value) or "-"
    return str(value)


def _cache_line(cache: dict) -> str:
    if cache.get("slots") is None:
        return "-"
    occ = cache.get("occupancy")
    pct = f" ({100 * occ:.1f}%)" if isinstance(occ, (int, float)) else ""
    return f"{cache.get('used')}/{cache.get('slots')} slots used{pct}, {cache.get('dual')} dual, {cache.get('dirty')} dirty"


def _jsonable(value: Any) -> Any:
    """Plain JSON: no NaN/inf (they are not JSON), tuples as lists, odd types as text."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
