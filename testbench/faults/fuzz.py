"""Fuzzers: every interface a peer or an operator can reach, at scale.

Each interface is a *target*: a function of one input (bytes) that feeds it
to the real parser or handler in this process and raises only on a crash,
i.e. an exception other than the interface's documented error class (its
``ProtocolError`` / ``ConfigError`` / ``TraceError`` / ``LinkDown`` /
``ControlRefused``, or a Reply for the console) or an ``exc_info`` log record
from the code under test (a handler that caught a bug to stay up). Targets:

- ``nbd_handshake``, ``nbd_transmission``: drivers/nbd/server.py's
  connection protocol fed from a fake transport (option haggling from the
  first byte; requests after a valid OPT_GO), on a 1 MiB memory volume.
- ``link_preauth``: a real ``ReplicationService`` in front of a real
  Secondary, serving an in-memory link that carries mutated handshake frames.
- ``link_sealed``: frames after a real handshake with the secret (its session
  keys): mutated sealed frames opened with the secondary's ``Sealing``, half
  of them re-sealed (MAC/tag and CRC recomputed) so the body parsers behind
  the seal see the damage too.
- ``control``: the session control link: ``accept_subordinate`` on mutated
  handshakes, and sealed frames (key from a real handshake) as above.
- ``console``: ``CommandSet.execute`` on a real in-process Primary.
- ``trace``: every trace reader that needs no options (first byte picks it).
- ``config``: ``harness.config.load_config`` on mutated valid configs.

Each target runs in its own worker process (two at a time), with its own
budgets: per-case time (a case over ``HANG_S`` is a hang), peak RSS
(``RSS_BUDGET_MIB``), and the worker's wall time. The engine is atheris
(coverage-guided, libFuzzer: -runs, -timeout, -rss_limit_mb) when it is
installed (``pip install -e '.[fuzz]'``), else a seeded mutation fuzzer on
the same targets from the same valid seeds.

Listeners get a live sample besides (``live_nbd``, ``live_link``): mutated
byte streams at a real NbdServer / ReplicationService over TCP, with a good
client checked between cases.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

EXAMPLES = 3
HANG_S = 2.0  # one case longer than this is a hang
RSS_BUDGET_MIB = 768  # what a worker's cases may add to its RSS (the interpreter and its imports are ~100 MiB)
SECRET = b"fuzz-secret-0123456789abcdef"
SESSION = "fuzz"
INTERFACES = {  # results.json "fuzz" key -> its targets
    "nbd": ("nbd_handshake", "nbd_transmission"),
    "link": ("link_preauth", "link_sealed"),
    "control": ("control",),
    "console": ("console",),
    "trace": ("trace",),
    "config": ("config",),
}


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to three of: flip a bit, overwrite a byte with an edge value, insert
    junk, truncate, duplicate a slice, overwrite a 4/8-byte field with an edge."""
    b = bytearray(data)
    if not b:
        return rng.randbytes(rng.randrange(1, 64))
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[i] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif op == 3:
            del b[i:]
        elif op == 4:
            j = min(len(b), i + rng.randrange(1, 32))
            b[j:j] = b[i:j]
        else:
            width = rng.choice((2, 4, 8))
            edge = rng.choice((0, 1, (1 << (8 * width)) - 1, 1 << (8 * width - 1), rng.randrange(1 << (8 * width))))
            b[i:i + width] = edge.to_bytes(width, "big")
    return bytes(b)


def _result(cases: int, crashes: list[str]) -> dict:
    return {"cases": cases, "crashes": len(crashes), "examples": crashes[:EXAMPLES]}


class Crash(Exception):
    """What a target raises for a crash (wrapping the real exception's words)."""


