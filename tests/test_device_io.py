"""drivers.osio.deviceio.DeviceIo on every path it can take here: io_uring
(when liburing works on this machine), batched pool jobs, and the RWF_NOWAIT
inline path of page-cache descriptors. Real files, real kernel; no mocks."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from drivers.osio import deviceio, pio, uring

PATHS = ["pool", "pool-inline", "uring", "uring-direct", "pool-direct"]


def _want_uring(monkeypatch) -> None:
    """io_uring is opt-in (MIRRORFW_IO_ENGINE=uring): turn it on for this test only."""
    monkeypatch.setenv(uring.ENGINE_ENV, "uring")
    monkeypatch.setattr(uring, "_uring_tried", False)
    monkeypatch.setattr(uring, "_uring_mod", None)
    monkeypatch.setattr(uring, "_uring_all", False)


def _open(tmp_path, path_kind: str, size: int = 1 << 20) -> deviceio.DeviceIo:
    name = tmp_path / "img"
    with open(name, "wb") as f:
        f.truncate(size)
    direct = path_kind.endswith("-direct")
    flags = os.O_RDWR | os.O_CLOEXEC
    if direct:
        fd, direct = pio.open_direct(str(name), flags)
        if not direct or not pio.probe_direct(fd, 4096):
            os.close(fd)
            pytest.skip("this filesystem refuses O_DIRECT")
    else:
        fd = os.open(name, flags)
    dio = deviceio.DeviceIo(fd, direct=direct)
    dio._nowait_reads = dio._nowait_writes = path_kind == "pool-inline" and dio._nowait_reads
    if path_kind.startswith("uring"):
        if uring.ring_module() is None:
            os.close(fd)
            pytest.skip("io_uring (liburing 2024.5.3) is not available here")
        dio._ring_ok = True
    else:
        dio._ring_ok = False
    return dio


@pytest.fixture(params=PATHS)
def dio(request, tmp_path, monkeypatch):
    if request.param.startswith("uring"):
        _want_uring(monkeypatch)
    d = _open(tmp_path, request.param)
    yield d
    d.close()


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.mark.timeout(60)
def test_writes_read_back_in_issue_order(dio):
    async def go():
        for i in range(8):  # each awaited before the next: the last one wins
            await dio.write(bytes([i]) * 4096, 8192)
        assert await dio.read(8192, 4096) == bytes([7]) * 4096
        # many at once, distinct ranges, odd buffer types
        blocks = [os.urandom(4096) for _ in range(40)]
        await asyncio.gather(*(dio.write(memoryview(bytearray(b)), i * 4096) for i, b in enumerate(blocks)))
        # overlapping and not awaited in between: they land in the order issued
        await asyncio.gather(*(dio.write(bytes([i]) * 8192, 524288 + (i % 2) * 4096) for i in range(20)))
        assert await dio.read(524288, 12288) == bytes([18]) * 4096 + bytes([19]) * 8192
        got = await asyncio.gather(*(dio.read(i * 4096, 4096) for i in range(40)))
        assert got == blocks
        await dio.write(b"\x5a" * 8192, 0, dsync=True)
        await dio.fdatasync()
        assert await dio.read(0, 8192) == b"\x5a" * 8192

    _run(go())


@pytest.mark.timeout(60)
def test_read_past_the_end_is_an_oserror_with_errno(dio):
    async def go():
        with pytest.raises(OSError) as e:
            await dio.read((1 << 20) - 4096, 8192)
        assert e.value.errno == errno.EIO

    _run(go())


@pytest.mark.timeout(60)
def test_close_waits_for_in_flight_writes_even_when_the_waiter_gives_up(tmp_path, monkeypatch):
    _want_uring(monkeypatch)
    for kind in PATHS:
        sub = tmp_path / kind
        sub.mkdir()
        try:
            dio = _open(sub, kind)
        except pytest.skip.Exception:
            continue

        async def go(dio=dio):
            tasks = [asyncio.ensure_future(dio.write(b"\x77" * 65536, i * 65536)) for i in range(16)]
            await asyncio.sleep(0)
            for t in tasks[::2]:
                t.cancel()
            dio.close()  # the descriptor stays open until the kernel/worker is done
            await asyncio.gather(*tasks, return_exceptions=True)
            for _ in range(200):
                if dio.inflight == 0:
                    break
                await asyncio.sleep(0.01)
            assert dio.inflight == 0
            with pytest.raises(OSError) as e:
                os.fstat(dio.fd)
            assert e.value.errno == errno.EBADF

        _run(go())
        with open(sub / "img", "rb") as f:
            data = f.read(16 * 65536)
        # uncancelled writes landed; cancelled ones either landed or not, never torn into other files
        for i in range(1, 16, 2):
            assert data[i * 65536 : (i + 1) * 65536] == b"\x77" * 65536


@pytest.mark.parametrize("choice", ["auto", "threads", "uring", "uring-all"])
def test_engine_name_obeys_the_setting_and_names_the_engine_doing_the_io(tmp_path, monkeypatch, choice):
    """MIRRORFW_IO_ENGINE is obeyed (threads: the pool for every descriptor;
    uring, and auto with a known-good liburing: io_uring for O_DIRECT ones
    only; uring-all: for every one, when liburing works here), and
    engine_name() names the engine that really carries a descriptor's I/O
    off the loop."""
    from importlib.metadata import PackageNotFoundError, version

    _want_uring(monkeypatch)
    monkeypatch.setenv(uring.ENGINE_ENV, choice)
    try:
        known_good = version("liburing") in uring.KNOWN_GOOD_LIBURING
    except PackageNotFoundError:
        known_good = False
    asks = choice.startswith("uring") or (choice == "auto" and known_good)
    uring_here = asks and uring.ring_module() is not None
    for direct in (False, True):
        expect = "uring" if uring_here and (direct or choice == "uring-all") else "threads"
        assert uring.engine_name(direct) == expect, (choice, direct)
        name = tmp_path / f"img-{direct}"
        with open(name, "wb") as f:
            f.truncate(1 << 20)
        if direct:
            fd, ok = pio.open_direct(str(name), os.O_RDWR | os.O_CLOEXEC)
            if not ok or not pio.probe_direct(fd, 4096):
                os.close(fd)
                continue  # this filesystem refuses O_DIRECT: nothing to compare
        else:
            fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
        d = deviceio.DeviceIo(fd, direct=direct)
        d._nowait_reads = d._nowait_writes = False  # no inline path: every op goes off the loop

        async def go(d=d):
            await d.write(b"\x5a" * 4096, 8192)
            assert await d.read(8192, 4096) == b"\x5a" * 4096
            return d._ring is not None  # the ring exists once an op went through it

        try:
            assert _run(go()) == (expect == "uring"), (choice, direct)
        finally:
            d.close()


# -- io_uring: a taken SQE slot is always prepared; a sync follows the writes before it --
URING_PATHS = ["uring", "uring-direct"]
BLOCK = 4096


def _stamp(i: int) -> bytes:
    return i.to_bytes(4, "big") * (BLOCK // 4)


async def _fill_every_sq_slot(dio, buf: bytearray, blocks: int) -> None:
    """Write ``blocks`` blocks one at a time from one reused buffer (the caller
    may reuse it once the write is done), so every SQ slot of the ring has
    held a write of that buffer at some other offset."""
    for i in range(blocks):
        buf[:] = _stamp(i)
        await dio.write(buf, i * BLOCK)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", URING_PATHS)
def test_a_sync_through_the_ring_runs_no_stale_write(tmp_path, monkeypatch, kind):
    """Before the fix, fdatasync asked liburing for IORINGFSYNC_DATASYNC (no
    such name) after taking an SQE slot: the op fell back to the pool and the
    slot went to the kernel unprepared, re-running the write that last used
    it, from a buffer that held other data by then (C showed one track's data
    at another's offset). Every op of a uring path must go through the ring."""
    _want_uring(monkeypatch)
    dio = _open(tmp_path, kind, size=(uring.RING_ENTRIES + 64) * BLOCK)
    blocks = uring.RING_ENTRIES + 44
    pooled = []
    monkeypatch.setattr(dio, "_to_pool", lambda loop, op: pooled.append(op.kind) or pytest.fail("op left the ring"))

    async def go():
        buf = bytearray(BLOCK)
        await _fill_every_sq_slot(dio, buf, blocks)
        await dio.fdatasync()
        await dio.write(b"\x01" * BLOCK, 0)  # a submit after the sync's
        return [await dio.read(i * BLOCK, BLOCK) for i in range(1, blocks)]

    try:
        got = _run(go())
    finally:
        dio.close()
    assert pooled == []
    bad = [i for i, b in enumerate(got, 1) if b != _stamp(i)]
    assert bad == [], f"blocks with another block's data: {bad[:8]}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", URING_PATHS)
