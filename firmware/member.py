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
Every method returns when the member has done it, raises ``MemberError``
when the member refuses (it says why), and ``ConnectionError``/``OSError``/
``TimeoutError`` when the member cannot be reached. The in-process
implementation wraps a Primary; the control link carries the same calls as
frames.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


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

    async def close(self) -> None:
        return None