class _ExcInfoLog(logging.Handler):
    """Counts log records that carry a traceback (``log.exception``): code
    under test that caught a bug of its own to stay up."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[0] is not None:
            self.records.append(f"{record.name}: {record.getMessage()}: {record.exc_info[0].__name__}: "
                                f"{record.exc_info[1]}")


@dataclass
class Target:
    run: Callable[[bytes], None]  # raises Crash (or anything unexpected) on a crash
    seeds: list[bytes]
    close: Callable[[], None] = lambda: None
    notes: dict = field(default_factory=dict)


# -- a Link in memory ------------------------------------------------------------------


class _MemLink:
    """A hal Link whose peer is a script: ``recv`` hands out the frames given,
    then LinkDown; what is sent is kept."""

    def __init__(self, frames, on_send=None) -> None:
        from hal.link import LinkDown

        self._down = LinkDown
        self.frames = list(frames)
        self.sent: list[bytes] = []
        self.on_send = on_send
        self.closed = False

    @property
    def peer(self) -> str:
        return "fuzz"

    async def send(self, frame) -> None:
        if self.closed:
            raise self._down("closed")
        self.sent.append(bytes(frame))
        if self.on_send is not None:
            self.on_send(self, bytes(frame))

    async def recv(self) -> bytes:
        await asyncio.sleep(0)
        if self.closed or not self.frames:
            raise self._down("script ended")
        return self.frames.pop(0)

    async def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def _split_frames(data: bytes, header_bytes: int, rest_length) -> list[bytes]:
    """Cut a byte stream into frames as the TCP link would (header, then what
    it says follows); a short tail is the last frame."""
    frames, i = [], 0
    while i < len(data) and len(frames) < 16:
        head = data[i:i + header_bytes]
        n = rest_length(head) if len(head) == header_bytes else 0
        frames.append(data[i:i + header_bytes + n])
        i += header_bytes + n
    return frames


def _run_case(loop: asyncio.AbstractEventLoop, coro, expected: tuple, what: str) -> None:
    try:
        loop.run_until_complete(asyncio.wait_for(coro, HANG_S * 5))
    except expected:
        pass
    except TimeoutError:
        raise Crash(f"{what}: no end after {HANG_S * 5:g} s (hang)") from None


# -- NBD ------------------------------------------------------------------------------

NBD_OPTS_MAGIC = b"IHAVEOPT"
NBD_REQUEST_MAGIC = 0x25609513
NBD_OPT_GO = 7
NBD_VOLUME_BYTES = 1 << 20


def _nbd_go(export: bytes = b"vol0") -> bytes:
    go = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
    return struct.pack(">I", 3) + NBD_OPTS_MAGIC + struct.pack(">II", NBD_OPT_GO, len(go)) + go


def _nbd_requests(rng: random.Random) -> bytes:
    out = b""
    for h in range(rng.randrange(1, 4)):
        cmd = rng.choice((0, 1, 3, 4, 6))  # read, write, flush, trim, write zeroes
        offset = rng.randrange(0, 64) * 512
        length = 512 * rng.randrange(1, 9)
        out += struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, rng.choice((0, 1)), cmd, h, offset, length)
        if cmd == 1:
            out += rng.randbytes(length)
    return out + struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 2, 99, 0, 0)  # disconnect


class _FakeTransport:
    """What drivers/nbd/server.py's protocol asks of a transport, in memory."""

    def __init__(self) -> None:
        self.out = 0
        self.closing = False
        self.paused = False

    def get_extra_info(self, name, default=None):
        return ("fuzz", 0) if name == "peername" else default

    def write(self, data) -> None:
        self.out += len(data)

    def writelines(self, parts) -> None:
        for part in parts:
            self.out += len(part)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def _nbd_target(transmission: bool) -> Target:
    from drivers import open_device
    from drivers.nbd.limits import NbdLimits
    from drivers.nbd.server import NbdServer, _Connection
    from harness.hostport import DeviceTarget

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    target = DeviceTarget({"vol0": open_device(f"mem://?size={NBD_VOLUME_BYTES}")})
    # Small budgets so that fuzzed lengths meet them in a few cases.
    server = NbdServer(target, limits=NbdLimits(max_request_bytes=1 << 20, connection_buffer_bytes=4 << 20,
                                                server_buffer_bytes=8 << 20, handshake_timeout_s=HANG_S,
                                                stall_timeout_s=HANG_S))
    prefix = _nbd_go() if transmission else b""
    rng = random.Random(5)
    seeds = [_nbd_requests(rng)[:-28] for _ in range(8)] + [_nbd_requests(rng)] if transmission else [_nbd_go() + _nbd_requests(rng)
                                                                       for _ in range(4)]
    if not transmission:
        seeds += [_nbd_go(b"nope"), struct.pack(">I", 3) + NBD_OPTS_MAGIC + struct.pack(">II", 3, 0)]

    live: list = []  # transmission: one connection goes on across cases until a case ends it

    async def settle(conn) -> None:
        for _ in range(50):  # let requests at the volume finish
            if not conn.tasks and (conn.negotiation is None or conn.negotiation.done()):
                break
            await asyncio.sleep(0)

    async def end(conn) -> None:
        if not conn.closed:
            conn.eof_received()
        for _ in range(3):
            await asyncio.sleep(0)
        if conn.negotiation is not None and not conn.negotiation.done():
            conn.negotiation.cancel()
        conn.connection_lost(None)
        if conn.tasks:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        await asyncio.sleep(0)

    async def push(conn, tr, data: bytes) -> None:
        # Chunks as the input's length says: mostly whole, one in 16 a few bytes at a time.
        pos, step = 0, (1 + len(data) // 16 % 7) if len(data) % 16 == 1 else 1 << 16
        stalls = 0
        while pos < len(data) and not conn.closed and not tr.closing and stalls <= 20:
            if tr.paused or conn.blocked:
                stalls += 1
                await asyncio.sleep(0)
                continue
            buf = conn.get_buffer(-1)
            n = min(len(buf), step, len(data) - pos)
            if n == 0:
                stalls += 1
                await asyncio.sleep(0)
                continue
            buf[:n] = data[pos:pos + n]
            pos += n
            conn.buffer_updated(n)
            if step < 1 << 16 or conn.negotiation is not None and not conn.negotiation.done():
                await asyncio.sleep(0)

    async def feed(data: bytes) -> None:
        if live and not (live[0][0].closed or live[0][1].closing):
            conn, tr = live[0]
        else:
            if live:
                await end(live.pop()[0])
            conn, tr = _Connection(server), _FakeTransport()
            conn.connection_made(tr)
            if transmission:
                await push(conn, tr, prefix)
                await settle(conn)
                live.append((conn, tr))
        await push(conn, tr, data)
        await settle(conn)
        if not transmission or conn.closed or tr.closing:
            if live:
                live.pop()
            await end(conn)

    def run(data: bytes) -> None:
        _run_case(loop, feed(data), (), "nbd")
        if not live and (server.buffered or server.inflight or server._connections):
            server.buffered = server.inflight = 0
            server._connections.clear()
            raise Crash("a closed connection left bytes or requests counted against the server's budget")

    def close() -> None:
        target.close()
        loop.close()

    return Target(run, seeds, close)


# -- the replication link -------------------------------------------------------------


class _Site:
    """A real Secondary on memory devices behind a ReplicationService."""

    def __init__(self, loop) -> None:
        from drivers import open_device, open_nvram
        from firmware.events import EventBus
        from firmware.link_secondary import ReplicationService
        from firmware.secondary import Secondary
        from hal.clock import AsyncioClock

        self.tmp = tempfile.mkdtemp(prefix="mirrorfw-fuzz-link-", dir=_scratch())
        devices = {"vol0": (open_device("mem://?size=1MiB"), open_device("mem://?size=1MiB"))}
        self.nvram = open_nvram(f"nvram://{self.tmp}/s.nvram?size=8MiB")
        self.secondary = Secondary(devices, self.nvram, AsyncioClock(), session_id=SESSION, events=EventBus())
        loop.run_until_complete(self.secondary.open(format=True))
        self.service = ReplicationService(self.secondary, SECRET, SESSION, random_bytes=random.Random(7).randbytes,
                                          handshake_timeout_s=HANG_S)

    def close(self, loop) -> None:
        import shutil

        loop.run_until_complete(self.secondary.close())
        self.nvram.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _hello(p, flags: int = 0) -> bytes:
    return p.encode(p.Hello(version=p.PROTOCOL_VERSION, session_id=SESSION, volumes=[("vol0", 1 << 20, 65536)],
                            seq=1, generation=0, flags=flags))


class _Primary:
    """The primary's side of a real handshake, answering the secondary's
    frames as they are sent on a _MemLink: AUTH_RESPONSE to its challenge;
    afterwards ``sealing`` seals what the primary sends."""

    def __init__(self) -> None:
        from firmware import link_handshake as hs
        from firmware import protocol as p

        self.p, self.hs = p, hs
        self.nonce = b"P" * hs.NONCE_BYTES
        self.sealing = None
        self.then: list[bytes] = []  # sealed frames (or a function of the sealing) to send after STATUS

    def on_send(self, link: _MemLink, raw: bytes) -> None:
        p, hs = self.p, self.hs
        try:
            frame = p.decode(raw) if self.sealing is None else None
        except p.ProtocolError:
            return
        if isinstance(frame, p.AuthChallenge):
            mac = hs.auth_mac(SECRET, hs.PRIMARY, frame.nonce, SESSION)
            link.frames.append(p.encode(p.AuthResponse(mac=mac, challenge=self.nonce, seq=2)))
            self._nonce_s = frame.nonce
        elif isinstance(frame, p.AuthResponse):
            self.sealing = p.Sealing.derive(SECRET, self.nonce, self._nonce_s, SESSION, hs.PRIMARY, hs.SECONDARY)
            link.frames.extend(f(self.sealing) if callable(f) else f for f in self.then)


def _sealed_frames(p, sealing) -> list[bytes]:
    """Valid sealed frames from the primary, seq 1.. in order."""
    frames = [p.Data(volume=0, track=3, cg_seq=1, payload=bytes(range(256)) * 256),
              p.Data(volume=0, track=4, cg_seq=1, flags=p.FLAG_RUNS,
                     payload=p.pack_runs([(0, 4096)]) + b"r" * 4096),
              p.DrainDone(cg_seq=1), p.Prepare(cg_seq=1), p.Commit(cg_seq=1), p.Sync(cg_seq=1), p.Abort(cg_seq=2)]
    out = []
    for seq, f in enumerate(frames, 1):
        f.seq = seq
        out.append(bytes(sealing.seal(f)))
    return out


def _reseal(p, sealing, raw: bytes, seq: int | None = None) -> bytes:
    """``raw`` (mutated) sealed again with ``sealing``: its length field fixed,
    FLAG_SEALED set, a new MAC (or, for DATA, the rest encrypted anew), a new CRC.
    What an attacker with the secret can send."""
    import crc32c

    from firmware import seal

    head = bytearray(raw[:p.HEADER_BYTES].ljust(p.HEADER_BYTES, b"\0"))
    magic, version, kind, flags, old_seq, _ = p.HEADER.unpack_from(head)
    seq = old_seq if seq is None else seq
    flags |= p.FLAG_SEALED
    if kind == p.Kind.DATA:
        fixed = p.DATA_HEAD.size - p.HEADER_BYTES
        fields = raw[p.HEADER_BYTES:p.HEADER_BYTES + fixed].ljust(fixed, b"\0")
        plain = raw[p.HEADER_BYTES + fixed:-(p.TAG_BYTES + p.CRC_BYTES)] if len(raw) > p.DATA_HEAD.size + 20 else b""
        length = fixed + len(plain) + p.TAG_BYTES
        header = p.HEADER.pack(magic, version, kind, flags, seq, length) + fields
        if flags & p.FLAG_CLEAR:
            tag = sealing.keys.cipher._aead.encrypt(sealing.keys.cipher.nonce(sealing.role, seq), b"", header + plain)
            body = plain + tag
        else:
            body = sealing.keys.cipher._aead.encrypt(sealing.keys.cipher.nonce(sealing.role, seq), plain, header)
        framed = header + body
    else:
        body = raw[p.HEADER_BYTES:-(p.MAC_BYTES + p.CRC_BYTES)] if len(raw) > p.HEADER_BYTES + 36 else b""
        header = p.HEADER.pack(magic, version, kind, flags, seq, len(body) + p.MAC_BYTES)
        framed = header + body + seal.seal_mac(sealing.keys.mac_key, sealing.role, seq, header + body)
    return framed + crc32c.crc32c(framed).to_bytes(4, "big")


def _fix_crc(raw: bytes) -> bytes:
    import crc32c

    return raw[:-4] + crc32c.crc32c(raw[:-4]).to_bytes(4, "big") if len(raw) > 8 else raw


def _link_preauth_target() -> Target:
    from firmware import link_handshake as hs
    from firmware import protocol as p
    from hal.link import LinkDown

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    site = _Site(loop)
    service = site.service
    auth = p.encode(p.AuthResponse(mac=b"m" * 32, challenge=b"c" * 32, seq=2))
    seeds = [_hello(p) + auth, _hello(p, p.FLAG_CLEAR) + auth, _hello(p),
             p.encode(p.Hello(version=p.PROTOCOL_VERSION, session_id=SESSION, seq=1, generation=0,
                              volumes=[(f"v{i}", 1 << 20, 65536) for i in range(40)]))]

    async def case(data: bytes) -> None:
        mode = data[0] if data else 0
        frames = _split_frames(data[1:], p.HEADER_BYTES, p.rest_length)
        if mode & 1:
            frames = [_fix_crc(f) for f in frames]
        if mode & 2 and frames:  # a real primary's answer after a mutated HELLO
            primary = _Primary()
            link = _MemLink(frames[:1], primary.on_send)
        else:
            link = _MemLink(frames)
        await service.serve(link)

    def run(data: bytes) -> None:
        _run_case(loop, case(data), (LinkDown,), "link pre-auth")

    def close() -> None:
        site.close(loop)
        loop.close()

    _ = hs
    return Target(run, [bytes([m]) + s for m in (0, 1, 2, 3) for s in seeds], close)


def _link_sealed_target() -> Target:
    """Sealed frames after a real handshake: the secondary's Sealing opens them
    (in-process, every case), and one case in eight goes to the real
    ReplicationService through a whole handshake first."""
    from firmware import link_handshake as hs
    from firmware import protocol as p
    from hal.link import LinkDown

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    site = _Site(loop)
    # One real handshake, to learn its keys (the secondary's nonces are seeded).
    primary = _Primary()
    link = _MemLink([_hello(p)], primary.on_send)
    loop.run_until_complete(site.service.serve(link))
    if primary.sealing is None:
        raise RuntimeError(f"the fuzzer's handshake with the secret failed: {link.sent[-1:]!r}")
    p_sealing = primary.sealing
    s_sealing = p.Sealing.derive(SECRET, primary.nonce, primary._nonce_s, SESSION, hs.SECONDARY, hs.PRIMARY)
    status = p_sealing.open(link.sent[-1])  # the STATUS the secondary sealed: the keys agree
    if not isinstance(status, p.Status):
        raise RuntimeError(f"expected a sealed STATUS after the handshake, got {status}")
    valid = _sealed_frames(p, p_sealing)
    n = 0

    async def through_service(frames: list[bytes]) -> None:
        prim = _Primary()
        prim.then = [lambda s, i=i, f=f: _reseal(p, s, f, i + 1) for i, f in enumerate(frames)]
        await site.service.serve(_MemLink([_hello(p)], prim.on_send))
        if prim.sealing is None:
            raise Crash("a real handshake with the secret failed after fuzzed frames")

    def run(data: bytes) -> None:
        nonlocal n
        n += 1
        mode = data[0] if data else 0
        raw = data[1:]
        if mode & 1:
            raw = _reseal(p, p_sealing, raw)
        elif mode & 2:
            raw = _fix_crc(raw)
        try:
            s_sealing.open(raw)
        except p.ProtocolError:
            pass
        if n % 8 == 0:
            frames = _split_frames(raw, p.HEADER_BYTES, p.rest_length)
            _run_case(loop, through_service(frames), (LinkDown,), "link sealed")

    def close() -> None:
        site.close(loop)
        loop.close()

    return Target(run, [bytes([m]) + f for m in (0, 1, 2) for f in valid], close)


# -- the session control link ----------------------------------------------------------


def _control_target() -> Target:
    from firmware import control_protocol as cp
    from firmware import protocol as p
    from firmware.control_channel import ControlRefused, accept_subordinate, open_master
    from hal.link import LinkDown

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    rng = random.Random(3)

    class _Pipe:  # two _MemLinks joined back to back, for one real handshake
        def __init__(self) -> None:
            self.q: asyncio.Queue = asyncio.Queue()
            self.other: _Pipe | None = None
            self.peer = "pipe"

        async def send(self, frame) -> None:
            self.other.q.put_nowait(bytes(frame))

        async def recv(self) -> bytes:
            return await self.q.get()

        async def close(self) -> None:
            pass

    a, b = _Pipe(), _Pipe()
    a.other, b.other = b, a

    async def handshake():
        return await asyncio.gather(open_master(a, SECRET, SESSION, "m", rng.randbytes),
                                    accept_subordinate(b, SECRET, SESSION, rng.randbytes))

    master, sub = loop.run_until_complete(handshake())
    # The sealed channels' codecs: seal as the master, open as the subordinate.
    valid = []
    for seq, f in enumerate([cp.MemberHello(session_id=SESSION), cp.MemberStatus(), cp.MemberStart(cg_seq=1),
                             cp.MemberDrain(cg_seq=1), cp.MemberPrepare(cg_seq=1), cp.MemberCommit(cg_seq=1),
                             cp.MemberRun(cg_seq=1), cp.MemberFail(cg_seq=1, reason="x")], 1):
        f.seq = seq
        valid.append(master._seal(f))
    unseal = sub._unseal
    key = _control_key(master)
    hello = cp.encode(cp.ControlHello(version=cp.CONTROL_VERSION, session_id=SESSION, name="m"))
    resp = cp.encode(p.AuthResponse(mac=b"m" * 32, challenge=b"c" * 32))

    def reseal(raw: bytes) -> bytes:
        import crc32c

        head = bytearray(raw[:p.HEADER_BYTES].ljust(p.HEADER_BYTES, b"\0"))
        magic, version, kind, flags, seq, _ = p.HEADER.unpack_from(head)
        body = raw[p.HEADER_BYTES:-(cp.MAC_BYTES + 4)] if len(raw) > p.HEADER_BYTES + 36 else b""
        header = p.HEADER.pack(magic, version, kind, flags, seq, len(body) + cp.MAC_BYTES)
        framed = header + body + cp.seal_mac(key, cp.MASTER, seq, header + body)
        return framed + crc32c.crc32c(framed).to_bytes(4, "big")

    async def handshake_case(frames: list[bytes]) -> None:
        await accept_subordinate(_MemLink(frames), SECRET, SESSION, rng.randbytes)

    def run(data: bytes) -> None:
        mode = data[0] if data else 0
        raw = data[1:]
        if mode & 4:  # a handshake from a stranger
            frames = _split_frames(raw, p.HEADER_BYTES, p.rest_length)
            if mode & 1:
                frames = [_fix_crc(f) for f in frames]
            _run_case(loop, handshake_case(frames), (ControlRefused, LinkDown, p.ProtocolError), "control handshake")
            return
        raw = reseal(raw) if mode & 1 else _fix_crc(raw) if mode & 2 else raw
        try:
            unseal(raw)
        except p.ProtocolError:
            pass

    seeds = [bytes([m]) + f for m in (0, 1, 2) for f in valid] + [bytes([m]) + hello + resp for m in (4, 5)]
    return Target(run, seeds, loop.close)


def _control_key(channel) -> bytes:
    """The session key inside a control SealedChannel's codec (a closure over it)."""
    for cell in getattr(channel._seal, "__closure__", None) or ():
        if isinstance(cell.cell_contents, bytes) and len(cell.cell_contents) == 32:
            return cell.cell_contents
    for value in getattr(channel._seal, "keywords", {}).values():
        if isinstance(value, bytes) and len(value) == 32:
            return value
    raise RuntimeError("cannot find the control link's session key in its channel")


# -- console ---------------------------------------------------------------------------

CONSOLE_LINES = ("status", "status --json", "cg start", "cg pause", "cg resume", "cg run",
                 "bitmap show oos vol0 0-100", "cache stats", "set cg_interval_s 0.5", "set max_drain_s 5",
                 "set collision_policy send-first", "volume show vol0", "help", "help set",
                 "fault arm primary.mid_drain 3", "log level debug", "events --now", "link status --json",
                 "pair suspend", "pair resume", "set cg_interval_s 1e308")


def _console_target() -> Target:
    from firmware.console import CommandSet, Reply
    from testbench.faults.inproc import InProcessPair

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    pair = loop.run_until_complete(InProcessPair.create(Path(tempfile.mkdtemp(prefix="mirrorfw-fuzz-console-",
                                                                               dir=_scratch()))))
    commands = CommandSet(pair.primary, role="primary", allow_faults=False)

    async def case(line: str) -> None:
        reply = await commands.execute(line)
        if not isinstance(reply, Reply):
            raise Crash(f"{line!r}: returned {type(reply).__name__}")
        if getattr(reply, "stream", None) is not None:
            reply.stream.close()

    def run(data: bytes) -> None:
        line = data.decode("utf-8", "replace")[:4096]
        _run_case(loop, case(line), (), "console")
        if pair.primary.status().get("copy_state") == "Fatal":
            raise Crash(f"the primary went Fatal after {line!r}")

    def close() -> None:
        loop.run_until_complete(pair.close())
        loop.close()

    return Target(run, [line.encode() for line in CONSOLE_LINES], close)


# -- traces and config ------------------------------------------------------------------


def _scratch() -> str:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _trace_target() -> Target:
    from testbench.errors import TestbenchError
    from testbench.traces import FORMATS

    readers = [f for name, f in FORMATS.items() if name != "csv"]  # csv needs a --columns spec
    samples_dir = Path(__file__).resolve().parents[2] / "tests" / "data" / "traces"
    tmp = Path(tempfile.mkdtemp(prefix="mirrorfw-fuzz-trace-", dir=_scratch()))
    seeds = []
    for path in sorted(samples_dir.glob("sample*")) if samples_dir.is_dir() else []:
        for i, fmt in enumerate(readers):
            if path.name.endswith(fmt.suffix):
                seeds.append(bytes([i]) + path.read_bytes()[:8192])
    per_format = {f.name: 0 for f in readers}

    def run(data: bytes) -> None:
        fmt = readers[(data[0] if data else 0) % len(readers)]
        per_format[fmt.name] += 1
        path = tmp / f"case{fmt.suffix}"
        path.write_bytes(data[1:])
        try:
            for i, _rec in enumerate(fmt.read(path)):
                if i > 10000:
                    break
        except TestbenchError:
            pass

    def close() -> None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    return Target(run, seeds or [bytes([i]) for i in range(len(readers))], close, {"per_format": per_format})


def _config_target() -> Target:
    from harness.config import load_config
    from harness.errors import ConfigError
    from harness.supervise import write_pair_configs

    tmp = Path(tempfile.mkdtemp(prefix="mirrorfw-fuzz-config-", dir=_scratch()))
    pair = write_pair_configs(tmp / "valid", console=True, nbd_socket=True)
    seeds = [pair.primary.read_bytes(), pair.secondary.read_bytes(), b"a = [[[[[[1]]]]]]\n"]
    path = tmp / "valid" / "case.toml"  # beside the valid ones: their relative paths resolve

    def run(data: bytes) -> None:
        path.write_bytes(data)
        try:
            load_config(path)
        except ConfigError:
            pass

    def close() -> None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    return Target(run, seeds, close)


TARGETS: dict[str, Callable[[], Target]] = {
    "nbd_handshake": lambda: _nbd_target(False),
    "nbd_transmission": lambda: _nbd_target(True),
    "link_preauth": _link_preauth_target,
    "link_sealed": _link_sealed_target,
    "control": _control_target,
    "console": _console_target,
    "trace": _trace_target,
    "config": _config_target,
}
INSTRUMENT = ["firmware", "drivers", "harness", "testbench.traces"]  # what atheris measures coverage of


# -- engines (in the worker process) ------------------------------------------------------


def _status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """This process's peak resident set since ``reset_peak_rss`` (or its
    start). VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    process that forked the worker (a pytest worker of 775 MiB made every
    target look over its budget)."""
    kib = _status_kib("VmHWM:")
    return kib / 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> float:
    """Start the peak over from now (Linux: 5 to clear_refs) and return the
    resident set now, in MiB: a target runs in-process in the tests, after
    whatever else that pytest worker ran, so its peak is measured from here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    kib = _status_kib("VmRSS:")
    return kib / 1024 if kib is not None else 0.0


class _Counter:
    def __init__(self, name: str, cases: int, out: Path, target: Target, watch: _ExcInfoLog) -> None:
        self.name, self.cases, self.out, self.target, self.watch = name, cases, out, target, watch
        self.n = 0
        self.crashes: list[str] = []
        self.slowest = 0.0
        self.t0 = time.monotonic()
        self.rss0 = reset_peak_rss()

    def one(self, data: bytes) -> None:
        t = time.perf_counter()
        try:
            self.target.run(data)
        except Exception as e:  # noqa: BLE001 - that is what we count
            self.crashes.append(f"{type(e).__name__}: {e} on input {data[:64].hex()}")
        dt = time.perf_counter() - t
        self.slowest = max(self.slowest, dt)
        if dt > HANG_S:
            self.crashes.append(f"hang: a case took {dt:.2f} s (bound {HANG_S} s) on input {data[:64].hex()}")
        if self.watch.records:
            self.crashes += [f"logged a traceback: {r} on input {data[:64].hex()}" for r in self.watch.records]
            self.watch.records.clear()
        self.n += 1
        if self.n % 5000 == 0 or self.n == self.cases:
            self.write()

    def write(self) -> None:
        secs = time.monotonic() - self.t0
        rss = rss_mib()
        crashes = list(self.crashes)
        # The budget is for what the cases take: in a worker of its own the
        # start is the interpreter and imports (~100 MiB), in a test's process more.
        if rss - self.rss0 > RSS_BUDGET_MIB:
            crashes.append(f"peak RSS {rss:.0f} MiB, {rss - self.rss0:.0f} MiB over the {self.rss0:.0f} MiB "
                           f"it started with: over its {RSS_BUDGET_MIB} MiB budget")
        res = _result(self.n, crashes) | {"seconds": round(secs, 1), "cases_per_s": round(self.n / max(secs, 1e-9)),
                                           "slowest_case_ms": round(self.slowest * 1000, 1),
                                           "peak_rss_mib": round(rss), **self.target.notes}
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        tmp.replace(self.out)


def _worker(name: str, cases: int, seed: int, out: Path, engine: str) -> None:
    """One target, ``cases`` cases, results to ``out`` (rewritten as it goes)."""
    logging.getLogger("drivers.nbd").setLevel(logging.CRITICAL + 1)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    watch = _ExcInfoLog()
    logging.getLogger().addHandler(watch)
    logging.getLogger().setLevel(logging.ERROR)
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=INSTRUMENT):
            target = TARGETS[name]()
    else:
        target = TARGETS[name]()
    watch.records.clear()  # what setting up logged is not a case's
    counter = _Counter(name, cases, out, target, watch)
    if engine == "atheris":
        corpus = Path(tempfile.mkdtemp(prefix=f"mirrorfw-fuzz-{name}-", dir=_scratch()))
        for i, s in enumerate(target.seeds):
            (corpus / f"seed{i}").write_bytes(s)

        def one(data: bytes) -> None:
            counter.one(data)
            if counter.n >= cases:
                target.close()
                shutil.rmtree(corpus, ignore_errors=True)
                os._exit(0)  # libFuzzer would go on past -runs by the seeds' count

        atheris.Setup([sys.argv[0], f"-runs={cases + len(target.seeds) + 10}", f"-seed={seed}",
                       f"-timeout={int(HANG_S * 5)}", f"-rss_limit_mb={RSS_BUDGET_MIB * 2}", "-max_len=16384",
                       "-print_final_stats=0", str(corpus)], one)
        atheris.Fuzz()
        return
    rng = random.Random(seed)
    seeds = target.seeds or [b""]
    corpus = list(seeds)
    for i in range(cases):
        r = rng.random()
        if r < 0.04:
            data = rng.randbytes(rng.randrange(0, 300))
        else:
            base = rng.choice(corpus)
            if r < 0.1 and len(corpus) > 1:  # splice two inputs
                other = rng.choice(corpus)
                cut = rng.randrange(len(base) + 1)
                base = base[:cut] + other[rng.randrange(len(other) + 1):]
            data = mutate(rng, base)
        counter.one(data)
        if i % 997 == 0 and len(corpus) < 256:
            corpus.append(data)  # keep a few mutants to mutate further (no coverage to say which)
    target.close()


async def _send_stream(host: str, port: int, raw: bytes, *, eof: bool, quiet_s: float) -> str | None:
    """One live case: connect, send ``raw`` (then EOF if asked), read until the
    listener is quiet for ``quiet_s`` or hangs up. Returns why it could not
    connect, else None (what the listener does with the bytes is its own)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except Exception as e:  # noqa: BLE001 - reported as the case's failure
        return str(e)
    try:
        writer.write(raw)
        if eof:
            writer.write_eof()
        while await asyncio.wait_for(reader.read(65536), quiet_s):
            pass
    except (TimeoutError, ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return None


# -- the parent: run every target in workers, two at a time ---------------------------------


def engine_available() -> str:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "mutate"
    return "atheris"


def run_targets(names: list[str], cases: int, seed: int, *, engine: str | None = None, jobs: int = 2,
                progress=None, timeout_s: float | None = None) -> dict[str, dict]:
    """Each named target in a worker process; returns name -> its results."""
    engine = engine or engine_available()
    out: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="mirrorfw-fuzz-", dir=_scratch()))
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen, Path, float]] = {}
    # A worker's stderr goes to a file, never a pipe: libFuzzer writes its
    # stats there all along, and a full pipe nobody reads until the worker
    # exits blocked the worker for good (the trace target hung at 64 KiB).
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                path = tmp / f"{name}.json"
                cmd = [sys.executable, "-m", "testbench.faults.fuzz", "--worker", name, "--cases", str(cases),
                       "--seed", str(seed), "--out", str(path), "--engine", engine]
                with open(tmp / f"{name}.err", "wb") as errf:
                    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf,
                                            cwd=Path(__file__).resolve().parents[2])
                running[name] = (proc, path, time.monotonic())
            time.sleep(0.2)
            for name, (proc, path, t0) in list(running.items()):
                limit = timeout_s or max(120.0, cases * 0.01)
                if proc.poll() is None and time.monotonic() - t0 < limit:
                    continue
                timed_out = proc.poll() is None
                if timed_out:
                    proc.kill()
                proc.wait()
                err = (tmp / f"{name}.err").read_bytes()
                del running[name]
                res = json.loads(path.read_text()) if path.exists() else {"cases": 0, "crashes": 0, "examples": []}
                if timed_out or proc.returncode or res["cases"] < cases:
                    why = (f"worker killed after {limit:g} s" if timed_out else
                           f"worker exit {proc.returncode} after {res['cases']} of {cases} cases")
                    tail = (err or b"").decode(errors="replace").strip().splitlines()[-6:]
                    res["crashes"] += 1
                    res["examples"] = (res["examples"] + [f"{why}: {' | '.join(tail)}"])[:EXAMPLES + 1]
                res["engine"] = engine
                edges = re.findall(rb"cov: (\d+)", err or b"")
                if edges:
                    res["coverage_edges"] = int(edges[-1])  # libFuzzer's count of code edges reached
                out[name] = res
                if progress:
                    progress(f"fuzz {name}: {res['cases']} cases, {res['crashes']} crashes, "
                             f"{res.get('cases_per_s')} cases/s, peak {res.get('peak_rss_mib')} MiB ({engine})")
    finally:
        for proc, _, _ in running.values():
            proc.kill()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- live listeners (a sample of cases over TCP) ----------------------------------------------


