"""Power cuts at every persist point of small workloads (testbench/powercut.py),
and the two cache bugs the enumeration found, each as a test that fails on
the cache before its fix."""

from __future__ import annotations

import asyncio

import pytest

from drivers.powerloss import PowerDomain, PowerLost, VolatileNvram
from firmware.cache import WriteCache
from firmware.layout import PRIMARY_MAGIC, STATE_CUR, plan_region
from testbench.powercut import (
    DOMAINS,
    SECTOR,
    SITE,
    MemRegion,
    Scenario,
    enumerate_cuts,
    run_point,
    scenarios,
)

pytestmark = pytest.mark.timeout(300)
T = 4096


def test_every_cut_point_of_the_default_run_recovers_without_a_violation():
    res = enumerate_cuts()  # the default run
    assert res["cut_points"] >= 200, res["cut_points"]
    assert all(res["by_domain"][d] for d in (*DOMAINS, SITE)), res["by_domain"]
    assert res["states_checked"] >= 2 * res["cut_points"]
    assert res["violations"] == [], "\n".join(v["repro"] + "\n    " + "\n    ".join(v["found"])
                                             for v in res["violations"][:5])
    assert res["acked_writes_lost"] == res["inconsistent_copies"] == res["full_resyncs"] == 0


def test_scenarios_are_seeded_and_valid():
    a, b = scenarios(7, 5), scenarios(7, 5)
    assert a == b and a != scenarios(8, 5)
    for sc in a:
        assert sum(s[0] == "write" for s in sc.steps) <= 3, sc
        assert {s[1] for s in sc.steps if s[0] == "write"} <= {0, 1}


def test_a_cut_point_replays_the_same_way():
    sc = scenarios(1, 0)[2]  # write-during-drain
    one = asyncio.run(run_point(sc, "secondary", 5, "random:1"))
    two = asyncio.run(run_point(sc, "secondary", 5, "random:1"))
    assert one["survived"] == two["survived"] and one["violations"] == two["violations"] == []
    site = asyncio.run(run_point(sc, SITE, 7, "random:0"))
    assert site["cut"] == "primary" and site["violations"] == [] and site["states"] == 2


def test_the_faults_campaign_fails_on_a_power_loss():
    from testbench.cli_faults import empty_results, failures, summary

    res = empty_results(1)
    res.update(passed=True, failures=[], seconds=0)
    assert failures(res) == []
    assert "power   cut_points 0" in summary(res)
    for key in ("acked_writes_lost", "inconsistent_copies", "full_resyncs"):
        res["power"][key] = 1
        assert f"power.{key} = 1" in failures(res)
        res["power"][key] = 0


def test_an_overwrite_of_cached_sectors_cut_mid_store_leaves_each_sector_old_or_new():
    """Found by the enumeration: a write over sectors an image already held
    was stored in place in NVRAM; a cut before its persist tore those
    sectors per 8-byte word, so an acknowledged write read back as a mix of
    it and the unacknowledged one (fixed by the undo journal in WriteCache)."""
    sc = Scenario("overwrite", "dual-image", (("write", 0, 8, 4), ("write", 0, 9, 2)))
    rec = asyncio.run(run_point(sc, None, 0, record=True))
    found = []
    for n in range(1, rec["events"]["primary"] + 1):
        for tear in ("random:0", "random:1", "random:2", "random:3", "keep"):
            r = asyncio.run(run_point(sc, "primary", n, tear))
            found += [f"n={n} {tear}: {v}" for v in r["violations"]]
    assert found == []


def _region(slots: int = 16) -> tuple[PowerDomain, MemRegion, WriteCache]:
    plan = plan_region(PRIMARY_MAGIC, 4 * 4096 + 2 * 4096 + 4096 + slots * T + 4096, [("v", 64 * T)], T, "s",
                       with_cache=True, max_slots=slots)
    inner = MemRegion(plan.total_bytes)
    dom = PowerDomain(3, mode="random")
    cache = WriteCache(VolatileNvram(inner, dom), plan)
    cache.format()
    return dom, inner, cache


def _land(cache: WriteCache, track: int, fill: bytes, *, state=STATE_CUR):
    cur, _ = cache.images(0, track)
    entry = cur if cur is not None else cache.allocate(0, track, state)
    cache.apply(entry, 0, memoryview(fill * T))
    return entry


def test_a_torn_entry_write_to_a_reused_slot_never_brings_back_the_image_it_held():
    """Found while fixing the journal: a reused slot's first entry was
    always written to copy 0. When copy 0 held the slot's newest entry (its
    free entry) and copy 1 an older image, a cut tearing that write left the
    older image as the slot's newest readable entry: an evicted track came
    back from the dead at recovery. Each entry is now written over the slot's
    older copy."""
    for seed in range(8):
        dom, inner, cache = _region()
        n = cache.n_slots
        e = _land(cache, 0, b"a")  # copy 0
        cache.destage_done(e, e.seq)  # copy 1: clean, evictable
        for t in range(1, n):
            _land(cache, t, b"o")
        assert not cache._free
        slot = e.slot
        # The next allocation evicts track 0 (a free entry into copy 0) and
        # reuses the slot; its first entry write is cut, torn per word.
        entry = cache.allocate(0, 50, STATE_CUR)
        assert entry.slot == slot and not cache.has(0, 0)
        dom = PowerDomain(seed, mode="random")
        nvram = VolatileNvram(inner, dom)
        # Rebuild the in-memory cache on the same bytes and replay the write
        # through a fresh filter: the cut hits the entry write (3rd persist:
        # the slot's data, then its entry).
        cache2 = WriteCache(nvram, cache.plan)
        cache2.load([64])
        assert not cache2.has(0, 0)
        entry2 = cache2.allocate(0, 50, STATE_CUR)
        assert entry2.slot == slot
        dom.arm(2)
        with pytest.raises(PowerLost):
            cache2.apply(entry2, 0, memoryview(b"n" * SECTOR))
        after = WriteCache(dom.power_on().regions[0], cache.plan)
        after.load([64])
        assert not after.has(0, 0), f"seed {seed}: the evicted track 0 came back from slot {slot}"
