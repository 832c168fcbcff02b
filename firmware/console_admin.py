"""The console's operator and test handlers: ``set``, ``fault ...``
(crash points), ``power cut`` and ``log level``. CommandSet
(firmware/console.py) inherits them."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from firmware import console_format as fmt
from firmware.console_grammar import CommandError
from firmware.crashpoints import POINTS, UnknownCrashPoint

# The console's one logger name, whichever of its modules logs.
log = logging.getLogger("firmware.console")

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class AdminCommands:
    controller: Any
    role: str
    crashpoints: Any
    power_cut: Callable[[int | None], None] | None

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
