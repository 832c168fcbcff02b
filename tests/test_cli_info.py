"""``mirrorfw info URL [--json]`` run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from drivers import open_device

pytestmark = pytest.mark.timeout(60)
IS_ROOT = os.geteuid() == 0


def mirrorfw(*args: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(wrap or []), sys.executable, "-m", "harness.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mirrorfw info: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_info_on_mem_as_json():
    proc = mirrorfw("info", "--json", "mem://?size=64MiB")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["transport"] == "mem"
    assert info["block_size"] == 512 and info["num_blocks"] == (64 << 20) // 512
    assert info["size_bytes"] == 64 << 20 and info["read_only"] is True


def test_info_on_a_file_shows_size_and_direct_io(tmp_path):
    path = tmp_path / "a.img"
    open_device(f"file://{path}?size=32MiB").close()
    proc = mirrorfw("info", "--json", f"file://{path}")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["transport"] == "file" and info["size_bytes"] == 32 << 20
    assert isinstance(info["direct_io"], bool)
    text = mirrorfw("info", f"file://{path}")
    assert text.returncode == 0
    assert any(line.split() == ["size_bytes", str(32 << 20)] for line in text.stdout.splitlines())


def test_info_on_a_loop_device_shows_its_real_geometry(loop_device):
    dev = loop_device(48 << 20)
    proc = mirrorfw("info", "--json", f"blk://{dev}")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["transport"] == "loop"
    assert info["block_size"] == 512 and info["physical_block_size"] >= 512
    assert info["size_bytes"] == 48 << 20 and info["num_blocks"] == (48 << 20) // 512
    assert info["direct_io"] is True and info["discard"] is True
    assert info["extra"]["backing_file"].endswith(".img")


def test_info_on_a_device_in_use_is_one_line(loop_device):
    dev = loop_device(8 << 20)
    held = open_device(f"blk://{dev}")  # O_EXCL: now the device is in use
    try:
        assert_one_line_error(mirrorfw("info", f"blk://{dev}"), "in use", "EBUSY")
    finally:
        held.close()


@pytest.mark.parametrize(
    "url, needles",
    [
        ("notaurl", ["file://", "notaurl: no such file"]),  # a plain path is a file, as qemu-img takes it
        ("foo://bar", ["unknown device scheme 'foo'", "known:"]),
        ("mem://", ["needs ?size="]),
        ("mem://?size=lots", ["not a size"]),
        ("file:///definitely/not/here.img", ["no such file", "ENOENT"]),
        ("blk:///dev/definitely-not-a-device", ["no such file"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(url, needles):
    assert_one_line_error(mirrorfw("info", url), *needles)


def test_a_regular_file_given_as_blk_is_one_line(tmp_path):
    path = tmp_path / "plain.img"
    path.write_bytes(bytes(4096))
    assert_one_line_error(mirrorfw("info", f"blk://{path}"), "not a block device", "file://")


def test_permission_denied_is_one_line(tmp_path):
    path = tmp_path / "secret.img"
    path.write_bytes(bytes(1 << 20))
    path.chmod(0)
    wrap = None
    if IS_ROOT:
        # root reads anything; drop the capabilities that let it (owner bits 000 then apply)
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv cannot be denied a file")
        caps = "-dac_override,-dac_read_search"
        wrap = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]
    try:
        assert_one_line_error(mirrorfw("info", f"file://{path}", wrap=wrap), "permission denied")
    finally:
        os.chmod(path, 0o600)
