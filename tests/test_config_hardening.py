"""Issue 16, files and inputs in the config loader: a secret or token is
read only from a regular file and at most 4 KiB of it, others' read access
is named in a warning, deep TOML nesting is a config error, and a TCP
console beyond loopback needs a token."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from harness.config import load_config
from harness.errors import ConfigError
from tests.test_config import PRIMARY, write


def load_within(path: Path, seconds: float = 5.0):
    """load_config in a thread: a hang (a FIFO secret) fails the test instead of the run."""
    out: dict = {}

    def go() -> None:
        try:
            out["cfg"] = load_config(path)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["exc"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "load_config hung"
    if "exc" in out:
        raise out["exc"]
    return out["cfg"]


def with_secret(tmp_path: Path, secret_file: str) -> Path:
    path = write(tmp_path, PRIMARY)
    path.write_text(path.read_text().replace('secret_file = "secret"', f'secret_file = "{secret_file}"'))
    return path


def test_a_fifo_secret_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match=r"session\.secret_file.*not a regular file"):
        load_within(with_secret(tmp_path, "fifo"))


def test_dev_zero_secret_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"/dev/zero is not a regular file"):
        load_within(with_secret(tmp_path, "/dev/zero"))


def test_a_secret_over_4_kib_is_refused(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 4097)
    (tmp_path / "big").chmod(0o600)
    with pytest.raises(ConfigError, match=r"session\.secret_file.*longer than 4096 bytes"):
        load_within(with_secret(tmp_path, "big"))
    (tmp_path / "big").write_bytes(b"x" * 4096)
    assert load_within(with_secret(tmp_path, "big")).secret == b"x" * 4096


def test_a_group_or_world_readable_secret_is_named_in_a_warning(tmp_path, caplog):
    path = write(tmp_path, PRIMARY)
    secret = tmp_path / "secret"
    secret.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="harness.config"):
        load_config(path)
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(secret) in m and "0644" in m for m in shown), shown
    caplog.clear()
    secret.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="harness.config"):
        load_config(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_deeply_nested_toml_is_a_config_error(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path)


def test_a_config_file_that_is_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "ctl.toml")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_within(tmp_path / "ctl.toml")


def console(tmp_path: Path, body: str) -> Path:
    path = write(tmp_path, PRIMARY)
    text = path.read_text().replace('url = "socket://127.0.0.1:4001"\nallow_faults = true\n', body)
    path.write_text(text)
    return path


def test_a_tcp_console_beyond_loopback_needs_a_token(tmp_path):
    path = console(tmp_path, 'url = "socket://0.0.0.0:4001"\n')
    with pytest.raises(ConfigError, match=r"console\.url.*beyond loopback.*token_file"):
        load_config(path)
    (tmp_path / "tok").write_bytes(b"t0ken\n")
    (tmp_path / "tok").chmod(0o600)
    path = console(tmp_path, 'url = "socket://0.0.0.0:4001"\ntoken_file = "tok"\n')
    cfg = load_config(path)
    assert cfg.console_url == f"socket://0.0.0.0:4001?token_file={tmp_path / 'tok'}"
    assert cfg.console_token_file == tmp_path / "tok"
    assert load_config(console(tmp_path, 'url = "socket://[::1]:4001"\n')).console_url == "socket://[::1]:4001"


def test_console_token_errors_name_the_key(tmp_path):
    path = console(tmp_path, 'url = "pty:///tmp/c"\ntoken_file = "tok"\n')
    (tmp_path / "tok").write_bytes(b"t")
    with pytest.raises(ConfigError, match=r"console\.token_file.*file permissions"):
        load_config(path)
    (tmp_path / "tok").write_bytes(b"\n")
    path = console(tmp_path, 'url = "socket://127.0.0.1:4001"\ntoken_file = "tok"\n')
    with pytest.raises(ConfigError, match=r"console\.token_file.*empty"):
        load_config(path)
