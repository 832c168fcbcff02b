"""SessionParams: the tunables of a Global Mirror session.

``SessionParams.set(name, text)`` parses one parameter from text (console
``set`` command, config loader) and validates it; a bad value raises
ValueError naming the parameter and its range, and leaves the object
unchanged. Every number is bounded and finite (``RANGES``): an interval of
``inf`` once stopped CG formation for good while status said Running, and a
drain limit of 0 failed every CG.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

POLICIES = ("dual-image", "send-first")
DAY_S = 86_400.0

# name -> (lowest, highest, unit): the one place the bounds live; `help set`
# and every refusal show them (``describe``).
RANGES: dict[str, tuple[float, float, str]] = {
    "cg_interval_s": (0.0, DAY_S, "s"),
    "max_coord_ms": (1.0, 60_000.0, "ms"),
    "max_drain_s": (1.0, DAY_S, "s"),
    "track_bytes": (512, 4 << 20, "bytes"),
    "max_failures_before_untimed": (0, 4096, ""),
    "destage_inflight": (1, 4096, ""),
    "drain_inflight": (1, 4096, ""),
    "max_pinned_bytes": (0, 1 << 40, "bytes"),
    "rpo_warning_s": (0.0, DAY_S, "s, 0 off"),
    "rpo_severe_s": (0.0, DAY_S, "s, 0 off"),
}


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "yes", "true", "on"):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _shown(v: float) -> str:
    if isinstance(v, int) and v >= 1 << 20:
        for shift, suffix in ((40, "TiB"), (30, "GiB"), (20, "MiB")):
            if v % (1 << shift) == 0:
                return f"{v >> shift}{suffix}"
    return f"{v:g}"


def describe(name: str) -> str:
    """The allowed values of one parameter, e.g. ``0..86400 s``."""
    if name == "collision_policy":
        return "|".join(POLICIES)
    lo, hi, unit = RANGES[name]
    return f"{_shown(lo)}..{_shown(hi)}" + (f" {unit}" if unit else "")


@dataclass
class SessionParams:
    cg_interval_s: float = 0.0
    max_coord_ms: float = 50.0
    max_drain_s: float = 240.0
    collision_policy: str = "dual-image"
    track_bytes: int = 65536
    max_failures_before_untimed: int = 5
    destage_inflight: int = 8
    drain_inflight: int = 64  # sends in flight: the secondary is latency-bound (a durable copy-on-write per track)
    # Secondary: bytes that point-in-time reads of C (NBD connections, snapshots)
    # may keep in memory, over all of them (firmware/pins.py).
    max_pinned_bytes: int = 256 << 20
    # Recovery point objective thresholds (as Copy Services Manager has): data
    # exposure above them makes status severity Warning / Severe; 0 is off.
    rpo_warning_s: float = 0.0
    rpo_severe_s: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            self._check(f.name, getattr(self, f.name))
        self._check_rpo(self.rpo_warning_s, self.rpo_severe_s)

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in dataclasses.fields(SessionParams)]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def set(self, name: str, text: str) -> None:
        """Parse ``text`` for parameter ``name`` and set it (ValueError if bad)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        if name not in fields:
            raise ValueError(f"unknown parameter {name!r}; known: {', '.join(fields)}")
        kind = type(getattr(SessionParams(), name))
        text = str(text).strip()
        try:
            if len(text) > 64:  # no parameter needs more; int() of 100k digits is slow
                raise ValueError(text)
            if kind is bool:
                value = _parse_bool(text)
            elif kind is int:
                value = _parse_size(text) if text[-1:].isalpha() else int(text, 0)
            elif kind is float:
                value = float(text)
            else:
                value = text
        except ValueError:
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise ValueError(f"{name}: cannot parse {shown!r} as {kind.__name__}"
                             + (f" ({describe(name)})" if name in RANGES else "")) from None
        self._check(name, value)
        if name == "rpo_warning_s":
            self._check_rpo(value, self.rpo_severe_s)
        elif name == "rpo_severe_s":
            self._check_rpo(self.rpo_warning_s, value)
        setattr(self, name, value)

    @staticmethod
    def _check(name: str, value) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"{name}: {value!r} is invalid; {what}")

        if name == "collision_policy":
            need(value in POLICIES, f"must be one of {', '.join(POLICIES)}")
            return
        lo, hi, _unit = RANGES[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(lo, int):
            need(number and isinstance(value, int) and lo <= value <= hi,
                 f"must be an integer in {describe(name)}")
        else:
            need(number and math.isfinite(value) and lo <= value <= hi, f"must be in {describe(name)}")
        if name == "track_bytes":
            need(value & (value - 1) == 0, f"must be a power of two in {describe(name)}")

    @staticmethod
    def _check_rpo(warning: float, severe: float) -> None:
        if warning and severe and severe < warning:
            raise ValueError(f"rpo_severe_s ({severe:g}) must be 0 (off) or at least "
                             f"rpo_warning_s ({warning:g})")


def _parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": 1024, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(t[-1:])
    if mult is None:
        raise ValueError(text)
    return int(t[:-1]) * mult