async def _nbd_live(cases: int, seed: int) -> list[str]:
    from drivers import open_device
    from drivers.nbd.client import open_async
    from drivers.nbd.server import NbdServer
    from harness.hostport import DeviceTarget

    rng = random.Random(seed)
    crashes: list[str] = []
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []
    loop.set_exception_handler(lambda _l, ctx: loop_errors.append(str(ctx.get("exception") or ctx.get("message"))))
    target = DeviceTarget({"vol0": open_device("mem://?size=1MiB")})
    server = NbdServer(target)
    host, port = await server.start_tcp("127.0.0.1", 0)
    canary = rng.randbytes(4096)
    canary_lba = (1 << 20) // 512 - 8  # the last 4 KiB: no fuzz case writes there

    async def healthy() -> str | None:
        try:
            dev = await asyncio.wait_for(open_async(f"nbd://{host}:{port}/vol0"), 5)
            try:
                got = await asyncio.wait_for(dev.read(canary_lba, 8), 5)
            finally:
                dev.close()
            return None if got == canary else "the canary block changed"
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"

    try:
        dev = await open_async(f"nbd://{host}:{port}/vol0")
        await dev.write(canary_lba, canary)
        dev.close()
        for n in range(cases):
            raw = _nbd_go() + _nbd_requests(rng)
            if rng.random() < 0.9:
                raw = mutate(rng, raw)
            failed = await _send_stream(host, port, raw, eof=rng.random() < 0.7, quiet_s=0.2)
            if failed:
                crashes.append(f"case {n}: cannot connect: {failed}")
                break
            if n % 10 == 9 or n == cases - 1:
                why = await healthy()
                if why:
                    crashes.append(f"after case {n}: server unhealthy: {why}")
                    break
        crashes += [f"loop error: {e}" for e in loop_errors]
    finally:
        await server.close()
        target.close()
    return crashes


