"""OS primitives the device drivers share: page-aligned buffers for O_DIRECT,
positional I/O that never comes back short, opening with O_DIRECT (and
finding out whether the filesystem allows it), the thread pool that keeps
blocking calls off the event loop, ``DeviceIo`` (a device's reads, writes
and syncs off the loop: io_uring when it works here, else the thread pool),
and errno classification.

io_uring comes from the optional PyPI ``liburing`` (extra ``uring``, pinned
to 2024.5.3: 2026.3.30 died with an illegal instruction on these machines,
which no ``try`` can catch). It is used only when MIRRORFW_IO_ENGINE=uring
(O_DIRECT descriptors) or uring-all asks for it; see _liburing for why the
default stays on the pool. Any failure to import it or to set
up a ring (seccomp, ENOSYS, io_uring_disabled) falls back to the pool.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from hal._ioctl import ffi, lib

log = logging.getLogger(__name__)

PAGE_BYTES = mmap.PAGESIZE
O_DIRECT: int = getattr(os, "O_DIRECT", lib.O_DIRECT)
_RWF_DSYNC: int = getattr(os, "RWF_DSYNC", 0)

# Errors that mean "this device / filesystem does not do that", as opposed to
# "it tried and failed": callers fall back (to sysfs, to buffered I/O, to
# writing zeros) on these and report anything else.
UNSUPPORTED_ERRNOS = frozenset({errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def is_unsupported(err: int | BaseException | None) -> bool:
    if isinstance(err, BaseException):
        err = getattr(err, "errno", None)
    return err in UNSUPPORTED_ERRNOS


# -- the executor ------------------------------------------------------------
T = TypeVar("T")

# Enough threads for queue depth 32 on one device plus a few on others; every
# blocking call releases the GIL (os.pread/pwrite, cffi calls).
IO_THREADS = int(os.environ.get("MIRRORFW_IO_THREADS", "48"))
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="mirrorfw-io")
    return _executor


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call in the I/O thread pool and await its result."""
    return await asyncio.get_running_loop().run_in_executor(executor(), fn, *args)


# -- aligned buffers ---------------------------------------------------------
class AlignedBuffer:
    """Page-aligned anonymous memory (mmap), usable for O_DIRECT I/O."""

    __slots__ = ("size_bytes", "_map", "view")

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self._map = mmap.mmap(-1, max(size_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)[:size_bytes]

    def close(self) -> None:
        self.view.release()
        self._map.close()


class BufferPool:
    """Reuses aligned buffers by size: an mmap/munmap pair per I/O costs more
    than a small 4 KiB write itself."""

    def __init__(self, keep_per_size: int = 64) -> None:
        self._free: dict[int, list[AlignedBuffer]] = {}
        self._lock = threading.Lock()
        self._keep = keep_per_size

    def get(self, size_bytes: int) -> AlignedBuffer:
        with self._lock:
            free = self._free.get(size_bytes)
            if free:
                return free.pop()
        return AlignedBuffer(size_bytes)

    def put(self, buf: AlignedBuffer) -> None:
        with self._lock:
            free = self._free.setdefault(buf.size_bytes, [])
            if len(free) < self._keep and buf.size_bytes <= (4 << 20):
                free.append(buf)
                return
        buf.close()


buffers = BufferPool()


def address_of(data) -> int:
    """The memory address of a bytes-like object (for alignment checks)."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(data)))


def is_aligned(data, alignment: int = PAGE_BYTES) -> bool:
    return address_of(data) % alignment == 0


# -- positional I/O ----------------------------------------------------------
def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset``; a short read (end of file) raises EIO."""
    total = view.nbytes
    done = os.preadv(fd, [view], offset)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"short read: {done} of {total} bytes at offset {offset}")
        done += n


def pwrite_from(fd: int, view, offset: int, flags: int = 0) -> None:
    """Write all of ``view`` at ``offset`` (``flags``: os.RWF_DSYNC etc.)."""
    if type(view) is not memoryview or view.format != "B":
        view = memoryview(view).cast("B")
    total = view.nbytes
    done = os.pwritev(fd, [view], offset, flags) if flags else os.pwrite(fd, view, offset)
    if done == 0 and total:
        raise OSError(errno.EIO, f"short write: 0 of {total} bytes at offset {offset}")
    while done < total:
        if flags:
            n = os.pwritev(fd, [view[done:]], offset + done, flags)
        else:
            n = os.pwrite(fd, view[done:], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"short write: {done} of {total} bytes at offset {offset}")
        done += n


