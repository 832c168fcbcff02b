"""nvram:// : an mmap'd file whose contents survive SIGKILL of the writer."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from drivers import open_nvram
from hal.block import DeviceError
from hal.url import UrlError

pytestmark = pytest.mark.timeout(60)

CHILD = textwrap.dedent(
    """
    import sys, time
    from drivers import open_nvram
    region = open_nvram(sys.argv[1])
    view = region.view
    # no persist() for the first store: the page cache alone must survive SIGKILL
    view[4096:4096 + 11] = b"not flushed"
    view[0:16] = b"mirrorfw-nvram-1"
    region.persist(0, 16)
    for i in range(256):
        view[8192 + i] = i
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_stores_survive_sigkill_of_the_writer(tmp_path):
    url = f"nvram://{tmp_path}/p.nvram?size=1MiB"
    child = subprocess.Popen([sys.executable, "-c", CHILD, url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        # while the writer lives, a second opener is refused
        with pytest.raises(DeviceError) as e:
            open_nvram(url)
        assert e.value.errno == errno.EBUSY
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    region = open_nvram(f"nvram://{tmp_path}/p.nvram")  # size from the file
    try:
        assert region.size_bytes == 1 << 20
        view = region.view
        assert bytes(view[0:16]) == b"mirrorfw-nvram-1"
        assert bytes(view[4096:4107]) == b"not flushed"
        assert bytes(view[8192:8448]) == bytes(range(256))
    finally:
        region.close()


def test_create_grow_and_refuse_shrink(tmp_path):
    path = tmp_path / "r.nvram"
    region = open_nvram(f"nvram://{path}?size=64KiB")
    region.view[0:3] = b"abc"
    region.close()
    region = open_nvram(f"nvram://{path}?size=128KiB")
    assert region.size_bytes == 128 << 10 and bytes(region.view[0:3]) == b"abc"
    region.close()
    with pytest.raises(DeviceError, match="refusing to shrink"):
        open_nvram(f"nvram://{path}?size=64KiB")
    assert path.stat().st_size == 128 << 10


def test_persist_checks_its_range(tmp_path):
    region = open_nvram(f"nvram://{tmp_path}/r.nvram?size=64KiB")
    try:
        region.persist(1, 4096)  # unaligned start is widened to the page
        region.persist(0, 0)
        for off, n in ((-1, 1), (0, (64 << 10) + 1), (64 << 10, 1)):
            with pytest.raises(DeviceError) as e:
                region.persist(off, n)
            assert e.value.errno == errno.EINVAL
    finally:
        region.close()
    with pytest.raises(DeviceError) as e:
        region.persist(0, 1)
    assert e.value.errno == errno.EBADF
    with pytest.raises(DeviceError):
        region.view  # noqa: B018 - the property raises


def test_close_with_a_held_slice_still_releases_the_lock(tmp_path):
    url = f"nvram://{tmp_path}/r.nvram?size=64KiB"
    region = open_nvram(url)
    held = region.view[0:8]
    held[:] = b"12345678"
    region.close()
    again = open_nvram(url)
    assert bytes(again.view[0:8]) == b"12345678"
    again.close()


@pytest.mark.parametrize(
    "tail, exc, match",
    [
        ("missing.nvram", UrlError, "give \\?size="),
        ("x.nvram?size=1000", UrlError, "multiple of 4096"),
        ("x.nvram?size=1MiB&mode=fast", UrlError, "unknown option"),
    ],
)
def test_bad_nvram_urls(tmp_path, tail, exc, match):
    with pytest.raises(exc, match=match):
        open_nvram(f"nvram://{tmp_path}/{tail}")


def test_open_nvram_refuses_other_schemes(tmp_path):
    with pytest.raises(UrlError, match="unknown NVRAM scheme 'file'"):
        open_nvram(f"file://{tmp_path}/x?size=1MiB")
    with pytest.raises(DeviceError) as e:
        open_nvram(f"nvram://{tmp_path}?size=1MiB")
    assert e.value.errno == errno.EISDIR


def test_persist_mode_is_chosen_by_url(tmp_path):
    from drivers import open_nvram

    plain = open_nvram(f"nvram://{tmp_path}/a.nvram?size=64KiB")
    synced = open_nvram(f"nvram://{tmp_path}/b.nvram?size=64KiB&persist=msync")
    try:
        assert (plain.msync, synced.msync) == (False, True)
        synced.view[0:4] = b"abcd"
        synced.persist(0, 4)
    finally:
        plain.close()
        synced.close()
    with pytest.raises(UrlError, match="persist='fsync'.*none.*msync"):
        open_nvram(f"nvram://{tmp_path}/c.nvram?size=64KiB&persist=fsync")
