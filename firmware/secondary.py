"""Secondary: receives each CG into B and keeps C, the consistent copy, as a
no-copy FlashCopy of B (firmware/flashcopy.py). C is exported read-only by
firmware/secondary_export.py; firmware/local_remote.py's ``LocalRemote``
lets a Primary in the same process call it directly (the link's LinkRemote
carries the same calls over frames).

A secondary of a multi-controller session (``session_member=True``) keeps a
prepared CG across a restart as a revertible state with its sequence (the
DS8000 procedure behind ``commitflash``/``revertflash``): session recovery
commits it (``commit_flash``: B is durable since prepare, so it is the
FlashCopy record flip) or drops it (``revert_flash``), the same on every
member. While a CG is prepared and in doubt, a session member refuses
tracks and other prepares, which would overwrite the B it would commit.
Alone (the default), a restart between prepare and commit keeps the
previous C."""

from __future__ import annotations

import logging

from firmware import crashpoints as cp
from firmware.crashpoints import CrashPoints
from firmware.double_record import DoubleRecord
from firmware.errors import NvramError
from firmware.events import EventBus
from firmware.flashcopy import FlashCopy
from firmware.layout import (
    FC_PREPARED,
    SECONDARY_MAGIC,
    FlashCopyRecord,
    RegionPlan,
    region_is_blank,
)
from firmware.member import RecoveryState
from firmware.pins import DEFAULT_MAX_PINNED_BYTES, SNAPSHOT_SEP, Snapshots
from firmware.region import format_region, read_region
from firmware.remote import RemoteError, RemoteState, VolumeGeometry
from firmware.secondary_export import SecondaryTarget
from hal.block import BlockDevice
from hal.clock import Clock
from hal.host import HostTarget
from hal.nvram import NvramRegion

log = logging.getLogger(__name__)

AFTER_PREPARE = cp.declare("secondary.after_prepare", "B is durable and PREPARED recorded; commit not yet done")
MID_COMMIT = cp.declare("secondary.mid_commit", "commit received, the FlashCopy record not yet rewritten")
MID_FLASHCOPY = cp.declare("secondary.mid_flashcopy", "a grain was copied B->C, its copied bit not yet set")