def read_aligned(fd: int, offset: int, length: int) -> bytes:
    """An O_DIRECT-safe read: into a page-aligned buffer, returned as bytes."""
    buf = buffers.get(length)
    try:
        pread_into(fd, buf.view, offset)
        return bytes(buf.view)
    finally:
        buffers.put(buf)


def write_aligned(fd: int, data, offset: int, flags: int = 0) -> None:
    """An O_DIRECT-safe write: data already page-aligned goes as is, anything
    else is copied into an aligned buffer first."""
    view = memoryview(data).cast("B")
    if is_aligned(view):
        pwrite_from(fd, view, offset, flags)
        return
    buf = buffers.get(view.nbytes)
    try:
        buf.view[:] = view
        pwrite_from(fd, buf.view, offset, flags)
    finally:
        buffers.put(buf)


# -- opening -----------------------------------------------------------------
def open_direct(path: str, flags: int, mode: int = 0o644) -> tuple[int, bool]:
    """Open with O_DIRECT, or without when the filesystem refuses it at open
    (tmpfs says EINVAL). Returns (fd, direct)."""
    try:
        return os.open(path, flags | O_DIRECT, mode), True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return os.open(path, flags, mode), False


def drop_direct(fd: int) -> None:
    """Clear O_DIRECT on an open descriptor (fcntl F_SETFL)."""
    import fcntl

    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~O_DIRECT)


def probe_direct(fd: int, block_size: int) -> bool:
    """Some filesystems accept O_DIRECT at open and refuse the I/O, or need a
    larger alignment than ``block_size``: read one block to find out."""
    try:
        buf = buffers.get(block_size)
        try:
            os.preadv(fd, [buf.view], 0)
        finally:
            buffers.put(buf)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True


# -- ioctl and fallocate through cffi -----------------------------------------
def _raise_errno(what: str) -> None:
    err = ffi.errno
    raise OSError(err, f"{what}: {os.strerror(err)}")


def ioctl_ptr(fd: int, request: int, arg, what: str = "ioctl") -> int:
    rc = lib.mfw_ioctl_ptr(fd, request, arg)
    if rc < 0:
        _raise_errno(what)
    return rc


def ioctl_int(fd: int, request: int, arg: int = 0, what: str = "ioctl") -> int:
    rc = lib.mfw_ioctl_int(fd, request, arg)
    if rc < 0:
        _raise_errno(what)
    return rc


def ioctl_u64(fd: int, request: int, what: str) -> int:
    out = ffi.new("uint64_t *")
    ioctl_ptr(fd, request, out, what)
    return int(out[0])


def ioctl_uint(fd: int, request: int, what: str) -> int:
    out = ffi.new("unsigned int *")
    ioctl_ptr(fd, request, out, what)
    return int(out[0])


def ioctl_range(fd: int, request: int, offset: int, length: int, what: str) -> None:
    rng = ffi.new("uint64_t[2]", [offset, length])
    ioctl_ptr(fd, request, rng, what)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if lib.fallocate(fd, mode, offset, length) < 0:
        _raise_errno("fallocate")


FALLOC_PUNCH_HOLE = lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE
FALLOC_ZERO_RANGE = lib.FALLOC_FL_ZERO_RANGE | lib.FALLOC_FL_KEEP_SIZE


