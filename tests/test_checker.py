"""The cut checker on consistent copies and on each kind of broken copy, built on purpose."""

from __future__ import annotations

import asyncio

import pytest

from drivers import open_device
from testbench import stamp
from testbench.checker import check_copy
from testbench.replaylog import LogVolumeInfo, ReplayLog, WriteRecord, write_log

pytestmark = pytest.mark.timeout(60)
BS = 512
VOL_BLOCKS = 256


def devices(n: int = 2):
    return [open_device(f"mem://?size={VOL_BLOCKS * BS}") for _ in range(n)]


def sequential_log() -> list[WriteRecord]:
    """Ten writes, one after another (each acked before the next is issued),
    alternating volumes; write 9 overwrites write 3's blocks; write 4 has 4 blocks."""
    spots = {1: (0, 0, 1), 2: (1, 0, 1), 3: (0, 10, 2), 4: (1, 20, 4), 5: (0, 30, 1),
             6: (1, 40, 1), 7: (0, 50, 1), 8: (1, 60, 1), 9: (0, 10, 2), 10: (1, 70, 1)}
    return [WriteRecord(i, v, lba, n, issue_ns=i * 100, ack_ns=i * 100 + 50) for i, (v, lba, n) in spots.items()]


async def apply(devs, writes, *, skip_blocks=()):
    for w in sorted(writes, key=lambda w: w.write_id):
        data = stamp.encode(w.write_id, w.volume, w.lba, w.nblocks, BS)
        for i in range(w.nblocks):
            if (w.volume, w.lba + i) not in skip_blocks:
                await devs[w.volume].write(w.lba + i, data[i * BS:(i + 1) * BS])


def prefix(log, k):
    return [w for w in log if w.write_id <= k]


async def run_check(devs, log, **kw):
    return await check_copy(devs, log, **kw)


def check(build, log=None, **kw):
    log = log or sequential_log()

    async def go():
        devs = devices()
        await build(devs, log)
        return await run_check(devs, log, **kw)

    return asyncio.run(go())


def test_every_prefix_is_consistent():
    for k in range(0, 11):
        r = check(lambda devs, log, k=k: apply(devs, prefix(log, k)))
        assert r.consistent, (k, r.summary())
        assert r.shown_writes == k - (1 if k >= 9 else 0)  # write 3 is overwritten by 9


def test_exposure_is_check_time_minus_cut_time():
    r = check(lambda devs, log: apply(devs, prefix(log, 6)), check_ns=2000)
    assert r.consistent and r.t_star_ns == 600 and r.t_star_write == 6
    assert r.data_exposure_s == pytest.approx((2000 - 600) / 1e9)
    assert r.missing_acked_before_check == 4


def test_write_in_flight_at_the_cut_may_be_missing():
    log = sequential_log()
    log[6] = WriteRecord(7, 0, 50, 1, issue_ns=700, ack_ns=1200)  # issued, acked after write 8 was issued
    log[7] = WriteRecord(8, 1, 60, 1, issue_ns=800, ack_ns=850)
    r = check(lambda devs, log: apply(devs, [w for w in prefix(log, 8) if w.write_id != 7]), log)
    assert r.consistent, r.summary()


def test_never_acknowledged_write_may_be_shown():
    log = sequential_log()
    log[5] = WriteRecord(6, 1, 40, 1, issue_ns=600, ack_ns=None)
    r = check(lambda devs, log: apply(devs, prefix(log, 6)), log[:6])
    assert r.consistent, r.summary()


def test_copy_mixing_two_cgs_is_caught():
    async def build(devs, log):
        await apply(devs[:1], [w for w in prefix(log, 4) if w.volume == 0])  # vol0 from the CG at write 4
        await apply([None, devs[1]], [w for w in prefix(log, 8) if w.volume == 1])  # vol1 from the CG at write 8

    r = check(build)
    assert not r.consistent
    kinds = {(v.kind, v.volume, v.lacks) for v in r.violations}
    assert ("lost-write", "vol0", 5) in kinds and ("lost-write", "vol0", 7) in kinds
    v5 = next(v for v in r.violations if v.lacks == 5)
    assert v5.lba == 30 and v5.shows is None and "write 8" in v5.message


