"""drivers.powerloss: the volatile write cache, the volatile NVRAM copy, and
the power cut that decides what of them survives.

Every cut is checked against a shadow model: a sector holds its durable
contents (as of its last flush or FUA write) or the newest write to it,
never anything else; an NVRAM word its last persisted value or its newest
store. Outcomes are deterministic from the seed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest

from drivers import open_device, open_nvram
from drivers import powerloss as pl
from drivers.mem import open as open_mem
from hal.block import BlockDevice, DeviceError
from hal.nvram import NvramRegion
from hal.url import UrlError

pytestmark = pytest.mark.timeout(120)

BS = 512


class MemNvram(NvramRegion):
    """The durable copy under a VolatileNvram: a bytearray that counts persists."""

    def __init__(self, size_bytes: int = 64 << 10) -> None:
        self.url = "memnvram://"
        self.size_bytes = size_bytes
        self.buf = bytearray(size_bytes)
        self.persisted: list[tuple[int, int]] = []
        self.closed = False

    @property
    def view(self) -> memoryview:
        return memoryview(self.buf)

    def persist(self, offset: int, length: int) -> None:
        self.persisted.append((offset, length))

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def fresh_default_domain(monkeypatch):
    """Each test gets its own process domain, made from its own environment."""
    monkeypatch.delenv(pl.SEED_ENV, raising=False)
    monkeypatch.delenv(pl.MODE_ENV, raising=False)
    pl.set_default_domain(None)
    yield
    pl.set_default_domain(None)


def run(coro):
    return asyncio.run(coro)


def sector(tag: int, lba: int) -> bytes:
    """A sector that says which write made it and where it belongs."""
    return (f"w{tag:06d}@{lba:08d}:".encode() * 40)[:BS]


def payload(tag: int, lba: int, count: int) -> bytes:
    return b"".join(sector(tag, lba + i) for i in range(count))


def rig(seed: int = 0, *, mode: str = "random", blocks: int = 256, record: bool = False):
    domain = pl.PowerDomain(seed, mode=mode, record=record)
    inner = open_mem(f"mem://?size={blocks * BS}")
    return domain, inner, pl.VolatileDevice(inner, domain)


# -- the BlockDevice contract of the filter ---------------------------------------
def test_info_is_the_inner_info_with_a_write_cache_and_the_filter_in_the_url():
    domain, inner, dev = rig()
    assert dev.info.write_cache is True and inner.info.write_cache is False
    assert dev.info.url == "volatile+" + inner.info.url
    assert (dev.info.block_size, dev.info.num_blocks, dev.info.transport) == (
        inner.info.block_size, inner.info.num_blocks, inner.info.transport)
    assert dev.info.extra["power_seed"] == 0 and domain.devices == [dev]


def test_reads_see_the_cache_and_flush_makes_it_durable():
    async def go():
        domain, inner, dev = rig()
        await inner.write(10, payload(0, 10, 4))
        await dev.write(11, payload(1, 11, 2))
        assert await dev.read(10, 4) == payload(0, 10, 1) + payload(1, 11, 2) + payload(0, 13, 1)
        assert await inner.read(10, 4) == payload(0, 10, 4)  # not durable yet
        assert dev.unflushed_sectors == 2
        await dev.flush()
        assert dev.unflushed_sectors == 0
        assert await inner.read(10, 4) == payload(0, 10, 1) + payload(1, 11, 2) + payload(0, 13, 1)
        assert (domain.stats.writes, domain.stats.flushes, domain.stats.events) == (1, 1, 2)

    run(go())


def test_fua_is_durable_at_once_and_a_later_flush_does_not_undo_it():
    async def go():
        domain, inner, dev = rig()
        await dev.write(20, payload(1, 20, 4))  # cached
        await dev.write(21, payload(2, 21, 2), fua=True)  # durable, supersedes two cached sectors
        assert await inner.read(21, 2) == payload(2, 21, 2)
        assert await dev.read(20, 4) == sector(1, 20) + payload(2, 21, 2) + sector(1, 23)
        await dev.flush()
        assert await inner.read(20, 4) == sector(1, 20) + payload(2, 21, 2) + sector(1, 23)
        assert domain.stats.fua_writes == 1

    run(go())


def test_zeroout_and_discard_pass_through_and_are_durable():
    async def go():
        domain, inner, dev = rig()
        await inner.write(0, payload(0, 0, 16))
        await dev.write(4, payload(1, 4, 8))
        await dev.zeroout(6, 2)
        await dev.discard(10, 2)
        zeros = bytes(2 * BS)
        want = payload(0, 0, 4) + payload(1, 4, 2) + zeros + payload(1, 8, 2) + zeros + payload(0, 12, 4)
        assert await dev.read(0, 16) == want
        domain.cut(mode="drop")  # the zeroed and discarded sectors are durable, the rest of the write is not
        want = payload(0, 0, 6) + zeros + payload(0, 8, 2) + zeros + payload(0, 12, 4)
        assert await inner.read(0, 16) == want

    run(go())


def test_the_base_class_checks_still_apply():
    async def go():
        _, _, dev = rig(blocks=16)
        with pytest.raises(DeviceError, match="past the end"):
            await dev.write(15, bytes(2 * BS))
        with pytest.raises(DeviceError, match="multiple of the block size"):
            await dev.write(0, bytes(100))
        dev.close()
        with pytest.raises(DeviceError, match="closed"):
            await dev.read(0, 1)

    run(go())


# -- cut outcomes against a shadow model ---------------------------------------------
class Shadow:
    """Per sector: the durable contents and the newest unflushed write (tag)."""

    def __init__(self) -> None:
        self.durable: dict[int, int] = {}
        self.newest: dict[int, int] = {}

    def write(self, tag: int, lba: int, count: int, fua: bool) -> None:
        for k in range(lba, lba + count):
            if fua:
                self.durable[k] = tag
                self.newest.pop(k, None)
            else:
                self.newest[k] = tag

    def flush(self) -> None:
        self.durable.update(self.newest)
        self.newest.clear()

    def allowed(self, lba: int) -> set[bytes]:
        old = sector(self.durable[lba], lba) if lba in self.durable else bytes(BS)
        new = {sector(self.newest[lba], lba)} if lba in self.newest else set()
        return {old} | new


async def random_workload(seed: int, dev, shadow: Shadow, steps: int = 40) -> None:
    import random

    rng = random.Random(seed)
    for tag in range(1, steps + 1):
        roll = rng.random()
        if roll < 0.15:
            await dev.flush()
            shadow.flush()
            continue
        count = rng.choice([1, 2, 3, 8, 16])
        lba = rng.randrange(0, dev.info.num_blocks - count)
        fua = roll > 0.9
        await dev.write(lba, payload(tag, lba, count), fua=fua)
        shadow.write(tag, lba, count, fua)


@pytest.mark.parametrize("seed", range(40))
def test_after_a_cut_each_sector_is_old_or_new_and_nothing_else(seed):
    async def go():
        domain, inner, dev = rig(seed, blocks=64)
        shadow = Shadow()
        await random_workload(seed, dev, shadow)
        unflushed = dev.unflushed_sectors
        assert unflushed == len(shadow.newest)
        stats = domain.cut()
        assert stats.sectors_kept + stats.sectors_dropped == unflushed
        got = await inner.read(0, 64)
        kept = 0
        for k in range(64):
            s = got[k * BS : (k + 1) * BS]
            assert s in shadow.allowed(k), f"seed {seed}: lba {k} holds {s[:16]!r}, neither old nor new"
            kept += k in shadow.newest and s == sector(shadow.newest[k], k)
        assert kept == stats.sectors_kept

    run(go())


def test_each_write_is_dropped_kept_or_torn_as_a_whole():
    """Group the sectors each write still has in the cache: a dropped write
    left all of them old, a kept one made all new, a torn one a real mix."""
    async def go():
        seen = {"dropped": 0, "kept": 0, "torn": 0}
        for seed in range(30):
            domain, inner, dev = rig(seed, blocks=256)
            spans = {}
            for tag in range(1, 9):  # disjoint writes of 8 sectors
                lba = tag * 16
                await dev.write(lba, payload(tag, lba, 8))
                spans[tag] = lba
            stats = domain.cut()
            outcomes = {"dropped": 0, "kept": 0, "torn": 0}
            for tag, lba in spans.items():
                got = await inner.read(lba, 8)
                new = [got[i * BS : (i + 1) * BS] == sector(tag, lba + i) for i in range(8)]
                old = [got[i * BS : (i + 1) * BS] == bytes(BS) for i in range(8)]
                assert all(n or o for n, o in zip(new, old, strict=True))
                outcomes["kept" if all(new) else "dropped" if all(old) else "torn"] += 1
            assert outcomes == {"dropped": stats.writes_dropped, "kept": stats.writes_kept,
                                "torn": stats.writes_torn}, f"seed {seed}"
            for k, v in outcomes.items():
                seen[k] += v
        assert all(seen.values()), seen  # 30 seeds x 8 writes show every outcome

    run(go())


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_the_extreme_modes(mode):
    async def go():
        domain, inner, dev = rig(5, mode=mode, blocks=64)
        shadow = Shadow()
        await random_workload(5, dev, shadow)
        assert shadow.newest, "the workload left nothing unflushed: pick another seed"
        stats = domain.cut()
        got = await inner.read(0, 64)
        for k in range(64):
            want = sector(shadow.newest[k], k) if mode == "keep" and k in shadow.newest else (
                sector(shadow.durable[k], k) if k in shadow.durable else bytes(BS))
            assert got[k * BS : (k + 1) * BS] == want
        assert stats.writes_torn == 0
        assert (stats.sectors_dropped if mode == "keep" else stats.sectors_kept) == 0

    run(go())


# -- NVRAM ------------------------------------------------------------------------------
def nvram_rig(seed: int = 0, mode: str = "random"):
    domain = pl.PowerDomain(seed, mode=mode)
    inner = MemNvram(64 << 10)
    return domain, inner, pl.VolatileNvram(inner, domain)


def test_nvram_persist_copies_the_range_and_nothing_else():
    domain, inner, region = nvram_rig()
    assert region.url == "volatile+memnvram://" and region.size_bytes == inner.size_bytes
    region.view[0:8] = b"persistd"
    region.view[100:108] = b"volatile"
    region.persist(0, 8)
    assert bytes(inner.buf[0:8]) == b"persistd" and bytes(inner.buf[100:108]) == bytes(8)
    assert inner.persisted == [(0, 8)] and domain.stats.persists == 1
    with pytest.raises(DeviceError, match="outside the region"):
        region.persist(inner.size_bytes - 4, 8)


@pytest.mark.parametrize("seed", range(20))
def test_nvram_cut_keeps_persisted_ranges_and_each_word_old_or_new(seed):
    import random

    rng = random.Random(seed)
    domain = pl.PowerDomain(seed)
    inner = MemNvram(64 << 10)
    size = inner.size_bytes
    old = rng.randbytes(size)
    inner.buf[:] = old
    region = pl.VolatileNvram(inner, domain)
    assert bytes(region.view) == old  # it starts from the durable contents
    new = bytearray(old)
    persisted = bytearray(old)
    for _ in range(30):
        at, n = rng.randrange(0, size - 300), rng.randrange(1, 300)
        data = rng.randbytes(n)
        region.view[at : at + n] = data
        new[at : at + n] = data
        if rng.random() < 0.4:
            region.persist(at, n)
            persisted[at : at + n] = new[at : at + n]
    stats = domain.cut()
    got = bytes(inner.buf)
    for w in range(0, size, 8):
        assert got[w : w + 8] in (bytes(persisted[w : w + 8]), bytes(new[w : w + 8])), f"seed {seed}: word {w}"
    lines = stats.nvram_lines_kept + stats.nvram_lines_dropped + stats.nvram_lines_torn
    assert lines == sum(persisted[i : i + 64] != new[i : i + 64] for i in range(0, size, 64))


def test_nvram_extreme_modes_and_dead_view():
    for mode in ("keep", "drop"):
        domain, inner, region = nvram_rig(mode=mode)
        region.view[0:8] = b"persistd"
        region.persist(0, 8)
        region.view[4096:4104] = b"unsynced"
        domain.cut()
        assert bytes(inner.buf[0:8]) == b"persistd"
        assert bytes(inner.buf[4096:4104]) == (b"unsynced" if mode == "keep" else bytes(8))
        region.view[8192:8200] = b"too late"  # no power: the durable copy never sees it
        with pytest.raises(pl.PowerLost):
            region.persist(8192, 8)
        assert bytes(inner.buf[8192:8200]) == bytes(8)
        region.close()
        assert inner.closed


# -- determinism ------------------------------------------------------------------------
async def mixed_workload(domain: pl.PowerDomain):
    """Two devices and one NVRAM region, a fixed sequence of persist points.
    Returns the inner objects; raises PowerLost when the domain is armed."""
    inners = [open_mem(f"mem://?size={64 * BS}") for _ in range(2)]
    devs = [pl.VolatileDevice(i, domain) for i in inners]
    nv = MemNvram(16 << 10)
    region = pl.VolatileNvram(nv, domain)
    for step in range(1, 25):
        dev = devs[step % 2]
        lba = (step * 7) % 56
        await dev.write(lba, payload(step, lba, 1 + step % 5), fua=step % 11 == 0)
        region.view[step * 40 : step * 40 + 16] = step.to_bytes(2, "little") * 8
        if step % 3 == 0:
            region.persist(step * 40, 16)
        if step % 5 == 0:
            await dev.flush()
    return inners, nv


async def run_and_cut(seed: int, arm: int | None = None):
    domain = pl.PowerDomain(seed, record=True)
    if arm:
        domain.arm(arm)
    try:
        inners, nv = await mixed_workload(domain)
        domain.cut()
    except pl.PowerLost:
        inners = [d.inner for d in domain.devices]
        nv = domain.regions[0].inner
    images = [await i.read(0, 64) for i in inners]
    return domain, images + [bytes(nv.buf)]


def test_the_same_seed_and_events_give_the_same_outcome():
    async def go():
        outcomes = {}
        for seed in range(6):
            a_dom, a = await run_and_cut(seed)
            b_dom, b = await run_and_cut(seed)
            assert a == b and a_dom.stats == b_dom.stats and a_dom.history == b_dom.history
            outcomes[seed] = a
        assert len({tuple(v) for v in outcomes.values()}) > 1, "every seed cut the same way"

    run(go())


def test_arm_cuts_at_exactly_the_nth_event_with_it_in_flight():
    async def go():
        full, _ = await run_and_cut(0)
        total = full.stats.events
        assert total == full.stats.writes + full.stats.fua_writes + full.stats.flushes + full.stats.persists
        for n in range(1, total + 1):
            domain, images = await run_and_cut(3, arm=n)
            assert domain.dead and domain.stats.cut_at_event == n and domain.stats.events == n
            assert domain.history == full.history[:n]  # the same events, and none after the cut
            again, images_again = await run_and_cut(3, arm=n)
            assert images == images_again
        with pytest.raises(ValueError):
            full.arm(0)

    run(go())


def test_an_armed_flush_makes_nothing_durable_and_an_armed_write_may_land():
    async def go():
        domain, inner, dev = rig(mode="drop")
        await dev.write(0, payload(1, 0, 2))
        domain.arm(1)
        with pytest.raises(pl.PowerLost):
            await dev.flush()
        assert await inner.read(0, 2) == bytes(2 * BS)
        domain, inner, dev = rig(mode="keep")
        domain.arm(1)
        with pytest.raises(pl.PowerLost):
            await dev.write(0, payload(1, 0, 2), fua=True)  # in flight: the keep mode lets it land
        assert await inner.read(0, 2) == payload(1, 0, 2)

    run(go())


# -- a dead domain, and power back on ----------------------------------------------------
def test_a_dead_domain_refuses_everything_and_except_exception_does_not_catch_it():
    async def go():
        domain, inner, dev = rig(mode="drop")
        nv = MemNvram()
        region = pl.VolatileNvram(nv, domain)
        await dev.write(0, payload(1, 0, 1))
        domain.cut()
        for call in (dev.read(0, 1), dev.write(0, bytes(BS)), dev.write(0, bytes(BS), fua=True),
                     dev.flush(), dev.zeroout(0, 1), dev.discard(0, 1)):
            with pytest.raises(pl.PowerLost):
                await call
        with pytest.raises(pl.PowerLost):
            region.persist(0, 8)
        assert not issubclass(pl.PowerLost, Exception)
        try:
            try:
                await dev.flush()
            except Exception:  # noqa: BLE001 - what firmware handlers look like
                pytest.fail("PowerLost was caught by except Exception")
        except pl.PowerLost:
            pass
        with pytest.raises(RuntimeError, match="already cut"):
            domain.cut()
        assert domain.stats.events == 1  # calls on a dead domain are not events

    run(go())


def test_power_on_gives_fresh_filters_over_what_survived():
    async def go():
        domain, inner, dev = rig(mode="keep")
        nv = MemNvram()
        region = pl.VolatileNvram(nv, domain)
        await dev.write(3, payload(1, 3, 2))
        region.view[0:4] = b"kept"
        with pytest.raises(RuntimeError, match="after cut"):
            domain.power_on()
        domain.cut()
        new = domain.power_on()
        assert new.boot == 1 and not new.dead and new.seed == domain.seed
        (dev2,), (region2,) = new.devices, new.regions
        assert dev2.inner is inner and region2.inner is nv and dev2 is not dev
        assert await dev2.read(3, 2) == payload(1, 3, 2) and bytes(region2.view[0:4]) == b"kept"
        with pytest.raises(pl.PowerLost):
            await dev.read(0, 1)  # the old filter stays dead
        dev.close()  # and no longer owns the inner objects
        region.close()
        assert not inner.closed and not nv.closed
        await dev2.write(0, payload(2, 0, 1))
        dev2.close()  # a clean close writes the cache back
        region2.view[8:12] = b"more"
        region2.close()
        assert inner.closed and nv.closed
        assert bytes(inner._chunks[0][:BS]) == payload(2, 0, 1)  # a closed mem:// refuses reads
        assert bytes(nv.buf[8:12]) == b"more"

    run(go())


class SlowDevice(BlockDevice):
    """An inner device that really awaits (as nbd:// does): a cut cannot write it synchronously."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(dataclasses.replace(inner.info, url="slow://"))
        self.inner = inner

    async def _read(self, lba: int, count: int) -> bytes:
        await asyncio.sleep(0)
        return await self.inner.read(lba, count)

    async def _write(self, lba: int, data, fua: bool) -> None:
        await asyncio.sleep(0)
        await self.inner.write(lba, data, fua=fua)


def test_kept_writes_to_an_asynchronous_inner_device_land_on_settle():
    async def go():
        domain = pl.PowerDomain(0, mode="keep")
        mem = open_mem(f"mem://?size={16 * BS}")
        dev = pl.VolatileDevice(SlowDevice(mem), domain)
        await dev.write(2, payload(1, 2, 3))
        domain.cut()
        assert await mem.read(2, 3) == bytes(3 * BS)
        with pytest.raises(RuntimeError, match="settle"):
            domain.power_on()
        await domain.settle()
        assert await mem.read(2, 3) == payload(1, 2, 3)
        (dev2,) = domain.power_on().devices
        assert await dev2.read(2, 3) == payload(1, 2, 3)

    run(go())


# -- URLs -----------------------------------------------------------------------------------
def test_volatile_urls_share_the_process_domain(tmp_path, monkeypatch):
    monkeypatch.setenv(pl.SEED_ENV, "42")
    monkeypatch.setenv(pl.MODE_ENV, "keep")
    a = open_device("volatile+mem://?size=1MiB")
    b = open_device(f"volatile+file://{tmp_path}/b.img?size=1MiB")
    nv = open_nvram(f"volatile+nvram://{tmp_path}/p.nvram?size=64KiB")
    try:
        domain = pl.default_domain()
        assert domain.seed == 42 and domain.mode == "keep"
        assert domain.devices == [a, b] and domain.regions == [nv]
        assert b.info.url == f"volatile+file://{tmp_path}/b.img?size=1MiB" and b.info.transport == "file"
        assert isinstance(nv, pl.VolatileNvram) and nv.size_bytes == 64 << 10
    finally:
        a.close()
        b.close()
        nv.close()
    assert domain.devices == [] and domain.regions == []


def test_read_only_volatile_device(tmp_path):
    open_device(f"file://{tmp_path}/a.img?size=1MiB").close()
    dev = open_device(f"volatile+file://{tmp_path}/a.img", read_only=True)
    try:
        assert dev.info.read_only and dev.inner.info.read_only
    finally:
        dev.close()


@pytest.mark.parametrize(
    "url, match",
    [
        ("volatile+", "is not a URL"),
        ("volatile+://x", "needs a device URL after it"),
        ("volatile+volatile+mem://?size=1MiB", "one volatile\\+ layer is enough"),
        ("volatile+foo://x", "unknown device scheme 'foo'"),
        ("volatile+mem://", "needs \\?size="),
        ("volatile+mem://?size=1MiB&colour=red", "unknown option.*colour"),
        ("volatile+nvram:///tmp/x.nvram?size=64KiB", "not a block device; open it with open_nvram"),
        ("bogus://x", "each also as volatile\\+<scheme>"),
    ],
)
def test_bad_device_urls_say_what_is_wrong(url, match):
    with pytest.raises(UrlError, match=match):
        open_device(url)


def test_bad_nvram_urls_and_environment(tmp_path, monkeypatch):
    with pytest.raises(UrlError, match="unknown NVRAM scheme 'volatile\\+mem'.*volatile\\+nvram"):
        open_nvram("volatile+mem://?size=1MiB")
    with pytest.raises(UrlError, match="persist='sometimes'"):
        open_nvram(f"volatile+nvram://{tmp_path}/p.nvram?size=64KiB&persist=sometimes")
    pl.set_default_domain(None)  # the environment is read when the process domain is made
    monkeypatch.setenv(pl.SEED_ENV, "lucky")
    with pytest.raises(UrlError, match="MIRRORFW_POWER_SEED='lucky'.*integer"):
        open_device("volatile+mem://?size=1MiB")
    monkeypatch.setenv(pl.SEED_ENV, "1")
    monkeypatch.setenv(pl.MODE_ENV, "maybe")
    with pytest.raises(UrlError, match="MIRRORFW_POWER_MODE='maybe'"):
        open_device("volatile+mem://?size=1MiB")


def test_opening_on_a_dead_process_domain_says_power_is_off():
    dev = open_device("volatile+mem://?size=1MiB")
    pl.default_domain().cut()
    with pytest.raises(pl.PowerLost, match="power_on"):
        open_device("volatile+mem://?size=1MiB")
    new = pl.default_domain().power_on()
    assert pl.default_domain() is new
    open_device("volatile+mem://?size=1MiB").close()
    dev.close()


# -- a real process loses power -------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from drivers import open_device, open_nvram
    from drivers.powerloss import cut_power_and_exit

    def sector(tag, lba):
        return (f"w{tag:06d}@{lba:08d}:".encode() * 40)[:512]

    async def main(dev_url, nv_url, seed):
        dev = open_device(dev_url)
        nv = open_nvram(nv_url)
        await dev.write(0, b"".join(sector(1, k) for k in range(0, 8)))
        await dev.flush()                                  # durable
        await dev.write(8, b"".join(sector(2, k) for k in range(8, 12)), fua=True)  # durable
        for tag in range(3, 11):                           # unflushed: 8 writes of 4 sectors
            lba = tag * 16
            await dev.write(lba, b"".join(sector(tag, k) for k in range(lba, lba + 4)))
        nv.view[0:16] = b"persisted-record"
        nv.persist(0, 16)
        for i in range(64):                                # unpersisted: 64 lines
            nv.view[4096 + i * 64 : 4096 + i * 64 + 64] = bytes([i + 1]) * 64
        cut_power_and_exit(seed)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


def cut_child(tmp_path, name: str, seed: int, mode: str = "random") -> tuple[bytes, bytes, str]:
    img, nvf = tmp_path / f"{name}.img", tmp_path / f"{name}.nvram"
    env = {**os.environ, pl.MODE_ENV: mode}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, f"volatile+file://{img}?size=1MiB", f"volatile+nvram://{nvf}?size=64KiB",
         str(seed)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert proc.returncode == pl.EXIT_STATUS, proc.stderr
    assert "mirrorfw: power cut: events=" in proc.stderr, proc.stderr
    return img.read_bytes(), nvf.read_bytes(), proc.stderr


def test_a_process_that_loses_power_leaves_durable_data_and_old_or_new_elsewhere(tmp_path):
    outcomes = set()
    for seed in (1, 2):
        img, nv, stderr = cut_child(tmp_path, f"s{seed}", seed)
        assert img[: 12 * BS] == payload(1, 0, 8) + payload(2, 8, 4)
        for tag in range(3, 11):
            lba = tag * 16
            for k in range(lba, lba + 4):
                got = img[k * BS : (k + 1) * BS]
                assert got in (sector(tag, k), bytes(BS)), f"seed {seed}: lba {k}"
                outcomes.add(got == bytes(BS))
        assert nv[0:16] == b"persisted-record"
        for i in range(64):
            line = nv[4096 + i * 64 : 4096 + i * 64 + 64]
            for w in range(0, 64, 8):
                assert line[w : w + 8] in (bytes([i + 1]) * 8, bytes(8)), f"seed {seed}: line {i}"
        # the same seed and events cut the same way in another process
        again = cut_child(tmp_path, f"again{seed}", seed)
        assert (again[0], again[1]) == (img, nv)
    assert outcomes == {True, False}, "two seeds x 32 sectors: some kept, some dropped"


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_a_process_cut_in_the_extreme_modes(tmp_path, mode):
    img, nv, _ = cut_child(tmp_path, mode, 0, mode)
    for tag in range(3, 11):
        lba = tag * 16
        want = payload(tag, lba, 4) if mode == "keep" else bytes(4 * BS)
        assert img[lba * BS : (lba + 4) * BS] == want
    want_nv = b"".join(bytes([i + 1]) * 64 for i in range(64)) if mode == "keep" else bytes(4096)
    assert nv[4096 : 4096 + 4096] == want_nv and nv[0:16] == b"persisted-record"
