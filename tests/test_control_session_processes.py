"""A 3-controller session as real processes on 127.0.0.1: one master and two
subordinate primaries, each with its own secondary. Writes through every
primary's NBD port reach every C at a CG; with a subordinate SIGKILLed no C
moves past what it held (the CG fails everywhere), and after the
subordinate restarts from its NVRAM every C catches up, each a prefix of its
controller's writes."""

from __future__ import annotations

import asyncio
import time

import pytest

from harness.supervise import start_controller, write_session_configs
from tests.test_controllers import cut_prefix, read_c, wait_for, write_ids

pytestmark = pytest.mark.timeout(240)


def write(primaries, first: int, last: int) -> list[list[int]]:
    """Write ids first..last on vol0 of every primary at once; the acked ids of each."""
    acked: list[list[int]] = [[] for _ in primaries]

    async def main():
        await asyncio.gather(*(write_ids(p.ready["nbd"], first, last, a) for p, a in zip(primaries, acked, strict=True)))

    asyncio.run(main())
    return acked


def test_three_controllers_commit_together_and_a_dead_subordinate_fails_every_cg(tmp_path):
    session = write_session_configs(tmp_path, controllers=3, console=True, session={"cg_interval_s": 0.05})
    procs = []
    try:
        secondaries = [start_controller(pair.secondary, format=True) for pair in session.pairs]
        procs += secondaries
        subordinates = [start_controller(pair.primary, format=True) for pair in session.subordinates]
        procs += subordinates
        master = start_controller(session.master.primary, format=True)
        procs.append(master)
        primaries = [master, *subordinates]

        acked = write(primaries, 1, 40)
        assert all(a == list(range(1, 41)) for a in acked)
        for sec in secondaries:
            wait_for(lambda sec=sec: cut_prefix(read_c(sec)) >= 40, 30, "every C at write 40")

        # A subordinate dies: no CG commits anywhere while it is gone.
        subordinates[0].kill()
        held = [cut_prefix(read_c(sec)) for sec in secondaries]
        acked = write([master, subordinates[1]], 41, 60)
        assert all(a == list(range(41, 61)) for a in acked)
        time.sleep(1.5)  # many CG intervals: each one must fail
        assert [cut_prefix(read_c(sec)) for sec in secondaries] == held

        # It comes back from its NVRAM; the session commits again, on every C.
        subordinates[0] = start_controller(session.subordinates[0].primary)
        procs.append(subordinates[0])
        acked = write([subordinates[0]], 41, 60)
        assert acked == [list(range(41, 61))]
        for sec in secondaries:
            wait_for(lambda sec=sec: cut_prefix(read_c(sec)) >= 60, 60, "every C at write 60 after the restart")
        for proc in (master, *subordinates, *secondaries):
            assert proc.stop() == 0, proc.tail()
    finally:
        for proc in procs:
            proc.kill()


# -- session recovery: the master SIGKILLed between prepare and commit ---------------------------


def console_json(proc, line: str) -> dict:
    from harness.console_client import ConsoleClient

    with ConsoleClient(proc.ready["console"], timeout_s=10) as con:
        return con.run_json(line)["data"]


def write_from(primaries, nexts: list[int], last: int) -> list[list[int]]:
    """Each primary writes its own ids nexts[i]..last (one client each, in order)."""
    acked: list[list[int]] = [[] for _ in primaries]

    async def main():
        await asyncio.gather(*(write_ids(p.ready["nbd"], n, last, a)
                               for p, n, a in zip(primaries, nexts, acked, strict=True)))

    asyncio.run(main())
    return acked


@pytest.mark.parametrize("point, skip, how, outcome", [
    ("session.after_prepare_all", 8, "cli", "revert"),  # every member prepared, none committed
    ("session.after_member_commit", 9, "auto", "commit"),  # the master's own member committed, the others not
])
def test_the_master_killed_between_prepare_and_commit_recovers_every_c_to_one_cg(tmp_path, point, skip, how,
                                                                                   outcome):
    import subprocess
    import sys

    session = write_session_configs(tmp_path, controllers=3, console=True, session={"cg_interval_s": 0.05})
    procs = []
    try:
        secondaries = [start_controller(pair.secondary, format=True) for pair in session.pairs]
        procs += secondaries
        subordinates = [start_controller(pair.primary, format=True) for pair in session.subordinates]
        procs += subordinates
        master = start_controller(session.master.primary, format=True, crashpoints=f"{point}:{skip}")
        procs.append(master)
        primaries = [master, *subordinates]

        # Stamped writes on every controller while CGs form; the master dies at the crash point.
        acked = write_from(primaries, [1, 1, 1], 400)
        master.wait(30)
        assert f"crash point {point} hit" in master.logs()
        states = [console_json(sec, "status") for sec in secondaries]
        # Every subordinate's secondary holds the CG in doubt; the master's own too, or it committed it.
        doubt = states[1]["prepared_cg"]
        assert doubt and states[2]["prepared_cg"] == doubt, states
        assert [s["committed_cg"] for s in states[1:]] == [doubt - 1] * 2, states
        if outcome == "revert":
            assert (states[0]["prepared_cg"], states[0]["committed_cg"]) == (doubt, doubt - 1), states
        else:
            assert (states[0]["prepared_cg"], states[0]["committed_cg"]) == (None, doubt), states

        if how == "cli":  # the master is down: recover from its config, straight at the secondaries
            out = subprocess.run([sys.executable, "-m", "harness.cli", "recover", "--config",
                                  str(session.master.primary), "--settle", "0.5"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            lines = out.stdout.splitlines()
            assert len(lines) == 4 and all(f"-> {outcome}; C at CG " in line for line in lines[:3]), out.stdout
            final = doubt if outcome == "commit" else doubt - 1
            assert lines[3] == f"session recover: done; every C at CG {final}"
        master = start_controller(session.master.primary)  # from its NVRAM; recovers by itself if needed
        procs.append(master)
        primaries[0] = master
        target = doubt if outcome == "commit" else doubt - 1
        wait_for(lambda: all(console_json(sec, "status")["prepared_cg"] is None for sec in secondaries), 30,
                 "no CG in doubt")
        if how == "auto":
            status = console_json(master, "status")
            assert status["session"]["recovery"]["last"]["reason"] == "automatic", status["session"]
            assert set(status["session"]["recovery"]["last"]["actions"].values()) <= {"commit", "none"}
        assert all(console_json(sec, "status")["committed_cg"] >= target for sec in secondaries)

        # The session goes on: every controller's writes reach its C (no acked write lost).
        nexts = [len(a) + 1 for a in acked]
        more = write_from(primaries, nexts, 450)
        assert all(m == list(range(n, 451)) for m, n in zip(more, nexts, strict=True))
        for sec in secondaries:
            wait_for(lambda sec=sec: cut_prefix(read_c(sec)) >= 450, 60, "every C at write 450")

        # One CG on every C: pause the master's CG formation, read, resume.
        console_json(master, "cg pause")
        seqs = {console_json(sec, "status")["committed_cg"] for sec in secondaries}
        assert len(seqs) == 1, seqs
        assert all(cut_prefix(read_c(sec)) == 450 for sec in secondaries)
        status = console_json(master, "status")
        assert [m["state"] for m in status["members"]] == ["ok", "ok", "ok"], status["members"]
        console_json(master, "cg resume")
        (seq,) = seqs
        wait_for(lambda: console_json(secondaries[0], "status")["committed_cg"] > seq, 5, "a CG after resume")
        for proc in (master, *subordinates, *secondaries):
            assert proc.stop() == 0, proc.tail()
    finally:
        for proc in procs:
            proc.kill()
