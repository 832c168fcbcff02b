"""SessionParams: the tunables of a Global Mirror session.

``SessionParams.set(name, text)`` parses one parameter from text (console
``set`` command, config loader) and validates it; a bad value raises
ValueError naming the parameter and leaves the object unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

POLICIES = ("dual-image", "send-first")


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "yes", "true", "on"):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass
class SessionParams:
    cg_interval_s: float = 0.0
    max_coord_ms: float = 50.0
    max_drain_s: float = 240.0
    collision_policy: str = "dual-image"
    track_bytes: int = 65536
    max_failures_before_untimed: int = 5
    destage_inflight: int = 8
    drain_inflight: int = 16
    # Secondary: bytes that point-in-time reads of C (NBD connections, snapshots)
    # may keep in memory, over all of them (firmware/pins.py).
    max_pinned_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            self._check(f.name, getattr(self, f.name))

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
            if kind is bool:
                value = _parse_bool(text)
            elif kind is int:
                value = _parse_size(text) if text[-1:].isalpha() else int(text, 0)
            elif kind is float:
                value = float(text)
            else:
                value = text
        except ValueError:
            raise ValueError(f"{name}: cannot parse {text!r} as {kind.__name__}") from None
        self._check(name, value)
        setattr(self, name, value)

    @staticmethod
    def _check(name: str, value) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"{name}: {value!r} is invalid; {what}")

        if name in ("cg_interval_s", "max_drain_s"):
            need(isinstance(value, (int, float)) and value >= 0 and value == value, "must be >= 0 seconds")
        elif name == "max_coord_ms":
            need(isinstance(value, (int, float)) and 0 < value <= 60_000, "must be in (0, 60000] ms")
        elif name == "collision_policy":
            need(value in POLICIES, f"must be one of {', '.join(POLICIES)}")
        elif name == "track_bytes":
            need(isinstance(value, int) and 512 <= value <= (4 << 20) and value & (value - 1) == 0,
                 "must be a power of two between 512 and 4 MiB")
        elif name in ("max_failures_before_untimed", "destage_inflight", "drain_inflight"):
            lo = 0 if name == "max_failures_before_untimed" else 1
            need(isinstance(value, int) and lo <= value <= 4096, f"must be an integer in [{lo}, 4096]")
        elif name == "max_pinned_bytes":
            need(isinstance(value, int) and 0 <= value <= 1 << 40, "must be 0 to 1 TiB (e.g. 256MiB)")


def _parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": 1024, "m": 1 << 20, "g": 1 << 30}.get(t[-1:])
    if mult is None:
        raise ValueError(text)
    return int(t[:-1]) * mult
