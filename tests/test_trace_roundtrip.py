"""Writers round-trip through readers; the generator is deterministic; the volume map follows its rule."""

from __future__ import annotations

import pytest

from testbench.generate import GeneratorParams, generate
from testbench.traces import (
    FORMATS,
    IoRecord,
    VolumeGeometry,
    VolumeMap,
    read_trace,
    scan,
    write_trace,
)
from testbench.traces.generic_csv import CsvSpec

PARAMS = GeneratorParams(seed=11, duration_s=0.4, iops=300, devices=3, span_bytes=8 << 20,
                         flush_ratio=0.05, trim_ratio=0.05)
# What each format keeps: ops it can say, and its time resolution in ns.
KEEPS = {
    "fio2": ("RWTF", 1_000_000), "fio3": ("RWTF", 1_000), "blktrace": ("RWTF", 1), "blkparse": ("RWTF", 1),
    "msr": ("RW", 100), "alibaba": ("RW", 1_000), "tencent": ("RW", 1_000_000_000), "fiu": ("RW", 1),
    "csv": ("RWTF", 1),
}


def expected(fmt: str) -> list[tuple]:
    ops, res = KEEPS[fmt]
    recs = [r for r in generate(PARAMS) if r.op in ops]
    t0 = recs[0].ts_ns
    relative = fmt in ("fio2", "fio3", "blktrace", "blkparse")
    out = []
    for r in recs:
        ts = (r.ts_ns - t0) if relative else r.ts_ns
        ts = ts // res * res
        off, ln = (0, 0) if r.op == "F" else (r.offset_bytes, r.length_bytes)
        out.append((ts, r.op, off, ln, r.device))
    return out


def as_tuples(recs, t0_relative: bool) -> list[tuple]:
    recs = list(recs)
    t0 = recs[0].ts_ns if t0_relative else 0
    return [(r.ts_ns - t0, r.op, r.offset_bytes, r.length_bytes, r.device) for r in recs]


def same_up_to_device_names(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    assert [g[:4] for g in got] == [w[:4] for w in want]
    mapping: dict[str, str] = {}
    for g, w in zip(got, want, strict=False):
        assert mapping.setdefault(w[4], g[4]) == g[4], "device names must map one to one"
    assert len(set(mapping.values())) == len(mapping)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_writer_round_trips_through_reader(tmp_path, fmt):
    path = tmp_path / ("t" + FORMATS[fmt].suffix)
    opts = {"spec": CsvSpec.parse("ts=0:ns,op=1,offset=2,length=3,device=4")} if fmt == "csv" else {}
    result = write_trace(path, fmt, generate(PARAMS), **opts)
    want = expected(fmt)
    assert result.written == len(want)
    got = as_tuples(read_trace(path, fmt, **opts), t0_relative=False)
    same_up_to_device_names(got, want)
    if fmt != "csv":  # the generic csv needs its spec; every other format is recognised on its own
        assert scan(read_trace(path)).records == len(want)


def test_blktrace_issue_events_selectable(tmp_path):
    path = tmp_path / "t.blktrace.0"
    write_trace(path, "blktrace", generate(PARAMS), issue_delay_ns=5000)
    q = list(read_trace(path, "blktrace", events="Q"))
    d = list(read_trace(path, "blktrace", events="D"))
    assert len(q) == len(d) > 0
    assert all(b.ts_ns - a.ts_ns == 5000 for a, b in zip(q, d, strict=False))


def test_generator_is_deterministic_from_its_seed():
    a = list(generate(PARAMS))
    b = list(generate(PARAMS))
    c = list(generate(GeneratorParams(**{**PARAMS.__dict__, "seed": 12})))
    assert a == b
    assert a != c
    ts = [r.ts_ns for r in a]
    assert ts == sorted(ts)
    assert {r.device for r in a} == {"dev0", "dev1", "dev2"}
    assert all(r.offset_bytes % 4096 == 0 and r.offset_bytes + r.length_bytes <= 8 << 20 for r in a if r.op != "F")


def test_generator_mix_follows_its_parameters():
    p = GeneratorParams(seed=3, duration_s=5, iops=2000, write_ratio=0.8, seq_prob=0.0, burst_prob=0.0)
    recs = list(generate(p))
    writes = sum(r.op == "W" for r in recs) / len(recs)
    assert 0.75 < writes < 0.85
    assert 8000 < len(recs) < 12000


def test_generator_rejects_bad_parameters():
    with pytest.raises(ValueError, match="write_ratio"):
        list(generate(GeneratorParams(write_ratio=0.9, flush_ratio=0.2)))


def test_volume_map_rule():
    vols = [VolumeGeometry("a", 1 << 20, 512), VolumeGeometry("b", 1 << 20, 4096)]
    m = VolumeMap(["z", "x", "y"], vols)
    # sorted x, y, z -> a, b, a
    assert [m.volume_of(d) for d in ("x", "y", "z")] == [0, 1, 0]
    io = m.map(IoRecord(0, "W", (1 << 20) + 1000, 100, "x"))  # wraps; bytes 1000..1100 touch blocks 1 and 2
    assert (io.volume, io.lba, io.nblocks) == (0, 1, 2)
    io = m.map(IoRecord(0, "W", 1000, 5000, "y"))  # 4 KiB blocks: bytes 1000..6000 -> blocks 0..1
    assert (io.volume, io.lba, io.nblocks) == (1, 0, 2)
    io = m.map(IoRecord(0, "W", (1 << 20) - 512, 4096, "x"))  # past the end: moved back
    assert (io.lba, io.nblocks) == (2048 - 8, 8)
    assert "x -> a" in m.describe() and "round-robin" in m.describe()
