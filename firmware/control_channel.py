"""The control link's handshake and its sealed channel.

The handshake is the data link's mutual HMAC challenge (firmware/link_handshake.py),
with the roles ``master`` and ``subordinate`` in its MACs, so a response
made for the data link is refused here and the other way round::

    M -> S  CONTROL_HELLO(control version, session id, master name)
    S -> M  AUTH_CHALLENGE(nonce_s)
    M -> S  AUTH_RESPONSE(mac = HMAC(secret, "master" | nonce_s | session), challenge = nonce_m)
    S -> M  AUTH_RESPONSE(mac = HMAC(secret, "subordinate" | nonce_m | session))   or ERROR

Both sides then derive the session key from the secret and both nonces and
talk through a ``SealedChannel``: every frame sealed with that key and the
sender's role, its seq one more than the sender's last. A replayed
handshake fails at the third step (nonce_s is fresh); a frame replayed,
reordered or rewritten after it fails the channel's checks, and the side
that sees it refuses it with a log line and closes the connection.

Nonces come from a caller-supplied ``random_bytes`` so the firmware stays
deterministic under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from firmware import control_protocol as cp
from firmware import protocol as p
from firmware.link_handshake import NONCE_BYTES, RandomBytes, auth_mac, check_mac
from hal.link import Link, LinkDown

MIN_NONCE_BYTES = 16


class ControlRefused(ConnectionError):
    """The pairing was refused (secret, version, session, or a frame that
    does not belong); ``code`` is what the ERROR frame says."""

    def __init__(self, message: str, code: int = p.ErrorCode.AUTH) -> None:
        super().__init__(message)
        self.code = code


class SealedChannel:
    """A Link after the handshake: frames sealed with the session key, and
    sequence numbers 1, 2, 3, ... in each direction."""

    def __init__(self, link: Link, key: bytes, role: str, peer_role: str, peer_name: str = "") -> None:
        self.link = link
        self._key = key
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
            raw = cp.encode(frame, key=self._key, role=self.role)
            self._sent = seq
            if before_send is not None:
                before_send(seq)
            await self.link.send(raw)
        return seq

    async def recv(self) -> p.Frame:
        """The next frame from the peer; ProtocolError (BadMac, BadSequence,
        ...) when it must be refused."""
        frame = cp.decode(await self.link.recv(), key=self._key, role=self.peer_role)
        expected = self._received + 1
        if frame.seq != expected:
            what = "replayed" if frame.seq <= self._received else "out of order (frames missing)"
            raise cp.BadSequence(f"{frame.KIND.name} seq {frame.seq} where {expected} was due: {what}")
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


async def _expect(link: Link, cls: type[p.Frame]) -> p.Frame:
    try:
        frame = cp.decode(await link.recv())
    except p.ProtocolError as e:
        await send_error(link, e.code, str(e))
        raise ControlRefused(f"handshake with {link.peer or 'peer'}: {e}", e.code) from None
    if isinstance(frame, p.Error):
        raise ControlRefused(f"{link.peer or 'peer'} refused the control link: "
                             f"{p.PeerError(frame.code, frame.message)}", frame.code)
    if not isinstance(frame, cls):
        msg = f"handshake: expected {cls.KIND.name}, got {frame.KIND.name}"
        await send_error(link, p.ErrorCode.STATE, msg)
        raise ControlRefused(msg, p.ErrorCode.STATE)
    return frame


async def send_error(link: Link, code: int, message: str) -> None:
    """An unsealed ERROR (during the handshake, before there is a key)."""
    try:
        await link.send(cp.encode(p.Error(code=int(code), message=message)))
    except LinkDown:
        pass


async def open_master(link: Link, secret: bytes, session_id: str, name: str,
                      random_bytes: RandomBytes) -> SealedChannel:
    """The master's side of the handshake; ControlRefused when it fails."""
    await link.send(cp.encode(cp.ControlHello(version=cp.CONTROL_VERSION, session_id=session_id, name=name)))
    challenge = await _expect(link, p.AuthChallenge)
    if len(challenge.nonce) < MIN_NONCE_BYTES:
        msg = f"the subordinate's challenge is {len(challenge.nonce)} bytes, fewer than {MIN_NONCE_BYTES}"
        await send_error(link, p.ErrorCode.AUTH, msg)
        raise ControlRefused(msg)
    nonce = random_bytes(NONCE_BYTES)
    mac = auth_mac(secret, cp.MASTER, challenge.nonce, session_id)
    await link.send(cp.encode(p.AuthResponse(mac=mac, challenge=nonce)))
    answer = await _expect(link, p.AuthResponse)
    if not check_mac(secret, cp.SUBORDINATE, nonce, session_id, answer.mac):
        msg = "the subordinate failed authentication (wrong shared secret?)"
        await send_error(link, p.ErrorCode.AUTH, msg)
        raise ControlRefused(msg)
    key = cp.session_key(secret, nonce, challenge.nonce, session_id)
    return SealedChannel(link, key, cp.MASTER, cp.SUBORDINATE)


async def accept_subordinate(link: Link, secret: bytes, session_id: str | None,
                             random_bytes: RandomBytes) -> SealedChannel:
    """The subordinate's side of the handshake; ControlRefused (after the
    peer got an ERROR saying why) when it fails. ``session_id`` None takes
    any session the master names."""
    hello = await _expect(link, cp.ControlHello)
    if hello.version != cp.CONTROL_VERSION:
        msg = f"control version {hello.version}; this subordinate speaks {cp.CONTROL_VERSION}"
        await send_error(link, p.ErrorCode.VERSION, msg)
        raise ControlRefused(msg, p.ErrorCode.VERSION)
    nonce = random_bytes(NONCE_BYTES)
    await link.send(cp.encode(p.AuthChallenge(nonce=nonce)))
    response = await _expect(link, p.AuthResponse)
    if not check_mac(secret, cp.MASTER, nonce, hello.session_id, response.mac):
        msg = "authentication failed (wrong shared secret, or a replayed handshake)"
        await send_error(link, p.ErrorCode.AUTH, msg)
        raise ControlRefused(msg)
    if len(response.challenge) < MIN_NONCE_BYTES:
        msg = f"the master's challenge is {len(response.challenge)} bytes, fewer than {MIN_NONCE_BYTES}"
        await send_error(link, p.ErrorCode.AUTH, msg)
        raise ControlRefused(msg)
    if session_id is not None and hello.session_id != session_id:
        msg = f"session {hello.session_id!r}; this subordinate is in {session_id!r}"
        await send_error(link, p.ErrorCode.SESSION, msg)
        raise ControlRefused(msg, p.ErrorCode.SESSION)
    mac = auth_mac(secret, cp.SUBORDINATE, response.challenge, hello.session_id)
    await link.send(cp.encode(p.AuthResponse(mac=mac)))
    key = cp.session_key(secret, response.challenge, nonce, hello.session_id)
    return SealedChannel(link, key, cp.SUBORDINATE, cp.MASTER, peer_name=hello.name)
