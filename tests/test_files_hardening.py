"""Issue 16, files: images are created 0600 (configurable), the demo's link
secret is random and 0600 per run, and the demo's consoles refuse fault
commands."""

from __future__ import annotations

import argparse
import os
import stat

import pytest

from drivers.file import open as open_file
from hal.url import UrlError
from harness.config import load_config
from harness.supervise import write_pair_configs


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("direct", ["off", "auto"])
def test_images_are_created_owner_only(tmp_path, umask_022, direct):
    dev = open_file(f"file://{tmp_path}/a.img?size=1MiB&direct={direct}")
    dev.close()
    assert mode_of(tmp_path / "a.img") == 0o600
    dev = open_file(f"file://{tmp_path}/b.img?size=1MiB&mode=0640&direct={direct}")
    dev.close()
    assert mode_of(tmp_path / "b.img") == 0o640
    os.chmod(tmp_path / "a.img", 0o644)  # an existing image keeps what its owner chose
    open_file(f"file://{tmp_path}/a.img").close()
    assert mode_of(tmp_path / "a.img") == 0o644


@pytest.mark.parametrize("mode", ["rw", "0999", "1777"])
def test_a_bad_image_mode_is_refused(tmp_path, mode):
    with pytest.raises(UrlError, match="mode="):
        open_file(f"file://{tmp_path}/a.img?size=1MiB&mode={mode}")


def test_pair_secrets_are_random_and_owner_only(tmp_path, umask_022):
    a = write_pair_configs(tmp_path / "a")
    write_pair_configs(tmp_path / "b")
    sa, sb = (tmp_path / "a" / "secret").read_bytes(), (tmp_path / "b" / "secret").read_bytes()
    assert sa != sb and b"mirrorfw-test-secret" not in sa and len(sa.strip()) >= 32
    assert mode_of(tmp_path / "a" / "secret") == 0o600
    assert load_config(a.primary).secret == load_config(a.secondary).secret == sa.strip()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "secret").write_bytes(b"old")
    os.chmod(tmp_path / "c" / "secret", 0o644)
    write_pair_configs(tmp_path / "c", secret=b"given\n")
    assert mode_of(tmp_path / "c" / "secret") == 0o600 and (tmp_path / "c" / "secret").read_bytes() == b"given\n"


def test_the_demo_writes_no_fault_commands_and_a_random_secret(tmp_path, monkeypatch):
    import testbench.cli_demo as demo

    seen = {}

    class Stop(Exception):
        pass

    def capture(workdir, **kw):
        seen["pair"] = write_pair_configs(workdir, **kw)
        raise Stop

    monkeypatch.setattr(demo, "write_pair_configs", capture)
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    with pytest.raises(Stop):
        demo.run(p.parse_args(["--workdir", str(tmp_path / "work")]))
    pair = seen["pair"]
    for path in (pair.primary, pair.secondary):
        cfg = load_config(path)
        assert cfg.console_url and not cfg.console_allow_faults
        assert b"mirrorfw-test-secret" not in cfg.secret
    assert mode_of(tmp_path / "work" / "secret") == 0o600
