"""One contract suite for every BlockDevice driver: mem://, file:// (O_DIRECT
and buffered), a loop device (root) through blk://, and every
``--hil-device=URL`` (read-only unless ``--hil-destructive``).

The base class checks bounds and alignment, so every driver must refuse the
same requests with the same errno; the data tests prove each driver stores
what it is given, at many offsets and sizes, concurrently, and after close
refuses everything with EBADF.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random

import pytest

from drivers import open_device
from hal.block import BlockDevice, DeviceError
from hal.url import UrlError

pytestmark = pytest.mark.timeout(120)

SIZE = 16 << 20


def pytest_generate_tests(metafunc) -> None:
    if "kind" in metafunc.fixturenames:
        kinds = ["mem", "file", "file-buffered", "volatile-file", "loop"]
        kinds += [f"hil:{url}" for url in metafunc.config.getoption("hil_device")]
        metafunc.parametrize("kind", kinds)


class Target:
    """How a test reaches one device: its URL, and whether it may write."""

    def __init__(self, url: str, writable: bool, why_not: str = "") -> None:
        self.url = url
        self.writable = writable
        self.why_not = why_not

    def open(self, *, read_only: bool = False) -> BlockDevice:
        return open_device(self.url, read_only=read_only or not self.writable)

    def need_write(self) -> None:
        if not self.writable:
            pytest.skip(self.why_not)


@pytest.fixture
def target(kind, tmp_path, loop_device, hil_destructive) -> Target:
    if kind == "mem":
        return Target(f"mem://?size={SIZE}", True)
    if kind in ("file", "file-buffered"):
        url = f"file://{tmp_path}/dev.img?size={SIZE}" + ("&direct=off" if kind == "file-buffered" else "")
        open_device(url).close()  # created now, so read-only opens find it
        return Target(url, True)
    if kind == "volatile-file":  # drivers.powerloss's write-back cache in front of file://
        url = f"volatile+file://{tmp_path}/dev.img?size={SIZE}"
        open_device(url).close()
        return Target(url, True)
    if kind == "loop":
        return Target(f"blk://{loop_device(SIZE)}", True)
    url = kind.removeprefix("hil:")
    return Target(url, hil_destructive, "read-only: pass --hil-destructive to let the suite write to " + url)


def run(coro):
    return asyncio.run(coro)


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def raises_errno(err: int):
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, et, ev, tb):
            assert et is not None, f"expected DeviceError {errno.errorcode[err]}, nothing raised"
            assert issubclass(et, DeviceError), f"expected DeviceError, got {et.__name__}: {ev}"
            assert ev.errno == err, f"expected {errno.errorcode[err]}, got {errno.errorcode.get(ev.errno)}: {ev}"
            return True

    return _Ctx()


# -- info ------------------------------------------------------------------------
def test_info_describes_a_usable_device(target):
    dev = target.open()
    try:
        info = dev.info
        assert info.block_size >= 512 and info.block_size & (info.block_size - 1) == 0
        assert info.num_blocks > 0
        assert info.size_bytes == info.block_size * info.num_blocks
        d = info.as_dict()
        assert d["physical_block_size"] >= info.block_size
        assert d["transport"] and d["url"] == target.url
    finally:
        dev.close()


# -- data ------------------------------------------------------------------------
def test_round_trips_at_many_offsets_and_sizes(target):
    target.need_write()

    async def go():
        dev = target.open()
        try:
            bs, n = dev.info.block_size, dev.info.num_blocks
            rng = random.Random(7)
            counts = [1, 2, 7, 8, 9, 64, 255, 2048]
            spots = [(0, 1), (n - 1, 1), (n - 8, 8), (0, 2048)]
            spots += [(rng.randrange(0, n - c), c) for c in counts for _ in range(3)]
            for i, (lba, count) in enumerate(spots):
                data = pattern(i, count * bs)
                await dev.write(lba, data)
                got = await dev.read(lba, count)
                assert got == data, f"mismatch at lba {lba} count {count}"
        finally:
            dev.close()

    run(go())


def test_write_leaves_neighbours_untouched(target):
    target.need_write()

    async def go():
        dev = target.open()
        try:
            bs = dev.info.block_size
            base = pattern(1, 32 * bs)
            await dev.write(100, base)
            await dev.write(110, b"\xee" * (3 * bs))
            got = await dev.read(100, 32)
            want = base[: 10 * bs] + b"\xee" * (3 * bs) + base[13 * bs :]
            assert got == want
        finally:
            dev.close()

    run(go())


def test_accepts_any_buffer_type_and_unaligned_memory(target):
    """O_DIRECT needs aligned memory; the driver must copy when it is not."""
    target.need_write()

    async def go():
        dev = target.open()
        try:
            bs = dev.info.block_size
            data = pattern(3, 4 * bs)
            odd = bytearray(b"x" + data)  # the payload starts one byte past the allocation
            await dev.write(10, memoryview(odd)[1:])
            await dev.write(20, bytearray(data))
            await dev.write(30, memoryview(data))
            for lba in (10, 20, 30):
                assert await dev.read(lba, 4) == data
        finally:
            dev.close()

    run(go())


def test_reads_survive_reopen(target):
    target.need_write()
    if target.url.startswith("mem:"):
        pytest.skip("mem:// lives only as long as the object")

    async def go():
        dev = target.open()
        bs = dev.info.block_size
        data = pattern(9, 16 * bs)
        await dev.write(50, data)
        await dev.flush()
        dev.close()
        dev = target.open()
        try:
            assert await dev.read(50, 16) == data
        finally:
            dev.close()

    run(go())


def test_fua_write_and_flush(target):
    target.need_write()

    async def go():
        dev = target.open()
        try:
            bs = dev.info.block_size
            data = pattern(4, 8 * bs)
            await dev.write(40, data, fua=True)
            await dev.flush()
            assert await dev.read(40, 8) == data
        finally:
            dev.close()

    run(go())


def test_flush_on_read_only_open_is_fine(target):
    async def go():
        dev = target.open(read_only=True)
        try:
            await dev.flush()
            assert len(await dev.read(0, 1)) == dev.info.block_size
        finally:
            dev.close()

    run(go())


def test_zeroout_zeroes_exactly_the_range(target):
    target.need_write()

    async def go():
        dev = target.open()
        try:
            bs = dev.info.block_size
            data = pattern(5, 64 * bs)
            await dev.write(200, data)
            await dev.zeroout(210, 20)
            got = await dev.read(200, 64)
            assert got[: 10 * bs] == data[: 10 * bs]
            assert got[10 * bs : 30 * bs] == bytes(20 * bs)
            assert got[30 * bs :] == data[30 * bs :]
        finally:
            dev.close()

    run(go())


def test_discard_is_accepted_and_spares_neighbours(target):
    target.need_write()

    async def go():
        dev = target.open()
        try:
            if not dev.info.discard:
                with raises_errno(errno.EOPNOTSUPP):
                    await dev.discard(0, 8)
                return
            bs = dev.info.block_size
            data = pattern(6, 2048 * bs)
            await dev.write(0, data)
            await dev.discard(512, 1024)  # whole 256 KiB-aligned middle: readable afterwards
            got = await dev.read(0, 2048)
            assert len(got) == 2048 * bs
            assert got[: 512 * bs] == data[: 512 * bs]
            assert got[1536 * bs :] == data[1536 * bs :]
        finally:
            dev.close()

    run(go())


def test_concurrent_io_many_tasks(target):
    target.need_write()

    async def go():
        dev = target.open()
        try:
            bs = dev.info.block_size
            chunks = {i * 16: pattern(100 + i, 8 * bs) for i in range(64)}
            await asyncio.gather(*(dev.write(lba, d) for lba, d in chunks.items()))
            reads = await asyncio.gather(*(dev.read(lba, 8) for lba in chunks))
            assert reads == list(chunks.values())
            # reads and writes interleaved on disjoint ranges
            more = {4096 + i * 8: pattern(300 + i, 8 * bs) for i in range(32)}
            results = await asyncio.gather(
                *(dev.write(lba, d) for lba, d in more.items()),
                *(dev.read(lba, 8) for lba in chunks),
            )
            assert results[len(more):] == list(chunks.values())
            assert [await dev.read(lba, 8) for lba in more] == list(more.values())
        finally:
            dev.close()

    run(go())


def test_close_waits_for_io_in_flight(target):
    """Writes already submitted when close() is called finish and land."""
    target.need_write()
    if target.url.startswith("mem:"):
        pytest.skip("mem:// lives only as long as the object")

    async def go():
        dev = target.open()
        bs = dev.info.block_size
        chunks = {i * 8: pattern(500 + i, 8 * bs) for i in range(32)}
        tasks = [asyncio.ensure_future(dev.write(lba, d)) for lba, d in chunks.items()]
        await asyncio.sleep(0)  # every task has passed its checks and is in the pool
        dev.close()
        await asyncio.gather(*tasks)
        dev = target.open()
        try:
            assert [await dev.read(lba, 8) for lba in chunks] == list(chunks.values())
        finally:
            dev.close()

    run(go())


# -- refusals: the same errno from every driver ----------------------------------
def test_out_of_range_requests_are_refused(target):
    async def go():
        dev = target.open(read_only=not target.writable)
        try:
            n = dev.info.num_blocks
            with raises_errno(errno.EINVAL):
                await dev.read(n, 1)
            with raises_errno(errno.EINVAL):
                await dev.read(n - 1, 2)
            with raises_errno(errno.EINVAL):
                await dev.read(-1, 1)
            if target.writable:
                bs = dev.info.block_size
                with raises_errno(errno.ENOSPC):
                    await dev.write(n, bytes(bs))
                with raises_errno(errno.ENOSPC):
                    await dev.write(n - 1, bytes(2 * bs))
                with raises_errno(errno.ENOSPC):
                    await dev.zeroout(n - 1, 2)
                with raises_errno(errno.ENOSPC):
                    await dev.discard(n, 1)
                with raises_errno(errno.EINVAL):
                    await dev.write(-1, bytes(bs))
        finally:
            dev.close()

    run(go())


def test_misaligned_lengths_are_refused(target):
    target.need_write()

    async def go():
        dev = target.open()
        try:
            bs = dev.info.block_size
            for n in (1, 100, bs - 1, bs + 1, 3 * bs + 7):
                with raises_errno(errno.EINVAL):
                    await dev.write(0, bytes(n))
            assert len(await dev.read(0, 0)) == 0
            await dev.write(0, b"")  # zero blocks: a no-op, not an error
        finally:
            dev.close()

    run(go())


def test_read_only_device_refuses_writes(target):
    async def go():
        dev = target.open(read_only=True)
        try:
            assert dev.info.read_only
            bs = dev.info.block_size
            before = await dev.read(0, 4)
            with raises_errno(errno.EROFS):
                await dev.write(0, bytes(bs))
            with raises_errno(errno.EROFS):
                await dev.zeroout(0, 1)
            with raises_errno(errno.EROFS):
                await dev.discard(0, 1)
            assert await dev.read(0, 4) == before
        finally:
            dev.close()

    run(go())


def test_closed_device_refuses_everything(target):
    async def go():
        dev = target.open(read_only=not target.writable)
        dev.close()
        dev.close()  # idempotent
        bs = dev.info.block_size
        with raises_errno(errno.EBADF):
            await dev.read(0, 1)
        with raises_errno(errno.EBADF):
            await dev.write(0, bytes(bs))
        with raises_errno(errno.EBADF):
            await dev.flush()
        with raises_errno(errno.EBADF):
            await dev.zeroout(0, 1)

    run(go())


# -- opening rules of the fd-backed drivers ----------------------------------------
def test_a_second_writer_is_refused_with_ebusy(kind, target):
    if kind not in ("file", "loop"):
        pytest.skip("exclusive open applies to file:// and blk://")
    dev = target.open()
    try:
        with raises_errno(errno.EBUSY):
            open_device(target.url)
    finally:
        dev.close()
    open_device(target.url).close()  # released on close


def test_file_created_sparse_then_reopened_by_its_size(tmp_path):
    path = tmp_path / "img"
    dev = open_device(f"file://{path}?size=8MiB")
    dev.close()
    assert path.stat().st_size == 8 << 20
    assert path.stat().st_blocks * 512 < (1 << 20)  # sparse
    dev = open_device(f"file://{path}")
    assert dev.info.size_bytes == 8 << 20
    dev.close()


def test_file_grows_but_never_shrinks(tmp_path):
    path = tmp_path / "img"
    open_device(f"file://{path}?size=4MiB").close()
    dev = open_device(f"file://{path}?size=8MiB")
    assert dev.info.size_bytes == 8 << 20
    dev.close()
    with pytest.raises(DeviceError, match="refusing to shrink") as e:
        open_device(f"file://{path}?size=4MiB")
    assert e.value.errno == errno.EINVAL
    assert path.stat().st_size == 8 << 20  # untouched


@pytest.mark.parametrize(
    "url_tail, match",
    [
        ("missing.img", "give \\?size="),
        ("x.img?size=1000", "multiple of block_size"),
        ("x.img?size=1MiB&block_size=1000", "power of two"),
        ("x.img?size=1MiB&direct=maybe", "direct="),
        ("x.img?size=1MiB&colour=red", "unknown option"),
        ("x.img?size=lots", "not a size"),
    ],
)
def test_file_bad_urls_say_what_is_wrong(tmp_path, url_tail, match):
    with pytest.raises(UrlError, match=match):
        open_device(f"file://{tmp_path}/{url_tail}")
    assert not (tmp_path / "x.img").exists()


def test_file_missing_read_only_and_directory(tmp_path):
    with pytest.raises(DeviceError) as e:
        open_device(f"file://{tmp_path}/nope.img?size=1MiB", read_only=True)
    assert e.value.errno == errno.ENOENT and "no such file" in str(e.value)
    with pytest.raises(DeviceError) as e:
        open_device(f"file://{tmp_path}?size=1MiB")
    assert e.value.errno == errno.EISDIR


def test_file_info_says_whether_io_is_direct(tmp_path):
    dev = open_device(f"file://{tmp_path}/a.img?size=1MiB&direct=off")
    assert dev.info.direct_io is False
    dev.close()
    dev = open_device(f"file://{tmp_path}/a.img")
    # ext4/xfs/btrfs/tmpfs (>= 6.6) accept O_DIRECT; either way the flag must match the descriptor
    import fcntl

    flags = fcntl.fcntl(dev.fd, fcntl.F_GETFL)
    assert bool(flags & os.O_DIRECT) == dev.info.direct_io
    dev.close()


def test_blk_refuses_a_regular_file(tmp_path):
    path = tmp_path / "plain"
    path.write_bytes(bytes(4096))
    with pytest.raises(UrlError, match="not a block device.*file://"):
        open_device(f"blk://{path}")


def test_blk_loop_geometry_and_transport(loop_device):
    dev_path = loop_device(8 << 20)
    dev = open_device(f"blk://{dev_path}", read_only=True)
    try:
        info = dev.info
        assert info.transport == "loop"
        assert info.block_size == 512 and info.num_blocks == (8 << 20) // 512
        assert info.direct_io and info.extra["backing_file"].endswith(".img")
        # the loop driver answers neither NVMe nor ATA: probed, then sysfs
        assert "not supported here" in info.extra["nvme_probe"]
    finally:
        dev.close()
    for scheme, name in (("nvme", "NVMe"), ("sata", "SATA")):
        with pytest.raises(DeviceError, match=f"not an? {name} device") as e:
            open_device(f"{scheme}://{dev_path}", read_only=True)
        assert e.value.errno == errno.ENODEV


def test_blk_read_only_loop_refuses_a_writable_open(loop_device):
    dev_path = loop_device(4 << 20, read_only=True)
    with pytest.raises(DeviceError) as e:
        open_device(f"blk://{dev_path}")
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    dev = open_device(f"blk://{dev_path}", read_only=True)
    assert dev.info.read_only
    dev.close()
