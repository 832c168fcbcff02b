"""Power loss as a filter: a volatile write cache in front of any BlockDevice
and any NvramRegion, and the power domain that cuts them (after SQLite's
crash VFS, dm-log-writes and CrashMonkey).

URLs: put ``volatile+`` in front of any device or NVRAM URL::

    volatile+file:///tmp/a.img?size=64MiB      (open_device)
    volatile+mem://?size=1MiB                  (open_device)
    volatile+nvram:///tmp/p.nvram?size=64MiB   (open_nvram)

Every option after ``?`` belongs to the inner URL; the filter has none. All
volatile URLs opened in one process share the process's default
``PowerDomain``: seed from ``MIRRORFW_POWER_SEED`` (default 0), cut mode from
``MIRRORFW_POWER_MODE`` (``random``, the default; ``keep``; ``drop``).
``cut_power_and_exit(seed)`` cuts that domain and ends the process with
status 137, as a power cut to the controller would.

What is volatile, and what a cut does with it:

- ``VolatileDevice``: a write lands in a write-back cache (per sector, keyed
  by LBA, holding only the newest unflushed version of each sector); reads
  see the cache over the inner device. ``flush`` writes the cache to the
  inner device and flushes it; a FUA write goes to the inner device at once.
  At a cut, each write still (partly) in the cache is dropped, kept, or torn
  (a seeded mix of its sectors), so after the cut every sector holds either
  its durable (flushed) contents or the newest unflushed write to it, never
  anything else. A disk that wrote an older cached version back before it
  was overwritten is not modelled.
- ``discard`` and ``zeroout`` pass through: the cached sectors of the range
  are dropped, the inner device zeroes (or discards) them and is flushed, so
  they are durable at once like a FUA write. Zeros staged in the cache
  instead would cost a cache entry per sector for a whole-volume discard, and
  the firmware issues neither.
- ``VolatileNvram``: ``view`` is a private in-memory copy; ``persist(offset,
  length)`` copies that range to the inner region and persists it there. At
  a cut, the bytes that differ between the view and the durable copy are
  taken per 64-byte cache line: each differing line is kept, dropped, or torn
  per aligned 8-byte word (the unit an x86 store is atomic in), so a
  persisted range always survives and an unpersisted store is old or new per
  word.

Persist points: every device write, FUA write, flush, discard/zeroout and
NVRAM persist is one event of the domain. ``arm(n)`` cuts at the n-th event
from now, *with that event in flight*: a write or FUA write is in the cache
when the cut decides (so it may be dropped, kept or torn), a flush has made
nothing durable yet, a persist has not copied its range (those stores are
unpersisted), a discard/zeroout has not happened; the caller gets
``PowerLost``, never success. Everything a cut does is drawn from one
``random.Random`` seeded by (seed, boot), in registration order, writes in
the order they were made, sectors and lines in address order, so a cut is
deterministic from the seed and the sequence of events (concurrent I/O to a
real inner device, e.g. a flush still in flight on a file, can only make a
kept write land where the draw dropped it: still old or new).

After a cut the domain is dead: device calls and ``persist`` raise
``PowerLost``; stores into a dead NVRAM view go to the dead private copy and
never reach the durable one. ``PowerLost`` is a BaseException, like
CancelledError, because the firmware has ``except Exception`` handlers that
log a failure and carry on (the CG loop retries, the console replies): a
controller whose power is off must stop, not retry against dead devices.
``power_on()`` returns a new domain with fresh filters over the same inner
objects (``devices`` and ``regions`` in the same order) and an empty
volatile state.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os
import random
from collections.abc import Iterator
from typing import NoReturn

from drivers.file import FdDevice
from drivers.mem import MemDevice
from hal.block import BlockDevice, DeviceError
from hal.nvram import NvramRegion
from hal.url import UrlError, parse_url

log = logging.getLogger(__name__)

PREFIX = "volatile+"
SEED_ENV = "MIRRORFW_POWER_SEED"
MODE_ENV = "MIRRORFW_POWER_MODE"
MODES = ("random", "keep", "drop")
LINE_BYTES = 64  # NVRAM: the unit a cut keeps or drops whole ...
WORD_BYTES = 8  # ... or tears into words
EXIT_STATUS = 137  # what a shell reports for SIGKILL; a harness treats it as "died without cleanup"


class PowerLost(BaseException):  # noqa: N818 - an event, not an error; see the module docstring
    """The power domain of this device or NVRAM region was cut."""


@dataclasses.dataclass
class PowerStats:
    """Counts for reports; cut outcomes stay 0 until the domain is cut."""

    events: int = 0
    writes: int = 0
    fua_writes: int = 0
    flushes: int = 0
    zeroouts: int = 0  # discard and zeroout
    persists: int = 0
    cut_at_event: int = 0  # 0: not cut
    writes_kept: int = 0
    writes_dropped: int = 0
    writes_torn: int = 0
    sectors_kept: int = 0
    sectors_dropped: int = 0
    nvram_lines_kept: int = 0
    nvram_lines_dropped: int = 0
    nvram_lines_torn: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class PowerDomain:
    """The devices and NVRAM regions that lose power together."""

    def __init__(self, seed: int = 0, *, mode: str = "random", boot: int = 0, record: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"power cut mode {mode!r}: choose one of {', '.join(MODES)}")
        self.seed = seed
        self.mode = mode
        self.boot = boot  # how many power cycles came before this domain
        self.devices: list[VolatileDevice] = []
        self.regions: list[VolatileNvram] = []
        self.stats = PowerStats()
        self.dead = False
        self.history: list[tuple] | None = [] if record else None  # (event, kind, url) when recording
        self._fire_at = 0
        self._wid = 0  # write sequence number: the order a cut visits cached writes in
        self._unapplied: list[tuple[VolatileDevice, list[tuple[int, bytes]]]] = []

    def __repr__(self) -> str:
        state = f"dead at event {self.stats.cut_at_event}" if self.dead else f"{self.stats.events} events"
        return f"<PowerDomain seed={self.seed} boot={self.boot} mode={self.mode} {state}>"

    # -- arming -------------------------------------------------------------------
    def arm(self, n: int) -> None:
        """Cut power at the n-th event from now (n >= 1), with that event in flight."""
        if n < 1:
            raise ValueError(f"arm({n}): n counts events from now and must be >= 1")
        self._fire_at = self.stats.events + n

    def disarm(self) -> None:
        self._fire_at = 0

    # -- what the filters call ---------------------------------------------------
    def _event(self, kind: str, url: str) -> bool:
        """Count one persist point; True when it is the armed one (the caller
        stages its in-flight data, then calls ``_fire``)."""
        if self.dead:
            raise PowerLost(f"{url}: {kind} after the power was cut")
        s = self.stats
        s.events += 1
        setattr(s, kind, getattr(s, kind) + 1)
        if self.history is not None:
            self.history.append((s.events, kind, url))
        return s.events == self._fire_at

    def _fire(self) -> NoReturn:
        self.cut()
        raise PowerLost(f"power cut at event {self.stats.cut_at_event} (seed {self.seed}, boot {self.boot})")

    def _next_wid(self) -> int:
        self._wid += 1
        return self._wid

    # -- the cut ------------------------------------------------------------------
    def cut(self, seed: int | None = None, *, mode: str | None = None) -> PowerStats:
        """Cut the power now: decide, from the seed, what of the volatile state
        reaches the inner devices and regions, write it there, and leave the
        domain dead. ``mode`` overrides the domain's: ``keep`` keeps every
        unflushed write (what SIGKILL does), ``drop`` drops them all."""
        if self.dead:
            raise RuntimeError(f"{self!r}: already cut")
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"power cut mode {mode!r}: choose one of {', '.join(MODES)}")
        self.dead = True
        self.stats.cut_at_event = self.stats.events
        rng = random.Random(f"mirrorfw-powerloss:{self.seed if seed is None else seed}:{self.boot}")
        for dev in self.devices:
            survivors = self._cut_device(dev, rng, mode)
            if survivors and not _apply_now(dev.inner, survivors):
                self._unapplied.append((dev, survivors))
        for region in self.regions:
            self._cut_region(region, rng, mode)
        log.info("power cut: %s", self.stats.as_dict())
        return dataclasses.replace(self.stats)

    def _cut_device(self, dev: VolatileDevice, rng: random.Random, mode: str) -> list[tuple[int, bytes]]:
        writes: dict[int, list[tuple[int, memoryview]]] = {}
        for lba in sorted(dev._cache):
            wid, data = dev._cache[lba]
            writes.setdefault(wid, []).append((lba, data))
        s = self.stats
        survivors: list[tuple[int, bytes]] = []
        for wid in sorted(writes):
            sectors = writes[wid]
            n = len(sectors)
            if mode == "keep":
                choice = 1
            elif mode == "drop":
                choice = 0
            else:
                choice = rng.randrange(3 if n > 1 else 2)  # 0 drop, 1 keep, 2 tear (needs 2 sectors)
            if choice == 2:
                keep = [rng.random() < 0.5 for _ in sectors]
                if all(keep) or not any(keep):
                    keep[rng.randrange(n)] ^= True  # a tear is a real mix
                s.writes_torn += 1
            else:
                keep = [choice == 1] * n
                if choice:
                    s.writes_kept += 1
                else:
                    s.writes_dropped += 1
            for (lba, data), k in zip(sectors, keep, strict=True):
                if k:
                    survivors.append((lba, bytes(data)))
            kept = sum(keep)
            s.sectors_kept += kept
            s.sectors_dropped += n - kept
        dev._cache.clear()
        survivors.sort()
        return survivors

    def _cut_region(self, region: VolatileNvram, rng: random.Random, mode: str) -> None:
        s = self.stats
        inner = region.inner.view
        for start, end in _differing(region._view, inner):
            for line in range(start, end, LINE_BYTES):
                mine = region._view[line : line + LINE_BYTES].tobytes()
                if mine == inner[line : line + LINE_BYTES].tobytes():
                    continue
                if mode == "keep":
                    choice = 1
                elif mode == "drop":
                    choice = 0
                else:
                    choice = rng.randrange(3)  # 0 drop, 1 keep, 2 tear per word
                if choice == 1:
                    inner[line : line + LINE_BYTES] = mine
                    s.nvram_lines_kept += 1
                elif choice == 0:
                    s.nvram_lines_dropped += 1
                else:
                    for word in range(0, LINE_BYTES, WORD_BYTES):
                        if rng.random() < 0.5:
                            inner[line + word : line + word + WORD_BYTES] = mine[word : word + WORD_BYTES]
                    s.nvram_lines_torn += 1
            region.inner.persist(start, end - start)

    async def settle(self) -> None:
        """Write what the cut kept to inner devices that cannot be written
        synchronously (anything but mem://, file:// and blk://)."""
        while self._unapplied:
            dev, survivors = self._unapplied.pop(0)
            for lba, data in _runs(survivors, dev.inner.info.max_transfer_bytes):
                await dev.inner.write(lba, data)
            await dev.inner.flush()

    # -- power back on ------------------------------------------------------------
    def power_on(self) -> PowerDomain:
        """A new domain (same seed and mode, next boot) with fresh filters over
        the same inner devices and regions, in the same order; the old filters
        stay dead and no longer own (close) their inner objects."""
        if not self.dead:
            raise RuntimeError(f"{self!r}: power_on() after cut()")
        if self._unapplied:
            raise RuntimeError(f"{self!r}: await settle() first: kept writes are not on the inner devices yet")
        new = PowerDomain(self.seed, mode=self.mode, boot=self.boot + 1, record=self.history is not None)
        for dev in self.devices:
            dev._owns_inner = False
            VolatileDevice(dev.inner, new)
        for region in self.regions:
            region._owns_inner = False
            VolatileNvram(region.inner, new)
        global _default
        if _default is self:
            _default = new
        return new


# -- the block device filter ----------------------------------------------------------
class VolatileDevice(BlockDevice):
    """Any BlockDevice behind a volatile write-back cache that a PowerDomain cuts."""

    def __init__(self, inner: BlockDevice, domain: PowerDomain) -> None:
        extra = {**inner.info.extra, "power_seed": domain.seed, "power_boot": domain.boot}
        url = inner.info.url if inner.info.url.startswith(PREFIX) else PREFIX + inner.info.url
        super().__init__(dataclasses.replace(inner.info, url=url, write_cache=True, extra=extra))
        self.inner = inner
        self.domain = domain
        self._cache: dict[int, tuple[int, memoryview]] = {}  # lba -> (write id, one sector)
        self._owns_inner = True
        domain.devices.append(self)

    @property
    def unflushed_sectors(self) -> int:
        return len(self._cache)

    def _alive(self, op: str) -> None:
        if self.domain.dead:
            raise PowerLost(f"{self.info.url}: {op} after the power was cut")

    def _cached_in(self, lba: int, count: int) -> list[int]:
        cache = self._cache
        if len(cache) < count:
            return sorted(k for k in cache if lba <= k < lba + count)
        return [k for k in range(lba, lba + count) if k in cache]

    def _uncache(self, lba: int, count: int) -> None:
        for k in self._cached_in(lba, count):
            del self._cache[k]

    async def _read(self, lba: int, count: int) -> bytes:
        self._alive("read")
        bs = self.info.block_size
        if len(self._cached_in(lba, count)) == count:
            return b"".join(self._cache[k][1] for k in range(lba, lba + count))
        out = bytearray(await self.inner.read(lba, count))
        self._alive("read")
        for k in self._cached_in(lba, count):  # the cache as it is now, after the await
            at = (k - lba) * bs
            out[at : at + bs] = self._cache[k][1]
        return bytes(out)

    async def _write(self, lba: int, data, fua: bool) -> None:
        fire = self.domain._event("fua_writes" if fua else "writes", self.info.url)
        bs = self.info.block_size
        count = memoryview(data).nbytes // bs
        if fua and not fire:
            self._uncache(lba, count)  # superseded: a later flush must not write them over this
            await self.inner.write(lba, data, fua=True)
            self._alive("write")  # durable on the inner device, but the ack never came back
            return
        src = memoryview(bytes(data))  # one copy per write; the cache holds slices of it
        wid = self.domain._next_wid()
        for i in range(count):
            self._cache[lba + i] = (wid, src[i * bs : (i + 1) * bs])
        if fire:
            self.domain._fire()

    async def _flush(self) -> None:
        if self.domain._event("flushes", self.info.url):
            self.domain._fire()
        # Build each inner write from the cache as it is when the write is
        # issued: a sector a FUA write has since replaced is not in it, and the
        # inner device keeps issue order, so stale data never lands over it.
        written: dict[int, int] = {}
        step = max(1, self.inner.info.max_transfer_bytes // self.info.block_size)
        for start, n in _lba_runs(sorted(self._cache), step):
            for run_start, entries in self._current_runs(start, n):
                for i, (wid, _) in enumerate(entries):
                    written[run_start + i] = wid
                await self.inner.write(run_start, b"".join(d for _, d in entries))
                self._alive("flush")
        await self.inner.flush()
        self._alive("flush")
        for k, wid in written.items():
            entry = self._cache.get(k)
            if entry is not None and entry[0] == wid:  # not overwritten while flushing
                del self._cache[k]

    def _current_runs(self, start: int, n: int) -> Iterator[tuple[int, list[tuple[int, memoryview]]]]:
        run_start, run = start, []
        for k in range(start, start + n):
            entry = self._cache.get(k)
            if entry is None:
                if run:
                    yield run_start, run
                run_start, run = k + 1, []
            else:
                run.append(entry)
        if run:
            yield run_start, run

    async def _discard(self, lba: int, count: int) -> None:
        await self._passthrough("discard", lba, count)

    async def _zeroout(self, lba: int, count: int) -> None:
        await self._passthrough("zeroout", lba, count)

    async def _passthrough(self, op: str, lba: int, count: int) -> None:
        if self.domain._event("zeroouts", self.info.url):
            self.domain._fire()  # in flight: not done
        self._uncache(lba, count)  # before the inner op is issued, so no flush lands stale data over it
        await getattr(self.inner, op)(lba, count)
        await self.inner.flush()
        self._alive(op)

    def _close(self) -> None:
        if self in self.domain.devices:
            self.domain.devices.remove(self)
        if not self._owns_inner:
            return
        if self._cache and not self.domain.dead:
            # A clean close is no power cut: the disk writes its cache back.
            survivors = sorted((k, bytes(d)) for k, (_, d) in self._cache.items())
            self._cache.clear()
            if not _apply_now(self.inner, survivors):
                log.warning("%s: closed with %d unflushed sectors that cannot be written back synchronously; "
                            "they are lost (flush before close)", self.info.url, len(survivors))
        self.inner.close()


# -- the NVRAM filter -----------------------------------------------------------------
class VolatileNvram(NvramRegion):
    """Any NvramRegion behind a private copy; ``persist`` makes a range durable."""

    def __init__(self, inner: NvramRegion, domain: PowerDomain) -> None:
        self.inner = inner
        self.domain = domain
        self.url = inner.url if inner.url.startswith(PREFIX) else PREFIX + inner.url
        self.size_bytes = inner.size_bytes
        self._buf = bytearray(inner.view)
        self._view: memoryview | None = memoryview(self._buf)
        self._owns_inner = True
        domain.regions.append(self)

    @property
    def view(self) -> memoryview:
        # Still readable and writable when dead: stores go to this copy only.
        if self._view is None:
            raise DeviceError(errno.EBADF, "NVRAM region is closed", self.url)
        return self._view

    def persist(self, offset: int, length: int) -> None:
        self._check_persist(self._view, offset, length)
        if self.domain._event("persists", self.url):
            self.domain._fire()  # in flight: the range is not copied yet
        if length:
            self.inner.view[offset : offset + length] = self._view[offset : offset + length]
            self.inner.persist(offset, length)

    def close(self) -> None:
        if self._view is None:
            return
        if self in self.domain.regions:
            self.domain.regions.remove(self)
        if self._owns_inner:
            if not self.domain.dead:
                # A clean close is no power cut: what was stored is kept.
                for start, end in _differing(self._view, self.inner.view):
                    self.inner.view[start:end] = self._view[start:end]
                    self.inner.persist(start, end - start)
            self.inner.close()
        self._view = None

    def __repr__(self) -> str:
        return f"<VolatileNvram {self.url} {self.size_bytes} bytes>"


# -- writing what a cut kept ------------------------------------------------------------
def _lba_runs(lbas: list[int], max_count: int) -> Iterator[tuple[int, int]]:
    """Sorted LBAs -> (start, count) of contiguous runs, at most ``max_count`` long."""
    i = 0
    while i < len(lbas):
        j = i + 1
        while j < len(lbas) and lbas[j] == lbas[j - 1] + 1 and j - i < max_count:
            j += 1
        yield lbas[i], j - i
        i = j


def _runs(sectors: list[tuple[int, bytes]], max_bytes: int) -> Iterator[tuple[int, bytes]]:
    """Sorted (lba, sector) pairs -> (lba, data) of contiguous runs."""
    if not sectors:
        return
    step = max(1, max_bytes // len(sectors[0][1]))
    index = {lba: d for lba, d in sectors}
    for start, n in _lba_runs([lba for lba, _ in sectors], step):
        yield start, b"".join(index[k] for k in range(start, start + n))


def _apply_now(inner: BlockDevice, sectors: list[tuple[int, bytes]]) -> bool:
    """Write sectors to the inner device synchronously, durably; False when it
    cannot be done without an event loop (then ``settle`` does it)."""
    if isinstance(inner, FdDevice):
        bs = inner.info.block_size
        for lba, data in _runs(sectors, 8 << 20):
            # O_DIRECT wants aligned memory: an anonymous mapping is page-aligned.
            with mmap.mmap(-1, len(data)) as buf:
                buf[:] = data
                view = memoryview(buf)
                done = 0
                try:
                    while done < len(data):
                        done += os.pwrite(inner.fd, view[done:], lba * bs + done)
                except OSError as e:
                    raise DeviceError(e.errno or errno.EIO, f"power cut: writing kept data: {e.strerror}",
                                      inner.info.url) from None
                finally:
                    view.release()
        os.fdatasync(inner.fd)
        return True
    if isinstance(inner, MemDevice):
        for lba, data in _runs(sectors, inner.info.max_transfer_bytes):
            coro = inner.write(lba, data)
            try:
                coro.send(None)
            except StopIteration:
                continue
            coro.close()
            raise RuntimeError("mem:// write suspended")  # it never awaits anything that waits
        return True
    return False


def _differing(a: memoryview, b: memoryview, chunk: int = 64 << 10) -> Iterator[tuple[int, int]]:
    """Ranges [start, end) of ``chunk`` bytes where a and b differ."""
    size = len(a)
    for start in range(0, size, chunk):
        end = min(size, start + chunk)
        if a[start:end].tobytes() != b[start:end].tobytes():  # memoryview == compares per item: 10x slower
            yield start, end


# -- URLs and the process's domain ------------------------------------------------------
_default: PowerDomain | None = None


def default_domain() -> PowerDomain:
    """The process's domain, made on first use from the environment."""
    global _default
    if _default is None:
        seed_text = os.environ.get(SEED_ENV, "0")
        try:
            seed = int(seed_text)
        except ValueError:
            raise UrlError(f"{SEED_ENV}={seed_text!r}: the power-cut seed must be an integer") from None
        mode = os.environ.get(MODE_ENV, "random")
        if mode not in MODES:
            raise UrlError(f"{MODE_ENV}={mode!r}: choose one of {', '.join(MODES)}")
        _default = PowerDomain(seed, mode=mode)
    return _default


def set_default_domain(domain: PowerDomain | None) -> None:
    """Replace the process's domain (tests); None: made afresh on next use."""
    global _default
    _default = domain


def _inner_url(url: str, example: str) -> str:
    if not url.startswith(PREFIX):
        raise UrlError(f"{url}: not a volatile URL (e.g. {example})")
    inner = url[len(PREFIX):]
    if inner.startswith(PREFIX):
        raise UrlError(f"{url}: one volatile+ layer is enough")
    if "://" not in inner or not parse_url(inner).scheme:
        raise UrlError(f"{url}: volatile+ needs a device URL after it (e.g. {example})")
    return inner


def _live_default(url: str) -> PowerDomain:
    domain = default_domain()
    if domain.dead:
        raise PowerLost(f"{url}: the power of this process's domain is cut; power_on() first")
    return domain


def open(url: str, *, read_only: bool = False) -> VolatileDevice:  # noqa: A001 - the driver door
    from drivers import open_device

    example = "volatile+file:///tmp/a.img?size=64MiB"
    inner_url = _inner_url(url, example)
    if parse_url(inner_url).scheme == "nvram":
        raise UrlError(f"{url}: an NVRAM URL is not a block device; open it with open_nvram")
    domain = _live_default(url)
    inner = open_device(inner_url, read_only=read_only)
    return VolatileDevice(inner, domain)


def open_nvram(url: str) -> VolatileNvram:
    from drivers import open_nvram as open_inner

    inner_url = _inner_url(url, "volatile+nvram:///tmp/p.nvram?size=64MiB")
    domain = _live_default(url)
    return VolatileNvram(open_inner(inner_url), domain)


def cut_power_and_exit(seed: int | None = None) -> NoReturn:
    """Cut the power of this process's domain, then end the process at once
    (status 137, no cleanup), as a power cut to the controller would."""
    try:
        domain = _default
        if domain is not None and not domain.dead:
            stats = domain.cut(seed)
            msg = "mirrorfw: power cut: " + " ".join(f"{k}={v}" for k, v in stats.as_dict().items())
            if domain._unapplied:  # an inner device only an event loop can write (nbd://)
                msg += f" (kept writes of {len(domain._unapplied)} device(s) lost: not writable synchronously)"
        else:
            msg = "mirrorfw: power cut: no volatile devices in this process"
        os.write(2, (msg + "\n").encode())
    except BaseException as e:  # noqa: BLE001 - the process ends either way
        try:
            os.write(2, f"mirrorfw: power cut failed: {e!r}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(EXIT_STATUS)
