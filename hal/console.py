"""ConsolePort: a line-oriented text channel (serial, pty, TCP)."""

from __future__ import annotations

import abc


class ConsolePort(abc.ABC):
    @abc.abstractmethod
    async def readline(self) -> str | None:
        """The next line without its terminator; None when the peer went away."""

    @abc.abstractmethod
    async def write(self, text: str) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...
