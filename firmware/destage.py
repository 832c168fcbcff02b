"""Destage: how cached images reach volume A and become clean (evictable).
Only ``cur`` images are destaged (firmware/cache.py says why)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from firmware.cache import CacheEntry, WriteCache
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

    async def destage_entry(self, entry: CacheEntry,
                            claimed: tuple[int, list[tuple[int, bytes]]] | None = None) -> None:
        """Write one image to A; ``claimed`` is the ``claim(entry)`` taken when
        it was picked (taken here when None: the caller must not have awaited
        since picking it)."""
        cache = self.cache
        key = entry.key
        try:
            seq, runs = claimed if claimed is not None else self.claim(entry)
            dev = self.devices[entry.volume]
            bs = dev.info.block_size
            base = entry.track * cache.track_bytes
            for off, data in runs:
                await dev.write((base + off) // bs, data)
            cache.destage_done(entry, seq)
        except Exception as e:  # A failed: keep the image dirty; the next round retries
            cache.counters.destage_errors += 1
            cache.counters.last_error = str(e)
            log.warning("destage of volume %d track %d failed: %s", key[0], key[1], e)
            raise
        finally:
            cache.destaging.discard(key)

    async def destage(self, limit: int | None = None) -> int:
        """Destage up to ``limit`` images (all dirty ones when None) with bounded
        concurrency; returns how many were written."""
        done = 0
        running: set[asyncio.Task] = set()
        while limit is None or done + len(running) < limit:
            entry = self.cache.next_dirty()
            if entry is None:
                if not running:
                    break
            elif len(running) < self.inflight:
                running.add(asyncio.ensure_future(self.destage_entry(entry, self.claim(entry))))
                continue
            finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for t in finished:
                if t.exception() is None:
                    done += 1
                else:
                    limit = done  # stop this round on a device error
        if running:
            for t in await asyncio.gather(*running, return_exceptions=True):
                done += 0 if isinstance(t, BaseException) else 1
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
            await self.destage(limit=self.inflight * 4)
            if self.cache.counters.destage_errors != before:
                await clock_sleep(0.1)  # back off from a failing device
            else:
                await asyncio.sleep(0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
