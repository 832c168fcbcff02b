"""How long a CG formed by the loop holds host acks (firmware/cgcycle.py):
the CR switch follows the quiesce with no loop turn in between, unless a
chunked write is half landed; whatever else a turn runs (NBD batches, drain
and destage steps) is never inside the hold."""

from __future__ import annotations

import asyncio

import pytest
from firmware_doubles import make_rig, spy_rig_remote

pytestmark = pytest.mark.timeout(60)
T = 65536


def test_the_loop_forms_a_cg_with_no_loop_turn_inside_the_hold():
    async def main():
        rig = await make_rig()
        p = rig.primary
        assert await p.form_cg()  # the initial copy
        await p.write("vol0", 3 * T, b"a" * T)
        seen_closed = []
        stop = False

        async def ticker():  # anything else the loop runs, once a turn
            while not stop:
                seen_closed.append(p.cycle.gate.closed)
                await asyncio.sleep(0)

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        held_before = len(p.cycle.gate.held_ms)
        assert await p.form_cg()
        stop = True
        await tick
        assert len(p.cycle.gate.held_ms) == held_before + 1  # the CG did quiesce and release
        assert len(seen_closed) > 2 and not any(seen_closed), "a loop turn ran while the acks were held"
        assert await rig.secondary.read_c("vol0", 3 * T, T) == b"a" * T
    asyncio.run(main())


def test_a_write_that_lands_during_the_cg_goes_to_cr_and_is_not_held():
    async def main():
        rig = await make_rig()
        p = rig.primary
        assert await p.form_cg()
        await p.write("vol0", 2 * T, b"o" * T)  # something to drain
        spy = spy_rig_remote(rig)
        go = asyncio.Event()
        spy.before_send = lambda v, t, d: go.wait()  # the drain waits: the CG stays open
        cg = asyncio.ensure_future(p.form_cg())
        for _ in range(50):
            if p.machine.recording:
                break
            await asyncio.sleep(0)
        assert p.machine.recording and not p.cycle.gate.closed
        await p.write("vol0", 5 * T, b"n" * T)  # returns while the CG drains: not held
        assert p.cr[0].test(5) and not p.oos[0].test(5)
        go.set()
        assert await cg
        assert await rig.secondary.read_c("vol0", 2 * T, T) == b"o" * T
        assert await rig.secondary.read_c("vol0", 5 * T, T) == bytes(T)  # the next CG's
        assert await p.form_cg()
        assert await rig.secondary.read_c("vol0", 5 * T, T) == b"n" * T
    asyncio.run(main())
