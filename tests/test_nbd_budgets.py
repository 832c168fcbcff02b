"""The NBD host port under hostile clients (issue 16): a stalled WRITE header,
pipelined READs whose replies are never read, idle connections, a slow sender
and a slow reader. Each attack runs over real TCP against ``mirrorfw serve``
in its own process; what it costs is the server's VmRSS, and a good client
(qemu-io, or our own client) must still get its requests done meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from test_nbd_server import need, start_serve

from drivers.nbd import protocol as p
from drivers.nbd.client import NbdClient

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20


# -- helpers ---------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def settle_rss(pid: int, *, quiet_s: float = 1.0, limit_s: float = 15.0) -> int:
    """VmRSS once it stops growing (no new MiB for ``quiet_s``), or after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    high = rss_bytes(pid)
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = rss_bytes(pid)
        if now > high + MiB:
            high, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet_s:
            break
    return max(high, rss_bytes(pid))


def port_of(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def attach(port: int, name: str = "vol0", *, rcvbuf: int | None = None) -> socket.socket:
    """A raw socket through GO, in transmission."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    recv_exact(sock, 18)
    sock.sendall(p.ClientFlags.build(dict(flags=3)))
    data = p.InfoRequest.build(dict(name=name, requests=[]))
    sock.sendall(p.OptionHeader.build(dict(option=p.Option.GO, length=len(data))) + data)
    while True:
        _m, _o, reply, length = p.OPTION_REPLY_HEADER.unpack(recv_exact(sock, 20))
        recv_exact(sock, length)
        if reply == p.Reply.ACK:
            return sock
        assert not reply & (1 << 31), hex(reply)


def header(cmd: int, offset: int, length: int, handle: int = 1, flags: int = 0) -> bytes:
    return struct.pack(">LHHQQL", p.REQUEST_MAGIC, flags, cmd, handle, offset, length)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server hangs up within ``seconds`` (anything it sends first is read and dropped)."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(1 << 20):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def good_client_works(url: str, *, timeout_s: float = 30.0) -> float:
    """qemu-io writes and reads back 1 MiB; the seconds it took."""
    t0 = time.monotonic()
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 1M", "-c", "read -P 0x5a 1M 1M", url],
                          capture_output=True, text=True, timeout=timeout_s)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "verification failed" not in out.lower(), out[-2000:]
    return time.monotonic() - t0


class Served:
    """``mirrorfw serve`` on a mem:// device, as a process of its own."""

    def __init__(self, *extra: str, size: str = "64MiB") -> None:
        self.proc, urls = start_serve([f"mem://?size={size}", "--listen", "127.0.0.1:0", *extra])
        self.url = urls[0]
        self.port = port_of(self.url)
        self.socks: list[socket.socket] = []

    @property
    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def baseline(self) -> int:
        """RSS after one good client has been through (buffers, imports warmed up)."""
        good_client_works(self.url)
        return settle_rss(self.proc.pid, quiet_s=0.5)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def served():
    made: list[Served] = []

    def make(*extra: str, size: str = "64MiB") -> Served:
        s = Served(*extra, size=size)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def report(name: str, before: int, after: int) -> None:
    print(f"\n{name}: RSS {before / MiB:.0f} MiB -> {after / MiB:.0f} MiB (+{(after - before) / MiB:.0f} MiB)")


# -- finding 1: a WRITE header for 32 MiB, then nothing ------------------------------
def test_stalled_write_headers_allocate_nothing_and_a_good_client_goes_on(served):
    """16 connections each announce a 32 MiB WRITE (the largest the export
    advertises) and send 4 KiB of it: before, each allocated 32 MiB at once
    (+512 MiB); now a payload buffer grows only as its bytes arrive."""
    need("qemu-io")
    s = served()
    before = s.baseline()
    for i in range(16):
        sock = attach(s.port)
        sock.sendall(header(p.Cmd.WRITE, 0, 32 * MiB, handle=i) + os.urandom(4096))
        s.socks.append(sock)
    after = settle_rss(s.proc.pid)
    report("16 stalled 32 MiB WRITE headers", before, after)
    assert after - before < 64 * MiB
    took = good_client_works(s.url)
    assert took < 10, f"a good client took {took:.1f} s while writers stalled"


# -- finding 2: pipelined READs, replies never read -----------------------------------
def test_pipelined_reads_never_read_are_bounded_by_the_connection_budget(served):
    """Two clients pipeline 400 x 1 MiB READs each and never read a reply: before,
    every read ran and its reply waited in memory (+800 MiB); now a connection
    stops parsing requests once 64 MiB (connection_buffer_bytes) is waiting."""
    need("qemu-io")
    s = served()
    before = s.baseline()
    burst = b"".join(header(p.Cmd.READ, (i % 60) * MiB, MiB, handle=i) for i in range(400))
    for _ in range(2):
        sock = attach(s.port, rcvbuf=64 << 10)
        sock.sendall(burst)
        s.socks.append(sock)
    after = settle_rss(s.proc.pid, quiet_s=2.0)
    report("2 x 400 pipelined 1 MiB READs never read", before, after)
    assert after - before < 200 * MiB
    took = good_client_works(s.url)
    assert took < 10, f"a good client took {took:.1f} s while readers stalled"


def test_a_client_that_does_not_read_its_replies_is_dropped(served):
    s = served("--limit", "stall_timeout_s=1")
    sock = attach(s.port, rcvbuf=64 << 10)
    sock.sendall(b"".join(header(p.Cmd.READ, (i % 60) * MiB, MiB, handle=i) for i in range(100)))
    time.sleep(3.0)  # nothing read meanwhile: the server's send buffer stays full
    assert closed_within(sock, 10.0)  # (what is still queued is read and dropped here)


# -- finding 3: connections that never end -------------------------------------------
def test_connections_past_the_cap_are_refused(served):
    """300 idle connections through GO: before, every one stayed (+75 MiB, a
    256 KiB ring each); now the 65th and later are closed at once."""
    s = served()
    before = s.baseline()
    kept = refused = 0
    for _ in range(300):
        try:
            sock = attach(s.port)
        except (ConnectionError, OSError):
            refused += 1
            continue
        s.socks.append(sock)
        kept += 1
    after = settle_rss(s.proc.pid)
    report(f"300 idle connections ({kept} kept, {refused} refused)", before, after)
    assert kept == 64 and refused == 236
    assert after - before < 40 * MiB
    for sock in s.socks:
        sock.close()
    s.socks.clear()
    time.sleep(0.5)
    good_client_works(s.url)  # the slots come back when clients leave


def test_idle_connections_time_out_and_busy_ones_do_not(served):
    s = served("--limit", "idle_timeout_s=1", "--limit", "handshake_timeout_s=1")
    idle = [attach(s.port) for _ in range(20)]
    mute = socket.create_connection(("127.0.0.1", s.port), timeout=10)  # never says a word
    busy = attach(s.port)
    t0 = time.monotonic()
    for i in range(12):  # a request every 0.25 s for 3 s
        busy.sendall(header(p.Cmd.READ, 0, 4096, handle=i))
        assert recv_exact(busy, 16)[4:8] == b"\0\0\0\0"
        recv_exact(busy, 4096)
        time.sleep(0.25)
    assert time.monotonic() - t0 > 2.5
    assert closed_within(mute, 5.0)
    assert all(closed_within(sock, 5.0) for sock in idle)
    busy.sendall(header(p.Cmd.FLUSH, 0, 0, handle=99))
    assert recv_exact(busy, 16)[4:] == b"\0\0\0\0" + (99).to_bytes(8, "big")
    for sock in (*idle, mute, busy):
        sock.close()


def test_a_slow_sender_is_dropped_and_a_good_client_goes_on(served):
    """One byte every 0.2 s: of a request header, and of a WRITE payload. Each
    is dropped once its request has been arriving for stall_timeout_s."""
    need("qemu-io")
    s = served("--limit", "stall_timeout_s=1")
    drip_header = attach(s.port)
    drip_payload = attach(s.port)
    drip_payload.sendall(header(p.Cmd.WRITE, 0, 64 << 10, handle=1))
    req = header(p.Cmd.READ, 0, 4096, handle=2)
    t0 = time.monotonic()
    dropped: dict[str, float] = {}
    for i in range(40):  # up to 8 s
        for name, sock, byte in (("header", drip_header, req[i % len(req): i % len(req) + 1]),
                                 ("payload", drip_payload, b"\xee")):
            if name in dropped:
                continue
            try:
                sock.sendall(byte)
            except OSError:
                dropped[name] = time.monotonic() - t0
        if len(dropped) == 2:
            break
        time.sleep(0.2)
    for name, sock in (("header", drip_header), ("payload", drip_payload)):
        if name not in dropped and closed_within(sock, 0.1):
            dropped[name] = time.monotonic() - t0
    assert set(dropped) == {"header", "payload"}, f"still held after {time.monotonic() - t0:.1f} s: {dropped}"
    assert max(dropped.values()) < 5.0
    good_client_works(s.url)


def test_budget_keys_are_checked(served):
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "serve", "mem://?size=1MiB",
                          "--listen", "127.0.0.1:0", "--limit", "idle_timeout_s=-1"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "idle_timeout_s" in bad.stderr


# -- the server's own accounting ------------------------------------------------------
def test_server_accounting_stays_under_its_budgets():
    """In process: pipelined READs that are never read leave at most one
    request's worth above the connection budget waiting, and the server
    counts nothing once the client is gone."""
    from drivers import open_device
    from drivers.nbd.server import NbdLimits, NbdServer
    from harness.hostport import DeviceTarget

    async def main():
        dev = open_device("mem://?size=16MiB")
        limits = NbdLimits(connection_buffer_bytes=4 * MiB, server_buffer_bytes=6 * MiB)
        server = NbdServer(DeviceTarget({"vol0": dev}), limits=limits)
        _host, port = await server.start_tcp("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        socks = [await loop.run_in_executor(None, lambda: attach(port, rcvbuf=16 << 10)) for _ in range(3)]
        burst = b"".join(header(p.Cmd.READ, (i % 15) * MiB, MiB, handle=i) for i in range(200))
        for sock in socks:
            await loop.run_in_executor(None, sock.sendall, burst)
        peak = 0
        for _ in range(30):
            await asyncio.sleep(0.05)
            peak = max(peak, server.status()["buffered_bytes"])
        assert 0 < peak <= 6 * MiB + MiB
        st = server.status()
        assert st["connections"] == 3 and st["limits"]["connection_buffer_bytes"] == 4 * MiB
        # a good client still reads and writes (it waits for budget, it is not starved for ever)
        c = await NbdClient.connect(f"nbd://127.0.0.1:{port}/vol0")
        for sock in socks:
            sock.close()
        await asyncio.wait_for(c.write(0, b"\x77" * 4096), 10)
        assert await asyncio.wait_for(c.read(0, 4096), 10) == b"\x77" * 4096
        await c.close()
        for _ in range(100):
            if server.status()["buffered_bytes"] == 0 and server.status()["connections"] == 0:
                break
            await asyncio.sleep(0.05)
        st = server.status()
        assert st["buffered_bytes"] == 0 and st["inflight"] == 0 and st["connections"] == 0
        await server.close()
        dev.close()

    asyncio.run(main())


# -- the [host] keys of a controller config -------------------------------------------
def test_config_host_table_sets_the_nbd_limits(tmp_path):
    from test_config import PRIMARY, write

    from drivers.nbd.server import NbdLimits
    from harness.config import load_config
    from harness.errors import ConfigError

    assert load_config(write(tmp_path, PRIMARY)).host_limits == NbdLimits()
    text = PRIMARY.replace('socket = "nbd.sock"\n', 'socket = "nbd.sock"\nmax_connections = 8\n'
                           'server_buffer_bytes = "1GiB"\nconnection_buffer_bytes = 16777216\n'
                           'idle_timeout_s = 60\nstall_timeout_s = 2.5\n')
    lim = load_config(write(tmp_path, text)).host_limits
    assert (lim.max_connections, lim.server_buffer_bytes, lim.connection_buffer_bytes) == (8, 1 << 30, 16 * MiB)
    assert (lim.idle_timeout_s, lim.stall_timeout_s, lim.handshake_timeout_s) == (60.0, 2.5, 10.0)
    for bad, key in (("idle_timeout_s = 0", "idle_timeout_s"), ("max_connections = 1.5", "max_connections"),
                     ('max_request_bytes = "lots"', "max_request_bytes"), ("stall_timeout_s = inf", "stall_timeout_s"),
                     ("max_inflight = true", "max_inflight"), ("idle_timeout = 5", "idle_timeout")):
        text = PRIMARY.replace('socket = "nbd.sock"\n', f'socket = "nbd.sock"\n{bad}\n')
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, text))
        assert f"host.{key}" in str(e.value), str(e.value)


