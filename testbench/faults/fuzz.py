"""Fuzzers: garbage and mutated valid input at every parser a peer can reach.

Each ``fuzz_*`` runs ``cases`` seeded cases and returns ``{"cases", "crashes",
"examples"}``. A crash is anything but the layer's own error family (or, for
the NBD server, a server that stops serving a well-behaved client).
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import tempfile
from pathlib import Path

import crc32c

log = logging.getLogger(__name__)

EXAMPLES = 3


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One of: flip bits, overwrite bytes, insert junk, truncate, duplicate a slice."""
    b = bytearray(data)
    if not b:
        return rng.randbytes(rng.randrange(1, 64))
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[i] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif op == 3:
            del b[i:]
        else:
            j = min(len(b), i + rng.randrange(1, 32))
            b[j:j] = b[i:j]
    return bytes(b)


def _result(cases: int, crashes: list[str]) -> dict:
    return {"cases": cases, "crashes": len(crashes), "examples": crashes[:EXAMPLES]}


# -- link frames -------------------------------------------------------------------


def _valid_frames() -> list[bytes]:
    from firmware import protocol as p

    frames = [
        p.Hello(version=p.PROTOCOL_VERSION, session_id="fuzz", volumes=[("vol0", 8 << 20, 65536)], seq=1),
        p.AuthChallenge(nonce=b"n" * 16, seq=2),
        p.AuthResponse(mac=b"m" * 32, challenge=b"c" * 16, seq=3),
        p.Data(volume=0, track=5, cg_seq=7, payload=bytes(range(256)) * 4, seq=4),
        p.DrainDone(cg_seq=7, seq=5), p.Prepare(cg_seq=7, seq=6), p.Commit(cg_seq=7, seq=7),
        p.Abort(cg_seq=7, seq=8),
    ]
    return [p.encode(f) for f in frames]


def fuzz_link(cases: int, seed: int) -> dict:
    """``firmware.protocol.decode`` on mutated frames (half with the CRC fixed
    up, so the body parsers see the damage too)."""
    from firmware import protocol as p

    rng = random.Random(seed)
    valid = _valid_frames()
    crashes: list[str] = []
    for _ in range(cases):
        raw = mutate(rng, rng.choice(valid))
        if rng.random() < 0.5 and len(raw) > p.HEADER_BYTES + 4:
            raw = raw[:-4] + crc32c.crc32c(raw[:-4]).to_bytes(4, "big")
        try:
            p.decode(raw)
            if len(raw) >= p.HEADER_BYTES:
                p.rest_length(raw[:p.HEADER_BYTES])
        except p.ProtocolError:
            pass
        except Exception as e:  # noqa: BLE001 - that is what we count
            crashes.append(f"{type(e).__name__}: {e} on {raw[:48].hex()}")
    return _result(cases, crashes)


# -- console -------------------------------------------------------------------------

CONSOLE_LINES = ("status", "status --json", "cg start", "cg pause", "bitmap show oos vol0 0-100", "cache stats",
                 "set cg_interval_s 0.5", "set collision_policy send-first", "volume show vol0", "help",
                 "fault arm primary.mid_drain 3", "log level debug", "events --now", "link status --json")


async def _console_cases(cases: int, seed: int) -> list[str]:
    from firmware.console import CommandSet, Reply
    from testbench.faults.inproc import InProcessPair

    rng = random.Random(seed)
    crashes: list[str] = []
    pair = await InProcessPair.create(Path(tempfile.mkdtemp(prefix="mirrorfw-fuzz-console-")))
    try:
        commands = CommandSet(pair.primary, role="primary", allow_faults=False)
        for _ in range(cases):
            kind = rng.randrange(3)
            if kind == 0:
                line = rng.randbytes(rng.randrange(0, 200)).decode("latin-1")
            elif kind == 1:
                line = mutate(rng, rng.choice(CONSOLE_LINES).encode()).decode("latin-1")
            else:
                line = rng.choice(CONSOLE_LINES) + " " + rng.randbytes(rng.randrange(1, 40)).decode("latin-1")
            try:
                reply = await asyncio.wait_for(commands.execute(line), 5)
                if not isinstance(reply, Reply):
                    crashes.append(f"{line!r}: returned {type(reply).__name__}")
                elif getattr(reply, "stream", None) is not None:
                    reply.stream.close()
            except Exception as e:  # noqa: BLE001
                crashes.append(f"{line!r}: {type(e).__name__}: {e}")
        if pair.primary.status().get("copy_state") == "Fatal":
            crashes.append("the primary went Fatal under console garbage")
    finally:
        await pair.close()
    return crashes


def fuzz_console(cases: int, seed: int) -> dict:
    """``CommandSet.execute`` on garbage and mutated commands, against a real
    in-process Primary."""
    return _result(cases, asyncio.run(_console_cases(cases, seed)))


# -- traces ---------------------------------------------------------------------------


