"""Shared fixtures. Tests that need root or a device skip with the reason."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# In CI every property test runs the same examples each time (a red run
# replays exactly); locally they explore new ones. HYPOTHESIS_PROFILE=explore
# in CI, or =ci locally, swaps them.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "explore"))

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (loop devices and block ioctls)")


def loop_unavailable_reason() -> str | None:
    """Why a loop device cannot be made here, or None when it can."""
    import shutil

    if not IS_ROOT:
        return "needs root to attach a loop device (losetup)"
    if shutil.which("losetup") is None:
        return "losetup not installed (util-linux / mount package)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control: loop driver not available in this kernel/container"
    return None


@pytest.fixture
def loop_device(tmp_path):
    """Factory: ``loop_device(size_bytes, direct_io=True, read_only=False) ->
    "/dev/loopN"`` over a fresh sparse file in tmp_path. Every device made is
    detached at teardown, whatever the test did."""
    import subprocess

    reason = loop_unavailable_reason()
    made: list[str] = []

    def make(size_bytes: int = 64 << 20, *, direct_io: bool = True, read_only: bool = False) -> str:
        if reason:
            pytest.skip(reason)
        backing = tmp_path / f"loop-backing-{len(made)}.img"
        with open(backing, "wb") as f:
            f.truncate(size_bytes)
        cmd = ["losetup", "--find", "--show", f"--direct-io={'on' if direct_io else 'off'}"]
        if read_only:
            cmd.append("--read-only")
        proc = subprocess.run([*cmd, str(backing)], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            pytest.skip(f"losetup failed: {proc.stderr.strip() or proc.returncode}")
        dev = proc.stdout.strip()
        made.append(dev)
        return dev

    try:
        yield make
    finally:
        for dev in made:
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
