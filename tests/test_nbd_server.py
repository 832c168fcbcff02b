"""The NBD host port against real clients: nbdinfo, qemu-img, qemu-io,
nbdcopy, fio's nbd engine, our own client, and ``mirrorfw serve``."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from drivers import open_device
from drivers.nbd.client import NbdClient
from drivers.nbd.protocol import Cmd
from drivers.nbd.server import NbdServer
from hal.block import DeviceError
from hal.host import HostTarget, HostVolume
from harness.hostport import DeviceTarget

pytestmark = pytest.mark.timeout(120)


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make deps installs fio qemu-utils libnbd-bin nbdkit)")


class ServedTarget:
    """An NbdServer on its own event loop in a thread, so blocking tools and
    subprocesses can talk to it from the test."""

    def __init__(self, target: HostTarget, sock_path: str, *, read_only: bool = False) -> None:
        self.target = target
        self.sock_path = sock_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = NbdServer(target, read_only=read_only)

        async def start():
            host, port = await self.server.start_tcp("127.0.0.1", 0)
            await self.server.start_unix(sock_path)
            return port

        self.port = self.call(start())

    def call(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def tcp(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def unix(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock_path}"

    def volume_bytes(self, name: str) -> bytes:
        vol = self.target.volumes()[name]
        return self.call(vol.read(0, vol.size_bytes))

    def digest(self, name: str) -> str:
        return hashlib.sha256(self.volume_bytes(name)).hexdigest()

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served(tmp_path):
    """vol0: 32 MiB mem://, vol1: 16 MiB file://."""
    devices = {
        "vol0": open_device("mem://?size=32MiB"),
        "vol1": open_device(f"file://{tmp_path}/vol1.img?size=16MiB"),
    }
    s = ServedTarget(DeviceTarget(devices), str(tmp_path / "nbd.sock"))
    yield s
    s.stop()
    for d in devices.values():
        d.close()


def run(cmd: list[str], timeout_s: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


# -- nbdinfo ------------------------------------------------------------------------
def test_nbdinfo_shows_size_and_block_sizes(served):
    need("nbdinfo")
    info = json.loads(run(["nbdinfo", "--json", served.tcp("vol0")]).stdout)
    (exp,) = info["exports"]
    assert info["protocol"] == "newstyle-fixed"
    assert exp["export-size"] == 32 << 20
    assert exp["block_size_minimum"] == 512
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 32 << 20
    assert exp["can_flush"] and exp["can_fua"] and exp["can_trim"] and exp["can_zero"] and exp["can_multi_conn"]
    assert not exp["is_read_only"]


def test_nbdinfo_lists_every_export(served):
    need("nbdinfo")
    out = run(["nbdinfo", "--list", "--json", served.unix("")]).stdout
    names = sorted(e["export-name"] for e in json.loads(out)["exports"])
    assert names == ["vol0", "vol1"]


# -- qemu ---------------------------------------------------------------------------
def test_qemu_img_convert_round_trips(served, tmp_path):
    need("qemu-img")
    src = tmp_path / "src.raw"
    data = os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(12 << 20)
    src.write_bytes(data)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.unix("vol1")])
    assert served.volume_bytes("vol1") == data
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", served.tcp("vol1"), str(out)])
    assert out.read_bytes() == data


@pytest.mark.parametrize("cache", ["writeback", "none", "directsync"])
def test_qemu_io_write_read_modes(served, cache):
    need("qemu-io")
    cmds = [
        "write -P 0xab 0 64k",
        "write -f -P 0xcd 64k 64k",  # FUA
        "aio_write -P 0x11 1M 512k", "aio_write -P 0x22 2M 512k", "aio_flush",
        "flush",
        "read -P 0xab 0 64k", "read -P 0xcd 64k 64k", "read -P 0x11 1M 512k", "read -P 0x22 2M 512k",
        "write -z 4M 1M", "read -P 0 4M 1M",
        "discard 8M 1M",
    ]
    args = ["qemu-io", "-f", "raw", "-t", cache]
    for c in cmds:
        args += ["-c", c]
    proc = run(args + [served.unix("vol0")])
    assert "verification failed" not in proc.stdout + proc.stderr
    got = served.volume_bytes("vol0")
    assert got[: 64 << 10] == b"\xab" * (64 << 10)
    assert got[64 << 10 : 128 << 10] == b"\xcd" * (64 << 10)
    assert got[1 << 20 : (1 << 20) + (512 << 10)] == b"\x11" * (512 << 10)


