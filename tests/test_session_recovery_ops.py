"""Session recovery and the operators' view (issue 13), in process: the
FLASH_* frames carry FlashPort over the control link's sealed channel (and
share a secondary's replication port with the data link), the config keys
of a session's secondaries, the master's console (members table, status
--json members, session recover / failover output) and a subordinate's
status."""

from __future__ import annotations

import asyncio
import random

import pytest

from firmware import protocol as p
from firmware.console import CommandSet
from firmware.control_remote import ControlRemote
from firmware.control_service import ControlService, serve_link_or_control
from firmware.member import MemberError, RecoveryState
from harness.config import load_config
from harness.errors import ConfigError
from harness.supervise import write_session_configs
from tests.test_control_link import SECRET, mem_pair

pytestmark = pytest.mark.timeout(60)


class FakeSecondary:
    """A FlashPort: one CG in doubt, recorded calls."""

    def __init__(self, committed: int = 4, prepared: int | None = 5) -> None:
        self.state = RecoveryState(committed, prepared)
        self.calls: list[tuple] = []

    async def recovery_state(self) -> RecoveryState:
        return RecoveryState(self.state.committed_seq, self.state.prepared_seq)

    async def commit_flash(self, seq: int) -> None:
        self.calls.append(("commit_flash", seq))
        if self.state.prepared_seq != seq:
            raise MemberError(f"CG {seq} not prepared")
        self.state = RecoveryState(seq, None)

    async def revert_flash(self, seq: int) -> None:
        self.calls.append(("revert_flash", seq))
        self.state = RecoveryState(self.state.committed_seq, None)

    async def fast_reverse_restore(self) -> int:
        self.calls.append(("fast_reverse_restore",))
        return 17


def test_flash_calls_travel_as_sealed_frames_on_the_replication_port():
    async def main():
        sec = FakeSecondary()
        flash = ControlService(sec, SECRET, "test", random_bytes=random.Random(3).randbytes)
        replication_links = []

        async def replication(link):  # what a primary's HELLO would reach
            replication_links.append(link)
            await link.close()

        serving = []

        async def dial():
            mine, theirs = mem_pair(len(serving))
            serving.append(asyncio.ensure_future(serve_link_or_control(theirs, replication, flash.serve)))
            return mine

        remote = ControlRemote("sec0", dial, SECRET, session_id="test", random_bytes=random.Random(4).randbytes)
        assert await remote.recovery_state() == RecoveryState(4, 5)
        await remote.commit_flash(5)
        assert await remote.recovery_state() == RecoveryState(5, None)
        with pytest.raises(MemberError, match="refused FLASH_COMMIT: CG 6 not prepared"):
            await remote.commit_flash(6)
        await remote.revert_flash(6)
        assert await remote.fast_reverse_restore() == 17
        assert sec.calls == [("commit_flash", 5), ("commit_flash", 6), ("revert_flash", 6),
                             ("fast_reverse_restore",)]
        assert replication_links == []  # every frame came in on the control link's channel
        # A primary's first frame (HELLO) goes to the replication service, whole.
        mine, theirs = mem_pair(99)
        task = asyncio.ensure_future(serve_link_or_control(theirs, replication, flash.serve))
        hello = p.encode(p.Hello(seq=1, version=p.PROTOCOL_VERSION, session_id="test"))
        await mine.send(hello)
        await task
        assert len(replication_links) == 1 and await replication_links[0].recv() == hello
        await remote.close()
        await asyncio.gather(*serving)

    asyncio.run(main())


def test_the_member_service_does_not_answer_flash_frames():
    """A subordinate primary's ControlService has no FlashPort: a FLASH frame is refused."""
    from tests.test_control_link import Session

    async def main():
        s = Session()
        remote, _ = s.remote(backoff_s=(60.0, 60.0))
        with pytest.raises(ConnectionError):
            await remote.recovery_state()
        assert any("unexpected FLASH_STATE" in r for r in s.service.rejected)
        await remote.close()
        await s.close()

    asyncio.run(main())


def test_session_configs_make_secondaries_members_and_give_the_master_their_addresses(tmp_path):
    session = write_session_configs(tmp_path, controllers=3)
    master = load_config(session.master.primary)
    links = [load_config(pair.secondary).link_listen for pair in session.pairs]
    assert master.session_secondaries == links[1:]
    assert all(load_config(pair.secondary).session_member for pair in session.pairs)
    assert not load_config(session.subordinates[0].primary).session_member
    text = session.master.primary.read_text()
    bad = text.replace("secondaries = [", 'secondaries = ["127.0.0.1:1", ', 1)
    session.master.primary.write_text(bad)
    with pytest.raises(ConfigError, match=r"secondaries.*3 given for 2 subordinates"):
        load_config(session.master.primary)
    session.master.primary.write_text(text)
    sub = session.subordinates[0].primary
    sub.write_text(sub.read_text().replace('secret_file = "secret"\n', 'secret_file = "secret"\nmember = true\n', 1))
    with pytest.raises(ConfigError, match="member.*only a secondary"):
        load_config(sub)


