"""Destage: how cached images reach volume A and become clean (evictable).
Only ``cur`` images are destaged (firmware/cache.py says why)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from firmware.cache import WriteCache
from firmware.cache_directory import CacheEntry
from hal.block import BlockDevice

log = logging.getLogger(__name__)


class Destager:
    """Writes dirty ``cur`` images to volume A, at most ``inflight`` at a time,
    one write stream per track (so two versions of a track never race on A)."""

    def __init__(self, cache: WriteCache, devices: list[BlockDevice], track_len: Callable[[int, int], int],
                 inflight: int) -> None:
        self.cache = cache
        self.devices = devices
        self.track_len = track_len
        self.inflight = inflight
        self._task: asyncio.Task | None = None

    def claim(self, entry: CacheEntry) -> tuple[int, list[tuple[int, bytes]]]:
        """Claim the track and snapshot the image, with no await in between or
        before: a claim taken later (when a task first runs) lets ``next_dirty``
        hand the image out again, and a promote meanwhile can free the slot for
        another track's data, which would then be written to this track."""
        self.cache.destaging.add(entry.key)
        return self.cache.destage_snapshot(entry, self.track_len(*entry.key))

    def _release(self, entry: CacheEntry) -> None:
        self.cache.destaging.discard(entry.key)

    async def _write(self, entry: CacheEntry, runs: list[tuple[int, bytes]]) -> None:
        """Write one claimed image's runs to A (durable only after a flush)."""
        cache = self.cache
        dev = self.devices[entry.volume]
        bs = dev.info.block_size
        base = entry.track * cache.track_bytes
        try:
            for off, data in runs:
                await dev.write((base + off) // bs, data)
        except Exception as e:  # A failed: keep the image dirty; the next round retries
            self._count_error(f"destage of volume {entry.volume} track {entry.track} failed: {e}")
            raise

    def _count_error(self, message: str) -> None:
        self.cache.counters.destage_errors += 1
        self.cache.counters.last_error = message
        log.warning("%s", message)

    async def _make_clean(self, written: list[tuple[CacheEntry, int]]) -> int | None:
        """Flush A under a batch of written images, then mark them clean.
        A clean image may be evicted: were A's copy still in a volatile
        device cache, a power cut would bring back older data for an
        acknowledged write (and the drain would send that). Returns how
        many became clean, None when the flush failed."""
        if not written:
            return 0
        try:
            for vi in sorted({entry.volume for entry, _ in written}):
                await self.devices[vi].flush()
        except Exception as e:  # the images stay dirty; the next round writes them again
            self._count_error(f"flush of volume A after destage failed: {e}")
            for entry, _ in written:
                self._release(entry)
            return None
        for entry, seq in written:
            self.cache.destage_done(entry, seq)
            self._release(entry)
        return len(written)

    async def destage(self, limit: int | None = None) -> int:
        """Destage up to ``limit`` images (all dirty ones when None), at most
        ``inflight`` writes at a time; returns how many became clean. A device
        error ends the round (the images stay dirty).

        A flush of A covers the images whose writes completed before it
        began, and marks them clean when it returns. Writes go on while it
        runs (one flush at a time): those that complete meanwhile wait for
        the next flush, which begins as soon as this one ends and covers them
        all. A flush waited for with no write in flight stalled destage for a
        whole fdatasync per ``inflight`` images, and host writes then waited
        for free slots (cache_full_waits)."""
        running: dict[asyncio.Task, tuple[CacheEntry, int]] = {}
        written: list[tuple[CacheEntry, int]] = []  # written, waiting for a flush that begins after them
        flushing: asyncio.Task | None = None
        flush_batch: list[tuple[CacheEntry, int]] = []
        done = 0
        failed = False
        try:
            while True:
                left = None if limit is None else limit - done - len(written) - len(flush_batch) - len(running)
                if not failed and left != 0 and len(running) < self.inflight:
                    entry = self.cache.next_dirty()
                    if entry is not None:
                        seq, runs = self.claim(entry)
                        running[asyncio.ensure_future(self._write(entry, runs))] = (entry, seq)
                        continue
                if flushing is None and written and (not running or len(written) >= self.inflight):
                    # Settle a batch: its claims go, and a track rewritten
                    # meanwhile (still dirty) can be picked again this round.
                    flush_batch, written = written, []
                    if running:
                        flushing = asyncio.ensure_future(self._make_clean(flush_batch))
                    else:  # no write to overlap: flush here, a task costs loop turns for nothing
                        cleaned = await self._make_clean(flush_batch)
                        flush_batch = []
                        failed = failed or cleaned is None
                        done += cleaned or 0
                        continue
                if not running and flushing is None:
                    break
                waits = set(running) if flushing is None else {*running, flushing}
                finished, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    if task is flushing:
                        cleaned = task.result()
                        failed = failed or cleaned is None
                        done += cleaned or 0
                        flushing, flush_batch = None, []
                        continue
                    entry, seq = running.pop(task)
                    if task.exception() is None:
                        written.append((entry, seq))
                    else:
                        self._release(entry)
                        failed = True
        finally:  # cancelled (stop): what was claimed stays dirty
            for task, (entry, _) in running.items():
                task.cancel()
                self._release(entry)
            if flush_batch and (flushing is None or not flushing.done()):  # a finished flush released its own
                if flushing is not None:
                    flushing.cancel()
                for entry, _ in flush_batch:
                    self._release(entry)
            for entry, _ in written:
                self._release(entry)
        return done

    def start(self, clock_sleep: Callable[[float], object]) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop(clock_sleep))

    async def _loop(self, clock_sleep) -> None:
        while True:
            if self.cache.next_dirty() is None:
                await self.cache.wait_dirty()
                continue
            before = self.cache.counters.destage_errors
            # One round while anything is dirty: a round ends on a flush with
            # no write in flight, a stall that rounds of 4 x inflight images paid often.
            await self.destage()
            if self.cache.counters.destage_errors != before:
                await clock_sleep(0.1)  # back off from a failing device
            else:
                await asyncio.sleep(0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