def test_an_op_the_ring_refuses_leaves_a_no_op_not_a_stale_slot(tmp_path, monkeypatch, kind):
    """A prep that raises after its slot was taken (a buffer liburing will
    not take) sends the op to the pool; the slot must reach the kernel as a
    no-op, not as the earlier write it last held."""
    _want_uring(monkeypatch)
    dio = _open(tmp_path, kind, size=(uring.RING_ENTRIES + 64) * BLOCK)
    blocks = uring.RING_ENTRIES + 20

    class Refusing:
        """liburing with one prep_write that raises after its arguments were checked."""

        def __init__(self, u):
            self._u, self.armed = u, True

        def __getattr__(self, name):
            return getattr(self._u, name)

        def io_uring_prep_write(self, *args):
            if self.armed:
                self.armed = False
                raise TypeError("refused")
            return self._u.io_uring_prep_write(*args)

    async def go():
        buf = bytearray(BLOCK)
        await _fill_every_sq_slot(dio, buf, blocks)
        dio._ring.u = Refusing(dio._ring.u)
        await dio.write(_stamp(blocks), blocks * BLOCK)  # refused by the ring: the pool writes it
        assert not dio._ring.u.armed
        await dio.write(_stamp(blocks + 1), (blocks + 1) * BLOCK)  # through the ring, with the slot after it
        return [await dio.read(i * BLOCK, BLOCK) for i in range(blocks + 2)]

    try:
        got = _run(go())
    finally:
        dio.close()
    bad = [i for i, b in enumerate(got) if b != _stamp(i)]
    assert bad == [], f"blocks with another block's data: {bad[:8]}"


