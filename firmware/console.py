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

Here: the table, ``execute``, ``help`` and ``auth``. The other handlers are
methods CommandSet inherits, by area: console_copy.py (cg, pair, session,
snapshots), console_inspect.py (status, volumes, bitmaps, cache, link,
events), console_admin.py (set, faults, power cut, log level). Beside them:
console_grammar.py (``Command``, ``Arg``, how a line becomes one),
console_events.py (the ``events`` snapshot, ``EventStream``),
console_format.py (text and JSON).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firmware import console_format as fmt
from firmware.console_admin import LOG_LEVELS, AdminCommands
from firmware.console_copy import CopyCommands
from firmware.console_events import EventStream
from firmware.console_grammar import (
    BOTH,
    MAX_LINE_CHARS,
    SECONDARY,
    Arg,
    Command,
    CommandError,
    Grammar,
)
from firmware.console_inspect import InspectCommands
from firmware.errors import FirmwareError
from firmware.events import EventBus
from firmware.params import describe

# Importers (harness/console_session.py, tests, the fuzzer) take these from here.
__all__ = ["MAX_LINE_CHARS", "CommandError", "CommandSet", "EventStream", "Reply"]

log = logging.getLogger(__name__)

# Parameters `set` may change live (the rest of SessionParams is fixed at format time).
SETTABLE = ("cg_interval_s", "max_coord_ms", "max_drain_s", "collision_policy", "rpo_warning_s", "rpo_severe_s")
# `help set` shows each one's range (firmware/params.py RANGES, the one place they live).
SET_HELP = "change a session parameter live (a change wakes the CG loop): " + "; ".join(
    f"{name} {describe(name)}" for name in SETTABLE)


@dataclass
class Reply:
    ok: bool
    text: str  # what the operator sees (the JSON line when --json was given)
    data: dict | None = None
    command: str | None = None
    stream: EventStream | None = field(default=None, repr=False)  # `events` without --now


class CommandSet(CopyCommands, InspectCommands, AdminCommands):
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
        except FirmwareError as exc:  # the controller refused (a state, a bound): a reply, not a bug
            what = command.name if command else "console"
            return self._error(command, f"{what}: {fmt.one_line(exc)}", as_json)
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