def test_torn_multi_block_write_is_caught():
    # write 4 covers vol1 blocks 20..23; the copy has only its first two blocks
    r = check(lambda devs, log: apply(devs, prefix(log, 6), skip_blocks={(1, 22), (1, 23)}))
    assert not r.consistent
    (v,) = [v for v in r.violations if v.lacks == 4]
    assert v.kind == "torn-write" and (v.volume, v.lba) == ("vol1", 22)


def test_torn_dependent_writes_across_volumes_are_caught():
    # write 5 (vol0) was acked before write 6 (vol1) was issued; a copy with 6 but not 5 is torn
    r = check(lambda devs, log: apply(devs, [w for w in prefix(log, 6) if w.write_id != 5]))
    assert not r.consistent
    assert [(v.kind, v.volume, v.lba, v.lacks) for v in r.violations] == [("lost-write", "vol0", 30, 5)]


def test_lost_write_is_caught():
    r = check(lambda devs, log: apply(devs, prefix(log, 8), skip_blocks={(0, 0)}))
    assert not r.consistent
    assert [(v.kind, v.lba, v.shows, v.lacks) for v in r.violations] == [("lost-write", 0, None, 1)]
    assert "shows nothing, lacks write 1" in r.violations[0].message


def test_stale_block_is_caught():
    async def build(devs, log):
        await apply(devs, prefix(log, 10))
        await devs[0].write(10, stamp.encode(3, 0, 10, 2, BS))  # write 9's blocks revert to write 3's image

    r = check(build)
    assert not r.consistent
    assert [(v.kind, v.lba, v.shows, v.lacks) for v in r.violations] == [("stale-block", 10, 3, 9)]


def test_partly_stale_write_is_reported_as_torn():
    async def build(devs, log):
        await apply(devs, prefix(log, 10))
        await devs[0].write(11, stamp.encode(3, 0, 10, 2, BS)[BS:])  # only block 11 reverts

    r = check(build)
    assert [(v.kind, v.lba, v.shows, v.lacks) for v in r.violations] == [("torn-write", 11, 3, 9)]


def test_foreign_misplaced_corrupt_and_unknown_blocks_are_caught():
    async def build(devs, log):
        await apply(devs, prefix(log, 10))
        await devs[0].write(100, b"x" * BS)
        await devs[0].write(101, stamp.encode(5, 0, 30, 1, BS))  # write 5's stamp on the wrong block
        await devs[1].write(102, stamp.encode(99, 1, 102, 1, BS))  # a write the log never had
        torn = bytearray(stamp.encode(6, 1, 103, 1, BS))
        torn[100] ^= 1
        await devs[1].write(103, bytes(torn))

    r = check(build)
    assert {v.kind for v in r.violations} == {"foreign-data", "misplaced", "unknown-write", "corrupt"}


def test_check_reads_a_log_file_twice(tmp_path):
    path = tmp_path / "r.log"
    write_log(path, [LogVolumeInfo("a", BS, VOL_BLOCKS), LogVolumeInfo("b", BS, VOL_BLOCKS)], sequential_log())
    rlog = ReplayLog(path)
    assert len(rlog) == 10 and [v.name for v in rlog.volumes] == ["a", "b"]
    r = check(lambda devs, log: apply(devs, prefix(sequential_log(), 7)), rlog, names=["a", "b"])
    assert r.consistent and r.logged_writes == 10 and r.t_star_write == 7


def test_too_many_violations_are_counted_but_few_explained():
    r = check(lambda devs, log: apply(devs, [w for w in log if w.write_id == 10]), max_violations=2)
    assert not r.consistent and len(r.violations) == 2 and r.violation_count == 9  # writes 1..9


def test_a_generator_is_refused_because_the_check_reads_the_log_twice():
    """A one-shot iterator would be empty on the second pass and the check would
    pass without judging a single write: refuse it instead."""

    async def go(writes):
        devs = devices()
        await apply(devs, prefix(sequential_log(), 6), skip_blocks={(0, 0)})  # inconsistent: write 1 is lost
        return await check_copy(devs, writes)

    with pytest.raises(TypeError, match="one-shot iterator"):
        asyncio.run(go(w for w in sequential_log()))
    with pytest.raises(TypeError, match="one-shot iterator"):
        asyncio.run(go(lambda: iter(sequential_log())))
    assert not asyncio.run(go(lambda: list(sequential_log()))).consistent
    assert not asyncio.run(go(tuple(sequential_log()))).consistent
