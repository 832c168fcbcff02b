"""LocalRemote: a Primary's RemotePort answered by a Secondary in the same
process, by direct calls (firmware/link_primary.py's LinkRemote carries the
same calls over the replication link)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from firmware.remote import RemotePort, RemoteState, VolumeGeometry

if TYPE_CHECKING:
    from firmware.secondary import Secondary


class LocalRemote(RemotePort):
    """RemotePort by direct calls into a Secondary in the same process."""

    def __init__(self, secondary: Secondary) -> None:
        self.secondary = secondary
        self.sent_tracks = 0

    async def connect(self, session_id: str, volumes: list[VolumeGeometry], generation: int = 0) -> RemoteState:
        return await self.secondary.hello(session_id, volumes, generation)

    async def send_track(self, volume: str, track: int, cg_seq: int, data: bytes,
                         runs: list[tuple[int, int]] | None = None) -> None:
        self.sent_tracks += 1
        if runs is None:
            await self.secondary.receive_track(volume, track, cg_seq, bytes(data))
        else:
            await self.secondary.receive_track(volume, track, cg_seq, bytes(data), list(runs))

    async def sync(self, cg_seq: int) -> None:
        await self.secondary.sync(cg_seq)

    async def drain_done(self, cg_seq: int) -> None:
        await self.secondary.drain_done(cg_seq)

    async def prepare(self, cg_seq: int) -> None:
        await self.secondary.prepare(cg_seq)

    async def commit(self, cg_seq: int) -> None:
        await self.secondary.commit(cg_seq)

    async def abort(self, cg_seq: int) -> None:
        await self.secondary.abort(cg_seq)
