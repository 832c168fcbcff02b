"""What one NBD listener lets its clients hold and how long it waits for them
(issue 16): the budgets the server enforces, one place that checks them, and
the parser the config file and ``mirrorfw serve --limit`` share.

Bytes counted against a budget are WRITE payloads being received (as they
arrive, never the declared length up front) or at the volume, and READ data
from the moment the request is taken until the client has taken the reply off
the socket's send buffer. A connection past its own budget, or any
connection while the server is past the server-wide one, stops parsing
requests (and reading) until some are answered and read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from hal.url import UrlError, parse_size

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@dataclass(frozen=True)
class NbdLimits:
    max_connections: int = 64  # connections open at once (negotiating or transmitting); more are closed at once
    max_request_bytes: int = 32 * MiB  # largest READ/WRITE payload; advertised in NBD_INFO_BLOCK_SIZE
    max_inflight: int = 256  # requests one connection may have at the volume or waiting to be sent
    server_max_inflight: int = 4096  # the same over all connections
    connection_buffer_bytes: int = 64 * MiB  # payload and reply bytes one connection may hold
    server_buffer_bytes: int = 512 * MiB  # the same over all connections
    handshake_timeout_s: float = 10.0  # from accept to the end of option haggling
    idle_timeout_s: float = 300.0  # after GO: nothing in flight and nothing received for this long
    stall_timeout_s: float = 30.0  # one request's bytes arriving, or queued replies not taken by the client

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            lo, hi = _RANGES[f.name]
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{f.name}: expected a number, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ValueError(f"{f.name}: expected a whole number, got {value!r}")
            if not (lo <= value <= hi) or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"{f.name}: {value!r} is out of range ({_show(f.name, lo)} to {_show(f.name, hi)})")

    @classmethod
    def from_items(cls, items: Mapping[str, object]) -> NbdLimits:
        """Limits from ``key: value`` pairs (TOML values or ``--limit`` text);
        sizes may say ``64MiB``. A ValueError names the key."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for name, raw in items.items():
            f = known.get(name)
            if f is None:
                raise ValueError(f"{name}: unknown limit (known: {', '.join(known)})")
            values[name] = _convert(name, f.type, raw)
        return cls(**values)

    def as_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)


def parse_limit_items(texts: list[str]) -> dict[str, str]:
    """``["idle_timeout_s=5", ...]`` -> ``{"idle_timeout_s": "5", ...}``."""
    out: dict[str, str] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{text!r}: expected KEY=VALUE, e.g. idle_timeout_s=300")
        out[name.strip()] = value.strip()
    return out


_RANGES: dict[str, tuple[float, float]] = {
    "max_connections": (1, 100_000),
    "max_request_bytes": (4 * KiB, 1 * GiB),
    "max_inflight": (1, 65_536),
    "server_max_inflight": (1, 1_000_000),
    "connection_buffer_bytes": (64 * KiB, 64 * GiB),
    "server_buffer_bytes": (64 * KiB, 1024 * GiB),
    "handshake_timeout_s": (0.05, 3600.0),
    "idle_timeout_s": (0.05, 7 * 86400.0),
    "stall_timeout_s": (0.05, 86400.0),
}


def _show(name: str, value: float) -> str:
    if name.endswith("_bytes"):
        for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
            if value >= size and value % size == 0:
                return f"{int(value // size)}{unit}"
    return f"{value:g}"


def _convert(name: str, kind: str, raw: object) -> int | float:
    if isinstance(raw, bool):
        raise ValueError(f"{name}: expected a number, got {raw!r}")
    if name.endswith("_bytes"):
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        try:
            return parse_size(raw if isinstance(raw, int) else str(raw))
        except UrlError as e:
            raise ValueError(f"{name}: {e}") from None
    try:
        if kind == "int":
            if isinstance(raw, float):
                raise ValueError
            return int(str(raw), 10)
        value = float(str(raw))
    except ValueError:
        raise ValueError(f"{name}: {raw!r} is not a {'whole number' if kind == 'int' else 'number of seconds'}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}: {raw!r} is not finite")
    return value
