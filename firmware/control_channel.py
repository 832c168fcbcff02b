"""The control link's handshake and its sealed channel.

The handshake is the data link's mutual HMAC challenge (firmware/link_handshake.py),
with the roles ``master`` and ``subordinate`` in its MACs, so a response
made for the data link is refused here and the other way round::

    M -> S  CONTROL_HELLO(control version, session id, master name)
    S -> M  AUTH_CHALLENGE(nonce_s)
    M -> S  AUTH_RESPONSE(mac = HMAC(secret, "master" | nonce_s | session), challenge = nonce_m)
    S -> M  AUTH_RESPONSE(mac = HMAC(secret, "subordinate" | nonce_m | session))   or ERROR

Both sides then derive the session key from the secret and both nonces and
talk through a ``SealedChannel`` (firmware/sealed.py, shared with the
replication link): every frame sealed with that key and the
sender's role, its seq one more than the sender's last. A replayed
handshake fails at the third step (nonce_s is fresh); a frame replayed,
reordered or rewritten after it fails the channel's checks, and the side
that sees it refuses it with a log line and closes the connection.

Nonces come from a caller-supplied ``random_bytes`` so the firmware stays
deterministic under test.
"""

from __future__ import annotations

from functools import partial

from firmware import control_protocol as cp
from firmware import frames as p
from firmware.link_handshake import NONCE_BYTES, RandomBytes, auth_mac, check_mac
from firmware.sealed import SealedChannel
from hal.link import Link, LinkDown

MIN_NONCE_BYTES = 16


class ControlRefused(ConnectionError):
    """The pairing was refused (secret, version, session, or a frame that
    does not belong); ``code`` is what the ERROR frame says."""

    def __init__(self, message: str, code: int = p.ErrorCode.AUTH) -> None:
        super().__init__(message)
        self.code = code


def control_channel(link: Link, key: bytes, role: str, peer_role: str, peer_name: str = "") -> SealedChannel:
    """The shared channel (firmware/sealed.py) with the control link's codec:
    frames sealed with ``key`` as ``role``, the peer's opened as ``peer_role``."""
    return SealedChannel(link, partial(cp.encode, key=key, role=role), partial(cp.decode, key=key, role=peer_role),
                         role, peer_role, peer_name=peer_name)


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
    return control_channel(link, key, cp.MASTER, cp.SUBORDINATE)


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
    return control_channel(link, key, cp.SUBORDINATE, cp.MASTER, peer_name=hello.name)
