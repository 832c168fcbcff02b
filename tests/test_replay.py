"""The replayer in process on mem:// devices, its log, and the CLI end to end on file:// images."""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
import sys

import pytest

from drivers import open_device
from hal.block import BlockDevice, DeviceError
from testbench.checker import check_copy
from testbench.errors import ReplayError
from testbench.generate import GeneratorParams, generate
from testbench.replay import (
    Pacer,
    Replayer,
    ReplayOptions,
    ReplayResult,
    TraceDriver,
    WriteMonitor,
    parse_timing,
)
from testbench.replaylog import LogVolumeInfo, ReplayLog
from testbench.traces import IoRecord, VolumeGeometry, VolumeMap

pytestmark = pytest.mark.timeout(120)
PARAMS = GeneratorParams(seed=5, duration_s=0.5, iops=800, devices=3, span_bytes=4 << 20, seq_prob=0.2,
                         hot_prob=0.8, hot_spots=2, hot_bytes=256 << 10, flush_ratio=0.02, trim_ratio=0.02)


class WatchedDevice(BlockDevice):
    """A mem device that yields inside every write and records overlapping writes in flight."""

    def __init__(self, inner: BlockDevice, fail_at_write: int | None = None) -> None:
        super().__init__(inner.info)
        self.inner = inner
        self.busy: set[int] = set()
        self.overlaps = 0
        self.max_in_flight = 0
        self.in_flight = 0
        self.writes = 0
        self.fail_at_write = fail_at_write

    async def _read(self, lba, count):
        return await self.inner.read(lba, count)

    async def _write(self, lba, data, fua):
        self.writes += 1
        if self.writes == self.fail_at_write:
            raise DeviceError(errno.EIO, "injected write error", self.info.url)
        blocks = set(range(lba, lba + len(data) // self.info.block_size))
        if blocks & self.busy:
            self.overlaps += 1
        self.busy |= blocks
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.0005)
        await self.inner.write(lba, data)
        self.busy -= blocks
        self.in_flight -= 1


def mem_targets(n=2, **kw):
    return [WatchedDevice(open_device("mem://?size=4MiB"), **kw) for _ in range(n)]


def test_afap_replay_stamps_logs_and_leaves_a_consistent_copy(tmp_path):
    async def go():
        targets = mem_targets()
        log_path = tmp_path / "r.log"
        rp = Replayer(targets, str(log_path), ReplayOptions(queue_depth=8, trace_name="gen"))
        res = await rp.run(generate(PARAMS), ["dev0", "dev1", "dev2"])
        rlog = ReplayLog(log_path)
        result = await check_copy(targets, rlog, names=[v.name for v in rlog.volumes])
        return targets, res, rlog, result

    targets, res, rlog, result = asyncio.run(go())
    recs = list(generate(PARAMS))
    assert res.writes == sum(r.op == "W" for r in recs) and res.trims_skipped == sum(r.op == "T" for r in recs)
    assert res.ios == len(recs) - res.trims_skipped and res.errors == 0
    assert sum(t.overlaps for t in targets) == 0, "overlapping writes were in flight together"
    assert max(t.max_in_flight for t in targets) > 1, "queue depth was not used"
    writes = list(rlog)
    assert len(writes) == res.writes and rlog.trace == "gen"
    assert all(w.ack_ns is not None and w.ack_ns >= w.issue_ns for w in writes)
    by_id = sorted(writes, key=lambda w: w.write_id)
    assert [w.write_id for w in by_id] == list(range(1, len(by_id) + 1))
    assert [w.issue_ns for w in by_id] == sorted(w.issue_ns for w in by_id)
    assert result.consistent, result.summary()
    assert result.shown_writes > 0 and result.t_star_write == len(writes)
    # writes acked before the newest was issued; the rest (< queue depth) were in flight with it
    assert len(writes) - 8 <= result.required_writes <= len(writes) - 1


def test_copy_built_from_the_history_checks_like_the_rule_says(tmp_path):
    """Zeroing one block of the newest write to a block makes the final copy inconsistent."""

    async def go():
        targets = mem_targets()
        rp = Replayer(targets, None, ReplayOptions(queue_depth=4, keep_history=True))
        await rp.run(generate(PARAMS), ["dev0", "dev1", "dev2"])
        history = rp.history
        last = history[-1]
        # pick an early write whose first block no later write touched
        touched_later = {(w.volume, b) for w in history[len(history) // 2:] for b in range(w.lba, w.lba + w.nblocks)}
        victim = next(w for w in history[: len(history) // 2]
                      if not any((w.volume, b) in touched_later for b in range(w.lba, w.lba + w.nblocks)))
        await targets[victim.volume].write(victim.lba, bytes(512 * victim.nblocks))
        return await check_copy(targets, history), victim, last

    result, victim, last = asyncio.run(go())
    assert not result.consistent
    v = result.violations[0]
    assert (v.kind, v.lba, v.lacks, v.shows) == ("lost-write", victim.lba, victim.write_id, None)
    assert result.t_star_write == last.write_id


def test_timed_replay_reports_fidelity_and_never_runs_early():
    recs = [IoRecord(i * 10_000_000, "W", i * 4096, 4096, "d") for i in range(20)]  # 190 ms of trace

    async def go():
        rp = Replayer(mem_targets(1), options=ReplayOptions(timing="scale=2", queue_depth=4))
        return await rp.run(recs, ["d"])

    res = asyncio.run(go())
    assert res.speed == 2 and res.recorded_duration_s == pytest.approx(0.19)
    assert res.elapsed_s >= 0.19 / 2  # absolute deadlines: the last I/O cannot go before its time
    assert set(res.lateness_ms) >= {"p50", "p99", "max"} and res.lateness_ms["count"] == 20
    assert res.lateness_ms["p50"] <= res.lateness_ms["p99"] <= res.lateness_ms["max"]
    assert res.recorded_iops == pytest.approx(20 / 0.19)
    assert "lateness ms" in res.summary()


def test_pre_issue_hook_runs_before_every_write_in_id_order():
    seen: list[int] = []

    async def hook(write_id: int) -> None:
        seen.append(write_id)

    async def go():
        rp = Replayer(mem_targets(), options=ReplayOptions(queue_depth=4), pre_issue=hook)
        return await rp.run(generate(PARAMS))

    res = asyncio.run(go())
    assert seen == list(range(1, res.writes + 1))


def test_write_error_stops_the_replay_and_is_logged(tmp_path):
    async def go():
        rp = Replayer(mem_targets(1, fail_at_write=5), str(tmp_path / "e.log"), ReplayOptions(queue_depth=1))
        await rp.run(generate(PARAMS))

    with pytest.raises(ReplayError, match="injected write error"):
        asyncio.run(go())
    writes = list(ReplayLog(tmp_path / "e.log"))
    failed = [w for w in writes if w.failed]
    assert len(failed) == 1 and failed[0].ack_ns is None and len(writes) == 5


def test_pacer_deadlines_are_absolute_from_the_first_record():
    pacer = Pacer(2.0, start_ns=1_000)
    assert pacer.deadline(5_000) == 1_000  # the first record goes at the start
    assert pacer.deadline(9_000) == 1_000 + 4_000 // 2
    assert pacer.deadline(3_000) == 1_000  # a record stamped before the first goes at once
    assert pacer.recorded_duration_s == pytest.approx((9_000 - 5_000) / 1e9)  # last minus first, as recorded
    afap = Pacer(None, start_ns=1_000)
    assert afap.deadline(5_000) is None and afap.deadline(7_000) is None
    assert afap.recorded_duration_s == pytest.approx(2_000 / 1e9)


def test_driver_and_monitor_wired_by_hand_keep_overlapping_writes_in_order():
    """The roles without the Replayer: a chain of three overlapping writes, queue depth 4:
    each is issued only after the one before it was acknowledged."""
    recs = [IoRecord(0, "W", 0, 4096, "d"), IoRecord(1, "W", 2048, 4096, "d"), IoRecord(2, "R", 0, 512, "d"),
            IoRecord(3, "W", 4096, 512, "d"), IoRecord(4, "T", 0, 512, "d")]

    async def go():
        (dev,) = mem_targets(1)
        res = ReplayResult()
        monitor = WriteMonitor(res, [LogVolumeInfo("vol0", 512, dev.info.num_blocks)],
                               ReplayOptions(keep_history=True), log_path=None, start_mono_ns=0)
        driver = TraceDriver([dev], queue_depth=4)
        vmap = VolumeMap(["d"], [VolumeGeometry("vol0", dev.info.size_bytes, 512)])
        await driver.drive(recs, vmap, [0], Pacer(None, 0), monitor)
        monitor.close()
        monitor.summarise()
        return res, monitor.history, dev

    res, history, dev = asyncio.run(go())
    assert (res.ios, res.writes, res.reads, res.trims_skipped, res.errors) == (4, 3, 1, 1, 0)
    assert res.bytes_written == 4096 + 4096 + 512 and dev.overlaps == 0
    assert [w.write_id for w in history] == [1, 2, 3]
    assert all(later.issue_ns >= earlier.ack_ns for earlier, later in zip(history, history[1:], strict=False))
    assert res.write_latency_ms["count"] == 3 and res.lateness_ms == {}  # afap: lateness is not measured


@pytest.mark.parametrize("timing,speed", [("afap", None), ("original", 1.0), ("scale=0.5", 0.5)])
def test_timing_names(timing, speed):
    assert parse_timing(timing) == speed
    assert parse_timing("original", replay_time_scale=200) == 2.0
    assert parse_timing("original", replay_no_stall=True) is None


@pytest.mark.parametrize("bad", ["fast", "scale=0", "scale=x"])
def test_bad_timing_is_refused(bad):
    with pytest.raises(ReplayError, match="timing"):
        parse_timing(bad)


def test_replay_redirect_sends_everything_to_one_volume():
    async def go():
        targets = mem_targets(2)
        rp = Replayer(targets, None, ReplayOptions(replay_redirect="vol1", keep_history=True))
        await rp.run(generate(PARAMS))
        return rp.history

    history = asyncio.run(go())
    assert history and {w.volume for w in history} == {1}


def mirrorfw(*args, cwd):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_cli_generate_replay_check_happy_path(tmp_path):
    trace = tmp_path / "t.iolog"
    p = mirrorfw("trace", "generate", str(trace), "--duration-s", "0.3", "--iops", "400", "--span", "2MiB", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    urls = [f"file://{tmp_path}/v{i}.img?size=4MiB" for i in range(2)]
    p = mirrorfw("replay", str(trace), "--target", ",".join(urls), "--log", str(tmp_path / "r.log"), "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "round-robin" in p.stderr  # the mapping; stdout is only the JSON
    res = json.loads(p.stdout)
    assert res["writes"] > 50 and res["errors"] == 0
    p = mirrorfw("check", "--log", str(tmp_path / "r.log"), "--copy", *urls, "--junit", str(tmp_path / "j.xml"), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("CONSISTENT")
    assert 'failures="0"' in (tmp_path / "j.xml").read_text()
    # break the copy: zero the first written block of volume 0 -> exit 1 with an explanation
    first = next(w for w in ReplayLog(tmp_path / "r.log") if w.volume == 0)
    with open(tmp_path / "v0.img", "r+b") as f:
        f.seek(first.lba * 512)
        f.write(bytes(512 * first.nblocks))
    p = mirrorfw("check", "--log", str(tmp_path / "r.log"), "--copy", *urls, "--junit", str(tmp_path / "j.xml"), cwd=tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "INCONSISTENT" in p.stdout and "lacks write" in p.stdout
    junit = (tmp_path / "j.xml").read_text()
    assert 'failures="0"' not in junit and "<failure" in junit  # the verdict, then one case per LBA range


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.iolog"
    bad.write_text("fio version 3 iolog\n0 d add\n1 d write zero 512\n")
    p = mirrorfw("trace", "stats", str(bad), cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"mirrorfw trace: {bad}:3: offset 'zero' is not an integer"]
    p = mirrorfw("check", "--log", str(bad), "--copy", "mem://?size=1MiB", cwd=tmp_path)
    assert p.returncode == 2 and "not a mirrorfw replay log" in p.stderr
