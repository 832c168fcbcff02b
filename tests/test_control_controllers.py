"""The harness's session wiring, in process, with the session's two pieces
(LocalMember, SessionMaster) replaced by fakes: a subordinate primary
serves ControlService on [control] listen and forms no CGs of its own; a
master connects a ControlRemote per subordinate, hands them with its own
member to the session master, and starts and stops it."""

from __future__ import annotations

import asyncio
import io
import random

import pytest

from firmware.control_remote import ControlRemote
from firmware.control_service import ControlService
from harness import controller as ctl_mod
from harness.config import load_config
from harness.controller import PrimaryController, connect_replication_link, listen_replication_links
from harness.errors import ConfigError
from harness.supervise import write_session_configs
from tests.test_control_link import FakeMember, until

pytestmark = pytest.mark.timeout(60)


class Member(FakeMember):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.lost: list[str] = []

    def master_lost(self, reason: str) -> None:
        self.lost.append(reason)


class FakeSessionMaster:
    made: list[FakeSessionMaster] = []

    def __init__(self, primary, subordinates, *, name, secondaries=None) -> None:
        self.members = [Member(name), *subordinates]
        self.secondaries = secondaries or {}
        self.started = self.stopped = False
        primary.session_master = self  # as SessionMaster does: Primary.stop() stops its loop
        FakeSessionMaster.made.append(self)

    def start_loop(self) -> None:
        self.started = True

    async def stop_loop(self) -> None:
        self.stopped = True


@pytest.fixture
def fakes(monkeypatch):
    members: dict[str, FakeMember] = {}

    def local_member(primary, name):
        members[name] = Member(name)
        members[name].primary = primary
        return members[name]

    FakeSessionMaster.made = []
    monkeypatch.setattr(ctl_mod, "local_member", local_member)
    monkeypatch.setattr(ctl_mod, "session_master", FakeSessionMaster)
    return members


async def started(path) -> PrimaryController:
    ctl = PrimaryController(load_config(path, role="primary"), format=True, out=io.StringIO())
    await ctl._exits.__aenter__()
    await ctl.start()
    return ctl


async def stopped(ctl: PrimaryController) -> None:
    await ctl.stop()
    await ctl._exits.__aexit__(None, None, None)


def test_a_subordinate_serves_its_member_on_the_control_port_and_forms_no_cgs(tmp_path, fakes):
    session = write_session_configs(tmp_path, controllers=2)

    async def main():
        ctl = await started(session.pairs[1].primary)
        cfg = ctl.cfg
        assert ctl.addresses["session"] == "subordinate"
        assert ctl.addresses["control"] == f"127.0.0.1:{session.control_ports[1]}"
        member = fakes[f"127.0.0.1:{session.control_ports[1]}"]
        assert member.primary is ctl.primary and isinstance(ctl.control, ControlService)

        async def dial():
            return await connect_replication_link("127.0.0.1", session.control_ports[1])

        remote = ControlRemote("sub", dial, cfg.secret, session_id=cfg.session_id,
                               random_bytes=random.Random(1).randbytes)
        assert (await remote.hello(cfg.session_id)).name == member.name
        await remote.start(1)
        assert member.calls == [("hello", "test"), ("start", 1)]
        await remote.close()
        await until(lambda: member.lost == ["the master's control link went down"])
        await asyncio.wait_for(ctl._starter, 10)  # Primary.start returned, without a CG loop
        assert ctl.primary.cycle.loop_task is None
        await stopped(ctl)

    asyncio.run(main())


def test_a_master_connects_every_subordinate_and_hands_them_to_the_session_master(tmp_path, fakes):
    session = write_session_configs(tmp_path, controllers=3)

    async def main():
        subs = [FakeMember(f"sub{i}") for i in (1, 2)]
        servers = []
        for member, port in zip(subs, session.control_ports[1:], strict=True):
            service = ControlService(member, b"mirrorfw-test-secret", "test",
                                     random_bytes=random.Random(port).randbytes)
            servers.append(await listen_replication_links("127.0.0.1", port, service.serve))
        ctl = await started(session.master.primary)
        assert ctl.addresses["session"] == "master" and "control" not in ctl.addresses
        (master,) = FakeSessionMaster.made
        names = [m.name for m in master.members]
        assert names == ["master"] + [f"127.0.0.1:{p}" for p in session.control_ports[1:]]
        remotes = master.members[1:]
        assert all(isinstance(r, ControlRemote) for r in remotes)
        # each member's secondary, for session recovery: its [link] listen (the master's own: [link] peer)
        links = [pair.text["secondary"].split('listen = "', 1)[1].split('"', 1)[0] for pair in session.pairs]
        assert {k: v.name for k, v in master.secondaries.items()} == dict(zip(names, links, strict=True))
        await until(lambda: all(r.link_up for r in remotes), 10)
        for r in remotes:
            await r.start(4)
        assert [m.calls for m in subs] == [[("start", 4)], [("start", 4)]]
        await asyncio.wait_for(ctl._starter, 10)
        assert master.started and ctl.primary.cycle.loop_task is None
        await stopped(ctl)
        assert master.stopped and not any(r.link_up for r in remotes)
        for server in servers:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_without_session_py_a_session_config_fails_with_one_line(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_session(name, *args, **kw):
        if name in ("firmware.session_member", "firmware.session_master"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_session)
    with pytest.raises(ctl_mod.ControllerError, match="needs firmware/session_member.py"):
        ctl_mod.local_member(None, name="x")
    with pytest.raises(ctl_mod.ControllerError, match="needs firmware/session_master.py"):
        ctl_mod.session_master(None, [])


def test_a_session_config_for_a_secondary_is_refused(tmp_path):
    session = write_session_configs(tmp_path, controllers=2)
    text = session.pairs[1].secondary.read_text() + '[control]\nlisten = "127.0.0.1:1"\n'
    session.pairs[1].secondary.write_text(text)
    with pytest.raises(ConfigError, match="control"):
        load_config(session.pairs[1].secondary, role="secondary")
