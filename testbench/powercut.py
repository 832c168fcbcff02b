"""Power cuts at every persist point, in virtual time (issue 12).

A pair in one process (Primary + Secondary, every device and NVRAM region
behind drivers/powerloss.py's volatile filters, one power domain per
controller) runs a small scenario: up to 3 host writes over 2 volumes with
CG steps between and around them (write, form_cg, a CG stepped by hand with
writes during its drain, send-first, destage, fail, reconnect). The
enumeration runs each scenario once recording the persist points of both
domains (device write, FUA write, flush, NVRAM persist), then for every n of
either domain: a fresh pair, ``arm(n)``, run until the cut, power the cut
controller back on, reopen it from what survived (the other one keeps
running, as when one controller loses power), reconnect, and check against a
shadow model of the host writes:

(a) no acknowledged host write is lost from the primary (every sector shows
    its last acknowledged write, or the write that was in flight);
(b) after recovery, C equals exactly the committed CG the secondary names
    (the model's content at that CG's CR switch);
(c) after CGs are formed until OOS and CR are empty, C equals A;
(d) no full copy was made (the primary's ``full_copy`` session event),
    unless an NVRAM had to be formatted again.

The domain is the primary's, the secondary's, or ``both``: the primary's
n-th persist point cuts the whole site (both restart, the secondary first).
A cut point is (scenario, domain, n, tear): the tear names how the cut
decides the unflushed state (``random`` draws per write and per NVRAM line
from a seed; write events get a few more seeds, since a torn write is where
sectors mix). ``python -m testbench.powercut`` runs the enumeration; with
``--scenario/--domain/--n/--tear`` it replays one cut point (the repro line
each violation carries).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Callable

from drivers.mem import MemDevice
from drivers.powerloss import PowerDomain, PowerLost
from firmware.cg import Phase
from firmware.events import Event
from testbench.sim.model import SECTOR, Model, decode_sector, sector_data  # noqa: F401 - re-exported
from testbench.sim.world import (  # noqa: F401 - re-exported: tests and the faults part import them from here
    PRIMARY_NVRAM,
    SECONDARY_NVRAM,
    TRACK_BYTES,
    TRACKS,
    VOLUME_BYTES,
    VOLUMES,
    MemRegion,
    PowerPair,
    PowerRemote,
)

log = logging.getLogger(__name__)

SMALL_NVRAM = 100 << 10  # 16 slots: as many as the two volumes have tracks
DOMAINS = ("primary", "secondary")
SITE = "both"  # a cut at the primary's n-th persist point takes the secondary's power too
CONVERGE_ROUNDS = 8
WRITE_TEARS = 2  # extra seeds for a cut with a device write in flight
DRAWN = 8  # scenarios drawn from the seed besides the fixed ones (the default run: ~1,700 cut points)


# The pair (PowerPair, PowerRemote, MemRegion) and the shadow model (Model,
# sector_data) are the simulator's (testbench/sim/): one of each.


# ================================================================ scenarios
@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    policy: str
    steps: tuple[tuple, ...]
    primary_nvram: int = PRIMARY_NVRAM

    def describe(self) -> str:
        return f"{self.name} [{self.policy}]: " + ", ".join(
            f"write {VOLUMES[s[1]]}@{s[2]}+{s[3]}" if s[0] == "write" else s[0] for s in self.steps)


S_PER_T = TRACK_BYTES // SECTOR

FIXED = (
    Scenario("write-cg", "dual-image", (("write", 0, 1 * S_PER_T, 2), ("form_cg",))),
    Scenario("two-volumes", "dual-image", (("write", 0, 1 * S_PER_T, 8), ("write", 1, 2 * S_PER_T + 3, 2),
                                           ("form_cg",), ("write", 0, 1 * S_PER_T + 1, 2), ("form_cg",))),
    Scenario("write-during-drain", "dual-image", (("write", 0, 2 * S_PER_T, 4), ("begin",),
                                                  ("write", 0, 2 * S_PER_T + 2, 4), ("drain",),
                                                  ("write", 1, 0, 2), ("commit",), ("form_cg",))),
    Scenario("send-first", "send-first", (("write", 0, 3 * S_PER_T, 4), ("write", 1, 3 * S_PER_T, 2),
                                          ("begin",), ("write", 0, 3 * S_PER_T + 1, 2), ("drain",),
                                          ("commit",))),
    Scenario("destage", "dual-image", (("write", 0, 4 * S_PER_T, S_PER_T), ("destage",), ("form_cg",),
                                       ("write", 0, 4 * S_PER_T + 2, 3), ("destage",), ("form_cg",))),
    Scenario("fail-reconnect", "dual-image", (("write", 0, 5 * S_PER_T, 2), ("begin",), ("drain",),
                                              ("fail",), ("reconnect",), ("write", 1, 6 * S_PER_T, 2),
                                              ("form_cg",))),
    # 16 slots for 16 tracks: after the destage every slot is clean, so the
    # overwrite's journal needs an eviction (and the CG's new image another).
    Scenario("full-cache", "dual-image", (("write", 0, 0, TRACKS * S_PER_T), ("write", 1, 0, TRACKS * S_PER_T),
                                          ("destage",), ("begin",), ("write", 1, 2, 2), ("drain",), ("commit",)),
             primary_nvram=SMALL_NVRAM),
    # No free slot and the overwritten image dirty: its journal takes the
    # slot of a clean image of the other volume.
    Scenario("journal-evict", "dual-image", (("write", 0, 0, TRACKS * S_PER_T), ("destage",),
                                             ("write", 1, 0, TRACKS * S_PER_T), ("write", 1, 2 * S_PER_T + 1, 3),
                                             ("form_cg",)), primary_nvram=SMALL_NVRAM),
    Scenario("multi-track", "dual-image", (("write", 1, 2 * S_PER_T - 2, 2 * S_PER_T + 4), ("destage",),
                                           ("begin",), ("write", 1, 3 * S_PER_T, 1), ("drain",),
                                           ("commit",))),
    # 15 clean images that all owe, track 1 of volume 0 with a partial
    # write: the CG's 8 new images evict every image of volume 0, each
    # keeping its mask in its track's NVRAM record, and the drain sends
    # those tracks from their records.
    Scenario("evicted-mask", "dual-image", (("write", 0, 1 * S_PER_T + 2, 7 * S_PER_T - 2),
                                            ("write", 1, 0, TRACKS * S_PER_T), ("destage",), ("begin",),
                                            ("write", 1, 0, TRACKS * S_PER_T), ("drain",), ("commit",)),
             primary_nvram=SMALL_NVRAM),
)


def random_scenario(rng: random.Random, name: str) -> Scenario:
    """Up to 3 writes over 2 volumes with CG steps that are valid where
    they stand (a stepped CG is begun, drained, committed or failed)."""
    policy = rng.choice(("dual-image", "send-first"))
    steps: list[tuple] = []
    writes = rng.randint(1, 3)
    state = "idle"  # idle | draining | drained
    tracks = [rng.randrange(TRACKS) for _ in range(2)]  # a few hot tracks, so writes collide
    while writes or state != "idle":
        choices = []
        if writes:
            choices += ["write"] * 3
        if state == "idle":
            choices += ["form_cg", "begin", "destage"] if writes else ["form_cg"]
        elif state == "draining":
            choices += ["drain", "fail", "destage"]
        else:
            choices += ["commit", "commit", "fail"]
        kind = rng.choice(choices)
        if kind == "write":
            vi = rng.randrange(2)
            t = rng.choice(tracks) if rng.random() < 0.7 else rng.randrange(TRACKS)
            first = rng.randrange(S_PER_T)
            count = rng.randint(1, min(S_PER_T + 2, S_PER_T * TRACKS - t * S_PER_T - first))
            steps.append(("write", vi, t * S_PER_T + first, count))
            writes -= 1
            continue
        steps.append((kind,))
        if kind == "begin":
            state = "draining"
        elif kind == "drain":
            state = "drained"
        elif kind in ("commit", "fail"):
            state = "idle"
            if kind == "fail" and rng.random() < 0.5:
                steps.append(("reconnect",))
    if rng.random() < 0.5:
        steps.append(("form_cg",))
    return Scenario(name, policy, tuple(steps))


def scenarios(seed: int, count: int) -> list[Scenario]:
    """The fixed scenarios and ``count`` drawn from ``seed``."""
    rng = random.Random(f"powercut-scenarios:{seed}")
    return list(FIXED) + [random_scenario(rng, f"r{i}") for i in range(count)]


# ================================================================ one run
@dataclasses.dataclass
class CutPoint:
    scenario: str
    domain: str
    n: int
    tear: str  # "random:SEED", "drop" or "keep"

    def repro(self, seed: int, count: int) -> str:
        return (f"python -m testbench.powercut --seed {seed} --scenarios {count} --scenario {self.scenario} "
                f"--domain {self.domain} --n {self.n} --tear {self.tear}")


class SiteDomain(PowerDomain):
    """A power domain whose cut also cuts ``partner`` (one site, one feed)."""

    partner: PowerDomain | None = None

    def cut(self, seed: int | None = None, *, mode: str | None = None):
        stats = super().cut(seed, mode=mode)
        if self.partner is not None and not self.partner.dead:
            self.partner.cut()
        return stats


def _domain_for(tear: str, seed_base: int, cls: type[PowerDomain] = PowerDomain) -> PowerDomain:
    if tear in ("drop", "keep"):
        return cls(seed_base, mode=tear)
    return cls(int(tear.split(":", 1)[1]) * 2 + seed_base, mode="random")


async def _run_steps(pair: PowerPair, model: Model, scenario: Scenario) -> str | None:
    """Run the scenario's steps until one of them loses power. Returns the
    role whose power was cut (None: the scenario ran to its end)."""
    for step in scenario.steps:
        p = pair.primary
        try:
            kind = step[0]
            if kind == "write":
                await model.write(p, step[1], step[2], step[3])
            elif kind == "form_cg":
                await p.form_cg()
            elif kind == "begin":
                await p.quiesce()
                await p.run()
            elif kind == "drain":
                await p.drain()
            elif kind == "commit":
                await p.commit_cg()
            elif kind == "fail":
                if p.machine.phase is not Phase.IDLE:
                    await p.cg_fail("scenario")
            elif kind == "reconnect":
                await p.cycle.connect()
            elif kind == "destage":
                await p.destager.destage()
            else:
                raise ValueError(f"unknown step {step!r}")
        except PowerLost:
            if not pair.pdom.dead:
                raise  # the secondary's cut must reach the primary as a dropped link
        except Exception as e:  # noqa: BLE001 - a step the secondary's cut broke; the CG fails
            if not pair.sdom.dead:
                raise RuntimeError(f"step {step} failed with both controllers powered: {e!r}") from e
        await asyncio.sleep(0)  # background aborts run before the next step
        for role in DOMAINS:
            if pair.domain(role).dead:
                return role
    return None


async def _read_all(read: Callable, names: list[str]) -> list[bytes]:
    return [await read(n, 0, VOLUME_BYTES) for n in names]


async def run_point(scenario: Scenario, domain: str | None, n: int, tear: str = "random:0",
                    *, record: bool = False) -> dict:
    """One run: establish, arm ``domain`` at its n-th persist point after
    the setup (none: record only), run the scenario, recover, converge,
    check. Returns the findings."""
    if domain == SITE:
        pdom = _domain_for(tear, 1, SiteDomain)
        sdom = pdom.partner = _domain_for(tear, 2)
    else:
        pdom = _domain_for(tear, 1) if domain == "primary" else PowerDomain(1, mode="drop", record=record)
        sdom = _domain_for(tear, 2) if domain == "secondary" else PowerDomain(2, mode="drop", record=record)
    if record:
        pdom.history, sdom.history = [], []
    pair = PowerPair(pdom=pdom, sdom=sdom, policy=scenario.policy, primary_nvram=scenario.primary_nvram)
    model = Model(pair.names, VOLUME_BYTES // SECTOR)
    full_copies: list[Event] = []
    pair.pevents.subscribe(model.on_event)
    await pair.establish()
    pair.pevents.subscribe(lambda e: full_copies.append(e) if e.fields.get("full_copy") else None)
    start = {"primary": pair.pdom.stats.events, "secondary": pair.sdom.stats.events}
    if domain is not None:
        pair.domain("primary" if domain == SITE else domain).arm(n)
    cut = await _run_steps(pair, model, scenario)
    out: dict = {"cut": cut, "events": {r: pair.domain(r).stats.events - start[r] for r in DOMAINS},
                 "violations": [], "states": 0}
    if record:
        out["history"] = {r: [h[1] for h in pair.domain(r).history[start[r]:]] for r in DOMAINS}
    if domain is not None and cut is None:
        out["not_reached"] = True
        return out
    v = out["violations"]
    if cut is not None:
        out["survived"] = _durable_digest(pair)
        for role in ("secondary", "primary"):  # both, after a site cut: the secondary first, as it listens
            if pair.domain(role).dead:
                await pair.restart(role)
    p, s = pair.primary, pair.secondary
    # (a) right after recovery, (b) C is the CG the secondary names.
    a = await _read_all(p.read, pair.names)
    v += [f"(a) after recovery: {x}" for x in model.lost_from(a)]
    committed = s.committed_cg
    c = await _read_all(s.read_c, pair.names)
    if committed not in model.cgs:
        v.append(f"(b) the secondary names CG {committed}, which the primary never switched to")
    else:
        v += [f"(b) C at CG {committed}: {x}" for x in model.differs(c, model.cgs[committed])]
    out["states"] += 1
    # Reconnect and form CGs until nothing is out of sync.
    converged = False
    for _ in range(CONVERGE_ROUNDS):
        if p.machine.phase is not Phase.IDLE:
            await p.cg_fail("the secondary lost power")
        if not p.cycle.connected:
            await p.cycle.connect()
        if await p.form_cg() and not p.oos_tracks() and not p.cr_tracks():
            converged = True
            break
    if not converged:
        v.append(f"(c) no convergence in {CONVERGE_ROUNDS} CGs: oos {p.oos_tracks()}, cr {p.cr_tracks()}, "
                 f"state {p.copy_state.value}")
    a = await _read_all(p.read, pair.names)
    v += [f"(a) after convergence: {x}" for x in model.lost_from(a)]
    c = await _read_all(s.read_c, pair.names)
    for vi, name in enumerate(pair.names):
        if c[vi] != a[vi]:
            v.append(f"(c) after convergence C differs from A on {name}")
    out["states"] += 1
    # (d) a full copy only after an NVRAM was formatted again.
    if full_copies and not pair.reformatted:
        v.append(f"(d) full resync without a reformat ({len(full_copies)} full_copy events)")
    out["full_copies"] = len(full_copies)
    out["reformatted"] = list(pair.reformatted)
    out["acked"] = model.acked
    return out


def _durable_digest(pair: PowerPair) -> str:
    """What survived the cut, in both domains (the inner devices and regions)."""
    h = hashlib.blake2b(digest_size=12)
    for dom in (pair.pdom, pair.sdom):
        for dev in dom.devices:
            inner = dev.inner
            if isinstance(inner, MemDevice):
                for key in sorted(inner._chunks):
                    h.update(key.to_bytes(8, "little"))
                    h.update(memoryview(inner._chunks[key])[:VOLUME_BYTES])
        for region in dom.regions:
            h.update(region.inner.view)
    return h.hexdigest()


# ================================================================ the enumeration
def _tears(kind: str, tears: int) -> list[str]:
    out = ["random:0"]
    if kind in ("writes", "fua_writes"):
        out += [f"random:{k}" for k in range(1, tears + 1)] + ["drop", "keep"]
    return out


def enumerate_cuts(*, seed: int = 1, count: int = DRAWN, tears: int = WRITE_TEARS, only: str | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Every cut point of every scenario; the report the faults part and
    the test read."""
    t0 = time.monotonic()
    quiet = logging.getLogger("asyncio"), logging.getLogger("firmware")
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)  # a dead controller's orphaned tasks, the CG failures it causes
    res = {"seed": seed, "scenarios": 0, "cut_points": 0, "states_checked": 0, "distinct_states": 0,
           "acked_writes_lost": 0, "inconsistent_copies": 0, "full_resyncs": 0, "reformats": 0,
           "not_reached": 0, "violations": [], "by_domain": {r: 0 for r in (*DOMAINS, SITE)},
           "persist_points": {}}
    digests: set[str] = set()
    try:
        for sc in scenarios(seed, count):
            if only is not None and sc.name != only:
                continue
            res["scenarios"] += 1
            rec = asyncio.run(run_point(sc, None, 0, record=True))
            if rec["violations"]:
                raise RuntimeError(f"{sc.describe()}: violations without a cut: {rec['violations']}")
            res["persist_points"][sc.name] = rec["events"]
            for role in (*DOMAINS, SITE):
                kinds = rec["history"]["primary" if role == SITE else role]
                for n in range(1, len(kinds) + 1):
                    for tear in _tears(kinds[n - 1], tears) if role != SITE else ["random:0"]:
                        point = CutPoint(sc.name, role, n, tear)
                        try:
                            r = asyncio.run(run_point(sc, role, n, tear))
                        except Exception as e:  # noqa: BLE001 - a run that breaks is a violation with its repro
                            r = {"violations": [f"run failed: {type(e).__name__}: {e}"], "states": 0}
                        if r.get("not_reached"):
                            res["not_reached"] += 1
                            continue
                        res["cut_points"] += 1
                        res["by_domain"][role] += 1
                        res["states_checked"] += r["states"]
                        if r.get("survived"):
                            digests.add(r["survived"])
                        res["reformats"] += bool(r.get("reformatted"))
                        res["full_resyncs"] += bool(r.get("full_copies"))
                        found = r["violations"]
                        if found:
                            res["acked_writes_lost"] += any(x.startswith("(a)") for x in found)
                            res["inconsistent_copies"] += any(x.startswith(("(b)", "(c)")) for x in found)
                            res["violations"].append({"scenario": sc.describe(), "domain": role, "n": n,
                                                      "tear": tear, "event": kinds[n - 1],
                                                      "repro": point.repro(seed, count), "found": found[:6]})
            if progress is not None:
                progress(f"powercut {sc.describe()}: persist points {rec['events']}; "
                         f"{res['cut_points']} cut points so far, {len(res['violations'])} violations")
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    res["distinct_states"] = len(digests)
    res["seconds"] = round(time.monotonic() - t0, 2)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbench.powercut", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="seed of the drawn scenarios")
    ap.add_argument("--scenarios", type=int, default=DRAWN, help="how many scenarios to draw besides the fixed ones")
    ap.add_argument("--tears", type=int, default=WRITE_TEARS, help="extra seeds per cut with a device write in flight")
    ap.add_argument("--scenario", help="one scenario (by name)")
    ap.add_argument("--domain", choices=(*DOMAINS, SITE), help="with --scenario and --n: replay one cut point "
                    f"({SITE}: the primary's n-th persist point cuts both)")
    ap.add_argument("--n", type=int)
    ap.add_argument("--tear", default="random:0", help="random:SEED, drop or keep")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.domain is not None:
        if args.scenario is None or args.n is None:
            ap.error("--domain needs --scenario and --n")
        by_name = {s.name: s for s in scenarios(args.seed, args.scenarios)}
        sc = by_name.get(args.scenario)
        if sc is None:
            ap.error(f"no scenario {args.scenario!r}; known: {', '.join(by_name)}")
        logging.basicConfig(level=logging.INFO)
        r = asyncio.run(run_point(sc, args.domain, args.n, args.tear))
        print(sc.describe())
        print(json.dumps(r, indent=2))
        return 1 if r["violations"] else 0
    res = enumerate_cuts(seed=args.seed, count=args.scenarios, tears=args.tears, only=args.scenario,
                         progress=lambda t: print(t, file=sys.stderr))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"cut points {res['cut_points']} ({res['by_domain']}), states checked {res['states_checked']}, "
              f"distinct survived states {res['distinct_states']}, violations {len(res['violations'])}, "
              f"{res['seconds']} s")
        for v in res["violations"]:
            print(f"VIOLATION {v['scenario']} {v['domain']} n={v['n']} ({v['event']}) tear {v['tear']}")
            for f in v["found"]:
                print(f"    {f}")
            print(f"    repro: {v['repro']}")
    return 1 if res["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
