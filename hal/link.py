"""Link: a framed, ordered byte channel that is reliable until it breaks."""

from __future__ import annotations

import abc


class LinkDown(ConnectionError):
    """The link broke; frames sent since the last acknowledgement may be lost."""


class Link(abc.ABC):
    @abc.abstractmethod
    async def send(self, frame: bytes) -> None:
        """Queue one frame; raises LinkDown when the link is broken."""

    @abc.abstractmethod
    async def recv(self) -> bytes:
        """The next frame, in order; raises LinkDown when the link is broken."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    def peer(self) -> str:
        return ""
