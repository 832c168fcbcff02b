"""An in-memory Link pair: both ends in one process, for in-process pairs,
simulations and tests of the link protocols. Closing either end breaks both
(each side's ``recv`` raises LinkDown). ``tap`` (optional) sees every frame
sent and returns the frames to deliver instead (a test's tampering proxy);
``sent`` keeps what an end sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from hal.link import Link, LinkDown


class MemLink(Link):
    def __init__(self, name: str) -> None:
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.other: MemLink
        self.closed = False
        self.name = name
        self.tap: Callable[[bytes], Iterable[bytes]] | None = None
        self.sent: list[bytes] = []

    @property
    def peer(self) -> str:
        return self.other.name

    async def send(self, frame: bytes) -> None:
        if self.closed:
            raise LinkDown("memory link closed")
        frame = bytes(frame)
        self.sent.append(frame)
        for out in (self.tap(frame) if self.tap else (frame,)):
            self.other.inbox.put_nowait(out)

    async def recv(self) -> bytes:
        if self.closed:
            raise LinkDown("memory link closed")
        frame = await self.inbox.get()
        if frame is None:
            raise LinkDown("memory link closed")
        return frame

    async def close(self) -> None:
        for end in (self, self.other):
            if not end.closed:
                end.closed = True
                end.inbox.put_nowait(None)


def mem_pair(a_name: str, b_name: str) -> tuple[MemLink, MemLink]:
    a, b = MemLink(a_name), MemLink(b_name)
    a.other, b.other = b, a
    return a, b