def lock_exclusive(fd: int, path: str) -> None:
    """Refuse a second writer of the same image (EBUSY), like O_EXCL does for
    block devices; the lock goes away with the process, even on SIGKILL."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(errno.EBUSY, f"{path} is in use (locked by another opener)") from None


# -- a device's data path off the loop: io_uring, else the thread pool -----------
# uring: io_uring for O_DIRECT descriptors (the device works on many requests at
# once without a thread each), the pool for page-cache ones (ext4 cannot do a
# buffered write without blocking, so io_uring hands each one to a kernel
# worker thread: one switch per write, where a pool job takes a whole batch).
# uring-all: io_uring for every descriptor; threads and auto (the default,
# see _liburing): the pool for every one.
ENGINE_ENV = "MIRRORFW_IO_ENGINE"
URING_KNOWN_GOOD = frozenset({"2024.5.3"})
RING_ENTRIES = 256  # per device; more in flight than this spills to the pool
# Page-cache descriptors first try RWF_NOWAIT on the loop: the kernel completes
# it only when it need not wait (a cache hit; no dirty throttling), else says
# EAGAIN and the op goes off the loop. Bounded so one big copy stays short.
INLINE_MAX_BYTES = 1 << 20
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
# Ops queued in one loop iteration go to the pool as one job per chunk: with
# O_DIRECT the device works on several chunks at once; through the page cache
# one thread doing the whole batch beats many threads fighting for the GIL.
DIRECT_CHUNKS = int(os.environ.get("MIRRORFW_IO_DIRECT_CHUNKS", "8"))

_READ, _WRITE, _FSYNC = 0, 1, 2
_GRAIN_SHIFT = 20  # in-flight ops are indexed by 1 MiB grain for the overlap check
_uring_mod: Any = None
_uring_tried = False
_uring_all = False  # MIRRORFW_IO_ENGINE=uring-all: page-cache descriptors too
_uring_lock = threading.Lock()


def _liburing() -> Any:
    """The liburing module, or None (not installed, untrusted version, or
    io_uring refused here); decided once per process."""
    global _uring_mod, _uring_tried, _uring_all
    with _uring_lock:
        if _uring_tried:
            return _uring_mod
        _uring_tried = True
        choice = os.environ.get(ENGINE_ENV, "auto").strip().lower()
        if choice not in ("auto", "uring", "uring-all", "threads"):
            log.warning("%s=%r: expected auto, uring, uring-all or threads; using auto", ENGINE_ENV, choice)
            choice = "auto"
        if choice in ("threads", "auto"):
            # auto stays on the pool for now: with io_uring the controller crash
            # test (primary.after_recording_on) shows an inconsistent C about half
            # the time, and with IOSQE_IO_DRAIN (strict submission order) it
            # passes: something above relies on ordering the ring does not keep.
            return None
        _uring_all = choice == "uring-all"
        try:
            from importlib.metadata import PackageNotFoundError, version

            try:
                have = version("liburing")
            except PackageNotFoundError:
                return None
            if have not in URING_KNOWN_GOOD and choice == "auto":
                log.warning("liburing %s is not a version known to work here (%s); using the thread pool "
                            "(set %s=uring to try it anyway)", have, ", ".join(sorted(URING_KNOWN_GOOD)), ENGINE_ENV)
                return None
            import liburing

            probe = _Ring.__new__(_Ring)  # a throwaway ring: is io_uring allowed at all?
            probe._setup(liburing, 4)
            probe._exit()
        except Exception as e:  # noqa: BLE001 - ImportError, OSError(ENOSYS/EPERM), anything: fall back
            log.info("io_uring unavailable (%s); device I/O uses the thread pool", e)
            return None
        _uring_mod = liburing
        return liburing


def engine_name(direct: bool = True) -> str:
    """Which path DeviceIo takes off the loop for a descriptor (O_DIRECT or
    not) in this process: "uring" or "threads"."""
    if _liburing() is None:
        return "threads"
    return "uring" if direct or _uring_all else "threads"


class _Op:
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
        self.waiters: list[_Op] = []


def _run_op(fd: int, op: _Op) -> Any:
    """The thread-pool body of one op; returns the read bytes or None."""
    if op.kind == _READ:
        pread_into(fd, op.view, op.offset)
        return bytes(op.buf.view[: op.length])
    if op.kind == _WRITE:
        pwrite_from(fd, op.view, op.offset, op.flags)
        return None
    os.fdatasync(fd)
    return None


class _Ring:
    """An io_uring bound to one event loop: SQEs queued during a loop
    iteration go in with one io_uring_enter; completions wake the loop
    through an eventfd and are reaped in one pass."""

    def _setup(self, u: Any, entries: int) -> None:
        self.u = u
        self.ring = u.io_uring()
        u.io_uring_queue_init(entries, self.ring, 0)
        self.efd = -1
        try:
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            u.io_uring_register_eventfd(self.ring, self.efd)
        except BaseException:
            self._exit()
            raise

    def __init__(self, u: Any, loop: asyncio.AbstractEventLoop, owner: DeviceIo) -> None:
        self._setup(u, RING_ENTRIES)
        self.loop = loop
        self.owner = owner
        self.cqe = u.io_uring_cqe()
        self.ops: dict[int, _Op] = {}
        self.next_id = 1
        self.unsubmitted = 0
        self.submit_scheduled = False
        self.dead = False
        try:
            loop.add_reader(self.efd, self.reap)
        except BaseException:
            self._exit()
            raise

    def room(self) -> bool:
        return not self.dead and len(self.ops) < RING_ENTRIES

    def queue(self, fd: int, op: _Op) -> None:
        u = self.u
        sqe = u.io_uring_get_sqe(self.ring)
        if not sqe:  # SQ full of unsubmitted entries
            self.submit()
            sqe = u.io_uring_get_sqe(self.ring)
            if not sqe:
                raise OSError(errno.EAGAIN, "io_uring submission queue full")
        kind = op.kind
        if kind == _WRITE:
            if op.flags:
                op.iov = u.iovec(op.view)
                u.io_uring_prep_writev2(sqe, fd, op.iov, 1, op.offset, op.flags)
            else:
                u.io_uring_prep_write(sqe, fd, op.view, op.view.nbytes, op.offset)
        elif kind == _READ:
            u.io_uring_prep_read(sqe, fd, op.view, op.view.nbytes, op.offset)
        else:
            u.io_uring_prep_fsync(sqe, fd, u.IORING_FSYNC_DATASYNC)
        ud = self.next_id
        self.next_id = ud + 1
        u.io_uring_sqe_set_data64(sqe, ud)
        self.ops[ud] = op
        self.unsubmitted += 1
        if not self.submit_scheduled:
            self.submit_scheduled = True
            self.loop.call_soon(self.submit)

    def submit(self) -> None:
        self.submit_scheduled = False
        if self.unsubmitted and not self.dead:
            try:
                self.u.io_uring_submit(self.ring)
                self.unsubmitted = 0
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EBUSY, errno.EINTR):
                    self.submit_scheduled = True  # completions first, then try again
                    self.loop.call_soon(self.submit)
                else:
                    self._fail_all(e)
                    return
        self.reap()  # page-cache I/O often completes inside the submit

    def reap(self) -> None:
        if self.dead:
            return
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        u, ring, cqe, ops = self.u, self.ring, self.cqe, self.ops
        peek, seen = u.io_uring_peek_cqe, u.io_uring_cqe_seen
        done = []
        while peek(ring, cqe) == 0:
            res, ud = cqe.res, cqe.user_data
            seen(ring, cqe)
            op = ops.pop(ud, None)
            if op is not None:
                done.append((op, res))
        owner = self.owner
        for op, res in done:
            owner._completed(op, res)

    def _fail_all(self, e: OSError) -> None:
        """io_uring_enter itself failed: nothing queued can be trusted to run;
        fail it all and let this device use the pool from now on."""
        log.warning("io_uring submit failed (%s); falling back to the thread pool", e)
        self.dead = True
        ops, self.ops = list(self.ops.values()), {}
        for op in ops:
            self.owner._finish(op, None, OSError(e.errno or errno.EIO, f"io_uring submit: {e}"))

    def close(self) -> None:
        self.dead = True
        if not self.loop.is_closed():
            try:
                self.loop.remove_reader(self.efd)
            except Exception:  # noqa: BLE001 - a loop going away has nothing to remove
                pass
        self._exit()

    def _exit(self) -> None:
        try:
            self.u.io_uring_queue_exit(self.ring)
        finally:
            if self.efd >= 0:
                os.close(self.efd)
                self.efd = -1


class DeviceIo:
    """Reads, writes and syncs on one descriptor, off the event loop.

    io_uring when available (one ring per device, bound to the loop that
    uses it), else the thread pool with the ops queued during one loop
    iteration run as one job (per chunk) and completed with one wakeup.
    Overlapping ops keep the order they were issued in (a write waits for
    earlier overlapping reads and writes, a read for earlier overlapping
    writes), as a disk controller's overlap check does; io_uring and the pool
    would otherwise run a batch in any order, and callers (the firmware's
    destage and copy-on-write) have come to expect issue order.
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
        self._ring: _Ring | None = None
        self._batch: list[_Op] = []
        self._batch_loop: asyncio.AbstractEventLoop | None = None
        self._nowait_reads = self._nowait_writes = bool(_RWF_NOWAIT) and not direct
        self._ring_ok = _liburing() is not None and (direct or _uring_all)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._grains: dict[int, list[_Op]] = {}

    @property
    def inflight(self) -> int:
        return self._inflight

    # -- the public face ----------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        if (self._nowait_reads and length <= INLINE_MAX_BYTES
                and not (self._grains and self._conflicts(offset, offset + length, False))):
            data = self._read_nowait(offset, length)
            if data is not None:
                return data
        buf = buffers.get(length)
        return await self._submit(_Op(_READ, buf.view, offset, 0, buf, length))

    async def write(self, data, offset: int, *, dsync: bool = False) -> None:
        """Done when all of ``data`` is at ``offset`` (with ``dsync``: on
        stable storage too, RWF_DSYNC)."""
        view = data if type(data) is memoryview and data.format == "B" else memoryview(data).cast("B")
        buf = None
        if self.direct:
            if address_of(view) % PAGE_BYTES:
                buf = buffers.get(view.nbytes)
                buf.view[:] = view
                view = buf.view
        elif (self._nowait_writes and not dsync and view.nbytes <= INLINE_MAX_BYTES
              and not (self._grains and self._conflicts(offset, offset + view.nbytes, True))):
            done = self._write_nowait(view, offset)
            if done == view.nbytes:
                return
            view = view[done:]
            offset += done
        await self._submit(_Op(_WRITE, view, offset, _RWF_DSYNC if dsync else 0, buf, view.nbytes))

    async def fdatasync(self) -> None:
        await self._submit(_Op(_FSYNC, None, 0, 0, None, 0))

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

    def _submit(self, op: _Op) -> asyncio.Future:
        loop = self._running_loop()
        op.fut = fut = loop.create_future()
        with self._lock:
            self._inflight += 1
        if op.kind != _FSYNC:
            deps = self._conflicts(op.lo, op.hi, op.kind == _WRITE) if self._grains else ()
            grains = self._grains
            for g in range(op.lo >> _GRAIN_SHIFT, ((op.hi - 1) >> _GRAIN_SHIFT) + 1):
                grains.setdefault(g, []).append(op)
            if deps:
                op.deps = len(deps)
                for d in deps:
                    d.waiters.append(op)
                return fut  # goes when the last earlier overlapping op is done
        self._dispatch(loop, op)
        return fut

    def _conflicts(self, lo: int, hi: int, writing: bool) -> list[_Op]:
        out: list[_Op] = []
        grains = self._grains
        for g in range(lo >> _GRAIN_SHIFT, ((hi - 1) >> _GRAIN_SHIFT) + 1):
            for other in grains.get(g, ()):
                if other.lo < hi and lo < other.hi and (writing or other.kind == _WRITE) and other not in out:
                    out.append(other)
        return out

    def _forget(self, op: _Op) -> list[_Op]:
        """Drop ``op`` from the overlap index; the ops that may go now."""
        if op.kind == _FSYNC:
            return []
        grains = self._grains
        for g in range(op.lo >> _GRAIN_SHIFT, ((op.hi - 1) >> _GRAIN_SHIFT) + 1):
            ops = grains.get(g)
            if ops is not None:
                try:
                    ops.remove(op)
                except ValueError:
                    pass
                if not ops:
                    del grains[g]
        ready = []
        for w in op.waiters:
            w.deps -= 1
            if w.deps == 0:
                ready.append(w)
        op.waiters = []
        return ready

    def _dispatch(self, loop: asyncio.AbstractEventLoop, op: _Op) -> None:
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

    def _ring_for(self, loop: asyncio.AbstractEventLoop) -> _Ring | None:
        ring = self._ring
        if ring is not None:
            if ring.loop is loop and not ring.dead:
                return ring if ring.room() else None
            if ring.ops:
                return None  # still busy on another loop; the pool serves this one
            ring.close()
            self._ring = None
        u = _liburing()
        if u is None or self._closing:
            return None
        try:
            self._ring = ring = _Ring(u, loop, self)
        except Exception as e:  # noqa: BLE001 - out of rings / memlock: the pool still works
            log.info("io_uring ring setup failed (%s); this device uses the thread pool", e)
            return None
        return ring

    def _completed(self, op: _Op, res: int) -> None:
        """A CQE for ``op``: finish it, or go on after a short transfer."""
        if res < 0:
            self._finish(op, None, OSError(-res, os.strerror(-res)))
            return
        kind = op.kind
        if kind == _FSYNC:
            self._finish(op, None, None)
            return
        view = op.view
        if res >= view.nbytes:
            self._finish(op, bytes(op.buf.view[: op.length]) if kind == _READ else None, None)
            return
        if res == 0:
            what = "read" if kind == _READ else "write"
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

    def _finish(self, op: _Op, result: Any, exc: BaseException | None) -> None:
        if op.buf is not None:
            buffers.put(op.buf)
            op.buf = None
        op.view = op.iov = None
        fut = op.fut
        if not fut.done():
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)
        ready = self._forget(op)
        self._op_done()
        if ready:
            loop = fut.get_loop()
            for w in ready:
                self._dispatch(loop, w)

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
    def _to_pool(self, loop: asyncio.AbstractEventLoop, op: _Op) -> None:
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
        if any(op.kind == _FSYNC for op in batch):
            chunks = len(batch)  # a sync must not wait behind a chunk of writes
        step = -(-len(batch) // chunks)
        pool = executor()
        for i in range(0, len(batch), step):
            pool.submit(self._run_chunk, loop, batch[i : i + step])

    def _run_chunk(self, loop: asyncio.AbstractEventLoop, ops: list[_Op]) -> None:
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
                op.waiters = []  # the loop that would run them is gone
                self._op_done()

    def _chunk_done(self, results: list) -> None:
        for op, result, exc in results:
            self._finish(op, result, exc)