class Secondary:
    def __init__(self, volumes: dict[str, tuple[BlockDevice, BlockDevice]], nvram: NvramRegion, clock: Clock,
                 *, session_id: str = "default", events: EventBus | None = None,
                 crashpoints: CrashPoints | None = None, grain_bytes: int = 65536,
                 max_pinned_bytes: int = DEFAULT_MAX_PINNED_BYTES, session_member: bool = False) -> None:
        if not volumes:
            raise RemoteError("a secondary needs at least one volume")
        self.names = list(volumes)
        self.b = [volumes[n][0] for n in self.names]
        self.c = [volumes[n][1] for n in self.names]
        for name, b, c in zip(self.names, self.b, self.c, strict=False):
            if c.info.size_bytes < b.info.size_bytes:
                raise RemoteError(f"{name}: C ({c.info.size_bytes} bytes) is smaller than B "
                                  f"({b.info.size_bytes} bytes)")
            for dev in (b, c):
                if grain_bytes % dev.info.block_size:
                    raise RemoteError(f"{name}: grain {grain_bytes} is not a multiple of "
                                      f"{dev.info.url}'s block size {dev.info.block_size}")
        self._vindex = {n: i for i, n in enumerate(self.names)}
        self.nvram = nvram
        self.clock = clock
        self.session_id = session_id
        self.events = events if events is not None else EventBus()
        self.crashpoints = crashpoints if crashpoints is not None else CrashPoints()
        self.grain_bytes = grain_bytes
        self.session_member = session_member  # a prepared CG survives a restart, for session recovery
        self.fc: FlashCopy | None = None
        self.max_pinned_bytes = max_pinned_bytes  # what pinned reads of C may keep in memory
        self.snapshots: Snapshots | None = None
        self._track_bytes: dict[str, int] = {}
        self.receiving_seq = 0
        self.received_tracks = 0
        self.received_bytes = 0
        self.recovered: dict = {}
        self._primary_generation = 0  # the format generation of the primary that said hello

    # -- NVRAM -----------------------------------------------------------------
    async def open(self, format: bool = False) -> None:  # noqa: A002 - contract name
        nvram = self.nvram
        vols = [(n, b.info.size_bytes) for n, b in zip(self.names, self.b, strict=True)]
        fresh = format or region_is_blank(nvram.view)
        if fresh:
            plan, _ = format_region(nvram, SECONDARY_MAGIC, vols, self.grain_bytes, self.session_id,
                                    with_cache=False)
            store = DoubleRecord(nvram.view, nvram.persist, RegionPlan.RECORD_OFFSET, FlashCopyRecord)
            record = {"session_id": self.session_id, "established": 0, "phase": 0, "committed_seq": 0,
                      "prepared_seq": 0, "active_select": 0, "commit_wall": 0.0, "primary_generation": 0}
            store.write(record)
            self.recovered = {"formatted": True}
        else:
            plan, _, _ = read_region(nvram, SECONDARY_MAGIC, "secondary")
            theirs = [(v.name, v.size_bytes) for v in plan.volumes]
            if theirs != vols:
                raise NvramError(f"secondary NVRAM was formatted for {theirs}, the volumes are {vols}")
            self.grain_bytes = plan.track_bytes
            store = DoubleRecord(nvram.view, nvram.persist, RegionPlan.RECORD_OFFSET, FlashCopyRecord)
            record = store.read()
            if record is None:
                raise NvramError("secondary FlashCopy record is unreadable (both copies damaged)")
            prepared = record["phase"] == FC_PREPARED
            rolled_back = prepared and not self.session_member
            if rolled_back:  # crash between prepare and commit: the previous C stands
                record["phase"] = 0
                store.write(record)
            self.recovered = {"formatted": False, "rolled_back_prepare": rolled_back,
                              "committed_seq": record["committed_seq"]}
            if prepared and self.session_member:  # in doubt: session recovery commits or reverts it
                self.recovered["in_doubt_seq"] = record["prepared_seq"]
        self.fc = FlashCopy(nvram, plan, store, record, self.b, self.c, fresh=fresh,
                            max_pinned_bytes=self.max_pinned_bytes)
        self.snapshots = Snapshots(self.fc.pins)
        log.info("secondary NVRAM ready: %s", self.recovered)

    async def close(self) -> None:
        for dev in self.b + self.c:
            try:
                await dev.flush()
            except Exception as e:  # noqa: BLE001 - closing: report, go on
                log.warning("flush of %s at close failed: %s", dev.info.url, e)

    @property
    def committed_cg(self) -> int:
        return self.fc.record["committed_seq"]

    def _vi(self, volume: str) -> int:
        try:
            return self._vindex[volume]
        except KeyError:
            raise RemoteError(f"unknown volume {volume!r}; this secondary has {', '.join(self.names)}") from None

    # -- the RemotePort calls, server side --------------------------------------------
    async def hello(self, session_id: str, volumes: list[VolumeGeometry], generation: int = 0) -> RemoteState:
        if session_id != self.session_id:
            raise RemoteError(f"session {session_id!r} does not match this secondary's {self.session_id!r}")
        rec = self.fc.record
        if rec["session_id"] and rec["session_id"] != session_id:
            raise RemoteError(f"this secondary's NVRAM belongs to session {rec['session_id']!r}")
        names = [v.name for v in volumes]
        if sorted(names) != sorted(self.names):
            raise RemoteError(f"primary volumes {names} do not match secondary volumes {self.names}")
        for v in volumes:
            b = self.b[self._vindex[v.name]]
            if v.size_bytes != b.info.size_bytes:
                raise RemoteError(f"{v.name}: primary has {v.size_bytes} bytes, B has {b.info.size_bytes}")
            if v.track_bytes % b.info.block_size:
                raise RemoteError(f"{v.name}: track {v.track_bytes} is not a multiple of B's block size")
            self._track_bytes[v.name] = v.track_bytes
        # A primary whose NVRAM was formatted since our last commit may hold
        # anything on A: only a full copy makes C converge to it again.
        self._primary_generation = generation
        new = not rec["established"] or rec["primary_generation"] != generation
        return RemoteState(session_id=self.session_id, committed_cg=rec["committed_seq"],
                           new=new,
                           volumes=[VolumeGeometry(n, b.info.size_bytes, self._track_bytes[n])
                                    for n, b in zip(self.names, self.b, strict=False)])

    async def receive_track(self, volume: str, track: int, cg_seq: int, data: bytes,
                            runs: list[tuple[int, int]] | None = None) -> None:
        """Write a track into B: ``data`` is the whole track, or with ``runs``
        ((offset, length) in the track, ascending, apart) those runs' bytes
        one after another. C's copy-on-write covers the whole track's grains
        either way (once per CG, as for a whole track)."""
        vi = self._vi(volume)
        tb = self._track_bytes.get(volume)
        if tb is None:
            raise RemoteError("receive_track before hello")
        if cg_seq <= self.committed_cg:
            raise RemoteError(f"CG {cg_seq} is not newer than the committed CG {self.committed_cg}")
        self._refuse_in_doubt(f"a track of CG {cg_seq}", None)
        b = self.b[vi]
        bs = b.info.block_size
        offset = track * tb
        n = len(data)
        expect = min(tb, b.info.size_bytes - offset) if 0 <= offset < b.info.size_bytes else -1
        if runs is None:
            if n != expect:
                raise RemoteError(f"{volume} track {track}: {n} bytes, expected {expect}")
        else:
            end = 0
            for start, length in runs:
                if start < end or length <= 0 or start % bs or length % bs or start + length > expect:
                    raise RemoteError(f"{volume} track {track}: run {start}+{length} is out of order, empty, "
                                      f"unaligned to {bs} or past the track's {expect} bytes")
                end = start + length
            if sum(length for _, length in runs) != n:
                raise RemoteError(f"{volume} track {track}: runs add up to {sum(r[1] for r in runs)} bytes, "
                                  f"{n} came")
        self.receiving_seq = cg_seq
        grains = self.fc.grains(vi, offset, expect)
        await self.fc.lock(vi, grains)
        try:
            await self.fc.before_b_write(vi, grains, lambda: self.crashpoints.hit(MID_FLASHCOPY))
            if runs is None:
                await b.write(offset // bs, data)
            else:
                view = memoryview(data)
                pos = 0
                for start, length in runs:
                    await b.write((offset + start) // bs, view[pos : pos + length])
                    pos += length
        finally:
            self.fc.unlock(vi, grains)
        self.received_tracks += 1
        self.received_bytes += n

    async def sync(self, cg_seq: int) -> None:
        """Every track received so far is durable in B once this returns."""
        for b in self.b:
            await b.flush()

    async def drain_done(self, cg_seq: int) -> None:
        self.events.emit("change", "cg", seq=cg_seq, phase="drained", role="secondary")

    async def prepare(self, cg_seq: int) -> None:
        if cg_seq <= self.committed_cg:
            raise RemoteError(f"prepare of CG {cg_seq}: CG {self.committed_cg} is already committed")
        self._refuse_in_doubt(f"prepare of CG {cg_seq}", cg_seq)
        for b in self.b:
            await b.flush()  # B durable for this CG before it can become C
        self.fc.prepare(cg_seq)
        self.crashpoints.hit(AFTER_PREPARE)

    async def commit(self, cg_seq: int) -> None:
        rec = self.fc.record
        if rec["committed_seq"] == cg_seq:
            return  # a repeated commit (the primary did not see our answer)
        if rec["phase"] != FC_PREPARED or rec["prepared_seq"] != cg_seq:
            raise RemoteError(f"commit of CG {cg_seq} without prepare (prepared: {rec['prepared_seq']})")
        for c in self.c:
            await c.flush()  # copied grains durable before the bits that point at them are dropped
        self.crashpoints.hit(MID_COMMIT)
        # After a restart no hello may have come yet (an in-process remote):
        # the generation stays the one the record holds.
        self.fc.commit(cg_seq, self.clock.wall(), self._primary_generation or self.fc.record["primary_generation"])
        self.events.emit("destroy", "cg", seq=cg_seq, result="committed", role="secondary")

    async def abort(self, cg_seq: int) -> None:
        if self.fc.record["prepared_seq"] == cg_seq:
            self.fc.abort()
        self.events.emit("destroy", "cg", seq=cg_seq, result="failed", role="secondary")

    # -- session recovery: every member's C to one CG -----------------------------------------
    def _in_doubt(self) -> int | None:
        rec = self.fc.record
        return rec["prepared_seq"] if rec["phase"] == FC_PREPARED else None

    def _refuse_in_doubt(self, what: str, same_seq: int | None) -> None:
        doubt = self._in_doubt() if self.session_member else None
        if doubt is not None and doubt != same_seq:
            raise RemoteError(f"{what} refused: CG {doubt} is prepared and in doubt; "
                              "commit or revert it first (session recover)")

    async def recovery_state(self) -> RecoveryState:
        return RecoveryState(committed_seq=self.committed_cg, prepared_seq=self._in_doubt())

    async def commit_flash(self, seq: int) -> None:
        """Commit the prepared CG ``seq`` (after a restart too): B holds it,
        durable since prepare, so C becomes B by the FlashCopy record flip."""
        if self.committed_cg == seq:
            return
        if self._in_doubt() != seq:
            raise RemoteError(f"commit_flash of CG {seq}: not prepared (committed {self.committed_cg}, "
                              f"prepared {self._in_doubt()})")
        # After a restart no hello has said the primary's generation: keep the recorded one
        # (a reformatted primary then gets a full copy, the safe side).
        generation = self._primary_generation or self.fc.record["primary_generation"]
        for c in self.c:
            await c.flush()  # copied grains durable before the bits that point at them are dropped
        self.fc.commit(seq, self.clock.wall(), generation)
        self.events.emit("change", "session", recovery="commit_flash", seq=seq)

    async def revert_flash(self, seq: int) -> None:
        """Drop the prepared CG ``seq``: C stays the last committed CG."""
        if self._in_doubt() == seq:
            self.fc.abort()
            self.events.emit("change", "session", recovery="revert_flash", seq=seq)
        elif self.committed_cg >= seq:
            raise RemoteError(f"revert_flash of CG {seq}: CG {self.committed_cg} is committed")

    # -- C --------------------------------------------------------------------------------
    async def read_c(self, volume: str, offset: int, length: int) -> bytes:
        vi = self._vi(volume)
        b = self.b[vi]
        bs = b.info.block_size
        if offset < 0 or length < 0 or offset + length > b.info.size_bytes or offset % bs or length % bs:
            raise RemoteError(f"{volume}: read of {length} bytes at {offset} is outside or unaligned")
        if length == 0:
            return b""
        return await self.fc.read_c(vi, offset, length)

    def host_target(self) -> HostTarget:
        return SecondaryTarget(self)

    # -- named snapshots: one CG of every volume, kept in memory while replication runs --
    def snapshot_create(self, name: str) -> dict:
        pin = self.snapshots.create(name)
        return {"name": name, "cg": pin.seq, "exports": [f"{n}{SNAPSHOT_SEP}{name}" for n in self.names]}

    def snapshot_delete(self, name: str) -> dict:
        pin = self.snapshots.delete(name)
        return {"name": name, "cg": pin.seq}

    def snapshot_list(self) -> list[dict]:
        return self.snapshots.entries()

    async def fast_reverse_restore(self) -> int:
        """C -> B: B becomes the last committed CG (failover). Returns grains copied."""
        n = await self.fc.reverse_restore()
        self.events.emit("change", "session", recovery="fast_reverse_restore", grains=n)
        return n

    def status(self) -> dict:
        rec = self.fc.record
        return {
            "role": "secondary",
            "session_id": self.session_id,
            "committed_cg": rec["committed_seq"],
            "last_commit_time": rec["commit_wall"] or None,
            "prepared_cg": rec["prepared_seq"] if rec["phase"] == FC_PREPARED else None,
            "established": bool(rec["established"]),
            "receiving_cg": self.receiving_seq,
            "received_tracks": self.received_tracks,
            "received_bytes": self.received_bytes,
            "cow_copies": self.fc.cow_copies,
            "pins": self.fc.pins.status() | {"snapshots": self.snapshots.names()},
            "volumes": [{"name": n, "size_bytes": b.info.size_bytes, "b_url": b.info.url, "c_url": c.info.url,
                         "copied_grains": self.fc.copied(i).count()}
                        for i, (n, b, c) in enumerate(zip(self.names, self.b, self.c, strict=False))],
        }
