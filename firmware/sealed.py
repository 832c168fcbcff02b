"""A Link after a handshake: ``SealedChannel``, shared by the replication
link (firmware/link_primary.py, firmware/link_secondary.py) and the session
control link (firmware/control_channel.py).

Every frame sent is sealed by the link's own codec (``seal``: the session
key, the sender's role, the frame's seq; firmware/seal.py has the
primitives) with the sender's next sequence number, 1, 2, 3, ... in each
direction; every frame received is opened by it (``unseal``: the MAC or tag
checked before anything is parsed) and must carry exactly the next number
from the peer. A frame replayed, reordered, rewritten or from another
connection therefore fails here (BadMac, BadSequence), and the side that
sees it refuses it with a log line and closes the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from firmware import frames as p
from hal.link import Link, LinkDown

Seal = Callable[[p.Frame], bytes]  # the frame (seq set) -> its sealed bytes
Unseal = Callable[[bytes], p.Frame]  # sealed bytes from the peer -> the frame; ProtocolError when refused


class SealedChannel:
    """A Link after the handshake: frames sealed with the session key, and
    sequence numbers 1, 2, 3, ... in each direction."""

    def __init__(self, link: Link, seal: Seal, unseal: Unseal, role: str, peer_role: str,
                 peer_name: str = "") -> None:
        self.link = link
        self._seal = seal
        self._unseal = unseal
        self.role = role
        self.peer_role = peer_role
        self.peer_name = peer_name
        self._sent = 0
        self._received = 0
        self._send_lock = asyncio.Lock()

    @property
    def peer(self) -> str:
        return self.link.peer

    async def send(self, frame: p.Frame, before_send: Callable[[int], None] | None = None) -> int:
        """Seal and send ``frame`` with the next seq (returned). ``before_send``
        learns that seq first, so a reply cannot beat its waiter."""
        async with self._send_lock:
            seq = self._sent + 1
            frame.seq = seq
            raw = self._seal(frame)
            self._sent = seq
            if before_send is not None:
                before_send(seq)
            await self.link.send(raw)
        return seq

    async def recv(self) -> p.Frame:
        """The next frame from the peer; ProtocolError (BadMac, BadSequence,
        ...) when it must be refused."""
        frame = self._unseal(await self.link.recv())
        expected = self._received + 1
        if frame.seq != expected:
            what = "replayed" if frame.seq <= self._received else "out of order (frames missing)"
            raise p.BadSequence(f"{frame.KIND.name} seq {frame.seq} where {expected} was due: {what}")
        self._received = frame.seq
        return frame

    async def refuse(self, code: int, message: str) -> None:
        """Tell the peer why it is being dropped (sealed, best effort)."""
        try:
            await self.send(p.Error(code=int(code), message=message))
        except (LinkDown, p.ProtocolError):
            pass

    async def close(self) -> None:
        await self.link.close()