def test_qemu_io_read_detects_wrong_pattern(served):
    """The pattern check above can fail: a wrong pattern is reported."""
    need("qemu-io")
    proc = run(["qemu-io", "-f", "raw", "-c", "write -P 0x01 0 4k", "-c", "read -P 0x02 0 4k",
                served.tcp("vol0")], check=False)
    assert "verification failed" in (proc.stdout + proc.stderr).lower()


# -- nbdcopy ------------------------------------------------------------------------
def test_nbdcopy_in_and_out(served, tmp_path):
    need("nbdcopy")
    src = tmp_path / "in.raw"
    data = os.urandom(16 << 20)
    src.write_bytes(data)
    run(["nbdcopy", str(src), served.unix("vol1")])
    assert served.volume_bytes("vol1") == data
    out = tmp_path / "out.raw"
    run(["nbdcopy", served.tcp("vol1"), str(out)])
    assert out.read_bytes() == data


# -- fio ----------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_fio_nbd_verify_qd32(served, tmp_path, transport):
    need("fio")
    uri = served.unix("vol1") if transport == "unix" else served.tcp("vol1")
    proc = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                "--iodepth=32", "--size=8M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                "--verify_state_save=0", "--output-format=json"], timeout_s=90)
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] == 2048
    assert job["read"]["total_ios"] == 2048  # every block read back and checked


# -- our own client -----------------------------------------------------------------
def test_own_client_pipelined_and_several_clients(served):
    async def main():
        clients = await asyncio.gather(*(NbdClient.connect(served.unix("vol0")) for _ in range(4)))
        try:
            blobs = {(i, j): os.urandom(4096) for i in range(4) for j in range(32)}
            await asyncio.gather(*(clients[i].write((i * 32 + j) * 4096, b) for (i, j), b in blobs.items()))
            # each client reads what the others wrote (CAN_MULTI_CONN: shared, no private cache)
            reads = await asyncio.gather(*(clients[(i + 1) % 4].read((i * 32 + j) * 4096, 4096) for (i, j) in blobs))
            assert reads == list(blobs.values())
            await asyncio.gather(*(c.flush() for c in clients))
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    asyncio.run(main())


