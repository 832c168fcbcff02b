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
