"""Session keys in the controller config: a master names its subordinates,
a subordinate listens for its master; every misuse names the key and file."""

from __future__ import annotations

import pytest

from harness.config import load_config
from harness.errors import ConfigError
from tests.test_config import PRIMARY, SECONDARY, write

MASTER = PRIMARY.replace('id = "demo"', 'id = "demo"\nmaster = true\nsubordinates = ["127.0.0.1:7801", ":7802"]')
SUBORDINATE = (PRIMARY.replace('id = "demo"', 'id = "demo"\nmaster_addr = "127.0.0.1:7800"')
               + '[control]\nlisten = "127.0.0.1:7801"\n')


def test_a_master_names_its_subordinates(tmp_path):
    cfg = load_config(write(tmp_path, MASTER), role="primary")
    assert cfg.session_role == "master" and cfg.session_master
    assert cfg.session_subordinates == [("127.0.0.1", 7801), ("127.0.0.1", 7802)]
    assert cfg.control_listen is None and "master" not in cfg.params


def test_a_subordinate_listens_for_its_master(tmp_path):
    cfg = load_config(write(tmp_path, SUBORDINATE), role="primary")
    assert cfg.session_role == "subordinate"
    assert cfg.control_listen == ("127.0.0.1", 7801)
    assert cfg.session_master_addr == ("127.0.0.1", 7800)


def test_a_primary_on_its_own_has_no_session_role(tmp_path):
    assert load_config(write(tmp_path, PRIMARY)).session_role == ""


@pytest.mark.parametrize(
    "text, key",
    [
        (MASTER.replace("master = true", "master = 1"), "session.master"),
        (MASTER.replace('["127.0.0.1:7801", ":7802"]', '"127.0.0.1:7801"'), "session.subordinates"),
        (MASTER.replace('":7802"', '"nowhere"'), "session.subordinates[1]"),
        (MASTER.replace('":7802"', "7802"), "session.subordinates[1]"),
        (MASTER.replace('":7802"', '"127.0.0.1:7801"'), "session.subordinates[1]"),
        (MASTER.replace("master = true\n", ""), "session.subordinates"),
        (MASTER.replace("master = true", 'master = true\nmaster_addr = "127.0.0.1:1"'), "session.master_addr"),
        (MASTER + '[control]\nlisten = "127.0.0.1:7801"\n', "control"),
        (SUBORDINATE.replace('listen = "127.0.0.1:7801"', 'listen = "x"'), "control.listen"),
        (SUBORDINATE.replace('listen = "127.0.0.1:7801"', 'port = 7801'), "control.listen"),
        (SUBORDINATE.replace('[control]\nlisten = "127.0.0.1:7801"\n', ""), "session.master_addr"),
        (SUBORDINATE.replace('master_addr = "127.0.0.1:7800"', 'master_addr = "here"'), "session.master_addr"),
        (SUBORDINATE + 'colour = "blue"\n', "control.colour"),
    ],
)
def test_every_session_key_error_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, role="primary")
    assert str(path) in str(info.value) and key in str(info.value), str(info.value)


@pytest.mark.parametrize("extra", ["master = true", 'master_addr = "127.0.0.1:7800"'])
def test_a_secondary_takes_no_session_role(tmp_path, extra):
    path = write(tmp_path, SECONDARY.replace('id = "demo"', f'id = "demo"\n{extra}'))
    with pytest.raises(ConfigError, match=r"session\.master.*only a primary"):
        load_config(path, role="secondary")


def test_a_secondary_has_no_control_table(tmp_path):
    path = write(tmp_path, SECONDARY + '[control]\nlisten = "127.0.0.1:7801"\n')
    with pytest.raises(ConfigError, match="control.*only a subordinate primary"):
        load_config(path, role="secondary")


def test_write_session_configs_makes_one_master_and_its_subordinates(tmp_path):
    from harness.supervise import write_session_configs

    session = write_session_configs(tmp_path, controllers=3, console=True)
    primaries = [load_config(pair.primary, role="primary") for pair in session.pairs]
    secondaries = [load_config(pair.secondary, role="secondary") for pair in session.pairs]
    assert [c.session_role for c in primaries] == ["master", "subordinate", "subordinate"]
    listens = [c.control_listen for c in primaries[1:]]
    assert primaries[0].session_subordinates == listens
    assert session.control_ports == [None] + [port for _, port in listens]
    # Each primary has its own secondary; no port is used twice.
    assert [c.link_peer for c in primaries] == [c.link_listen for c in secondaries]
    ports = [port for _, port in listens] + [port for _, port in (c.link_peer for c in primaries)]
    assert len(set(ports)) == len(ports)
    assert {c.session_id for c in primaries + secondaries} == {"test"}
    assert len({c.secret for c in primaries}) == 1
