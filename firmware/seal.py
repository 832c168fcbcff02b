"""What seals a frame after a handshake, for both links (the replication
link, firmware/protocol.py, and the session control link,
firmware/control_protocol.py): the session key, the per-frame MAC, and the
AEAD that seals (and by default encrypts) a DATA frame's payload.

- ``session_key``: HKDF-SHA256 (RFC 5869) with both handshake nonces as the
  salt and the protocol and session as the info, so every connection has
  its own key and a frame recorded on one is worth nothing on the next.
- ``seal_mac``: HMAC-SHA256 over the sender's role, its sequence number and
  the bytes it covers; the role means a frame cannot be reflected back at
  its sender.
- ``FrameCipher``: AES-256-GCM with the sender's role and sequence number in
  the 96-bit nonce (4 bytes of role, 8 of seq: never the same nonce twice
  under one key, since each side numbers its frames 1, 2, 3, ...). With
  ``encrypt`` off the payload goes in the associated data instead: the tag
  still covers every byte (integrity), nothing is hidden.

Pure computation on bytes (the standard library and the ``cryptography``
package); the framing and the sequence checks are the callers'.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAC_BYTES = 32  # HMAC-SHA256
KEY_BYTES = 32
TAG_BYTES = 16  # AES-GCM
_HAS_INTO = hasattr(AESGCM, "encrypt_into")  # cryptography >= 45: no copy of the ciphertext


def hkdf_sha256(secret: bytes, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with ``salt``, expand with ``info``."""
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    out, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
    return out[:length]


def session_key(secret: bytes, first_nonce: bytes, second_nonce: bytes, label: bytes, session_id: str,
                length: int = KEY_BYTES) -> bytes:
    """The key of one connection: both nonces as the salt (initiator's
    first), ``label`` (the protocol) and the session as the info."""
    return hkdf_sha256(secret, first_nonce + second_nonce, label + b"\0" + session_id.encode(), length)


def seal_mac(key: bytes, role: str, seq: int, covered: bytes | memoryview) -> bytes:
    """The MAC of a sealed frame: the sender's role, its seq, then what it covers."""
    mac = hmac.new(key, role.encode() + b"\0" + seq.to_bytes(8, "big"), hashlib.sha256)
    mac.update(covered)
    return mac.digest()


def check_seal_mac(key: bytes, role: str, seq: int, covered: bytes | memoryview, mac: bytes | memoryview) -> bool:
    return hmac.compare_digest(seal_mac(key, role, seq, covered), bytes(mac))


@functools.cache
def _role_prefix(role: str) -> bytes:
    return hashlib.sha256(role.encode()).digest()[:4]


class SessionKeys:
    """The two keys of one connection, from one HKDF output: one for the
    per-frame MAC, one for the AEAD (never one key for both)."""

    def __init__(self, material: bytes) -> None:
        if len(material) != 2 * KEY_BYTES:
            raise ValueError(f"session keys need {2 * KEY_BYTES} bytes of key material, not {len(material)}")
        self.mac_key = material[:KEY_BYTES]
        self.cipher = FrameCipher(material[KEY_BYTES:])


class FrameCipher:
    """AES-256-GCM for the frames of one connection; ``role`` names the
    sender whose nonces these are."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a frame cipher key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)

    @staticmethod
    def nonce(role: str, seq: int) -> bytes:
        return _role_prefix(role) + seq.to_bytes(8, "big")

    def seal_into(self, role: str, seq: int, plain: bytes | memoryview, aad: bytes | memoryview,
                  out: memoryview) -> None:
        """Write ciphertext of ``plain`` and the tag (``len(plain) + TAG_BYTES``)
        into ``out``; the tag also covers ``aad``."""
        nonce = self.nonce(role, seq)
        if _HAS_INTO:
            self._aead.encrypt_into(nonce, plain, aad, out)
        else:
            out[:] = self._aead.encrypt(nonce, bytes(plain), bytes(aad))

    def open(self, role: str, seq: int, sealed: bytes | memoryview, aad: bytes | memoryview) -> bytes | None:
        """The plaintext of ``sealed`` (ciphertext then tag), or None when the
        tag does not match (rewritten, forged, another key or role)."""
        try:
            return self._aead.decrypt(self.nonce(role, seq), sealed, aad)
        except InvalidTag:
            return None
