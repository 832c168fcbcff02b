"""MemberPort: how a session's master drives one primary controller (a
subordinate, or itself) through a consistency group that spans all of them
(DESIGN.md section 3, the DS8000-style master/subordinate session).

The master calls, for CG ``seq``, on every member:
    start(seq)    quiesce: hold host write acks, switch recording to CR; acks stay held
    run(seq)      release the held acks (only after every member answered start)
    drain(seq)    send every OOS track and make it durable at the member's secondary
    prepare(seq)  the member's secondary prepares (B durable, C revertible)
    commit(seq)   the member's secondary commits; the member swaps CR into OOS
    fail(seq, r)  the CG failed somewhere: fold CR back into OOS, release acks, abort
Once any member committed CG ``seq``, the master sends no fail for it: a
member whose commit did not answer is in doubt (its secondary keeps the CG
prepared, ``MemberState.in_doubt_seq``) and is sent ``commit(seq)`` again,
which then only commits at its secondary. ``fail(seq)`` of a member in doubt
reverts its secondary's prepared CG. A member in doubt refuses ``start``.
Session recovery after crashes works on the secondaries (``FlashPort``).
Every method returns when the member has done it, raises ``MemberError``
when the member refuses (it says why), and ``ConnectionError``/``OSError``/
``TimeoutError`` when the member cannot be reached. The in-process
implementation wraps a Primary; the control link carries the same calls as
frames.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class MemberError(Exception):
    """A member refused a session request (the message says why)."""


@dataclass
class MemberState:
    """What a member reports about itself (hello and status)."""

    name: str
    session_id: str
    copy_state: str = ""
    phase: str = "idle"
    link: str = "down"
    committed_seq: int = 0
    oos_tracks: int = 0
    cr_tracks: int = 0
    held_ack_ms: dict = field(default_factory=dict)
    last_cg_time: float | None = None
    cg_seq: int = 0  # the member's current (or last) CG; the master numbers the next one above every member's
    in_doubt_seq: int = 0  # a CG its secondary prepared whose outcome the member does not know (0: none)


@dataclass
class RecoveryState:
    """What one member's secondary holds: the last committed CG, and a CG it
    prepared that was neither committed nor reverted (None: none)."""

    committed_seq: int
    prepared_seq: int | None = None


@runtime_checkable
class FlashPort(Protocol):
    """What session recovery needs of each member's secondary (the DS8000
    ``commitflash``/``revertflash`` and fast reverse restore). The in-process
    Secondary is one; the control link may carry the same calls."""

    async def recovery_state(self) -> RecoveryState: ...

    async def commit_flash(self, seq: int) -> None: ...

    async def revert_flash(self, seq: int) -> None: ...

    async def fast_reverse_restore(self) -> int: ...


class MemberPort(abc.ABC):
    name: str

    @abc.abstractmethod
    async def hello(self, session_id: str) -> MemberState: ...

    @abc.abstractmethod
    async def start(self, seq: int) -> None: ...

    @abc.abstractmethod
    async def run(self, seq: int) -> None: ...

    @abc.abstractmethod
    async def drain(self, seq: int) -> None: ...

    @abc.abstractmethod
    async def prepare(self, seq: int) -> None: ...

    @abc.abstractmethod
    async def commit(self, seq: int) -> None: ...

    @abc.abstractmethod
    async def fail(self, seq: int, reason: str) -> None: ...

    @abc.abstractmethod
    async def status(self) -> MemberState: ...

    def master_lost(self, reason: str) -> None:
        """The control link to the master broke (a subordinate's service says
        so). A member in this process fails its CG in flight."""
        return None

    def master_joined(self, master: str) -> None:
        """A master paired on the control link (``name@address``), for status."""
        return None

    async def close(self) -> None:
        return None
