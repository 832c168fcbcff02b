"""A CSV trace of any layout, described by a column spec from the command line.

Spec: ``ts=0:us,op=1,offset=2:sector,length=3:byte,device=4`` — field name,
zero-based column, optional unit. Units of ``ts``: s, ms, us, ns, filetime
(100 ns ticks); of ``offset``/``length``: byte, sector (512 B), kib, or a
number of bytes. ``device`` is optional (every record then goes to ``dev0``).
``ops`` maps the op column's values, e.g. ``R=0|read,W=1|write`` (default:
r/read, w/write, t/trim/d/discard, f/flush/sync, case-insensitive).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from testbench.errors import TraceError
from testbench.traces.record import (
    IoRecord,
    LineWriter,
    WriteResult,
    parse_int,
    parse_number,
    text_lines,
)

TIME_UNITS_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1, "filetime": 100}
SIZE_UNITS = {"byte": 1, "b": 1, "sector": 512, "kib": 1024}
DEFAULT_OPS = {"r": "R", "read": "R", "w": "W", "write": "W", "t": "T", "trim": "T", "d": "T",
               "discard": "T", "f": "F", "flush": "F", "sync": "F"}
REQUIRED = ("ts", "op", "offset", "length")
PLAUSIBLE_IOPS = (1.0, 10_000_000.0)  # outside this, a csv's ts unit is most likely wrong


def implausible_rate(iops: float, records: int, spec: CsvSpec) -> str | None:
    """A warning when the rate the ts unit implies is absurd (``ts=0:us`` on a
    file in ns gives 1000 times too few IOPS), else None."""
    lo, hi = PLAUSIBLE_IOPS
    if records < 100 or lo <= iops <= hi:
        return None
    unit = next(k for k, v in TIME_UNITS_NS.items() if v == spec.ts_unit_ns)
    return (f"{records} records at {iops:.3g} IOPS with the ts unit {unit!r}: check the unit "
            f"(--columns ts=N:s|ms|us|ns|filetime; `trace generate --format csv` writes ns)")


@dataclass
class CsvSpec:
    columns: dict[str, int]
    ts_unit_ns: int = 1_000
    offset_unit: int = 1
    length_unit: int = 1
    ops: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_OPS))
    delimiter: str = ","
    skip_lines: int = 0  # header lines

    @classmethod
    def parse(cls, columns: str, *, ops: str | None = None, delimiter: str = ",", skip_lines: int = 0) -> CsvSpec:
        cols: dict[str, int] = {}
        units: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in columns.split(","))):
            name, eq, rest = part.partition("=")
            if not eq or name not in (*REQUIRED, "device"):
                raise ValueError(f"column spec {part!r}: expected NAME=INDEX[:UNIT] with NAME one of {', '.join((*REQUIRED, 'device'))}")
            index, _, unit = rest.partition(":")
            if not index.isdigit():
                raise ValueError(f"column spec {part!r}: index {index!r} is not a column number")
            cols[name] = int(index)
            if unit:
                units[name] = unit.lower()
        missing = [n for n in REQUIRED if n not in cols]
        if missing:
            raise ValueError(f"column spec {columns!r} lacks {', '.join(missing)}")
        spec = cls(cols, delimiter=delimiter, skip_lines=skip_lines)
        if "ts" in units:
            if units["ts"] not in TIME_UNITS_NS:
                raise ValueError(f"ts unit {units['ts']!r}: use one of {', '.join(TIME_UNITS_NS)}")
            spec.ts_unit_ns = TIME_UNITS_NS[units["ts"]]
        for name in ("offset", "length"):
            if name in units:
                u = units[name]
                size = SIZE_UNITS.get(u) or (int(u) if u.isdigit() and int(u) > 0 else None)
                if size is None:
                    raise ValueError(f"{name} unit {u!r}: use byte, sector, kib or a number of bytes")
                setattr(spec, f"{name}_unit", size)
        if ops:
            spec.ops = {}
            for part in filter(None, (p.strip() for p in ops.split(","))):
                op, eq, values = part.partition("=")
                if not eq or op.upper() not in ("R", "W", "T", "F"):
                    raise ValueError(f"ops spec {part!r}: expected R|W|T|F=VALUE[|VALUE...]")
                for v in values.split("|"):
                    spec.ops[v.strip().lower()] = op.upper()
        return spec

    def describe(self) -> str:
        ts_unit = next(k for k, v in TIME_UNITS_NS.items() if v == self.ts_unit_ns)
        return ",".join(f"{k}={v}" + (f":{ts_unit}" if k == "ts" else "") for k, v in self.columns.items())


def read(path: str | os.PathLike, *, spec: CsvSpec | None = None, **_opts) -> Iterator[IoRecord]:
    if spec is None:
        raise TraceError(str(path), 0, "the generic csv format needs a column spec, e.g. --columns ts=0:ns,op=1,offset=2,length=3,device=4 (the layout `trace generate --format csv` writes; ts unit s, ms, us, ns or filetime as the file has it)")
    cols = spec.columns
    need = max(cols.values()) + 1
    dev_col = cols.get("device")
    for line_no, line in text_lines(path):
        if line_no <= spec.skip_lines or not line.strip():
            continue
        f = [x.strip() for x in line.split(spec.delimiter)]
        if len(f) < need:
            raise TraceError(str(path), line_no, f"expected at least {need} fields, got {len(f)}")
        op = spec.ops.get(f[cols["op"]].lower())
        if op is None:
            raise TraceError(str(path), line_no, f"op value {f[cols['op']]!r} is not mapped (known: {', '.join(sorted(spec.ops))})")
        ts = parse_number(path, line_no, f[cols["ts"]], "ts")
        offset = parse_int(path, line_no, f[cols["offset"]], "offset")
        length = parse_int(path, line_no, f[cols["length"]], "length")
        device = f[dev_col] if dev_col is not None else "dev0"
        yield IoRecord(round(ts * spec.ts_unit_ns), op, offset * spec.offset_unit, length * spec.length_unit, device)


DEFAULT_WRITE_SPEC = "ts=0:ns,op=1,offset=2,length=3,device=4"  # what `trace generate`/`convert --to csv` write


def write(path: str | os.PathLike, records: Iterable[IoRecord], *, spec: CsvSpec | None = None, **_opts) -> WriteResult:
    if spec is None:
        spec = CsvSpec.parse(DEFAULT_WRITE_SPEC)
    names = {v: k for k, v in spec.ops.items()}  # last listed value per op name
    for op, word in (("R", "read"), ("W", "write"), ("T", "trim"), ("F", "flush")):
        if spec.ops.get(word) == op:
            names[op] = word
    width = max(spec.columns.values()) + 1
    result = WriteResult()
    with LineWriter(path) as out:
        for _ in range(spec.skip_lines):
            out.line(spec.delimiter.join(sorted(spec.columns, key=spec.columns.get)))
        for rec in records:
            if rec.op not in names or rec.offset_bytes % spec.offset_unit or rec.length_bytes % spec.length_unit:
                result.skipped += 1
                continue
            row = [""] * width
            row[spec.columns["ts"]] = str(rec.ts_ns // spec.ts_unit_ns)
            row[spec.columns["op"]] = names[rec.op]
            row[spec.columns["offset"]] = str(rec.offset_bytes // spec.offset_unit)
            row[spec.columns["length"]] = str(rec.length_bytes // spec.length_unit)
            if "device" in spec.columns:
                row[spec.columns["device"]] = rec.device
            out.line(spec.delimiter.join(row))
            result.written += 1
    return result