def fuzz_trace(cases: int, seed: int, samples_dir: Path | None = None) -> dict:
    """Every trace reader on garbage and on mutated sample files."""
    from testbench.errors import TestbenchError
    from testbench.traces import FORMATS

    rng = random.Random(seed)
    samples_dir = samples_dir or Path(__file__).resolve().parents[2] / "tests" / "data" / "traces"
    samples = [p.read_bytes() for p in sorted(samples_dir.glob("sample*"))] if samples_dir.is_dir() else []
    readers = [f for name, f in FORMATS.items() if name != "csv"]
    crashes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mirrorfw-fuzz-trace-") as tmp:
        for n in range(cases):
            fmt = rng.choice(readers)
            data = mutate(rng, rng.choice(samples)) if samples and rng.random() < 0.8 else rng.randbytes(
                rng.randrange(0, 400))
            path = Path(tmp) / f"case{n}{fmt.suffix}"
            path.write_bytes(data)
            try:
                for i, _rec in enumerate(fmt.read(path)):
                    if i > 10000:
                        break
            except TestbenchError:
                pass
            except Exception as e:  # noqa: BLE001
                crashes.append(f"{fmt.name}: {type(e).__name__}: {e}")
            path.unlink()
    return _result(cases, crashes)


# -- config -----------------------------------------------------------------------------


def fuzz_config(cases: int, seed: int) -> dict:
    """``harness.config.load_config`` on mutated valid configs and garbage."""
    from harness.config import load_config
    from harness.errors import ConfigError
    from harness.supervise import write_pair_configs

    rng = random.Random(seed)
    crashes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mirrorfw-fuzz-config-") as tmp:
        pair = write_pair_configs(Path(tmp) / "valid", console=True, nbd_socket=True)
        valid = [pair.primary.read_bytes(), pair.secondary.read_bytes()]
        (Path(tmp) / "secret").write_bytes(b"fuzz-secret\n")
        for n in range(cases):
            data = mutate(rng, rng.choice(valid)) if rng.random() < 0.85 else rng.randbytes(rng.randrange(0, 300))
            path = Path(tmp) / f"case{n}.toml"
            path.write_bytes(data)
            try:
                load_config(path)
            except ConfigError:
                pass
            except Exception as e:  # noqa: BLE001
                crashes.append(f"{type(e).__name__}: {e}")
            path.unlink()
    return _result(cases, crashes)


# -- NBD server ------------------------------------------------------------------------------

NBD_OPTS_MAGIC = b"IHAVEOPT"
NBD_REQUEST_MAGIC = 0x25609513
NBD_OPT_GO = 7


def _client_stream(rng: random.Random, export: bytes = b"vol0") -> bytes:
    """What a well-behaved client sends: flags, OPT_GO, a few requests, disconnect."""
    go = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
    out = struct.pack(">I", 3) + NBD_OPTS_MAGIC + struct.pack(">II", NBD_OPT_GO, len(go)) + go
    for h in range(rng.randrange(1, 4)):
        cmd = rng.choice((0, 1, 3, 4, 6))  # read, write, flush, trim, write zeroes
        offset = rng.randrange(0, 64) * 512
        length = 512 * rng.randrange(1, 9)
        out += struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, cmd, h, offset, length)
        if cmd == 1:
            out += rng.randbytes(length)
    out += struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 2, 99, 0, 0)  # disconnect
    return out


async def _nbd_cases(cases: int, seed: int) -> list[str]:
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
            raw = _client_stream(rng)
            if rng.random() < 0.9:
                raw = mutate(rng, raw)
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            except Exception as e:  # noqa: BLE001
                crashes.append(f"case {n}: cannot connect: {e}")
                break
            try:
                writer.write(raw)
                if rng.random() < 0.7:
                    writer.write_eof()
                while await asyncio.wait_for(reader.read(65536), 0.2):
                    pass
            except (TimeoutError, ConnectionError, OSError):
                pass
            finally:
                writer.close()
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


def fuzz_nbd(cases: int, seed: int) -> dict:
    """Mutated client byte streams at a running NbdServer; a canary block and a
    well-behaved client every ten cases prove it still serves."""
    return _result(cases, asyncio.run(_nbd_cases(cases, seed)))


FUZZERS = {"nbd": fuzz_nbd, "link": fuzz_link, "console": fuzz_console, "trace": fuzz_trace, "config": fuzz_config}


def run_fuzz(cases: int, seed: int, progress=None) -> dict:
    out = {}
    for name, fn in FUZZERS.items():
        try:
            out[name] = fn(cases, seed)
        except Exception as e:  # noqa: BLE001 - a fuzzer that cannot run is reported, not a crash count
            out[name] = {"cases": 0, "crashes": None, "error": f"{type(e).__name__}: {e}"}
        if progress:
            progress(f"fuzz {name}: {out[name]}")
    return out
