import asyncio

from hal.clock import VirtualClock


def test_virtual_clock_fires_timers_in_order_and_only_when_due():
    clock = VirtualClock(start=0.0)
    fired = []
    clock.call_later(2.0, lambda: fired.append(("b", clock.now())))
    clock.call_later(1.0, lambda: fired.append(("a", clock.now())))
    h = clock.call_later(1.5, lambda: fired.append(("cancelled", clock.now())))
    h.cancel()
    clock.advance(0.5)
    assert fired == []
    clock.advance(2.0)
    assert fired == [("a", 1.0), ("b", 2.0)]
    assert clock.now() == 2.5


def test_virtual_sleep_wakes_on_advance():
    async def main():
        clock = VirtualClock(start=10.0)
        task = asyncio.create_task(clock.sleep(5.0))
        await asyncio.sleep(0)
        clock.advance(4.9)
        await asyncio.sleep(0)
        assert not task.done()
        clock.advance(0.1)
        await asyncio.sleep(0)
        assert task.done() and clock.now() == 15.0

    asyncio.run(main())