# -- the console ---------------------------------------------------------------------------------


MEMBERS = [
    {"name": "master", "state": "ok", "phase": "idle", "link": "up", "last_cg": 41, "last_cg_time": 1.7e9,
     "oos_tracks": 0, "cr_tracks": 2, "held_ack_ms": {"p50": 0.4, "p99": 1.25, "max": 3.5}, "cg_seq": 41,
     "in_doubt_seq": 0, "reason": ""},
    {"name": "127.0.0.1:7801", "state": "in doubt", "phase": "idle", "link": "up", "last_cg": 40,
     "last_cg_time": None, "oos_tracks": 5, "cr_tracks": 0, "held_ack_ms": {}, "cg_seq": 41, "in_doubt_seq": 41,
     "reason": "commit of CG 41: LinkDown"},
]
ROWS = [{"name": "master", "committed_before": 41, "prepared": None, "action": "none", "committed": 41},
        {"name": "127.0.0.1:7801", "committed_before": 40, "prepared": 41, "action": "commit", "committed": 41,
         "member": "ok"}]


class FakeMaster:
    def __init__(self) -> None:
        self.recovered = 0

    def status(self) -> dict:
        return {"seq": 41, "successful": 40, "failed": 1, "consecutive": 0, "last_reason": "", "coord_ms": {},
                "unresolved": {"127.0.0.1:7801": (41, "commit")}, "members": MEMBERS,
                "recovery": {"needed": "", "last": None, "runs": 0, "secondaries": [], "automatic": True}}

    async def recover_session(self, reason: str):
        self.recovered += 1
        return ROWS

    async def failover_session(self):
        raise MemberError("session failover: CGs are being formed; cg pause (or pair suspend) first")


class Controller:
    session_id = "test"

    def __init__(self, master=None, member=None) -> None:
        self.session_master = master
        if member is not None:
            self.session_member = member

    def status(self) -> dict:
        return {"copy_state": "running", "link": "up"} | (
            {"members": MEMBERS} if self.session_master is not None else {})

    def volumes_info(self):
        return []


def run(cs: CommandSet, line: str):
    return asyncio.run(cs.execute(line))


def test_the_masters_status_shows_a_table_of_members_and_json_carries_them():
    cs = CommandSet(Controller(FakeMaster()))
    reply = run(cs, "status")
    assert reply.ok, reply.text
    lines = reply.text.splitlines()
    at = lines.index("members:")
    header, first, second = lines[at + 1: at + 4]
    assert header.split() == ["name", "state", "phase", "link", "last_cg", "last_cg_time", "held_ack_ms",
                              "oos_tracks", "cr_tracks", "in_doubt_seq", "reason"]
    assert first.split()[:7] == ["master", "ok", "idle", "up", "41", "2023-11-14T22:13:20.000Z", "1.25/3.5"]
    assert second.split()[:3] == ["127.0.0.1:7801", "in", "doubt"] and "41" in second.split()
    session_line = next(line for line in lines if line.startswith("session "))
    assert "master of 2 members; CG 41, 40 committed, 1 failed" in session_line
    data = run(cs, "status --json").data
    assert data["members"] == MEMBERS and data["session"]["role"] == "master"
    events = run(cs, "events --now").text.splitlines()
    assert "exists member name:127.0.0.1:7801 state:in_doubt phase:idle link:up last_cg:40 oos_tracks:5 " \
           "cr_tracks:0 in_doubt_seq:41 reason:commit_of_CG_41:_LinkDown" in events


def test_session_recover_prints_what_each_member_did():
    master = FakeMaster()
    cs = CommandSet(Controller(master))
    reply = run(cs, "session recover")
    assert reply.ok and master.recovered == 1
    assert reply.text.splitlines() == [
        "master: secondary committed 41 -> none; C at CG 41",
        "127.0.0.1:7801: secondary committed 40, prepared 41 -> commit; C at CG 41; member ok",
        "session recover: done; every C at CG 41",
    ]
    assert run(cs, "session recover --json").data == {"members": ROWS, "cg": 41}
    refused = run(cs, "session failover")
    assert not refused.ok and refused.text == ("error: session failover: session failover: CGs are being formed; "
                                               "cg pause (or pair suspend) first")


def test_a_subordinate_says_who_its_master_is_and_refuses_session_commands():
    class Member:
        name = "127.0.0.1:7801"
        master = "master@127.0.0.1:40000"
        master_down_reason = ""
        in_doubt_seq = 0

    cs = CommandSet(Controller(member=Member()))
    reply = run(cs, "status")
    assert reply.text.splitlines()[-1].split(None, 1) == ["session",
                                                          "subordinate 127.0.0.1:7801 of master master@127.0.0.1:40000"]
    assert run(cs, "status --json").data["session"]["role"] == "subordinate"
    refused = run(cs, "session recover")
    assert refused.text == ("error: this primary is not a session's master; it is a subordinate "
                            "(master master@127.0.0.1:40000): run it on the master")
    alone = CommandSet(Controller())
    assert "session" not in run(alone, "status --json").data
