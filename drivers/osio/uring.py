"""The io_uring engine: one ring per device and event loop, fed from the
loop with no thread per request.

With O_DIRECT the device works on many requests at once; the thread pool
needs a thread (and a GIL hand-off) for each, io_uring one io_uring_enter per
loop iteration for all the SQEs queued in it, and completions wake the loop
through the ring's own descriptor (readable while the CQ holds entries).
``DeviceIo`` (deviceio.py) decides per op whether a ring or the pool takes
it; this module only sets rings up and runs them.

io_uring comes from the optional PyPI ``liburing`` (extra ``uring``, pinned
to 2024.5.3: 2026.3.30 died with an illegal instruction on these machines,
which no ``try`` can catch). MIRRORFW_IO_ENGINE picks the engine (see
``ring_module``): by default (auto) O_DIRECT descriptors use io_uring where
the pinned liburing is installed and a ring can be set up; any failure to
import it or to set up a ring (seccomp, ENOSYS, io_uring_disabled) falls
back to the pool.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from drivers.osio.deviceio import DeviceIo, Op

log = logging.getLogger(__name__)

# uring: io_uring for O_DIRECT descriptors (the device works on many requests at
# once without a thread each), the pool for page-cache ones (ext4 cannot do a
# buffered write without blocking, so io_uring hands each one to a kernel
# worker thread: one switch per write, where a pool job takes a whole batch).
# auto (the default): as uring, but only with a liburing release known to work
# here. uring-all: io_uring for every descriptor; threads: the pool for every one.
ENGINE_ENV = "MIRRORFW_IO_ENGINE"
RING_ENTRIES = 256  # per device; more in flight than this spills to the pool
# The liburing releases auto turns io_uring on with: 2026.3.30 died with SIGILL
# here, a signal no fallback can catch; an explicit uring takes any release.
KNOWN_GOOD_LIBURING = ("2024.5.3",)

READ, WRITE, FSYNC = 0, 1, 2  # what an op asks of the kernel (an Op's ``kind``)
# io_uring.h's IORING_FSYNC_DATASYNC (kernel ABI, 1U << 0): liburing 2024.5.3
# declares it only for Cython, so ``liburing.IORING_FSYNC_DATASYNC`` does not exist.
IORING_FSYNC_DATASYNC = 1
_uring_mod: Any = None
_uring_tried = False
_uring_all = False  # MIRRORFW_IO_ENGINE=uring-all: page-cache descriptors too
_uring_lock = threading.Lock()


def ring_module() -> Any:
    """The liburing module, or None (not asked for, not installed, or
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
        if choice == "threads":
            return None
        _uring_all = choice == "uring-all"
        try:
            from importlib.metadata import PackageNotFoundError, version

            try:
                release = version("liburing")
            except PackageNotFoundError:
                return None  # the optional extra "uring" is not installed
            if choice == "auto" and release not in KNOWN_GOOD_LIBURING:
                log.info("liburing %s is not a release known to work here (%s); device I/O uses the "
                         "thread pool (MIRRORFW_IO_ENGINE=uring tries it)", release, ", ".join(KNOWN_GOOD_LIBURING))
                return None
            import liburing

            probe = Ring.__new__(Ring)  # a throwaway ring: is io_uring allowed at all?
            probe._setup(liburing, 4)
            probe._exit()
        except Exception as e:  # noqa: BLE001 - ImportError, OSError(ENOSYS/EPERM), anything: fall back
            log.info("io_uring unavailable (%s); device I/O uses the thread pool", e)
            return None
        _uring_mod = liburing
        return liburing


def wanted(direct: bool) -> bool:
    """Whether a descriptor (O_DIRECT or not) goes through io_uring in this
    process: MIRRORFW_IO_ENGINE asks for it and a ring can be set up here."""
    return ring_module() is not None and (direct or _uring_all)


def engine_name(direct: bool = True) -> str:
    """Which path DeviceIo takes off the loop for a descriptor (O_DIRECT or
    not) in this process: "uring" or "threads"."""
    return "uring" if wanted(direct) else "threads"


class Ring:
    """An io_uring bound to one event loop: SQEs queued during a loop
    iteration go in with one io_uring_enter (the first op of an idle ring
    at once); completions wake the loop through the ring's descriptor, which
    polls readable while the CQ holds entries, and are reaped in one pass.

    The ring descriptor, not a registered eventfd: an eventfd costs a read
    per wakeup and another after every submit to clear it, two of the five
    system calls an op made at queue depth 1 (fio's psync makes one)."""

    def _setup(self, u: Any, entries: int) -> None:
        self.u = u
        self.ring = u.io_uring()
        u.io_uring_queue_init(entries, self.ring, 0)
        self.open = True
        self.ring_fd = self.ring.ring_fd

    def __init__(self, u: Any, loop: asyncio.AbstractEventLoop, owner: DeviceIo) -> None:
        self._setup(u, RING_ENTRIES)
        self.loop = loop
        self.owner = owner
        self.cqe = u.io_uring_cqe()
        self.ops: dict[int, Op] = {}
        self.next_id = 1
        self.unsubmitted: list[int] = []  # user_data of the SQEs not yet given to the kernel
        self.submit_scheduled = False
        self.dead = False
        try:
            loop.add_reader(self.ring_fd, self.reap)
        except BaseException:
            self._exit()
            raise

    def room(self) -> bool:
        return not self.dead and len(self.ops) < RING_ENTRIES

    def queue(self, fd: int, op: Op) -> None:
        u = self.u
        kind = op.kind
        # Whatever can fail comes before io_uring_get_sqe: a slot taken is
        # submitted with the next io_uring_enter whether or not it was
        # prepared, and an unprepared one still holds an earlier op's opcode,
        # buffer address and offset (a stale write of a reused buffer).
        if kind == WRITE and op.flags:
            op.iov = u.iovec(op.view)
        sqe = u.io_uring_get_sqe(self.ring)
        if not sqe:  # SQ full of unsubmitted entries
            self.submit()
            sqe = u.io_uring_get_sqe(self.ring)
            if not sqe:
                raise OSError(errno.EAGAIN, "io_uring submission queue full")
        ud = self.next_id
        try:
            if kind == WRITE:
                if op.flags:
                    u.io_uring_prep_writev2(sqe, fd, op.iov, 1, op.offset, op.flags)
                else:
                    u.io_uring_prep_write(sqe, fd, op.view, op.view.nbytes, op.offset)
            elif kind == READ:
                u.io_uring_prep_read(sqe, fd, op.view, op.view.nbytes, op.offset)
            else:
                u.io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC)
            u.io_uring_sqe_set_data64(sqe, ud)
        except BaseException:
            # The slot is taken and will be submitted: make it a no-op whose
            # completion (user_data 0) nobody claims; the caller sends the op
            # to the pool.
            u.io_uring_prep_nop(sqe)
            u.io_uring_sqe_set_data64(sqe, 0)
            self._count_queued(0)
            raise
        self.next_id = ud + 1
        ops = self.ops
        ops[ud] = op
        self.unsubmitted.append(ud)
        if not self.submit_scheduled:
            if len(ops) == 1:
                # Nothing else in flight: waiting for the end of the loop
                # iteration batches nothing at queue depth 1 and costs a loop
                # turn; a burst pays one io_uring_enter more than it would.
                self._enter()
            else:
                self.submit_scheduled = True
                self.loop.call_soon(self.submit)

    def _count_queued(self, ud: int) -> None:
        self.unsubmitted.append(ud)
        if not self.submit_scheduled:
            self.submit_scheduled = True
            self.loop.call_soon(self.submit)

    def submit(self) -> None:
        self.submit_scheduled = False
        if self.unsubmitted and not self.dead and not self._enter():
            return
        self.reap()  # page-cache I/O often completes inside the submit

    def _enter(self) -> bool:
        """Give the kernel the SQEs queued so far; False if the ring failed."""
        try:
            self.u.io_uring_submit(self.ring)
            self.unsubmitted = []
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EBUSY, errno.EINTR):
                if not self.submit_scheduled:
                    self.submit_scheduled = True  # completions first, then try again
                    self.loop.call_soon(self.submit)
            else:
                self._fail_all(e)
                return False
        return True

    def reap(self) -> None:
        if not self.open:
            return  # closed
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
            owner.completed(op, res)

    def _fail_all(self, e: OSError) -> None:
        """io_uring_enter itself failed (it gives no SQE to the kernel then):
        fail the ops not yet submitted and take no more. Ops submitted earlier
        are still the kernel's, buffers and all: their completions are reaped
        as usual, and only then does the device set up a new ring (or use
        the pool, if that fails too)."""
        log.warning("io_uring submit failed (%s); failing the ops not yet submitted on this ring", e)
        self.dead = True
        ids, self.unsubmitted = self.unsubmitted, []
        for ud in ids:
            op = self.ops.pop(ud, None)
            if op is not None:
                self.owner.failed(op, OSError(e.errno or errno.EIO, f"io_uring submit: {e}"))

    def close(self) -> None:
        self.dead = True
        if not self.loop.is_closed():
            try:
                self.loop.remove_reader(self.ring_fd)
            except Exception:  # noqa: BLE001 - a loop going away has nothing to remove
                pass
        self._exit()

    def _exit(self) -> None:
        if self.open:
            self.open = False
            self.u.io_uring_queue_exit(self.ring)


