"""What both ends of the replication link share: the handshake's roles and
HMAC, its deadline, and reading one frame.

The handshake (primary P connects to secondary S)::

    P -> S  HELLO(version, session id, volume geometry, format generation)
    S -> P  AUTH_CHALLENGE(nonce_s)
    P -> S  AUTH_RESPONSE(mac = HMAC(secret, "primary" | nonce_s | session), challenge = nonce_p)
    S -> P  AUTH_RESPONSE(mac = HMAC(secret, "secondary" | nonce_p | session))
    S -> P  STATUS(session, committed CG, new, geometry)    or ERROR(code, message)   (sealed)

Both sides then derive the session keys (HKDF-SHA256 of the secret, salted
with nonce_p | nonce_s; ``protocol.Sealing.derive``) and every frame after
the secondary's AUTH_RESPONSE, STATUS first, travels sealed through a
``SealedChannel`` (firmware/sealed.py): a MAC per frame, DATA payloads
under AES-GCM, sequence numbers 1, 2, 3, ... per direction. A HELLO with
FLAG_CLEAR says the primary sends DATA payloads in clear ([link] encrypt =
false); a secondary that requires encryption refuses it.

The primary's side is ``LinkRemote`` (firmware/link_primary.py), the
secondary's ``ReplicationService`` (firmware/link_secondary.py); the frames
are in firmware/protocol.py.

Nonces come from a caller-supplied ``random_bytes`` and time from a hal
Clock, so the firmware stays deterministic under test.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable

from firmware import protocol as p
from firmware.remote import VolumeGeometry
from hal.clock import Clock
from hal.link import Link

RandomBytes = Callable[[int], bytes]

HANDSHAKE_TIMEOUT_S = 10.0
NONCE_BYTES = 32
PRIMARY = "primary"
SECONDARY = "secondary"


def auth_mac(secret: bytes, role: str, nonce: bytes, session_id: str) -> bytes:
    """HMAC-SHA256 over the role that answers, the peer's nonce and the session.

    The role is in the MAC so a response cannot be reflected back at its
    sender; the session binds the response to this pairing."""
    msg = b"mirrorfw-link-v1\0" + role.encode() + b"\0" + nonce + b"\0" + session_id.encode()
    return hmac.new(secret, msg, hashlib.sha256).digest()


def check_mac(secret: bytes, role: str, nonce: bytes, session_id: str, mac: bytes) -> bool:
    return hmac.compare_digest(auth_mac(secret, role, nonce, session_id), mac)


async def with_deadline(clock: Clock, aw: Awaitable, seconds: float, what: str):
    """Await ``aw`` for at most ``seconds`` of ``clock`` time; TimeoutError after."""
    task = asyncio.ensure_future(aw)
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    handle = clock.call_later(seconds, expire)
    try:
        return await task
    except asyncio.CancelledError:
        if fired:
            raise TimeoutError(f"{what}: no answer in {seconds:g} s") from None
        raise
    finally:
        handle.cancel()
        if not task.done():
            task.cancel()


async def recv_frame(link: Link) -> p.Frame:
    return p.decode(await link.recv())


def wire_geometry(volumes: list[VolumeGeometry]) -> list[tuple[str, int, int]]:
    """Volumes as HELLO and STATUS carry them."""
    return [(v.name, v.size_bytes, v.track_bytes) for v in volumes]