@pytest.mark.timeout(60)
def test_a_sync_completes_only_after_the_writes_issued_before_it(dio):
    """fdatasync covers what was written before it; neither io_uring nor the
    pool orders it after writes still in flight. The second of two
    overlapping writes is held back until the first is done, so a sync
    issued right after them would otherwise finish before it even started."""

    async def go():
        done: list[str] = []

        def note(name):
            return lambda _f: done.append(name)

        w1 = asyncio.ensure_future(dio.write(b"\x11" * 8192, 0))
        w2 = asyncio.ensure_future(dio.write(b"\x22" * 4096, 4096))
        s = asyncio.ensure_future(dio.fdatasync())
        for f, name in ((w1, "w1"), (w2, "w2"), (s, "sync")):
            f.add_done_callback(note(name))
        await asyncio.gather(w1, w2, s)
        assert done.index("sync") > max(done.index("w1"), done.index("w2")), done
        assert await dio.read(0, 8192) == b"\x11" * 4096 + b"\x22" * 4096

    for _ in range(20):
        _run(go())


@pytest.mark.timeout(60)
def test_a_failed_submit_fails_only_the_ops_the_kernel_never_got(monkeypatch):
    """io_uring_enter failing (ENOMEM, say) gives the kernel none of the new
    SQEs, but ops submitted before are still the kernel's: failing those too
    handed their buffers back to the pool (and let the descriptor close)
    while the kernel could still fill them. A read on a socket stays in
    flight until its peer sends, so it is still the kernel's here."""
    _want_uring(monkeypatch)
    monkeypatch.setenv(uring.ENGINE_ENV, "uring-all")  # a socket is not O_DIRECT
    if uring.ring_module() is None:
        pytest.skip("io_uring (liburing 2024.5.3) is not available here")
    import socket

    mine, peer = socket.socketpair()
    dio = deviceio.DeviceIo(os.dup(mine.fileno()), direct=False)
    dio._nowait_reads = dio._nowait_writes = False

    async def go():
        read = asyncio.ensure_future(dio.read(0, 8))
        for _ in range(3):
            await asyncio.sleep(0)  # the read is submitted and waits for data
        ring = dio._ring
        assert ring is not None and len(ring.ops) == 1 and not ring.unsubmitted

        class Failing:
            def __getattr__(self, name):
                return getattr(ring.u.__dict__.get("_u", ring.u), name)

            def io_uring_submit(self, _ring):
                raise OSError(errno.ENOMEM, "no memory")

        real, failing = ring.u, Failing()
        failing.__dict__["_u"] = real
        ring.u = failing
        with pytest.raises(OSError) as e:
            await dio.write(b"abcd", 4096)  # queued (no overlap with the read), then its submit fails
        assert e.value.errno == errno.ENOMEM
        assert not read.done()  # still the kernel's
        ring.u = real
        peer.sendall(b"12345678")
        assert await read == b"12345678"
        assert dio.inflight == 0

    try:
        _run(go())
    finally:
        dio.close()
        mine.close()
        peer.close()


