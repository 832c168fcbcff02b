"""Issue 16, "state that cannot wedge": every `set` is bounded and finite,
any change of interval, resume or run wakes the CG loop, a secondary whose
committed CG jumped ahead does not leave the primary failing every CG, and
RPO thresholds drive status severity. In process, on a virtual clock."""

from __future__ import annotations

import asyncio
import json

import pytest

from firmware.console import CommandSet
from firmware.params import SessionParams
from tests.console_fakes import FakePrimary
from tests.firmware_doubles import make_rig, settle

T = 65536


def blk(ch: str) -> bytes:
    return ch.encode() * 4096


async def turn(rig, seconds: float = 0.0, rounds: int = 3) -> None:
    for _ in range(rounds):
        await settle()
        if seconds:
            rig.clock.advance(seconds)
    await settle()


@pytest.mark.parametrize(("name", "text"), [
    ("cg_interval_s", "inf"), ("cg_interval_s", "1e308"), ("cg_interval_s", "nan"), ("cg_interval_s", "-1"),
    ("max_drain_s", "0"), ("max_drain_s", "inf"), ("max_coord_ms", "0"), ("max_coord_ms", "1e9"),
    ("drain_inflight", "0"), ("max_pinned_bytes", "9" * 100), ("rpo_warning_s", "inf"),
])
def test_set_refuses_what_would_wedge_the_loop(name, text):
    p = SessionParams()
    before = p.as_dict()
    with pytest.raises(ValueError, match=name) as exc:
        p.set(name, text)
    assert ".." in str(exc.value)  # the refusal names the range
    assert p.as_dict() == before


def test_help_set_shows_every_range_and_console_refuses_inf():
    async def main():
        cs = CommandSet(FakePrimary())
        help_set = json.loads((await cs.execute("help set --json")).text)["data"]["commands"][0]["help"]
        for shown in ("cg_interval_s 0..86400 s", "max_drain_s 1..86400 s", "max_coord_ms 1..60000 ms",
                      "collision_policy dual-image|send-first", "rpo_warning_s", "rpo_severe_s"):
            assert shown in help_set
        reply = json.loads((await cs.execute("set cg_interval_s inf --json")).text)
        assert not reply["ok"] and "0..86400" in reply["error"]
        reply = json.loads((await cs.execute("set max_drain_s 0 --json")).text)
        assert not reply["ok"] and "1..86400" in reply["error"]
    asyncio.run(main())


def test_shortening_the_interval_wakes_a_long_wait():
    async def main():
        rig = await make_rig(form_cgs=True, cg_interval_s=3600.0)
        p = rig.primary
        await turn(rig)
        n = p.status()["total_successful_cgs"]
        assert n >= 1  # the first CG forms at once; the loop now waits an hour
        await p.write("vol0", 0, blk("a"))
        p.set_param("cg_interval_s", "1")
        await turn(rig, 1.0)
        assert p.status()["total_successful_cgs"] > n, "the hour's wait outlived the new interval"
        await p.stop()
    asyncio.run(main())


def test_resume_wakes_a_long_wait():
    async def main():
        rig = await make_rig(form_cgs=True, cg_interval_s=3600.0)
        p = rig.primary
        await turn(rig)
        await p.cg_pause()
        await p.write("vol0", T, blk("b"))
        n = p.status()["total_successful_cgs"]
        await p.cg_resume()
        await turn(rig, 0.5)
        assert p.status()["total_successful_cgs"] > n, "resume left the loop in its hour's wait"
        assert p.status()["oos_tracks"] == 0
        await p.stop()
    asyncio.run(main())


def test_pair_resume_wakes_a_long_wait():
    async def main():
        rig = await make_rig(form_cgs=True, cg_interval_s=3600.0)
        p = rig.primary
        await turn(rig)
        await p.suspend()
        await p.write("vol0", 2 * T, blk("c"))
        n = p.status()["total_successful_cgs"]
        await p.resume_pair()
        await turn(rig, 0.5)
        assert p.status()["total_successful_cgs"] > n, "pair resume left the loop in its hour's wait"
        await p.stop()
    asyncio.run(main())


# A RemoteError from a CG drops `connected` as a link error does, so the next
# turn says hello; connect() sees a CG this primary never formed, sends a full
# copy and numbers the next CG above it (CgCycle.connect).
def test_a_secondary_committed_ahead_is_adopted_not_a_silent_failing_loop():
    """A peer with the secret committed CG committed+1000 at the secondary:
    the primary's next CGs were refused ("CG N is already committed") for
    good while status said Running. It must adopt the secondary's committed
    CG as the floor for the next one (or go Fatal saying why)."""
    async def main():
        rig = await make_rig(form_cgs=True, cg_interval_s=1.0)
        p, sec = rig.primary, rig.secondary
        await turn(rig, 1.0)
        committed = p.status()["committed_seq"]
        assert committed >= 1
        ahead = committed + 1000
        await sec.prepare(ahead)  # what the rogue peer did
        await sec.commit(ahead)
        await p.write("vol0", 3 * T, blk("d"))
        await turn(rig, 1.0, rounds=6)
        s = p.status()
        if s["copy_state"] == "Fatal":
            assert "committed" in (s["fatal_reason"] or "")
        else:
            assert s["committed_seq"] > ahead, f"still failing: {s['total_failed_cgs']} failed CGs"
            assert s["consecutive_failures"] == 0 and s["oos_tracks"] == 0
            assert await sec.read_c("vol0", 3 * T, 4096) == blk("d")
        await p.stop()
    asyncio.run(main())


def test_rpo_thresholds_drive_severity():
    async def main():
        rig = await make_rig(form_cgs=True, cg_interval_s=3600.0, rpo_warning_s=10.0, rpo_severe_s=30.0)
        p = rig.primary
        await turn(rig)
        assert p.status()["committed_seq"] >= 1
        await p.write("vol0", 0, blk("r"))  # exposed from now until the next CG, an hour away
        assert p.status()["severity"] == "Normal"
        rig.clock.advance(15.0)
        s = p.status()
        assert s["data_exposure_s"] > 10 and s["severity"] == "Warning"
        rig.clock.advance(20.0)
        assert p.status()["severity"] == "Severe"
        p.set_param("rpo_severe_s", "0")  # off: back to the warning threshold only
        assert p.status()["severity"] == "Warning"
        await p.stop()
    asyncio.run(main())