def test_large_writes_from_many_clients_finish_under_a_small_server_budget():
    """Eight clients each write 4 x 4 MiB at once while the server may hold 6 MiB:
    the payloads wait for room (one may overdraw to finish), nothing deadlocks,
    every byte lands, and the server never held much more than its budget."""
    from drivers import open_device
    from drivers.nbd.server import NbdLimits, NbdServer
    from harness.hostport import DeviceTarget

    async def main():
        dev = open_device("mem://?size=128MiB")
        limits = NbdLimits(connection_buffer_bytes=4 * MiB, server_buffer_bytes=6 * MiB, max_request_bytes=4 * MiB)
        server = NbdServer(DeviceTarget({"vol0": dev}), limits=limits)
        _host, port = await server.start_tcp("127.0.0.1", 0)
        clients = [await NbdClient.connect(f"nbd://127.0.0.1:{port}/vol0") for _ in range(8)]
        blobs = {(i, j): os.urandom(4 * MiB) for i in range(8) for j in range(4)}
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, server.buffered)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(asyncio.gather(*(clients[i].write((i * 4 + j) * 4 * MiB, b)
                                                for (i, j), b in blobs.items())), 60)
        watcher.cancel()
        assert peak <= 6 * MiB + 4 * MiB, peak / MiB
        for (i, j), b in blobs.items():
            assert await clients[0].read((i * 4 + j) * 4 * MiB, 4 * MiB) == b
        for c in clients:
            await c.close()
        await asyncio.sleep(0.1)
        assert server.buffered == 0 and server.inflight == 0 and server._overdraft is None
        await server.close()
        dev.close()

    asyncio.run(main())


