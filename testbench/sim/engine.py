"""One simulated run: a whole session in one event loop on a virtual clock,
driven by a seeded list of events and checked against the reference model
after every one (issue 14).

A run is ``config(seed)`` (controllers, policy, CG parameters) and
``scenario(seed)`` (the event list). Events are JSON lists, ``[kind, t,
...]`` with ``t`` in virtual seconds from the start:

- ``["w", t, ctl, vol, sector, count]`` a host write (each sector of it
  distinct, sectors of a volume never written concurrently by two writes)
- ``["power", t, ctl, role, tear, down_s]`` cut the power of ``role``
  (``primary``, ``secondary``, ``site``: both) now, torn per ``tear``;
  power back on (recovery) after ``down_s``
- ``["crash", t, ctl, role, down_s]`` the process dies (what SIGKILL does:
  unflushed writes and NVRAM stores kept), restarted after ``down_s``
- ``["arm", t, ctl, role, n, down_s]`` the power goes at that domain's n-th
  persist point from now (mid-write, mid-persist); ending with
  ``"in:PHASE"``, at its n-th persist point from now that comes while the
  controller's CG is in PHASE (or its primary is off: ``in:down``)
- ``["linkdown", t, ctl, dur]`` / ``["loss", t, ctl, p, dur]`` the
  replication link drops every call (a loss may take the request or the
  answer) / each with probability ``p``
- ``["ctldown", t, ctl, dur]`` a subordinate's control link to the master
- ``["eio", t, ctl, dev, count]`` the next ``count`` calls of device
  ``dev`` (a0, b1, c0 ...) fail with EIO
- ``["cmd", t, ctl, name, arg]`` an operator command: pause, resume,
  suspend, resume_pair, set (``arg`` = "name=value")

A fault event may end with ``"at:PHASE"`` (quiescing, draining,
committing, idle, or down: its primary without power): from ``t`` on it
waits (at most a virtual second) for that controller's CG to enter the
phase (its primary to go off), and strikes right there; with
``"at:PHASE+SECONDS"``, that long after (inside the phase, or past it).

The faults of a seed aim at coverage cells (fault kind x CG phase x role,
``REACHABLE``): a few cells of its config's roles, from ``seed * k`` on in a
fixed walk of them, each an "at:PHASE" fault (an "in:PHASE" cut; after a
cut of its primary for "down"), and one or two untargeted faults beside.

Everything else is seeded by the run's seed too: each device call and link
hop takes an exponential virtual time or a few bare yields (so the
firmware's tasks interleave differently per seed), and the loop is run
until nothing is ready before the clock moves (``World.settle``). The
checks after each event (no latency, no faults while they read):

(a) after every restart and at the end, A shows every acknowledged write;
(b) every secondary's C is exactly the committed CG it names (the model's
    content at that CG's CR switch);
(c) every track where B (what the next commit makes C) is stale against
    the acknowledged A is in OOS, CR or a send in flight;
(d) no full copy unless an NVRAM had to be formatted again;
and at the end, faults healed, every C converges to A.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import selectors
from dataclasses import dataclass, field

from drivers.powerloss import PowerDomain, PowerLost
from firmware.cg import Phase
from firmware.copystate import CopyState
from firmware.session_master import SessionMaster
from firmware.session_member import LocalMember
from hal.clock import VirtualClock
from testbench.generate import GeneratorParams, generate
from testbench.sim.model import SECTOR, Model
from testbench.sim.world import (
    TRACK_BYTES,
    VOLUME_BYTES,
    PowerPair,
    Sim,
    SimFlashPort,
    SimMemberPort,
)

log = logging.getLogger(__name__)

S_PER_T = TRACK_BYTES // SECTOR
SECTORS = VOLUME_BYTES // SECTOR
PHASES = ("idle", "quiescing", "draining", "committing", "down")
ROLES = ("single", "master", "subordinate")
FAULT_KINDS = ("power-primary", "power-secondary", "power-site", "crash-primary", "crash-secondary",
               "cut-primary", "cut-secondary", "linkdown", "loss", "ctldown", "eio-a", "eio-b", "eio-c",
               "cmd-pause", "cmd-resume", "cmd-suspend", "cmd-resume_pair", "cmd-set")
SETTABLE = (("cg_interval_s", ("0", "0.02", "0.1")), ("drain_inflight", ("1", "2", "4")))
CONVERGE_S = 30.0
MAX_TURNS = 20000  # loop turns without the clock moving: a livelock


class Livelock(Exception):
    pass


class SimClock(VirtualClock):
    """The virtual clock, with a timer's callback run as the event loop
    runs one: what it raises goes to ``errors`` instead of out of
    ``advance`` (a dead controller's timer touching its dead NVRAM raises
    PowerLost: on a box without power nothing ran at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []

    def call_later(self, seconds, fn):
        def guarded() -> None:
            try:
                fn()
            except PowerLost:
                pass
            except Exception as e:  # noqa: BLE001 - asyncio would log it and go on; the run reports it
                self.errors.append(f"a timer callback raised {type(e).__name__}: {e}")
        return super().call_later(seconds, guarded)


# ================================================================ what a seed means
@dataclass(frozen=True)
class Config:
    controllers: int
    policy: str
    cg_interval_s: float
    drain_inflight: int
    duration_s: float
    writes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def config(seed: int) -> Config:
    # Unchanged draws: regressions.txt lines and printed repro lines give a
    # seed and its events, and mean the config this gives that seed.
    rng = random.Random(f"mirrorfw-sim-config:{seed}")
    return Config(controllers=rng.choice((1, 1, 1, 1, 2, 3)), policy=rng.choice(("dual-image", "send-first")),
                  cg_interval_s=rng.choice((0.0, 0.02, 0.1)), drain_inflight=rng.choice((1, 2, 4)),
                  duration_s=2.0, writes=rng.randint(10, 40))


def workload(seed: int, cfg: Config) -> list[list]:
    """Host writes from the seeded trace generator (testbench/generate.py),
    its devices mapped onto every controller's volumes."""
    n_dev = cfg.controllers * 2
    p = GeneratorParams(seed=seed, duration_s=cfg.duration_s, iops=cfg.writes / cfg.duration_s, devices=n_dev,
                        span_bytes=VOLUME_BYTES, write_ratio=1.0, seq_prob=0.3, hot_prob=0.6, hot_spots=2,
                        hot_bytes=2 * TRACK_BYTES, burst_prob=0.2, burst_factor=5.0, align_bytes=SECTOR,
                        sizes={512: 3, 1024: 2, 2048: 2, 4096: 3, 6144: 1, 8192: 1})
    out = []
    for rec in generate(p):
        d = int(rec.device[len(p.device_prefix):])
        sector, count = rec.offset_bytes // SECTOR, rec.length_bytes // SECTOR
        out.append(["w", round(rec.ts_ns / 1e9, 6), d // 2, d % 2, sector, min(count, SECTORS - sector)])
    return out


# ================================================================ coverage cells
def _impossible(kind: str, phase: str, role: str) -> str | None:
    """Why a (fault kind, CG phase, role) cell cannot happen; None if it can."""
    if kind == "ctldown" and role != "subordinate":
        return "only a subordinate has a control link (to its master)"
    if phase == "down" and kind in ("power-primary", "crash-primary"):
        return "the primary is off already: nothing to cut"
    if phase == "down" and kind == "cut-primary":
        return "an armed cut fires at a persist point of a powered primary"
    if phase == "down" and kind.startswith("cmd-"):
        return "a controller whose primary is off runs no command"
    return None


def _race_only(kind: str, phase: str, role: str) -> str | None:
    """Why a cell that can happen is reached only by a race that no event
    can aim at (targeted all the same; not in the coverage floor)."""
    if kind == "cut-secondary" and phase in ("idle", "quiescing"):
        return ("the secondary persists outside draining and committing only for a send or a prepared CG's "
                "abort that reaches it after the CG failed and before the next one drains")
    if kind == "cut-secondary" and phase == "down":
        return "the secondary persists with its primary off only for a call still running as the primary went"
    return None


CELLS = tuple((k, p, r) for k in FAULT_KINDS for p in PHASES for r in ROLES)
IMPOSSIBLE = {c: why for c in CELLS if (why := _impossible(*c)) is not None}
RACE_ONLY = {c: why for c in CELLS if c not in IMPOSSIBLE and (why := _race_only(*c)) is not None}
REACHABLE = tuple(c for c in CELLS if c not in IMPOSSIBLE)
# Targeted faults a seed gets: a session seed comes one time in three (config)
# and spreads over the master's and the subordinates' cells, twice a single's.
TARGETS = {"single": 3, "session": 8}
EXTRA_FAULTS = (1, 2)  # plus this many untargeted ones (they find what targeting does not)


def roles_of(cfg: Config) -> tuple[str, ...]:
    return ("single",) if cfg.controllers == 1 else ("master", "subordinate")


def fault_events(rng: random.Random, cfg: Config, kind: str, ctl: int, t: float, phase: str | None,
                 n_max: int = 40) -> list[list]:
    """A fault of ``kind`` (FAULT_KINDS) at controller ``ctl``, waiting for
    ``phase`` (None: it strikes at ``t``); pause and suspend come with the
    operator's undo, mostly. An armed cut goes off at one of the next
    ``n_max`` persist points."""
    at = [f"at:{phase}"] if phase else []
    if phase in ("idle", "draining") and rng.random() < 0.5:
        # Not always at the phase's first step: a while into it (a few link
        # hops), where a drain's sends and syncs are under way. (Committing is
        # a prepare and a commit: a delay overran it about one time in two.)
        at = [f"at:{phase}+{round(rng.uniform(0.0005, 0.005), 6)}"]
    down = round(rng.choice((0.0, 0.01, 0.2, 0.6)), 3)
    base, _, what = kind.partition("-")
    if base == "power":
        return [["power", t, ctl, what, rng.randrange(1000), down] + at]
    if base == "crash":
        return [["crash", t, ctl, what, down] + at]
    if base == "cut":  # a cut lands in a phase at a persist point that comes in it, not at the phase's start
        return [["arm", t, ctl, what, rng.randint(1, n_max), down] + ([f"in:{phase}"] if phase else [])]
    if base == "linkdown":
        return [["linkdown", t, ctl, round(rng.choice((0.005, 0.05, 0.3, 1.0)), 3)] + at]
    if base == "ctldown":
        return [["ctldown", t, ctl, round(rng.choice((0.005, 0.05, 0.3)), 3)] + at]
    if base == "loss":
        return [["loss", t, ctl, rng.choice((0.05, 0.2, 0.5)), round(rng.choice((0.1, 0.5, 1.0)), 3)] + at]
    if base == "eio":
        return [["eio", t, ctl, f"{what}{rng.randrange(2)}", rng.randint(1, 3)] + at]
    if base == "cmd":
        arg = ""
        if what == "set":
            key, values = rng.choice(SETTABLE)
            arg = f"{key}={rng.choice(values)}"
        out = [["cmd", t, ctl, what, arg] + at]
        if what in ("pause", "suspend") and rng.random() < 0.7:  # the operator undoes it, mostly
            out.append(["cmd", round(t + rng.uniform(0.01, 0.5), 6), ctl,
                        "resume" if what == "pause" else "resume_pair", ""])
        return out
    raise ValueError(f"unknown fault kind {kind!r}")


def _random_kind(rng: random.Random, ctl: int) -> str:
    base = rng.choice(("power", "power", "crash", "cut", "cut", "cut", "linkdown", "loss", "eio", "eio", "cmd",
                       "cmd") + (("ctldown",) if ctl else ()))
    if base == "power":
        return f"power-{rng.choice(('primary', 'secondary', 'site'))}"
    if base in ("crash", "cut"):
        return f"{base}-{rng.choice(('primary', 'secondary'))}"
    if base == "eio":
        return f"eio-{rng.choice('abc')}"
    if base == "cmd":
        return f"cmd-{rng.choice(('pause', 'suspend', 'set', 'resume', 'resume_pair'))}"
    return base


def _walk_order(roles: tuple[str, ...]) -> list[tuple[str, str, str]]:
    # One fixed shuffle, so that the cells next to each other in the walk (one
    # seed's targets) are of different kinds and phases.
    cells = [c for c in REACHABLE if c[2] in roles]
    random.Random(f"mirrorfw-sim-cells:{','.join(roles)}").shuffle(cells)
    return cells


WALKS = {roles: _walk_order(roles) for roles in (("single",), ("master", "subordinate"))}


def targets(seed: int, cfg: Config) -> list[tuple[str, str, str]]:
    """The cells this seed aims at: ``k`` cells of its config's roles, from
    ``seed * k`` on in the walk, so seeds spread evenly over the cells."""
    cells = WALKS[roles_of(cfg)]
    k = TARGETS["single" if cfg.controllers == 1 else "session"]
    return [cells[(seed * k + j) % len(cells)] for j in range(k)]


def faults(seed: int, cfg: Config) -> list[list]:
    """The targeted faults (``targets``), each in its own slice of the first
    80 % of the run (a fault waits up to a second for its phase, and what
    still waits at the end is dropped), and a few untargeted ones."""
    rng = random.Random(f"mirrorfw-sim-faults:{seed}")
    aims = targets(seed, cfg)
    rng.shuffle(aims)
    out = []
    span = 0.8 * cfg.duration_s - 0.05
    for i, (kind, phase, role) in enumerate(aims):
        t = round(0.05 + (i + rng.random()) * span / len(aims), 6)
        ctl = 0 if role != "subordinate" else rng.randrange(1, cfg.controllers)
        off = round(rng.uniform(0.2, 0.6), 3)
        if kind == "cut-secondary" and phase == "down":
            # The secondary persists with its primary off only for calls that
            # were in flight as the primary went (sends mid-drain): off at a
            # moment of the CG cycle, not at a phase's start.
            out += fault_events(rng, cfg, kind, ctl, t, phase, n_max=4)
            out.append(["power", round(t + rng.uniform(0.01, 0.3), 6), ctl, "primary", rng.randrange(1000), off])
            continue
        if kind == "cut-secondary" and phase in ("idle", "quiescing"):
            # ... and outside draining and committing only for sends still in
            # flight after their CG failed, and the abort of a prepared CG: C's
            # flush fails the commit.
            out += fault_events(rng, cfg, kind, ctl, t, phase, n_max=4)
            out.append(["eio", round(t + 0.001, 6), ctl, f"c{rng.randrange(2)}", 1, "at:committing"])
            continue
        if phase == "down":
            # Its primary goes off first, for long enough that the fault lands while it is off.
            how = rng.choice(("power", "crash"))
            out.append(["power", t, ctl, "primary", rng.randrange(1000), off] if how == "power"
                       else ["crash", t, ctl, "primary", off])
            t = round(t + rng.uniform(0.001, 0.1), 6)
        out += fault_events(rng, cfg, kind, ctl, t, phase, n_max=4)
    for _ in range(rng.randint(*EXTRA_FAULTS)):
        ctl = rng.randrange(cfg.controllers)
        kind = _random_kind(rng, ctl)
        phase = rng.choice(PHASES[:4]) if rng.random() < 0.6 and not kind.startswith("cut") else None
        out += fault_events(rng, cfg, kind, ctl, round(rng.uniform(0.05, cfg.duration_s), 6), phase)
    return out


def scenario(seed: int, cfg: Config | None = None) -> list[list]:
    cfg = cfg or config(seed)
    events = workload(seed, cfg) + faults(seed, cfg)
    order = sorted(range(len(events)), key=lambda i: (events[i][1], i))
    return [events[i] for i in order]


def phase_of(ev: list) -> str | None:
    """The phase a fault waits for (None: it strikes at its time)."""
    last = ev[-1]
    return last[3:].partition("+")[0] if isinstance(last, str) and last.startswith("at:") else None


def delay_of(ev: list) -> float:
    """How long after its phase began a fault strikes ("at:PHASE+SECONDS")."""
    last = ev[-1]
    return float(last.partition("+")[2] or 0.0) if isinstance(last, str) and last.startswith("at:") else 0.0


def within_of(ev: list) -> str | None:
    """The phase an armed cut waits for a persist point in (None: any)."""
    last = ev[-1]
    return last[3:] if isinstance(last, str) and last.startswith("in:") else None


def fault_kind(ev: list) -> str | None:
    kind = ev[0]
    if kind in ("power", "crash"):
        return f"{kind}-{ev[3]}"
    if kind in ("linkdown", "loss", "ctldown"):
        return kind
    if kind == "eio":
        return f"eio-{ev[3][0]}"
    if kind == "cmd":
        return f"cmd-{ev[3]}"
    return None  # writes; armed cuts count when they fire


# ================================================================ the world
@dataclass
class Result:
    seed: int
    config: dict
    events: int
    violations: list[str] = field(default_factory=list)
    cells: set = field(default_factory=set)  # (fault kind, CG phase, role)
    cgs_committed: int = 0
    cgs_failed: int = 0
    acked: int = 0
    virtual_s: float = 0.0
    log: list[str] = field(default_factory=list)
    failed_at: int | None = None  # the event after which a check failed (None: at the end)
    log_digest: str = ""

    def digest(self) -> str:
        if not self.log_digest:
            self.log_digest = hashlib.blake2b("\n".join(self.log).encode(), digest_size=12).hexdigest()
        return self.log_digest

    def summary(self) -> dict:
        return {"seed": self.seed, "violations": self.violations, "cells": sorted(self.cells),
                "cgs": self.cgs_committed + self.cgs_failed, "cgs_committed": self.cgs_committed,
                "acked": self.acked, "events": self.events, "virtual_s": round(self.virtual_s, 3),
                "failed_at": self.failed_at, "digest": self.digest()}


class World:
    def __init__(self, seed: int, cfg: Config, res: Result) -> None:
        self.seed, self.cfg, self.res = seed, cfg, res
        self.clock = SimClock()
        self.sim = Sim(seed, self.clock)
        self.session = cfg.controllers > 1
        self.pairs: list[PowerPair] = []
        self.models: list[Model] = []
        self.full_copies = [0] * cfg.controllers
        for i in range(cfg.controllers):
            pair = PowerPair(clock=self.clock, sim=self.sim, ctl=i, policy=cfg.policy,
                             params={"cg_interval_s": cfg.cg_interval_s, "drain_inflight": cfg.drain_inflight},
                             pdom=PowerDomain(seed * 8 + 2 * i + 1, mode="random"),
                             sdom=PowerDomain(seed * 8 + 2 * i + 2, mode="random"),
                             session_id="s" if self.session else "default", session_member=self.session,
                             start={"form_cgs": not self.session, "destage": True})
            model = Model(pair.names, SECTORS)
            pair.pevents.subscribe(model.on_event)
            pair.pevents.subscribe(self._logger(i, "p"))
            pair.sevents.subscribe(self._logger(i, "s"))
            self.pairs.append(pair)
            self.models.append(model)
        self.members: dict[int, LocalMember | None] = {}
        self.master: SessionMaster | None = None
        self.restarts: list[tuple[float, int, str]] = []  # (when, ctl, role)
        self.down_for: dict[tuple[int, str], float] = {}  # an armed cut's power-off time
        self.dead_seen: set[tuple[int, str]] = set()
        self.writing: dict[tuple[int, int], list[tuple[int, int, asyncio.Task]]] = {}
        self.waiting: list[tuple[float, list]] = []  # (deadline, event): faults waiting for a CG phase
        self.due: list[tuple[float, list]] = []  # (when, event): faults striking a while into their phase
        self.tasks: set[asyncio.Task] = set()
        self.host_calls: dict[int, set[asyncio.Task]] = {}  # a controller's writes and commands in progress
        self.deaths: dict[int, asyncio.Future] = {}  # done when that controller's primary goes off

    # -- the event log -------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.res.log.append(f"{self.clock.now() - 1000.0:.6f} {text}")

    def _logger(self, ctl: int, side: str):
        def on(event) -> None:
            self.note(f"c{ctl}{side} {event.line()}")
            if side == "p" and event.obj == "cg" and event.action == "destroy" and event.fields.get("role") != "master":
                if event.fields.get("result") == "committed":
                    self.res.cgs_committed += 1
                else:
                    self.res.cgs_failed += 1
            if side == "p" and event.fields.get("full_copy"):
                self.full_copies[ctl] += 1
            # The master's own events ("create" as the session's CG begins, before
            # its primary quiesces) are not its primary's phase: that one emits its own.
            if side == "p" and self.waiting and event.obj == "cg" and event.fields.get("role") != "master":
                entered = ("idle" if event.action == "destroy" else event.fields.get("phase")
                           if "acks" not in event.fields else None)
                self._strike_waiting(ctl, entered)  # right as the phase is entered, in the firmware's own step
        return on

    def _strike_waiting(self, ctl: int, phase: str | None) -> None:
        for item in list(self.waiting):
            if item[1][2] == ctl and phase_of(item[1]) == phase and item in self.waiting:
                self.waiting.remove(item)
                self._strike_in_phase(item[1])

    def _strike_in_phase(self, ev: list) -> None:
        if delay_of(ev) > 0:
            self.due.append((self.clock.now() + delay_of(ev), ev))
        else:
            self.strike(ev)

    def role(self, ctl: int) -> str:
        return "single" if not self.session else "master" if ctl == 0 else "subordinate"

    def phase(self, ctl: int) -> str:
        pair = self.pairs[ctl]
        if pair.pdom.dead or pair.primary is None:
            return "down"
        return pair.primary.machine.phase.value

    def cover(self, kind: str, ctl: int) -> None:
        self.res.cells.add((kind, self.phase(ctl), self.role(ctl)))

    # -- running the loop on the virtual clock -----------------------------------------------
    async def settle(self) -> None:
        """Run every ready callback until none is left (the clock stands)."""
        loop = asyncio.get_running_loop()
        for _ in range(MAX_TURNS):
            await asyncio.sleep(0)
            if not loop._ready:  # noqa: SLF001 - only this loop's own queue says "nothing ready"
                return
        raise Livelock(f"{MAX_TURNS} loop turns at t={self.clock.now() - 1000.0:.6f} without the clock moving")

    async def run_to(self, target: float) -> None:
        while True:
            await self.settle()
            self._notice_deaths()
            for item in [w for w in self.waiting if w[0] <= self.clock.now()]:
                self.waiting.remove(item)
                self.strike(item[1])  # the phase did not come: strike anyway
            for item in [d for d in self.due if d[0] <= self.clock.now()]:
                self.due.remove(item)
                self.strike(item[1])
            if self.restarts and self.restarts[0][0] <= self.clock.now():
                _, ctl, role = self.restarts.pop(0)
                await self.restart(ctl, role)
                continue
            nxt = [d for d in (self.clock.next_deadline(), self.restarts[0][0] if self.restarts else None,
                               min((w[0] for w in self.waiting), default=None),
                               min((w[0] for w in self.due), default=None)) if d is not None]
            step_to = min([target, *nxt])
            if step_to > self.clock.now():
                self.clock.advance(step_to - self.clock.now())
            if step_to >= target:
                await self.settle()
                self._notice_deaths()
                return

    async def run_for(self, seconds: float) -> None:
        await self.run_to(self.clock.now() + seconds)

    async def drive(self, coro, limit_s: float = 10.0):
        """Await ``coro`` while the clock runs (the driver's own awaits of the
        firmware take virtual time too: nothing else would move the clock)."""
        task = asyncio.ensure_future(coro)
        end = self.clock.now() + limit_s
        while not task.done():
            await self.settle()
            if task.done():
                break
            nxt = self.clock.next_deadline()
            if nxt is None or nxt > end:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise Livelock(f"{coro!r} did not end within {limit_s:g} virtual s")
            self.clock.advance(max(0.0, nxt - self.clock.now()))
        return task.result()

    # -- boot -------------------------------------------------------------------------------------
    async def boot(self) -> None:
        for pair in self.pairs:
            await self.drive(pair.open_secondary(format=True))
            await self.drive(pair.open_primary(format=True))
        if self.session:
            for i in range(1, len(self.pairs)):
                self.members[i] = LocalMember(self.pairs[i].primary, f"c{i}")
            self._new_master()
        for _ in range(100):
            await self.run_for(0.05)
            if all(p.secondary.committed_cg >= 1 for p in self.pairs):
                self.full_copies = [0] * len(self.pairs)  # the first copy is a full one
                return
        raise RuntimeError(f"no first CG in 5 s: committed {[p.secondary.committed_cg for p in self.pairs]}")

    def _new_master(self) -> None:
        n = len(self.pairs)
        self.master = SessionMaster(self.pairs[0].primary, [SimMemberPort(self, i, f"c{i}") for i in range(1, n)],
                                    name="c0", secondaries={f"c{i}": SimFlashPort(self, i) for i in range(n)})
        self.master.start_loop()
        for m in self.members.values():
            if m is not None:
                self._on_member(m.master_joined, "c0")

    # -- power, crashes, restarts -------------------------------------------------------------------
    @staticmethod
    def _on_member(call, *args) -> None:
        """A call into a member from the world's own code (not a task): the
        member's box may lose power in it (an armed cut at the record save
        of its failed CG), which its next death check notices; PowerLost is
        that box's, and must not end the run."""
        try:
            call(*args)
        except PowerLost:
            pass

    def _notice_deaths(self) -> None:
        for ctl, pair in enumerate(self.pairs):
            for role in ("secondary", "primary"):
                key = (ctl, role)
                if pair.domain(role).dead and key not in self.dead_seen:
                    self.dead_seen.add(key)
                    self._went_down(ctl, role)
                    if role == "primary":
                        self._strike_waiting(ctl, "down")
                    when = self.clock.now() + self.down_for.pop(key, 0.0)
                    self.restarts.append((when, ctl, role))
                    self.restarts.sort(key=lambda r: (r[0], r[1], r[2] != "secondary"))

    def death_of(self, ctl: int) -> asyncio.Future:
        """A future done when ``ctl``'s primary goes off next (SimMemberPort)."""
        fut = self.deaths.get(ctl)
        if fut is None or fut.done():
            fut = self.deaths[ctl] = asyncio.get_running_loop().create_future()
        return fut

    def _went_down(self, ctl: int, role: str) -> None:
        """Drop what a dead controller ran (its tasks would not run on a dead box)."""
        self.note(f"c{ctl} {role} down")
        pair = self.pairs[ctl]
        if role != "primary" or pair.primary is None:
            return
        if ctl in self.deaths and not self.deaths[ctl].done():
            self.deaths[ctl].set_result(None)
        p = pair.primary
        # Its own tasks would die at their next I/O (PowerLost) anyway; cancelled
        # now so none outlives the box by a timer. getattr: internals, not API.
        cycle = p.cycle
        doomed = [getattr(cycle, "loop_task", None), getattr(cycle, "body", None), *getattr(cycle, "_bg", ()),
                  getattr(p.destager, "_task", None)]
        if self.session and ctl == 0 and self.master is not None:
            doomed.append(self.master.loop_task)
            self.master.stopping = True
            for m in self.members.values():
                if m is not None:
                    self._on_member(m.master_lost, "master lost (sim)")
            self.master = None
        if self.session and ctl > 0:
            self.members[ctl] = None
        # The host's writes and the operator's commands in progress on it end
        # with an error (a dead box answers nothing); one awaiting a future only
        # that box would have resolved (a held ack, a suspend) waited for ever,
        # and the run never converged.
        doomed += self.host_calls.get(ctl, ())
        for t in doomed:
            if t is not None and not t.done():
                t.cancel()

    async def restart(self, ctl: int, role: str) -> None:
        pair = self.pairs[ctl]
        if not pair.domain(role).dead:
            return
        try:
            await self.drive(pair.restart(role))
        except PowerLost:
            pass  # an armed cut in the opening itself: noticed and restarted again
        except Exception as e:  # noqa: BLE001 - an injected EIO while opening: try again soon
            self.note(f"c{ctl} {role} restart failed: {type(e).__name__}: {e}")
            if not pair.domain(role).dead:  # powered on, half open: off again, and the next try opens it
                pair.domain(role).cut(mode="keep")
            self.restarts.append((self.clock.now() + 0.05, ctl, role))
            self.dead_seen.discard((ctl, role))
            return
        self.dead_seen.discard((ctl, role))
        self.note(f"c{ctl} {role} up ({'reformatted ' + role if role in pair.reformatted else 'recovered'})")
        if role == "primary" and not pair.pdom.dead:
            if self.session:
                if ctl == 0:
                    self._new_master()
                else:
                    self.members[ctl] = LocalMember(pair.primary, f"c{ctl}")
                    if self.master is not None:
                        self._on_member(self.members[ctl].master_joined, "c0")
            await self._check_a(ctl, "after restart")

    # -- events ---------------------------------------------------------------------------------------
    def apply(self, ev: list) -> None:
        if phase_of(ev) is not None and phase_of(ev) != self.phase(ev[2]):
            self.note("event waits " + json.dumps(ev))
            self.waiting.append((self.clock.now() + 1.0, ev))
            return
        if phase_of(ev) is not None:
            self._strike_in_phase(ev)
            return
        self.strike(ev)

    def strike(self, ev: list) -> None:
        kind, ctl = ev[0], ev[2]
        sim, pair = self.sim, self.pairs[ctl]
        fk = fault_kind(ev)
        if fk is not None and self._takes_effect(ev):
            self.cover(fk, ctl)
        self.note("event " + json.dumps(ev))
        if kind == "w":
            self._spawn(self.host_write(ctl, ev[3], ev[4], ev[5]), ctl)
        elif kind in ("power", "crash"):
            roles = ("primary", "secondary") if ev[3] == "site" else (ev[3],)
            for role in roles:
                dom = pair.domain(role)
                if dom.dead:
                    continue
                if kind == "power":
                    dom.cut(seed=ev[4])
                else:
                    dom.cut(mode="keep")
                self.down_for[(ctl, role)] = ev[5] if kind == "power" else ev[4]
        elif kind == "arm":
            role = ev[3]
            dom = pair.domain(role)
            if not dom.dead:
                self._arm(ctl, role, dom, ev[4], within_of(ev))
                self.down_for[(ctl, role)] = ev[5]
        elif kind == "linkdown":
            sim.link_down_until[ctl] = self.clock.now() + ev[3]
        elif kind == "ctldown":
            sim.ctl_down_until[ctl] = self.clock.now() + ev[3]
        elif kind == "loss":
            sim.loss[ctl] = (ev[3], self.clock.now() + ev[4])
        elif kind == "eio":
            sim.eio[(ctl, ev[3])] = sim.eio.get((ctl, ev[3]), 0) + ev[4]
        elif kind == "cmd":
            self._spawn(self.command(ctl, ev[3], ev[4]), ctl)
        else:
            raise ValueError(f"unknown event {ev!r}")

    def _takes_effect(self, ev: list) -> bool:
        """False for a fault that does nothing: a cut or a crash of boxes all
        off already, a command to a primary without power (no coverage)."""
        pair = self.pairs[ev[2]]
        if ev[0] in ("power", "crash"):
            roles = ("primary", "secondary") if ev[3] == "site" else (ev[3],)
            return any(not pair.domain(r).dead for r in roles)
        if ev[0] == "cmd":
            return not pair.pdom.dead and pair.primary is not None
        return True

    def _arm(self, ctl: int, role: str, dom: PowerDomain, n: int, phase: str | None = None) -> None:
        fire = dom._fire

        def fire_and_count():  # the coverage cell is the phase the cut lands in
            self.cover(f"cut-{role}", ctl)
            fire()
        dom._fire = fire_and_count
        if phase is None:
            dom.arm(n)
            return
        count, left = dom._event, [n]

        def event(kind: str, url: str) -> bool:  # counts every persist point; fires at the n-th in the phase
            if count(kind, url):
                return True
            if self.phase(ctl) == phase:
                left[0] -= 1
                if left[0] == 0:
                    dom._event = count
                    return True
            return False
        dom._event = event

    def _spawn(self, coro, ctl: int) -> None:
        t = asyncio.ensure_future(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        on = self.host_calls.setdefault(ctl, set())
        on.add(t)
        t.add_done_callback(on.discard)

    async def host_write(self, ctl: int, vi: int, sector: int, count: int) -> None:
        key, end = (ctl, vi), sector + count
        busy = self.writing.setdefault(key, [])
        while True:  # a host does not overlap two writes to one sector: wait for the older one
            older = [t for s, e, t in busy if s < end and sector < e]
            if not older:
                break
            await asyncio.gather(*older, return_exceptions=True)
        pair, model = self.pairs[ctl], self.models[ctl]
        if pair.pdom.dead or pair.primary is None:
            self.note(f"c{ctl} write v{vi}@{sector}+{count} refused: no power")
            return
        entry = (sector, end, asyncio.current_task())
        busy.append(entry)
        dom, primary = pair.pdom, pair.primary
        wid, data = model.issue(vi, sector, count)
        try:
            await primary.write(pair.names[vi], sector * SECTOR, data)
        except BaseException as e:  # noqa: BLE001 - the host sees an error: the write is not acknowledged
            self.note(f"c{ctl} write {wid} v{vi}@{sector}+{count} failed: {type(e).__name__}")
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        finally:
            busy.remove(entry)
        if dom.dead:  # a dead box released it (its gate opened as it failed): no ack ever left it
            self.note(f"c{ctl} write {wid} v{vi}@{sector}+{count} lost with the power")
            return
        model.ack(wid, vi, sector, count)

    async def command(self, ctl: int, name: str, arg: str) -> None:
        pair = self.pairs[ctl]
        p = pair.primary
        if pair.pdom.dead or p is None:
            return
        try:
            if name == "pause":
                await p.cg_pause()
            elif name == "resume":
                await p.cg_resume()
            elif name == "suspend":
                await p.suspend()
            elif name == "resume_pair":
                await p.resume_pair()
            elif name == "set":
                key, value = arg.split("=", 1)
                p.set_param(key, value)
            self.note(f"c{ctl} cmd {name} {arg} ok")
        except BaseException as e:  # noqa: BLE001 - a refused command is the operator's answer
            self.note(f"c{ctl} cmd {name} {arg} refused: {type(e).__name__}")
            if isinstance(e, asyncio.CancelledError):
                raise

    # -- checks ---------------------------------------------------------------------------------------
    async def _read_a(self, ctl: int) -> list[bytes]:
        """A as the host reads it (a read may wait for a destage: driven)."""
        p = self.pairs[ctl].primary
        return [await self.drive(p.read(n, 0, VOLUME_BYTES)) for n in p.names]

    async def _read_c(self, ctl: int) -> tuple[int, list[bytes]]:
        """C and the CG it is at, from one moment (read again if a commit came between)."""
        s = self.pairs[ctl].secondary
        while True:
            seq = s.committed_cg
            c = [await self.drive(s.read_c(n, 0, VOLUME_BYTES)) for n in s.names]
            if s.committed_cg == seq:
                return seq, c

    async def _check_a(self, ctl: int, when: str) -> None:
        self.sim.quiet = True
        try:
            bad = self.models[ctl].lost_from(await self._read_a(ctl))
        except PowerLost:
            bad = []  # it went down again while read: checked at its next restart
        finally:
            self.sim.quiet = False
        self.res.violations += [f"(a) c{ctl} {when}: {x}" for x in bad[:4]]

    async def check(self, when: str) -> list[str]:
        out = []
        self.sim.quiet = True
        try:
            for ctl in range(len(self.pairs)):
                try:
                    out += await self._check_one(ctl, when)
                except PowerLost:
                    pass  # an armed cut went off while the check read (time runs while it waits)
        finally:
            self.sim.quiet = False
        return out

    async def _check_one(self, ctl: int, when: str) -> list[str]:
        out = []
        pair, model = self.pairs[ctl], self.models[ctl]
        s, p = pair.secondary, pair.primary
        if pair.sdom.dead or s is None:
            return out
        committed, c = await self._read_c(ctl)
        cg = model.cgs.get(committed)
        if cg is None:
            out.append(f"(b) c{ctl} {when}: the secondary names CG {committed}, which the primary never switched to")
        else:
            out += [f"(b) c{ctl} {when}: C at CG {committed}: {x}" for x in model.differs(c, cg)[:4]]
        if pair.pdom.dead or pair.sdom.dead or p is None or not p.cycle.connected:
            return out
        stale = model.stale_tracks(await pair.read_b(), S_PER_T)
        inflight = set(p.cycle.drainer.inflight)
        bare = sorted(t for t in stale if not (p.region.oos[t[0]].test(t[1]) or p.region.cr[t[0]].test(t[1])
                                                or t in inflight))
        out += [f"(c) c{ctl} {when}: {pair.names[vi]} track {t} differs in B from the acked A and is in neither "
                f"OOS nor CR (phase {p.machine.phase.value})" for vi, t in bare[:4]]
        return out

    # -- the end ------------------------------------------------------------------------------------------
    async def converge(self) -> list[str]:
        """Heal every fault, power everything on, resume, and form CGs until
        every C is A; then the final checks."""
        self.note("converge")
        self.waiting.clear()
        self.due.clear()
        self.sim.heal()
        for pair in self.pairs:
            for dom in (pair.pdom, pair.sdom):
                dom.disarm()
                dom.__dict__.pop("_event", None)  # an "in:PHASE" arm's counter (World._arm)
        deadline = self.clock.now() + CONVERGE_S
        resumed: set[int] = set()
        while self.clock.now() < deadline:
            await self.run_for(0.25)
            if self.restarts:
                continue
            for ctl, pair in enumerate(self.pairs):
                p = pair.primary
                if p.copy_state in (CopyState.PAUSED, CopyState.PAUSING) and ctl not in resumed:
                    self._spawn(self.command(ctl, "resume", ""), ctl)
                elif p.copy_state in (CopyState.SUSPENDED, CopyState.FATAL):
                    self._spawn(self.command(ctl, "resume_pair", ""), ctl)
            if self.tasks:
                continue
            if await self._converged():
                break
        else:
            return await self.check("after healing") + [f"(c) no convergence in {CONVERGE_S:g} s: "
                    + "; ".join(f"c{i} state {p.primary.copy_state.value} phase {p.primary.machine.phase.value} "
                                f"oos {p.primary.oos_tracks()} cr {p.primary.cr_tracks()} C at CG "
                                f"{p.secondary.committed_cg}" for i, p in enumerate(self.pairs))]
        out = []
        self.sim.quiet = True
        try:
            for ctl, pair in enumerate(self.pairs):
                a = await self._read_a(ctl)
                out += [f"(a) c{ctl} at the end: {x}" for x in self.models[ctl].lost_from(a)[:4]]
                if self.full_copies[ctl] and not pair.reformatted:
                    out.append(f"(d) c{ctl}: full resync without a reformat ({self.full_copies[ctl]} full_copy events)")
        finally:
            self.sim.quiet = False
        if self.session:
            seqs = {p.secondary.committed_cg for p in self.pairs}
            if len(seqs) > 1:
                out.append(f"(b) the members' C show different CGs at the end: {sorted(seqs)}")
        return out

    async def _converged(self) -> bool:
        self.sim.quiet = True
        try:
            for pair in self.pairs:
                p = pair.primary
                if p.machine.phase is not Phase.IDLE or p.oos_tracks() or p.cr_tracks():
                    return False
                a = await self._read_a(self.pairs.index(pair))
                _, c = await self._read_c(self.pairs.index(pair))
                if a != c:
                    return False
            return True
        finally:
            self.sim.quiet = False


async def _run(seed: int, events: list[list], res: Result, cfg: Config) -> None:
    # A dead controller's tasks end with PowerLost, never retrieved: that is the cut, not news.
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: None)
    world = World(seed, cfg, res)
    try:
        await world.boot()
        t0 = world.clock.now()
        for i, ev in enumerate(events):
            await world.run_to(t0 + ev[1])
            world.apply(ev)
            await world.run_for(0)
            found = await world.check(f"after event {i}") + world.clock.errors
            if found or res.violations:
                res.violations += found
                res.failed_at = i
                break
        if not res.violations:
            res.violations += await world.converge() + world.clock.errors
    except Livelock as e:
        res.violations.append(f"livelock: {e}")
    except (Exception, PowerLost) as e:  # noqa: BLE001 - a run that breaks is a finding with its seed, never the campaign's end
        log.debug("seed %d", seed, exc_info=True)
        res.violations.append(f"run failed: {type(e).__name__}: {e}")
    finally:
        res.virtual_s = world.clock.now() - 1000.0
        res.acked = sum(m.acked for m in world.models)
        if world.master is not None:
            world.master.stopping = True
        for t in [*world.tasks]:
            t.cancel()


class _NoIo(selectors._BaseSelectorImpl):  # noqa: SLF001 - its register/unregister bookkeeping, as is
    """A run does no I/O: nothing to poll. The default selector made an
    epoll call at every loop turn, a twentieth of a run's time (py-spy)."""

    def select(self, timeout=None):
        return []


def run_seed(seed: int, events: list[list] | None = None, *, keep_log: bool = True,
             cfg: Config | None = None) -> Result:
    """One run of ``seed`` (its own config and scenario, or these)."""
    cfg = cfg or config(seed)
    events = scenario(seed, cfg) if events is None else events
    res = Result(seed, cfg.as_dict(), len(events))
    quiet = [logging.getLogger(n) for n in ("asyncio", "firmware", "drivers")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)  # dead controllers' tasks and the CG failures faults cause
    try:
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(_NoIo())) as runner:
            runner.run(_run(seed, events, res, cfg))
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    res.digest()
    if not keep_log:
        res.log = []
    return res