async def _link_live(cases: int, seed: int) -> list[str]:
    """Mutated handshake streams at a real ReplicationService over TCP; every
    ten cases a real primary (the secret, a whole handshake) must pair."""
    from drivers.link import connect_link
    from firmware import link_handshake as hs
    from firmware import protocol as p
    from harness.controller import LINK_FRAMING, listen_replication_links

    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    site = _Site.__new__(_Site)
    await asyncio.to_thread(lambda: None)
    crashes: list[str] = []
    watch = _ExcInfoLog()
    logging.getLogger().addHandler(watch)
    # _Site opens the secondary with run_until_complete; here we are inside a loop.
    from drivers import open_device, open_nvram
    from firmware.events import EventBus
    from firmware.link_secondary import ReplicationService
    from firmware.secondary import Secondary
    from hal.clock import AsyncioClock

    tmp = tempfile.mkdtemp(prefix="mirrorfw-fuzz-linklive-", dir=_scratch())
    devices = {"vol0": (open_device("mem://?size=1MiB"), open_device("mem://?size=1MiB"))}
    nvram = open_nvram(f"nvram://{tmp}/s.nvram?size=8MiB")
    secondary = Secondary(devices, nvram, AsyncioClock(), session_id=SESSION, events=EventBus())
    await secondary.open(format=True)
    service = ReplicationService(secondary, SECRET, SESSION, random_bytes=random.Random(7).randbytes,
                                 handshake_timeout_s=1.0)
    server = await listen_replication_links("127.0.0.1", 0, service.serve)
    port = server.sockets[0].getsockname()[1]
    _ = (site, loop)

    async def good() -> str | None:
        try:
            link = await connect_link("127.0.0.1", port, framing=LINK_FRAMING)
            try:
                await link.send(_hello(p))
                challenge = p.decode(await asyncio.wait_for(link.recv(), 5))
                nonce = rng.randbytes(hs.NONCE_BYTES)
                await link.send(p.encode(p.AuthResponse(mac=hs.auth_mac(SECRET, hs.PRIMARY, challenge.nonce, SESSION),
                                                        challenge=nonce, seq=2)))
                p.decode(await asyncio.wait_for(link.recv(), 5))
                sealing = p.Sealing.derive(SECRET, nonce, challenge.nonce, SESSION, hs.PRIMARY, hs.SECONDARY)
                status = sealing.open(await asyncio.wait_for(link.recv(), 5))
                return None if isinstance(status, p.Status) else f"got {status} for STATUS"
            finally:
                await link.close()
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"

    try:
        seeds = [_hello(p), _hello(p) + p.encode(p.AuthResponse(mac=b"m" * 32, challenge=b"c" * 32, seq=2))]
        for n in range(cases):
            raw = mutate(rng, rng.choice(seeds))
            failed = await _send_stream("127.0.0.1", port, raw, eof=rng.random() < 0.5, quiet_s=0.1)
            if failed:
                crashes.append(f"case {n}: cannot connect: {failed}")
                break
            if n % 10 == 9 or n == cases - 1:
                why = await good()
                if why:
                    crashes.append(f"after case {n}: a primary with the secret cannot pair: {why}")
                    break
        crashes += [f"logged a traceback: {r}" for r in watch.records]
    finally:
        logging.getLogger().removeHandler(watch)
        server.close()
        await server.wait_closed()
        await secondary.close()
        nvram.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return crashes