def test_nbd_device_url_is_a_block_device(served):
    dev = open_device(served.tcp("vol1"))
    assert dev.info.transport == "nbd" and dev.info.size_bytes == 16 << 20 and dev.info.block_size == 512

    async def main():
        data = os.urandom(3 << 20)
        await dev.write(8, data, fua=True)
        assert await dev.read(8, len(data) // 512) == data
        await dev.zeroout(8, 8)
        assert await dev.read(8, 8) == bytes(4096)
        await dev.flush()

    asyncio.run(main())
    asyncio.run(main())  # a second loop: the device reconnects there
    dev.close()


def test_client_sees_server_errors(served):
    async def main():
        c = await NbdClient.connect(served.tcp("vol0"))
        size = c.size
        cases = [
            ((Cmd.READ, size, 512), errno.EINVAL),
            ((Cmd.READ, size - 512, 1024), errno.EINVAL),
            ((Cmd.WRITE, size, 512, bytes(512)), errno.ENOSPC),
            ((Cmd.READ, 1, 512), errno.EINVAL),
            ((Cmd.READ, 0, 100), errno.EINVAL),
            ((Cmd.READ, 0, 64 << 20), errno.EOVERFLOW),
            ((Cmd.TRIM, size - 512, 4096), errno.EINVAL),
            ((Cmd.WRITE_ZEROES, size - 512, 4096), errno.ENOSPC),
            ((Cmd.BLOCK_STATUS, 0, 512), errno.EINVAL),
            ((77, 0, 512), errno.EINVAL),
        ]
        for args, want in cases:
            with pytest.raises(DeviceError) as e:
                await c.raw_request(*args)
            assert e.value.errno == want, args
        with pytest.raises(DeviceError) as e:
            await c.raw_request(Cmd.WRITE, 0, 512, bytes(512), flags=0x8000)  # unknown flag
        assert e.value.errno == errno.EINVAL
        assert await c.read(0, 512) == bytes(512)  # still serving
        await c.close()

    before = served.digest("vol0")
    asyncio.run(main())
    assert served.digest("vol0") == before


def test_unknown_export_is_refused(served):
    async def main():
        with pytest.raises(DeviceError) as e:
            await NbdClient.connect(served.tcp("nope"))
        assert e.value.errno == errno.ENOENT and "vol0" in str(e.value)
        assert sorted(await NbdClient.list_exports(served.tcp(""))) == ["vol0", "vol1"]

    asyncio.run(main())


class FailingVolume(HostVolume):
    """Writes fail with the exception the test sets; reads return zeros."""

    def __init__(self) -> None:
        self.name = "bad"
        self.size_bytes = 1 << 20
        self.block_size = 512
        self.exc: BaseException = OSError(errno.EIO, "boom")

    async def read(self, offset, length):
        return bytes(length)

    async def write(self, offset, data, *, fua=False):
        raise self.exc

    async def flush(self):
        raise self.exc


class OneVolume(HostTarget):
    def __init__(self, vol):
        self.vol = vol

    def volumes(self):
        return {self.vol.name: self.vol}


@pytest.mark.parametrize("exc, want", [
    (PermissionError(errno.EPERM, "held"), errno.EPERM),
    (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
    (OSError(errno.EROFS, "ro"), errno.EPERM),
    (OSError(errno.ENOENT, "odd"), errno.EIO),
    (RuntimeError("bug"), errno.EIO),
])
def test_volume_errors_map_to_nbd_errnos(tmp_path, exc, want):
    vol = FailingVolume()
    vol.exc = exc
    s = ServedTarget(OneVolume(vol), str(tmp_path / "f.sock"))
    try:
        async def main():
            c = await NbdClient.connect(s.tcp(""))  # the default export: only one volume
            for op in (c.write(0, bytes(512)), c.flush()):
                with pytest.raises(DeviceError) as e:
                    await op
                assert e.value.errno == want
            assert await c.read(0, 512) == bytes(512)
            await c.close()

        asyncio.run(main())
    finally:
        s.stop()


def test_read_only_export_refuses_writes(tmp_path):
    dev = open_device("mem://?size=8MiB")
    s = ServedTarget(DeviceTarget({"ro": dev}), str(tmp_path / "ro.sock"), read_only=True)
    try:
        async def main():
            c = await NbdClient.connect(s.tcp("ro"))
            assert c.read_only
            for op in (c.write(0, b"x" * 512), c.trim(0, 512), c.write_zeroes(0, 512)):
                with pytest.raises(DeviceError) as e:
                    await op
                assert e.value.errno == errno.EPERM
            assert await c.read(0, 512) == bytes(512)
            await c.close()

        asyncio.run(main())
        if shutil.which("nbdinfo"):
            info = json.loads(run(["nbdinfo", "--json", s.unix("ro")]).stdout)["exports"][0]
            assert info["is_read_only"] and not info["can_trim"]
        if shutil.which("qemu-io"):
            proc = run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", s.tcp("ro")])
            assert "read 4096/4096" in proc.stdout
    finally:
        s.stop()
    assert asyncio.run(dev.read(0, 16384 // 512)) == bytes(16384)
    dev.close()


# -- mirrorfw serve as a process -----------------------------------------------------
def start_serve(args: list[str]) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parent.parent))
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        raise AssertionError(f"serve did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, line.split()[1:]


def test_mirrorfw_serve_process(tmp_path):
    img = tmp_path / "a.img"
    sock = tmp_path / "serve.sock"
    proc, urls = start_serve([f"file://{img}?size=8MiB", "mem://?size=4MiB", "--listen", "127.0.0.1:0",
                              "--socket", str(sock), "--name", "disk"])
    try:
        assert urls[0].startswith("nbd://127.0.0.1:") and urls[0].endswith("/disk")
        assert urls[1].endswith("/vol1")
        assert f"nbd+unix:///disk?socket={sock}" in urls
        dev = open_device(urls[0])
        data = os.urandom(1 << 20)
        asyncio.run(dev.write(0, data, fua=True))
        dev.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not sock.exists()
    assert img.read_bytes()[: 1 << 20] == data


def test_mirrorfw_serve_read_only_and_bad_args(tmp_path):
    proc, urls = start_serve(["mem://?size=4MiB", "--listen", "none", "--socket", str(tmp_path / "r.sock"),
                              "--read-only"])
    try:
        async def main():
            c = await NbdClient.connect(urls[0])
            with pytest.raises(DeviceError) as e:
                await c.write(0, bytes(512))
            assert e.value.errno == errno.EPERM
            await c.close()

        asyncio.run(main())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "serve", "mem://?size=1MiB", "--listen", "nonsense"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--listen" in bad.stderr
