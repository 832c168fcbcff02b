"""Controller config: a good file loads; every bad one names the key and the file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness.config import load_config
from harness.errors import ConfigError

PRIMARY = """
role = "primary"
[session]
id = "demo"
secret_file = "secret"
cg_interval_s = 0.5
max_coord_ms = 20
collision_policy = "send-first"
[nvram]
url = "nvram://p.nvram?size=16MiB"
[[volume]]
name = "vol0"
url = "file://data/a0.img?size=8MiB"
[[volume]]
name = "vol1"
url = "file:///abs/a1.img?size=8MiB"
[link]
peer = "127.0.0.1:7700"
[host]
listen = "127.0.0.1:10809"
socket = "nbd.sock"
[console]
url = "socket://127.0.0.1:4001"
allow_faults = true
"""

SECONDARY = """
role = "secondary"
[session]
id = "demo"
secret_file = "secret"
[nvram]
url = "nvram:///abs/s.nvram?size=16MiB"
[[volume]]
name = "vol0"
b_url = "file:///abs/b0.img?size=8MiB"
c_url = "file:///abs/c0.img?size=8MiB"
[link]
listen = "127.0.0.1:0"
"""


def write(tmp_path: Path, text: str, secret: bytes | None = b"s3cret\n") -> Path:
    path = tmp_path / "ctl.toml"
    path.write_text(textwrap.dedent(text))
    if secret is not None:
        (tmp_path / "secret").write_bytes(secret)
    return path


def test_primary_config_loads_with_paths_resolved(tmp_path):
    cfg = load_config(write(tmp_path, PRIMARY), role="primary")
    assert cfg.role == "primary" and cfg.session_id == "demo"
    assert cfg.secret == b"s3cret"
    assert cfg.params == {"cg_interval_s": 0.5, "max_coord_ms": 20, "collision_policy": "send-first"}
    assert cfg.nvram_url == f"nvram://{tmp_path.resolve()}/p.nvram?size=16MiB"
    assert [v.name for v in cfg.volumes] == ["vol0", "vol1"]
    assert cfg.volumes[0].url == f"file://{tmp_path.resolve()}/data/a0.img?size=8MiB"
    assert cfg.volumes[1].url == "file:///abs/a1.img?size=8MiB"
    assert cfg.link_peer == ("127.0.0.1", 7700) and cfg.link_listen is None
    assert cfg.host_listen == ("127.0.0.1", 10809)
    assert cfg.host_socket == tmp_path.resolve() / "nbd.sock"
    assert cfg.console_url == "socket://127.0.0.1:4001" and cfg.console_allow_faults


def test_secondary_config_loads(tmp_path):
    cfg = load_config(write(tmp_path, SECONDARY), role="secondary")
    assert cfg.link_listen == ("127.0.0.1", 0)
    assert cfg.volumes[0].b_url.endswith("b0.img?size=8MiB")
    assert cfg.volumes[0].c_url.endswith("c0.img?size=8MiB")
    assert cfg.host_listen is None and cfg.console_url is None


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda t: t.replace('role = "primary"', 'role = "tertiary"'), "role"),
        (lambda t: t.replace('role = "primary"\n', ""), "role"),
        (lambda t: t + "colour = 3\n", "colour"),
        (lambda t: t.replace('id = "demo"', 'id = "demo"\nflavour = 1'), "session.flavour"),
        (lambda t: t.replace('id = "demo"', "id = 7"), "session.id"),
        (lambda t: t.replace("cg_interval_s = 0.5", 'cg_interval_s = "soon"'), "session.cg_interval_s"),
        (lambda t: t.replace('"send-first"', '"never"'), "session.collision_policy"),
        (lambda t: t.replace('secret_file = "secret"', 'secret_file = "nope"'), "session.secret_file"),
        (lambda t: t.replace('secret_file = "secret"\n', ""), "session.secret_file"),
        (lambda t: t.replace("nvram://p.nvram", "mem://"), "nvram.url"),
        (lambda t: t.replace('name = "vol1"', 'name = "vol0"'), "volume[1].name"),
        (lambda t: t.replace('url = "file:///abs/a1.img?size=8MiB"', 'b_url = "file:///x"'), "volume[1]"),
        (lambda t: t.replace("file:///abs/a1.img", "a1.img"), "volume[1].url"),
        (lambda t: t.replace('peer = "127.0.0.1:7700"', 'peer = "localhost"'), "link.peer"),
        (lambda t: t.replace('peer = "127.0.0.1:7700"', 'listen = "127.0.0.1:7700"'), "link"),
        (lambda t: t.replace("allow_faults = true", "allow_faults = 1"), "console.allow_faults"),
        (lambda t: t.replace('socket = "nbd.sock"', 'sock = "nbd.sock"'), "host.sock"),
        (lambda t: t.replace("[link]", "[link\n"), "TOML"),
    ],
)
def test_every_error_names_key_and_file(tmp_path, edit, key):
    path = write(tmp_path, edit(PRIMARY))
    with pytest.raises(ConfigError) as info:
        load_config(path, role="primary")
    message = str(info.value)
    assert str(path) in message
    assert key in message


def test_empty_secret_file_is_refused(tmp_path):
    path = write(tmp_path, PRIMARY, secret=b"\n  \n")
    with pytest.raises(ConfigError, match=r"session\.secret_file.*empty"):
        load_config(path)


def test_role_must_match_the_command(tmp_path):
    with pytest.raises(ConfigError, match="role.*secondary"):
        load_config(write(tmp_path, SECONDARY), role="primary")


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
