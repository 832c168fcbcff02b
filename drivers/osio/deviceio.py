"""``DeviceIo``: one device's reads, writes and syncs off the event loop,
through io_uring when it is on (uring.py), else the thread pool (pool.py).

The file and block drivers hand every data-path op of a descriptor to one
``DeviceIo``, which keeps what a disk controller would keep and neither
io_uring nor a thread pool does by itself: overlapping ops complete in issue
order, an op counts as in flight until the kernel is really done with it
(so the descriptor is closed after the last one), a flush goes only once
the writes issued before it are done, and the ops queued in one
loop iteration go to the pool as a few jobs woken up together rather than a
thread each. Page-cache descriptors first try RWF_NOWAIT on the loop itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from drivers.osio import uring
from drivers.osio.buffers import PAGE_BYTES, AlignedBuffer, address_of, buffers
from drivers.osio.errors import is_unsupported
from drivers.osio.pio import pread_into, pwrite_from
from drivers.osio.pool import executor
from drivers.osio.uring import FSYNC, READ, WRITE

log = logging.getLogger(__name__)
T = TypeVar("T")

_RWF_DSYNC: int = getattr(os, "RWF_DSYNC", 0)
# Page-cache descriptors first try RWF_NOWAIT on the loop: the kernel completes
# it only when it need not wait (a cache hit; no dirty throttling), else says
# EAGAIN and the op goes off the loop. Bounded so one big copy stays short.
INLINE_MAX_BYTES = 1 << 20
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
# Ops queued in one loop iteration go to the pool as one job per chunk: with
# O_DIRECT the device works on several chunks at once; through the page cache
# one thread doing the whole batch beats many threads fighting for the GIL.
DIRECT_CHUNKS = int(os.environ.get("MIRRORFW_IO_DIRECT_CHUNKS", "8"))
# Larger reads and writes go to the pool even with a ring: one thread per
# large transfer costs little, and 1 MiB O_DIRECT writes through io_uring ran
# ~16% slower than pwrite from the pool here (make bench's seqwrite_1m).
RING_MAX_BYTES = int(os.environ.get("MIRRORFW_IO_RING_MAX_BYTES", str(256 << 10)))
_GRAIN_SHIFT = 20  # in-flight ops are indexed by 1 MiB grain for the overlap check


class Op:
    """One read, write or sync in flight. ``view`` is what is still to do
    (it shrinks on a short transfer); ``buf`` a pooled buffer to give back."""

    __slots__ = ("kind", "view", "offset", "flags", "buf", "length", "fut", "iov", "lo", "hi", "deps", "waiters")

    def __init__(self, kind: int, view, offset: int, flags: int, buf: AlignedBuffer | None, length: int) -> None:
        self.kind = kind
        self.view = view
        self.offset = offset
        self.flags = flags
        self.buf = buf
        self.length = length
        self.fut: asyncio.Future | None = None
        self.iov = None
        self.lo = offset  # the byte range, for ordering against overlapping ops
        self.hi = offset + length
        self.deps = 0  # overlapping ops issued earlier and not yet done
        self.waiters: list[Op] | None = None  # made when one waits: most ops overlap nothing


def _run_op(fd: int, op: Op) -> Any:
    """The thread-pool body of one op; returns the read bytes or None."""
    if op.kind == READ:
        pread_into(fd, op.view, op.offset)
        return bytes(op.buf.view[: op.length])
    if op.kind == WRITE:
        pwrite_from(fd, op.view, op.offset, op.flags)
        return None
    os.fdatasync(fd)
    return None


class DeviceIo:
    """Reads, writes and syncs on one descriptor, off the event loop.

    io_uring when available (one ring per device, bound to the loop that
    uses it), else the thread pool with the ops queued during one loop
    iteration run as one job (per chunk) and completed with one wakeup.
    Overlapping ops keep the order they were issued in (a write waits for
    earlier overlapping reads and writes, a read for earlier overlapping
    writes), as a disk controller's overlap check does; io_uring and the pool
    would otherwise run a batch in any order, and callers (the firmware's
    destage and copy-on-write) have come to expect issue order. A sync waits
    for every write issued before it, so it makes them all durable.
    Each op counts as in flight until the kernel or the worker is really done
    with it (not merely until its awaiting task gives up), so ``close()``
    closes the descriptor only after the last one: a reused descriptor number
    never receives a late write. Errors are OSError with the errno.
    """

    def __init__(self, fd: int, *, direct: bool) -> None:
        self.fd = fd
        self.direct = direct
        self._lock = threading.Lock()
        self._inflight = 0
        self._closing = False
        self._fd_closed = False
        self._ring: uring.Ring | None = None
        self._batch: list[Op] = []
        self._batch_loop: asyncio.AbstractEventLoop | None = None
        self._nowait_reads = self._nowait_writes = bool(_RWF_NOWAIT) and not direct
        self._ring_ok = uring.wanted(direct)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._grains: dict[int, list[Op]] = {}

    @property
    def inflight(self) -> int:
        return self._inflight

    # -- the public face ----------------------------------------------------
    # read, write and fdatasync issue the op when called (a coroutine would
    # wait until it is first run) and return a future to await: one coroutine
    # frame less per op on the path every host I/O takes. Issue order is
    # call order, whichever path an op takes.
    def read(self, offset: int, length: int) -> asyncio.Future:
        """``length`` bytes at ``offset``."""
        if (self._nowait_reads and length <= INLINE_MAX_BYTES
                and not (self._grains and self._conflicts(offset, offset + length, False))):
            data = self._read_nowait(offset, length)
            if data is not None:
                return self._done(data)
        buf = buffers.get(length)
        return self._submit(Op(READ, buf.view, offset, 0, buf, length))

    def write(self, data, offset: int, *, dsync: bool = False) -> asyncio.Future:
        """Done when all of ``data`` is at ``offset`` (with ``dsync``: on
        stable storage too, RWF_DSYNC)."""
        buf = None
        if self.direct:
            if type(data) is bytes:
                # The data of a bytes object follows its header, so it is never
                # page-aligned (or, by a rare chance, copied for nothing):
                # copy it without asking where it lies.
                buf = buffers.get(len(data))
                view = buf.view
                view[:] = data
            else:
                view = data if type(data) is memoryview and data.format == "B" else memoryview(data).cast("B")
                if address_of(view) % PAGE_BYTES:
                    buf = buffers.get(view.nbytes)
                    buf.view[:] = view
                    view = buf.view
            return self._submit(Op(WRITE, view, offset, _RWF_DSYNC if dsync else 0, buf, view.nbytes))
        view = data if type(data) is memoryview and data.format == "B" else memoryview(data).cast("B")
        if (self._nowait_writes and not dsync and view.nbytes <= INLINE_MAX_BYTES
              and not (self._grains and self._conflicts(offset, offset + view.nbytes, True))):
            done = self._write_nowait(view, offset)
            if done == view.nbytes:
                return self._done(None)
            view = view[done:]
            offset += done
        return self._submit(Op(WRITE, view, offset, _RWF_DSYNC if dsync else 0, buf, view.nbytes))

    def fdatasync(self) -> asyncio.Future:
        return self._submit(Op(FSYNC, None, 0, 0, None, 0))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Anything else blocking on this descriptor (ioctl, fallocate), in the
        pool, counted as in flight like the rest."""
        with self._lock:
            self._inflight += 1
        cf = executor().submit(fn, *args)
        cf.add_done_callback(self._cf_done)
        return await asyncio.wrap_future(cf)

    # -- on the loop, when the kernel promises not to wait --------------------
    def _read_nowait(self, offset: int, length: int) -> bytes | None:
        buf = bytearray(length)
        try:
            n = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if not is_unsupported(e):
                raise
            self._nowait_reads = False
            return None
        return bytes(buf) if n == length else None  # short: not all cached (or EOF): off the loop

    def _write_nowait(self, view, offset: int) -> int:
        try:
            return os.pwritev(self.fd, [view], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as e:
            if not is_unsupported(e):
                raise
            self._nowait_writes = False  # e.g. ext4 buffered writes: EOPNOTSUPP
            return 0

    def close(self) -> None:
        """Close the descriptor now, or when the last op in flight is done."""
        with self._lock:
            self._closing = True
            idle = self._inflight == 0
        if idle:
            self._teardown()

    # -- plumbing -------------------------------------------------------------
    def _running_loop(self) -> asyncio.AbstractEventLoop:
        # asyncio.get_running_loop() costs a getpid() system call per op on 3.11;
        # one thread runs one loop at a time, so the last one seen, still
        # running on this same thread, is the running loop.
        loop = self._loop
        if loop is None or self._loop_thread != threading.get_ident() or not loop.is_running():
            self._loop = loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        return loop

    def _done(self, result: Any) -> asyncio.Future:
        """A future already done (an op the kernel finished on the loop)."""
        fut = self._running_loop().create_future()
        fut.set_result(result)
        return fut

    def _submit(self, op: Op) -> asyncio.Future:
        loop = self._loop  # _running_loop(), inlined: this runs for every op
        if loop is None or self._loop_thread != threading.get_ident() or not loop.is_running():
            loop = self._running_loop()
        op.fut = fut = loop.create_future()
        with self._lock:
            self._inflight += 1
        grains = self._grains
        kind = op.kind
        if kind != FSYNC:
            lo, hi = op.lo, op.hi
            g = lo >> _GRAIN_SHIFT
            if g == (hi - 1) >> _GRAIN_SHIFT:  # the common case: one grain, listed once
                ops = grains.get(g)
                if ops is None:
                    grains[g] = [op]
                    deps = None
                else:
                    writing = kind == WRITE
                    deps = [o for o in ops if o.lo < hi and lo < o.hi and (writing or o.kind == WRITE)]
                    ops.append(op)
            else:
                deps = self._conflicts(lo, hi, kind == WRITE) if grains else None
                for k in range(g, ((hi - 1) >> _GRAIN_SHIFT) + 1):
                    grains.setdefault(k, []).append(op)
        else:
            # A flush covers every write issued before it: neither io_uring nor
            # the pool orders an fdatasync after writes still in flight, so it
            # waits for them here (later writes do not wait for it).
            deps = self._writes_in_flight() if grains else None
        if deps:
            op.deps = len(deps)
            for d in deps:
                if d.waiters is None:
                    d.waiters = [op]
                else:
                    d.waiters.append(op)
            return fut  # goes when the last earlier op it must follow is done
        ring = self._ring
        if (ring is not None and ring.loop is loop and not ring.dead and len(ring.ops) < uring.RING_ENTRIES
                and op.length <= RING_MAX_BYTES):
            # _dispatch's usual outcome, without its call: the ring takes it
            try:
                ring.queue(self.fd, op)
            except Exception as e:  # noqa: BLE001 - as in _dispatch
                log.debug("io_uring queue failed (%s); this op goes to the pool", e)
                self._to_pool(loop, op)
            return fut
        self._dispatch(loop, op)
        return fut

    def _writes_in_flight(self) -> list[Op]:
        seen: set[int] = set()
        out: list[Op] = []
        for ops in self._grains.values():
            for other in ops:
                if other.kind == WRITE and id(other) not in seen:
                    seen.add(id(other))
                    out.append(other)
        return out

    def _conflicts(self, lo: int, hi: int, writing: bool) -> list[Op]:
        out: list[Op] = []
        grains = self._grains
        for g in range(lo >> _GRAIN_SHIFT, ((hi - 1) >> _GRAIN_SHIFT) + 1):
            for other in grains.get(g, ()):
                if other.lo < hi and lo < other.hi and (writing or other.kind == WRITE) and other not in out:
                    out.append(other)
        return out

    def _forget(self, op: Op) -> list[Op] | None:
        """Drop ``op`` from the overlap index; the ops that may go now."""
        if op.kind == FSYNC:
            return None
        grains = self._grains
        for g in range(op.lo >> _GRAIN_SHIFT, ((op.hi - 1) >> _GRAIN_SHIFT) + 1):
            ops = grains.get(g)
            if ops is not None:
                if len(ops) == 1:
                    if ops[0] is op:
                        del grains[g]
                    continue
                try:
                    ops.remove(op)
                except ValueError:
                    pass
        waiters = op.waiters
        if not waiters:
            return None
        op.waiters = None
        ready = []
        for w in waiters:
            w.deps -= 1
            if w.deps == 0:
                ready.append(w)
        return ready

    def _dispatch(self, loop: asyncio.AbstractEventLoop, op: Op) -> None:
        if op.length > RING_MAX_BYTES:
            self._to_pool(loop, op)
            return
        ring = self._ring
        if ring is None or ring.loop is not loop or not ring.room():
            ring = self._ring_for(loop) if self._ring_ok else None
        if ring is not None:
            try:
                ring.queue(self.fd, op)
                return
            except Exception as e:  # noqa: BLE001 - e.g. a buffer liburing will not take: use the pool
                log.debug("io_uring queue failed (%s); this op goes to the pool", e)
        self._to_pool(loop, op)

    def _ring_for(self, loop: asyncio.AbstractEventLoop) -> uring.Ring | None:
        ring = self._ring
        if ring is not None:
            if ring.loop is loop and not ring.dead:
                return None  # full (_dispatch asks only then): this op goes to the pool
            if ring.ops:
                return None  # still busy on another loop; the pool serves this one
            ring.close()
            self._ring = None
        u = uring.ring_module()
        if u is None or self._closing:
            return None
        try:
            self._ring = ring = uring.Ring(u, loop, self)
        except Exception as e:  # noqa: BLE001 - out of rings / memlock: the pool still works
            log.info("io_uring ring setup failed (%s); this device uses the thread pool", e)
            return None
        return ring

    # -- called by the ring -----------------------------------------------------
    def completed(self, op: Op, res: int) -> None:
        """A CQE for ``op``: finish it, or go on after a short transfer."""
        if res < 0:
            self._finish(op, None, OSError(-res, os.strerror(-res)))
            return
        kind = op.kind
        if kind == FSYNC:
            self._finish(op, None, None)
            return
        view = op.view
        if res >= view.nbytes:
            self._finish(op, None if kind == WRITE else bytes(op.buf.view[: op.length]), None)
            return
        if res == 0:
            what = "read" if kind == READ else "write"
            self._finish(op, None, OSError(errno.EIO, f"short {what}: {op.length - view.nbytes} of "
                                           f"{op.length} bytes at offset {op.offset - op.length + view.nbytes}"))
            return
        op.view = view[res:]
        op.offset += res
        ring = self._ring
        try:
            if ring is None or ring.dead:
                raise OSError(errno.EIO, "ring gone")
            ring.queue(self.fd, op)
        except Exception:  # noqa: BLE001
            self._to_pool(self._running_loop(), op)

    def failed(self, op: Op, exc: BaseException) -> None:
        """The ring gave up on ``op`` without running it."""
        self._finish(op, None, exc)

    def _finish(self, op: Op, result: Any, exc: BaseException | None) -> None:
        buf = op.buf
        if buf is not None:
            buffers.put(buf)
            op.buf = None
        op.view = op.iov = None
        fut = op.fut
        if not fut.done():
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)
        if op.kind != FSYNC:
            # _forget, inlined for the usual op: one grain, nobody waiting
            g = op.lo >> _GRAIN_SHIFT
            ops = self._grains.get(g) if g == (op.hi - 1) >> _GRAIN_SHIFT else None
            if ops is not None and op.waiters is None and len(ops) == 1 and ops[0] is op:
                del self._grains[g]
                ready = None
            else:
                ready = self._forget(op)
            if ready:
                loop = fut.get_loop()
                for w in ready:
                    self._dispatch(loop, w)
        with self._lock:  # _op_done, inlined
            self._inflight -= 1
            last = self._closing and self._inflight == 0
        if last:
            self._teardown()

    def _op_done(self) -> None:
        with self._lock:
            self._inflight -= 1
            last = self._closing and self._inflight == 0
        if last:
            self._teardown()

    def _cf_done(self, _cf) -> None:
        self._op_done()

    def _teardown(self) -> None:
        with self._lock:
            if self._fd_closed:
                return
            self._fd_closed = True
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()
        os.close(self.fd)

    # -- the thread-pool path: one job per chunk of a loop iteration's ops ----
    def _to_pool(self, loop: asyncio.AbstractEventLoop, op: Op) -> None:
        if self._batch and self._batch_loop is not loop:
            self._kick()
        self._batch.append(op)
        if len(self._batch) == 1:
            self._batch_loop = loop
            loop.call_soon(self._kick)

    def _kick(self) -> None:
        batch, self._batch = self._batch, []
        loop = self._batch_loop
        if not batch:
            return
        chunks = min(len(batch), DIRECT_CHUNKS) if self.direct else 1
        if any(op.kind == FSYNC for op in batch):
            chunks = len(batch)  # a sync must not wait behind a chunk of writes
        step = -(-len(batch) // chunks)
        pool = executor()
        for i in range(0, len(batch), step):
            pool.submit(self._run_chunk, loop, batch[i : i + step])

    def _run_chunk(self, loop: asyncio.AbstractEventLoop, ops: list[Op]) -> None:
        fd = self.fd
        results = []
        for op in ops:
            try:
                results.append((op, _run_op(fd, op), None))
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
                results.append((op, None, e))
        try:
            loop.call_soon_threadsafe(self._chunk_done, results)
        except RuntimeError:  # the loop is closed: nobody awaits; still account for them
            for op, _, _ in results:
                if op.buf is not None:
                    buffers.put(op.buf)
                    op.buf = None
                op.waiters = None  # the loop that would run them is gone
                self._op_done()

    def _chunk_done(self, results: list) -> None:
        for op, result, exc in results:
            self._finish(op, result, exc)