@pytest.mark.timeout(60)
def test_large_transfers_take_the_pool_small_ones_the_ring(tmp_path, monkeypatch):
    """Above RING_MAX_BYTES a read or write goes to the pool even with a ring
    (1 MiB writes were slower through io_uring here); 4 KiB ones take the ring."""
    _want_uring(monkeypatch)
    dio = _open(tmp_path, "uring-direct", size=4 << 20)
    pooled: list[int] = []
    real = dio._to_pool
    monkeypatch.setattr(dio, "_to_pool", lambda loop, op: pooled.append(op.length) or real(loop, op))
    big = deviceio.RING_MAX_BYTES + 4096

    async def go():
        await dio.write(b"\x33" * BLOCK, 0)
        await dio.write(b"\x44" * big, BLOCK)
        assert await dio.read(0, BLOCK + big) == b"\x33" * BLOCK + b"\x44" * big

    try:
        _run(go())
    finally:
        dio.close()
    assert pooled == [big, BLOCK + big]


@pytest.mark.timeout(60)
def test_an_op_on_an_idle_ring_goes_to_the_kernel_when_issued(tmp_path, monkeypatch):
    """At queue depth 1 waiting for the loop turn's io_uring_enter batches
    nothing: the only op in flight is submitted when issued. An op issued
    while others are in flight waits for that one batched enter, and its
    completion is reaped through the ring's descriptor as before."""
    _want_uring(monkeypatch)
    dio = _open(tmp_path, "uring-direct")

    async def go():
        await dio.write(b"\x01" * BLOCK, 0)  # the ring is set up; nothing in flight now
        ring = dio._ring
        first = dio.write(b"\x02" * BLOCK, BLOCK)
        assert len(ring.ops) == 1 and ring.unsubmitted == []  # the kernel has it already
        second = dio.write(b"\x03" * BLOCK, 2 * BLOCK)
        assert len(ring.unsubmitted) == 1  # batched with whatever else this loop turn queues
        await asyncio.gather(first, second)
        assert not ring.ops and not ring.unsubmitted
        return await dio.read(0, 3 * BLOCK)

    try:
        assert _run(go()) == b"\x01" * BLOCK + b"\x02" * BLOCK + b"\x03" * BLOCK
    finally:
        dio.close()
