"""RemotePort: how a primary reaches its secondary; SecondaryPort: what the
secondary answers.

The primary programs against RemotePort only. ``LocalRemote`` (in
firmware/local_remote.py) calls a Secondary in the same process; the link
implementation (firmware/link_primary.py) encodes the same calls as frames
over a hal ``Link``. Every method returns when the secondary has done it,
so "the secondary has the block" is the return of ``send_track``. Many
``send_track`` calls may be in flight at once; implementations bound them.

On the other end, ``ReplicationService`` turns frames back into calls on a
``SecondaryPort`` (the Secondary, or a test's fake): one method per request
the primary can make, all of them coroutines.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol


class RemoteError(Exception):
    """The secondary refused a request (the message says why)."""


@dataclass(frozen=True)
class VolumeGeometry:
    name: str
    size_bytes: int
    track_bytes: int


@dataclass
class RemoteState:
    """What the secondary reports about itself at connect time."""

    session_id: str
    committed_cg: int  # sequence number of the CG that C holds (0: none)
    new: bool  # True when B/C were never written by this session: full copy needed
    volumes: list[VolumeGeometry]


class RemotePort(abc.ABC):
    # Counts the hellos said on new links (a link remote reconnects underneath
    # its callers). A secondary reached on a later epoch may have restarted and
    # lost what sat in its volatile cache: the drain syncs only what it sent on
    # the sync's own epoch.
    epoch: int = 0

    @property
    def link_up(self) -> bool:
        """Whether the secondary can be reached now. An in-process remote
        always can; a link remote says whether its link is up (it alone
        emits the ``change link`` events)."""
        return True

    @abc.abstractmethod
    async def connect(self, session_id: str, volumes: list[VolumeGeometry], generation: int = 0) -> RemoteState:
        """Hello: check geometry and learn what the secondary holds.
        ``generation`` names the primary NVRAM's format: a secondary that last
        committed for another one answers ``new`` (a full copy is due).
        Raises RemoteError on a mismatch."""

    @abc.abstractmethod
    async def send_track(self, volume: str, track: int, cg_seq: int, data: bytes) -> None:
        """Write one track image (``track_bytes`` long, the last track of a
        volume may be shorter) into B for the CG being formed. An
        implementation whose ``send_track`` also takes ``runs`` (a list of
        (offset, length) in the track) is given only the segments that
        changed: ``data`` is then those runs' bytes one after another."""

    @abc.abstractmethod
    async def sync(self, cg_seq: int) -> None:
        """Make every track acknowledged so far (its ``send_track``
        returned) durable in B: a power cut at the secondary keeps them.
        Sends still in flight need not be covered. The primary clears OOS
        bits only after this, and only of acknowledged tracks: a track whose
        bit is cleared is never sent again."""

    @abc.abstractmethod
    async def drain_done(self, cg_seq: int) -> None:
        """Every track of ``cg_seq`` has been sent."""

    @abc.abstractmethod
    async def prepare(self, cg_seq: int) -> None:
        """Phase one of commit: make B durable for ``cg_seq`` on every volume."""

    @abc.abstractmethod
    async def commit(self, cg_seq: int) -> None:
        """Phase two: C becomes B at ``cg_seq``, atomically across volumes."""

    @abc.abstractmethod
    async def abort(self, cg_seq: int) -> None:
        """The CG failed; B may hold part of it, C keeps the last commit."""

    async def close(self) -> None:
        return None


class SecondaryPort(Protocol):
    """The calls a secondary answers, one per request frame."""

    async def hello(self, session_id: str, volumes: list[VolumeGeometry], generation: int = 0) -> RemoteState:
        """Check the primary's session and geometry; say what C holds.
        Raises RemoteError to refuse the pairing."""
        ...

    async def receive_track(self, volume: str, track: int, cg_seq: int, data: bytes) -> None:
        """Write one track image into B for ``cg_seq`` (the Secondary also
        takes ``runs``: ``data`` is then only those runs of the track)."""
        ...

    async def sync(self, cg_seq: int) -> None: ...

    async def drain_done(self, cg_seq: int) -> None: ...

    async def prepare(self, cg_seq: int) -> None: ...

    async def commit(self, cg_seq: int) -> None: ...

    async def abort(self, cg_seq: int) -> None: ...