def _live(fn, cases: int, seed: int) -> dict:
    t0 = time.monotonic()
    res = _result(cases, asyncio.run(fn(cases, seed)))
    secs = time.monotonic() - t0
    return res | {"seconds": round(secs, 1), "cases_per_s": round(cases / max(secs, 1e-9), 1)}


# -- the campaign's part -----------------------------------------------------------------------


def run_fuzz(cases: int, seed: int, progress=None, *, live_cases: int | None = None, engine: str | None = None,
             jobs: int = 2) -> dict:
    """Every target with ``cases`` cases (in workers), and the live samples;
    ``fuzz`` of faults/results.json: per interface its cases, crashes, cases/s
    and its targets' figures."""
    live_cases = live_cases if live_cases is not None else max(20, cases // 500)
    names = [t for ts in INTERFACES.values() for t in ts]
    per_target = run_targets(names, cases, seed, engine=engine, jobs=jobs, progress=progress)
    live = {}
    for name, fn in (("nbd", _nbd_live), ("link", _link_live)):
        try:
            live[name] = _live(fn, live_cases, seed)
        except Exception as e:  # noqa: BLE001 - a sample that cannot run fails the part
            live[name] = {"cases": 0, "crashes": 1, "examples": [f"{type(e).__name__}: {e}"]}
        if progress:
            progress(f"fuzz live {name}: {live[name]['cases']} cases, {live[name]['crashes']} crashes")
    out = {}
    for iface, targets in INTERFACES.items():
        parts = {t: per_target[t] for t in targets}
        if iface in live:
            parts[f"live_{iface}"] = live[iface]
        secs = sum(r.get("seconds", 0) for r in parts.values())
        n = sum(r["cases"] for r in parts.values())
        out[iface] = {"cases": n, "crashes": sum(r["crashes"] for r in parts.values()),
                      "cases_per_s": round(n / max(secs, 1e-9)),
                      "min_target_cases": min(r["cases"] for t, r in parts.items() if not t.startswith("live_")),
                      "examples": [e for r in parts.values() for e in r.get("examples", [])][:EXAMPLES],
                      "targets": parts}
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="one fuzz target in this process (the campaign's worker)")
    ap.add_argument("--worker", required=True, choices=sorted(TARGETS))
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--engine", choices=("atheris", "mutate"), default="mutate")
    a = ap.parse_args(argv)
    _worker(a.worker, a.cases, a.seed, Path(a.out), a.engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