def test_a_client_gone_with_requests_at_a_slow_volume_leaves_nothing_held():
    """Reads and writes still at the volume when the client vanishes let go of
    their bytes when they finish; queued replies go with the connection."""
    from drivers import open_device
    from drivers.nbd.server import NbdServer
    from harness.hostport import DeviceTarget, DeviceVolume

    class Slow(DeviceTarget):
        def __init__(self, dev):
            super().__init__({"vol0": dev})

            class SlowVolume(DeviceVolume):
                async def read(self, offset, length):
                    await asyncio.sleep(0.3)
                    return await super().read(offset, length)

                async def write(self, offset, data, *, fua=False):
                    await asyncio.sleep(0.3)
                    await super().write(offset, data, fua=fua)

            self._volumes = {"vol0": SlowVolume(dev, "vol0")}

    async def main():
        dev = open_device("mem://?size=16MiB")
        server = NbdServer(Slow(dev))
        _host, port = await server.start_tcp("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, attach, port)
        burst = b"".join(header(p.Cmd.READ, i * MiB, MiB, handle=i) for i in range(8))
        burst += b"".join(header(p.Cmd.WRITE, i * MiB, MiB, handle=100 + i) + bytes(MiB) for i in range(4))
        await loop.run_in_executor(None, sock.sendall, burst)
        await asyncio.sleep(0.1)
        assert server.buffered >= 8 * MiB and server.inflight >= 8
        sock.close()
        for _ in range(100):
            await asyncio.sleep(0.05)
            assert server.buffered >= 0
            if server.inflight == 0 and server.buffered == 0 and not server._connections:
                break
        assert (server.inflight, server.buffered, len(server._connections)) == (0, 0, 0)
        await server.close()
        dev.close()

    asyncio.run(main())


def test_option_spam_without_reading_the_answers_is_bounded_and_timed_out():
    """NBD_OPT_LIST after NBD_OPT_LIST (each answered with 64 long export
    names, 66 KB), no answer read: the server stops taking options while its
    answers wait (not megabytes queued), and the handshake timeout ends it."""
    from drivers import open_device
    from drivers.nbd.server import NbdLimits, NbdServer
    from harness.hostport import DeviceTarget

    async def main():
        devs = {f"{i:02d}" + "v" * 1000: open_device("mem://?size=64KiB") for i in range(64)}
        server = NbdServer(DeviceTarget(devs), limits=NbdLimits(handshake_timeout_s=1.5))
        _host, port = await server.start_tcp("127.0.0.1", 0)
        loop = asyncio.get_running_loop()

        def spam():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
            sock.connect(("127.0.0.1", port))
            sock.settimeout(0.5)
            sock.sendall(p.ClientFlags.build(dict(flags=3)))
            one = p.OptionHeader.build(dict(option=p.Option.LIST, length=0))
            with contextlib.suppress(OSError):
                sock.sendall(one * 20_000)  # stops when the server stops reading
            return sock

        spammer = loop.run_in_executor(None, spam)
        queued = 0
        for _ in range(100):  # while it sends, what waits in the server's send buffer
            if server.dropped["handshake"]:
                break
            for conn in server._connections:
                queued = max(queued, conn.transport.get_write_buffer_size())
            await asyncio.sleep(0.02)
        sock = await spammer
        print(f"\nLIST spam, answers not read: at most {queued / 1024:.0f} KiB queued")
        assert queued < 1 * MiB, queued
        assert server.dropped["handshake"] == 1
        for _ in range(250):  # the drop is counted at the timeout; the connection goes once its transport closed
            if not server._connections:
                break
            await asyncio.sleep(0.02)
        assert not server._connections
        sock.close()
        await server.close()
        for dev in devs.values():
            dev.close()

    asyncio.run(main())
