"""DoS: the attacks of issue 16 against a running pair (real processes on
127.0.0.1, default limits) while a good client writes and CGs commit.

Attacks, all at once, from a separate attacker process (so its CPU and GIL
do not count against the good client's latency):

- NBD (primary's host port): stalled WRITE headers announcing 32 MiB each,
  pipelined 1 MiB READs whose replies are never read, idle connections after
  GO, and 1-byte/s writers.
- Link (secondary's replication port): pre-auth frame headers announcing
  64 MiB, huge HELLOs (65,535 volumes), many concurrent handshakes that never
  answer the challenge.
- Console (both consoles): floods with no newline.

Measured: the peak RSS of the primary and the secondary while attacked
(sampled VmRSS), the good client's 4 KiB write latency (p50/p99/max), CGs
committed during the attack, and what each listener dropped. ``BUDGETS`` are
asserted by ``failures``: a run over any of them fails the campaign.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import shutil
import socket
import struct
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from testbench.faults.pair import ProcessPair

MiB = 1 << 20
# What an attacked pair may take (default [host]/[link] limits): the NBD server
# may hold server_buffer_bytes (512 MiB) of client data by design, plus the
# process itself; the secondary refuses pre-auth frames over 64 KiB unread, so
# strangers cost it little; a 4 KiB write may wait behind a CG's hold.
BUDGETS = {
    "nbd_peak_rss_mib": 768,
    "link_peak_rss_mib": 384,
    "good_client_p99_ms": 1000.0,
    "cgs_during_attack_min": 1,
}

NBD_REQUEST_MAGIC = 0x25609513


def _addr(text: str) -> tuple[str, int]:
    if "://" in text:
        u = urlsplit(text)
        return u.hostname or "127.0.0.1", int(u.port or 0)
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# -- the attacker (a child process) -------------------------------------------------------


def _nbd_go(sock: socket.socket, export: bytes = b"vol0") -> None:
    """Newstyle handshake to transmission (the reply bytes are read and ignored)."""
    sock.recv(18)
    go = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
    sock.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 7, len(go)) + go)
    sock.settimeout(2)
    got = b""
    while True:  # option replies until NBD_REP_ACK (1) for OPT_GO
        head = b""
        while len(head) < 20:
            chunk = sock.recv(20 - len(head))
            if not chunk:
                raise ConnectionError("closed during GO")
            head += chunk
        _magic, _opt, rtype, length = struct.unpack(">QIII", head)
        while length:
            chunk = sock.recv(min(length, 65536))
            if not chunk:
                raise ConnectionError("closed during GO")
            length -= len(chunk)
        got += head
        if rtype == 1 or rtype & 0x80000000:
            return


def _request(cmd: int, handle: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, cmd, handle, offset, length)


def _attack(nbd: str, link: str, consoles: list[str], seconds: float, counts: dict, ready) -> None:
    from firmware import protocol as p

    socks: list[socket.socket] = []
    stop = time.monotonic() + seconds
    opened = {k: 0 for k in ("nbd_stalled_write", "nbd_unread_reads", "nbd_idle", "nbd_slow", "link_huge_header",
                             "link_huge_hello", "link_handshakes", "console_flood")}

    def connect(addr: str) -> socket.socket | None:
        try:
            s = socket.create_connection(_addr(addr), timeout=2)
            socks.append(s)
            return s
        except OSError:
            return None

    def nbd_conn() -> socket.socket | None:
        s = connect(nbd)
        if s is None:
            return None
        try:
            _nbd_go(s)
        except OSError:
            return None
        return s

    for i in range(counts["nbd_stalled_write"]):
        s = nbd_conn()
        if s is not None:
            try:
                s.sendall(_request(1, i, 0, 32 * MiB) + b"x" * 4096)  # 32 MiB announced, 4 KiB sent, stall
                opened["nbd_stalled_write"] += 1
            except OSError:
                pass
    for _ in range(counts["nbd_unread_reads"]):
        s = nbd_conn()
        if s is not None:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.setblocking(False)
                s.send(b"".join(_request(0, h, (h % 7) * MiB, MiB) for h in range(200)))
                opened["nbd_unread_reads"] += 1
            except OSError:
                pass
    slow = [s for s in (nbd_conn() for _ in range(counts["nbd_slow"])) if s is not None]
    opened["nbd_slow"] = len(slow)
    for _ in range(counts["nbd_idle"]):  # past max_connections these are refused: that is the point
        if nbd_conn() is not None:
            opened["nbd_idle"] += 1
    header = p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.Kind.DATA, 0, 1, 64 * MiB - 64)
    for _ in range(counts["link_huge_header"]):
        s = connect(link)
        if s is not None:
            try:
                s.sendall(header + b"\0" * 4096)
                opened["link_huge_header"] += 1
            except OSError:
                pass
    # A HELLO of 65,535 volumes (~1.3 MB; its fields need not parse: the cap comes first).
    huge_body = b"\x00\x01x" + struct.pack(">H", 0) + struct.pack(">H", 0xFFFF) + bytes(20) * 65535
    huge = p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.Kind.HELLO, 0, 1, len(huge_body)) + huge_body + bytes(4)
    hello_raw = p.encode(p.Hello(version=p.PROTOCOL_VERSION, session_id="x", seq=1, generation=0,
                                 volumes=[("vol0", 8 * MiB, 65536)]))
    for _ in range(counts["link_handshakes"]):
        s = connect(link)
        if s is not None:
            try:
                s.sendall(hello_raw)  # then never answer the challenge
                opened["link_handshakes"] += 1
            except OSError:
                pass
    floods = [s for s in (connect(c) for c in consoles for _ in range(counts["console_flood"])) if s is not None]
    opened["console_flood"] = len(floods)
    for s in socks:
        s.setblocking(False)
    ready.put(opened)
    junk = b"A" * 65536
    tick = 0.0
    while time.monotonic() < stop:
        for s in floods:  # no newline, as fast as the console takes it
            try:
                s.send(junk)
            except OSError:
                pass
        now = time.monotonic()
        if now - tick >= 1.0:
            tick = now
            for s in slow:  # one byte a second: a request header that never completes
                try:
                    s.send(b"\x25")
                except OSError:
                    pass
            for _ in range(counts["link_huge_hello"]):
                s = connect(link)
                if s is not None:
                    try:
                        s.setblocking(False)
                        s.send(huge)
                        opened["link_huge_hello"] += 1
                    except OSError:
                        pass
        time.sleep(0.01)
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


# -- the good client and the sampler --------------------------------------------------------


async def _good_client(url: str, stop: threading.Event, lat: list[float], errors: list[str]) -> None:
    from drivers.nbd.client import open_async

    rng = random.Random(3)
    dev = await open_async(url)
    try:
        data = rng.randbytes(4096)
        while not stop.is_set():
            lba = rng.randrange(0, (8 * MiB - 4096) // 512) // 8 * 8
            t = time.perf_counter()
            try:
                await asyncio.wait_for(dev.write(lba, data), 30)
            except Exception as e:  # noqa: BLE001 - reported, and fails the part
                errors.append(f"{type(e).__name__}: {e}")
                return
            lat.append(time.perf_counter() - t)
            await asyncio.sleep(0.005)
    finally:
        dev.close()


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_dos(workdir: Path, *, seed: int, seconds: float, quick: bool = False, progress=print) -> dict:
    counts = {"nbd_stalled_write": 48, "nbd_unread_reads": 8, "nbd_idle": 500, "nbd_slow": 8,
              "link_huge_header": 24, "link_huge_hello": 2, "link_handshakes": 64, "console_flood": 2}
    if quick:
        counts |= {"nbd_idle": 100, "nbd_stalled_write": 16, "link_handshakes": 32}
    out: dict = {"nbd_peak_rss_mib": 0, "link_peak_rss_mib": 0, "good_client_p99_ms": 0, "seconds": seconds,
                 "attacks": counts, "budgets": BUDGETS}
    pair = ProcessPair(workdir)
    try:
        pair.start_both()
        pair.wait_caught_up(60, after_cgs=0)
        url = pair.nbd_url()
        pids = {"primary": pair.procs["primary"].pid, "secondary": pair.procs["secondary"].pid}
        out["baseline_rss_mib"] = {r: round(_rss_mib(pid)) for r, pid in pids.items()}
        peaks = dict.fromkeys(pids, 0.0)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for role, pid in pids.items():
                    peaks[role] = max(peaks[role], _rss_mib(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        lat: list[float] = []
        errors: list[str] = []
        client = threading.Thread(target=lambda: asyncio.run(_good_client(url, stop, lat, errors)), daemon=True)
        client.start()
        time.sleep(1.0)
        before_lat = len(lat)
        before = pair.status()
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Queue()
        consoles = [pair.procs[r].ready["console"] for r in ("primary", "secondary")]
        attacker = ctx.Process(target=_attack, args=(pair.procs["primary"].ready["nbd"],
                                                     pair.procs["secondary"].ready["link"], consoles,
                                                     seconds, counts, ready), daemon=True)
        t0 = time.monotonic()
        attacker.start()
        try:
            out["opened"] = ready.get(timeout=60 + seconds)
        except Exception:  # noqa: BLE001 - the attacker died setting up: say so
            out["opened"] = None
        attacker.join(seconds + 60)
        if attacker.is_alive():
            attacker.kill()
        out["attack_seconds"] = round(time.monotonic() - t0, 1)
        attacked = lat[before_lat:]
        time.sleep(0.5)
        stop.set()
        client.join(35)
        sampler.join(2)
        after = pair.status()
        out["nbd_peak_rss_mib"] = round(peaks["primary"])
        out["link_peak_rss_mib"] = round(peaks["secondary"])
        out["good_client_writes"] = len(attacked)
        out["good_client_p50_ms"] = round(_percentile(attacked, 0.5) * 1000, 1)
        out["good_client_p99_ms"] = round(_percentile(attacked, 0.99) * 1000, 1)
        out["good_client_max_ms"] = round(max(attacked, default=0) * 1000, 1)
        out["good_client_errors"] = errors[:3]
        out["cgs_during_attack"] = after["total_successful_cgs"] - before["total_successful_cgs"]
        out["failed_cgs_during_attack"] = after["total_failed_cgs"] - before["total_failed_cgs"]
        out["copy_state_after"] = after["copy_state"]
        for key in ("nbd", "host", "link"):
            if isinstance(after.get(key), dict):
                out[f"status_{key}"] = after[key]
        progress(f"dos: primary peak {out['nbd_peak_rss_mib']} MiB, secondary peak {out['link_peak_rss_mib']} MiB, "
                 f"good client p99 {out['good_client_p99_ms']} ms over {len(attacked)} writes, "
                 f"{out['cgs_during_attack']} CGs committed")
        return out
    finally:
        pair.close()
        shutil.rmtree(workdir, ignore_errors=True)


def failures(res: dict) -> list[str]:
    """Every budget the DoS part exceeded (empty when it did not run)."""
    if not res or "budgets" not in res:
        return []
    bad = []
    for key in ("nbd_peak_rss_mib", "link_peak_rss_mib", "good_client_p99_ms"):
        if res.get(key, 0) > BUDGETS[key]:
            bad.append(f"dos.{key} = {res[key]} over its budget {BUDGETS[key]}")
    if res.get("cgs_during_attack", 0) < BUDGETS["cgs_during_attack_min"]:
        bad.append(f"dos: {res.get('cgs_during_attack')} CGs committed during the attack "
                   f"(at least {BUDGETS['cgs_during_attack_min']})")
    if res.get("good_client_errors"):
        bad.append(f"dos: the good client failed: {res['good_client_errors'][0]}")
    if not res.get("good_client_writes"):
        bad.append("dos: the good client wrote nothing during the attack")
    if res.get("opened") is None:
        bad.append("dos: the attacker did not start")
    return bad
