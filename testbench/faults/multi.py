"""The fault campaign across controllers (issue 13): a session of 3 primaries
(c0 the master, c1 and c2 subordinates) and their 3 secondaries as real
processes, stamped writes on all of them, one controller SIGKILLed at each
phase of a session CG, and what every C shows afterwards.

The workload has cross-controller dependencies: each worker owns the same
LBA range on every controller's volume and issues its next write on another
controller only once the previous one was acknowledged (a write on c1
acked, then a write on c2). The history is one log over every volume
(volume index = controller), so the checker judges one cut with one T*
across all volumes of all controllers.

A round: a fresh session, the initial copy done, a declared crash point
armed on the victim (``fault arm NAME after N``, N from the seed), the
workload until the victim dies, a second of writes on the controllers still
up, then the victim restarted from its NVRAM and the session left to
recover: by itself (the master's automatic recovery), or with ``mirrorfw
recover --config MASTER`` while the master is down (the master's
between-prepare-and-commit round). Then:

- every primary's A shows every write it acknowledged (``acked_writes_lost``);
- C is read at one CG on every secondary (testbench.cli_demo's
  ``session_copy``: ``cg pause`` on the master, every secondary at one
  committed CG, ``snapshot create``, ``cg resume``, read ``VOLUME@NAME``)
  and checked as one cut (``inconsistent_copies``), right after recovery and
  again once every member caught up; after catching up C must also hold
  every acknowledged write (counted as lost otherwise);
- when no moment with every secondary at one CG comes, the CGs committed on
  some members only are counted (``split_cgs``, max - min committed CG
  while paused).

The secondary takes no part in quiescing, so no point is declared there: its
quiescing round SIGKILLs it at a random moment of the workload instead
(``untargeted``).

``run_delay``: a LinkProxy between the master and c1's control port; with a
delay longer than the coordination time every CG fails everywhere (no C
moves on any member while it lasts) and, once the delay is gone, the next CG
commits everywhere, checked as above.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.console_client import ConsoleClient
from harness.supervise import ControllerProcess, start_controller, write_session_configs
from testbench import stamp
from testbench.cli_demo import PrimaryConsole, SecondaryConsole, session_copy
from testbench.faults.workload import lost_acked_writes, read_volume
from testbench.replaylog import WriteRecord

log = logging.getLogger(__name__)

CONTROLLERS = 3
VOLUME_SIZE = "4MiB"
VOLUME_BYTES = 4 << 20
BLOCK = 512
CG_INTERVAL_S = 0.05
MAX_COORD_MS = 50.0
RECOVER_TIMEOUT_S = 30.0
CATCH_UP_TIMEOUT_S = 90.0
OUTAGE_WRITES_S = 1.0  # writes on the controllers still up while the victim is down


@dataclass(frozen=True)
class Round:
    victim: str  # master | subordinate | secondary
    phase: str  # quiescing | draining | prepared | committing
    point: str | None  # None: untargeted SIGKILL at a random moment
    controller: int  # whose primary or secondary dies


# One declared point per (victim, phase); the secondary of c1 (a subordinate's).
ROUNDS = (
    Round("master", "quiescing", "primary.after_recording_on", 0),
    Round("master", "draining", "primary.mid_drain", 0),
    Round("master", "prepared", "session.after_prepare_all", 0),
    Round("master", "committing", "session.after_member_commit", 0),
    Round("subordinate", "quiescing", "primary.after_recording_on", 1),
    Round("subordinate", "draining", "primary.mid_drain", 1),
    Round("subordinate", "prepared", "primary.after_prepare", 1),
    Round("subordinate", "committing", "primary.after_commit", 1),
    Round("secondary", "quiescing", None, 1),
    Round("secondary", "draining", "secondary.mid_flashcopy", 1),
    Round("secondary", "prepared", "secondary.after_prepare", 1),
    Round("secondary", "committing", "secondary.mid_commit", 1),
)
QUICK = ("master/prepared", "master/committing", "subordinate/quiescing", "subordinate/committing",
         "secondary/prepared")


def round_name(r: Round) -> str:
    return f"{r.victim}/{r.phase}"


def multi_points() -> list[str]:
    """The declared points the rounds use (each must exist)."""
    import firmware.primary  # noqa: F401 - importing declares the points
    import firmware.secondary  # noqa: F401
    import firmware.session_master  # noqa: F401
    from firmware.crashpoints import POINTS

    used = sorted({r.point for r in ROUNDS if r.point})
    missing = [p for p in used if p not in POINTS]
    if missing:
        raise RuntimeError(f"crash points not declared by the firmware: {missing}")
    return used


# ------------------------------------------------------------------ the workload
class CrossWorkload:
    """Stamped writes over every controller's volume: each worker owns one LBA
    range (the same on every volume) and one write in flight, and moves to
    another controller after each ack. Write ids are unique across runs."""

    def __init__(self, controllers: int, size_bytes: int, *, seed: int, max_blocks: int = 16) -> None:
        self.controllers = controllers
        self.size_bytes = size_bytes
        self.rng = random.Random(seed)
        self.max_blocks = max_blocks
        self.history: list[WriteRecord] = []
        self.next_id = 1
        self.errors = 0
        self.cross = 0  # writes issued on another controller than the worker's previous (acked) one

    @property
    def acked(self) -> int:
        return sum(1 for w in self.history if w.ack_ns is not None)

    def volume_history(self, v: int) -> list[WriteRecord]:
        return [w for w in self.history if w.volume == v]

    async def run(self, urls: dict[int, str], workers: int, seconds: float, stop=lambda: False) -> None:
        """``urls``: controller -> its vol0 NBD URL (only those up). A worker
        ends at its first error (that controller went away)."""
        from drivers.nbd.client import open_async

        devs = {}
        for v, url in urls.items():
            try:
                devs[v] = await open_async(url)
            except Exception as e:  # noqa: BLE001 - a dead controller refuses: nothing issued there
                log.info("multi workload: cannot connect %s: %s", url, e)
                self.errors += 1
        if not devs:
            return
        blocks = self.size_bytes // BLOCK
        per = blocks // workers
        deadline = time.monotonic() + seconds
        up = sorted(devs)

        async def worker(k: int) -> None:
            rng = random.Random(self.rng.random())
            first = k * per
            prev = None
            while time.monotonic() < deadline and not stop():
                choices = [v for v in up if v != prev] or up
                v = rng.choice(choices)
                n = rng.randrange(1, min(self.max_blocks, per) + 1)
                lba = first + rng.randrange(0, per - n + 1)
                wid = self.next_id
                self.next_id += 1
                w = WriteRecord(wid, v, lba, n, time.monotonic_ns(), None)
                self.history.append(w)
                try:
                    await devs[v].write(lba, stamp.encode(wid, v, lba, n, BLOCK))
                except Exception:  # noqa: BLE001 - never acknowledged: in flight for the checker
                    w.failed = True
                    self.errors += 1
                    return
                w.ack_ns = time.monotonic_ns()
                self.cross += prev is not None and prev != v
                prev = v

        try:
            await asyncio.gather(*(worker(k) for k in range(workers)))
        finally:
            for d in devs.values():
                d.close()


# ------------------------------------------------------------------ the session
class Session:
    """3 primaries + 3 secondaries as processes; consoles opened on demand."""

    def __init__(self, workdir: Path, *, session_params: dict | None = None) -> None:
        params = {"cg_interval_s": CG_INTERVAL_S, "max_coord_ms": MAX_COORD_MS} | (session_params or {})
        self.configs = write_session_configs(workdir, controllers=CONTROLLERS, size=VOLUME_SIZE,
                                             nvram_size="16MiB", console=True, session=params)
        self.primaries: list[ControllerProcess | None] = [None] * CONTROLLERS
        self.secondaries: list[ControllerProcess | None] = [None] * CONTROLLERS
        self._master: PrimaryConsole | None = None
        self._secs: dict[int, SecondaryConsole] = {}

    def start_all(self) -> None:
        # Secondaries, then subordinates (they listen before the master dials), then the master.
        for i in range(CONTROLLERS):
            self.start("secondary", i, format=True)
        for i in [*range(1, CONTROLLERS), 0]:
            self.start("primary", i, format=True)

    def start(self, role: str, i: int, *, format: bool = False) -> ControllerProcess:
        pair = self.configs.pairs[i]
        if role == "primary":
            if i == 0:
                self._close_master()
            self.primaries[i] = start_controller(pair.primary, format=format, verbose=0)
            return self.primaries[i]
        self._close_sec(i)
        self.secondaries[i] = start_controller(pair.secondary, format=format, verbose=0)
        return self.secondaries[i]

    def proc(self, role: str, i: int) -> ControllerProcess:
        return (self.primaries if role == "primary" else self.secondaries)[i]

    def console(self, role: str, i: int) -> ConsoleClient:
        return ConsoleClient(self.proc(role, i).ready["console"], timeout_s=20.0)

    def urls(self, up: list[int]) -> dict[int, str]:
        return {i: f"nbd://{self.primaries[i].ready['nbd']}/vol0" for i in up}

    @property
    def master(self) -> PrimaryConsole:
        if self._master is None:
            self._master = PrimaryConsole(self.primaries[0].ready["console"])
        return self._master

    def sec(self, i: int) -> SecondaryConsole:
        if i not in self._secs:
            self._secs[i] = SecondaryConsole(self.secondaries[i].ready["console"])
        return self._secs[i]

    def secs(self) -> list[SecondaryConsole]:
        return [self.sec(i) for i in range(CONTROLLERS)]

    def _close_master(self) -> None:
        if self._master is not None:
            try:
                self._master.close()
            except Exception:  # noqa: BLE001 - the master may be dead
                pass
            self._master = None

    def _close_sec(self, i: int) -> None:
        con = self._secs.pop(i, None)
        if con is not None:
            try:
                con.close()
            except Exception:  # noqa: BLE001 - the secondary may be dead
                pass

    def drop(self, role: str, i: int) -> None:
        if role == "primary" and i == 0:
            self._close_master()
        elif role == "secondary":
            self._close_sec(i)

    def committed(self) -> list[tuple[int, int | None]]:
        return [s.committed() for s in self.secs()]

    def wait_healthy(self, timeout_s: float, *, after_cgs: int | None = None) -> dict:
        """Until no secondary holds a CG prepared, every member is ok and caught
        up (no OOS, no CR) and the master committed a CG since ``after_cgs``."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.master.status()
            seen = self.committed()
            members = st.get("members", [])
            if (all(p is None for _, p in seen) and members and all(m["state"] == "ok" for m in members)
                    and not any(m["oos_tracks"] or m["cr_tracks"] for m in members)
                    and st["copy_state"] == "Running"
                    and (after_cgs is None or st["total_successful_cgs"] > after_cgs)):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"session not healthy after {timeout_s} s: secondaries (committed, prepared) "
                                   f"{seen}, members {[(m['name'], m['state'], m['oos_tracks'], m['cr_tracks']) for m in members]}, "
                                   f"copy_state {st['copy_state']}, recovery {st.get('session', {}).get('recovery')}")
            time.sleep(0.1)

    def split_cgs(self, timeout_s: float = 5.0) -> tuple[int, list]:
        """With the master paused: CGs committed on some secondaries only
        (max - min committed CG once the commits in flight have landed)."""
        self.master.pause()
        try:
            deadline = time.monotonic() + timeout_s
            seen = self.committed()
            while time.monotonic() < deadline and (len({c for c, _ in seen}) > 1 or any(p for _, p in seen)):
                time.sleep(0.05)
                seen = self.committed()
        finally:
            self.master.resume()
        cgs = [c for c, _ in seen]
        return max(cgs) - min(cgs), seen

    def close(self) -> None:
        self._close_master()
        for i in list(self._secs):
            self._close_sec(i)
        for proc in [*self.primaries, *self.secondaries]:
            if proc is not None and proc.alive():
                proc.kill()


async def _check_cs(session: Session, history: list[WriteRecord], name: str, *, want_all: bool) -> dict:
    """One cut across every C at one CG; ``want_all``: C must also hold every
    acknowledged write (the session caught up and nothing is in flight)."""
    from drivers.nbd.client import open_async
    from testbench.checker import check_copy

    names = [f"c{i}/vol0" for i in range(CONTROLLERS)]
    urls = [f"nbd://{session.secondaries[i].ready['nbd']}/vol0@{name}" for i in range(CONTROLLERS)]
    async with session_copy(session.master, session.secs(), name, urls) as copy:
        devs = [await open_async(u, read_only=True) for u in copy]
        try:
            res = await check_copy(devs, history, names=names)
        finally:
            for d in devs:
                d.close()
        lost, examples = 0, []
        if want_all:
            for v, url in enumerate(copy):
                n, ex = lost_acked_writes(await read_volume(url), [w for w in history if w.volume == v], BLOCK)
                lost += n
                examples += [f"c{v} C: {e}" for e in ex]
    return {"cg": copy.cg, "consistent": res.consistent, "shown_writes": res.shown_writes,
            "violations": [v.as_dict() for v in res.violations[:3]], "c_lost": lost, "c_lost_examples": examples[:5]}


def _check_session(session: Session, wl: CrossWorkload, r: dict, tag: str, *, want_all: bool) -> None:
    """The C check of a round (adds to r's counters); a session that never
    shows one CG on every secondary counts its split CGs instead."""
    try:
        c = asyncio.run(_check_cs(session, wl.history, f"multi-{tag}", want_all=want_all))
    except RuntimeError as e:  # snapshot_session found no moment with every secondary at one CG
        split, seen = session.split_cgs()
        r["split_cgs"] += max(split, 1)
        r.setdefault("problems", []).append(f"{tag}: {e}; secondaries (committed, prepared) {seen}")
        return
    r["checks"].append({"tag": tag, **{k: c[k] for k in ("cg", "consistent", "shown_writes")}})
    if not c["consistent"]:
        r["inconsistent_copies"] += 1
        r.setdefault("violations", []).extend(c["violations"])
    if c["c_lost"]:
        r["acked_writes_lost"] += c["c_lost"]
        r.setdefault("lost_examples", []).extend(c["c_lost_examples"])


def _check_primaries(session: Session, wl: CrossWorkload, r: dict) -> None:
    """Every primary's A shows every write it acknowledged."""
    for i in range(CONTROLLERS):
        image = asyncio.run(read_volume(session.urls([i])[i]))
        n, ex = lost_acked_writes(image, wl.volume_history(i), BLOCK)
        r["acked_writes_lost"] += n
        if n:
            r.setdefault("lost_examples", []).extend(f"c{i} A: {e}" for e in ex)


def _recover_cli(session: Session, settle_s: float = 0.5) -> dict:
    out = subprocess.run([sys.executable, "-m", "harness.cli", "recover", "--config",
                          str(session.configs.master.primary), "--settle", str(settle_s)],
                         capture_output=True, text=True, timeout=120)
    return {"rc": out.returncode, "out": out.stdout.strip().splitlines()[-1:] or out.stderr.strip().splitlines()[-1:]}


# ------------------------------------------------------------------ part 1: crash rounds
def run_multi(workdir: Path, *, seed: int, quick: bool = False, seconds_per_round: float = 4.0,
              rounds: list[str] | None = None, delay: bool = True, progress=print) -> dict:
    """Every round (or ``rounds`` by name, ``victim/phase``; ``quick``: a few),
    then the delayed-subordinate part. Returns faults/results.json "multi"."""
    multi_points()
    rng = random.Random(seed)
    chosen = [r for r in ROUNDS if (round_name(r) in rounds if rounds else (not quick or round_name(r) in QUICK))]
    out = {"controllers": CONTROLLERS, "injected": 0, "acked_writes_lost": 0, "inconsistent_copies": 0,
           "split_cgs": 0, "rounds": {}, "not_hit": [], "errors": []}
    for rd in chosen:
        name = round_name(rd)
        work = workdir / name.replace("/", "_")
        skip = rng.randrange(0, 3)
        t0 = time.monotonic()
        try:
            r = _one_round(work, rd, skip, seconds_per_round, rng.randrange(1 << 30),
                           recover_by_cli=rd.victim == "master" and rd.phase == "prepared")
        except Exception as e:  # noqa: BLE001 - a round that breaks is reported, the campaign goes on
            log.debug("multi round %s", name, exc_info=True)
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "kept": str(work)}
            out["errors"].append(f"{name}: {r['error']}")
        r["seconds"] = round(time.monotonic() - t0, 1)
        out["rounds"][name] = r
        _add(out, r, name)
        progress(f"multi {name}: {_brief(r)}")
    if delay:
        t0 = time.monotonic()
        try:
            r = run_delay(workdir / "delay", seed=rng.randrange(1 << 30), seconds=2.0 if quick else 4.0)
        except Exception as e:  # noqa: BLE001 - reported as a round that broke
            log.debug("multi delay", exc_info=True)
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                 "kept": str(workdir / "delay")}
            out["errors"].append(f"delay: {r['error']}")
        r["seconds"] = round(time.monotonic() - t0, 1)
        out["delay"] = r
        _add(out, r, "delay")
        progress(f"multi delay: {_brief(r)}")
    return out


def _add(out: dict, r: dict, name: str) -> None:
    if r.get("hit"):
        out["injected"] += 1
        for k in ("acked_writes_lost", "inconsistent_copies", "split_cgs"):
            out[k] += r.get(k, 0)
        out["errors"] += [f"{name}: {p}" for p in r.get("problems", [])]
    elif "error" not in r:
        out["not_hit"].append(name)


def _brief(r: dict) -> str:
    keys = ("hit", "point", "recovery", "acked", "cross_writes", "acked_writes_lost", "inconsistent_copies",
            "split_cgs", "failed_cgs", "error", "problems", "seconds")
    return ", ".join(f"{k} {r[k]}" for k in keys if k in r)


def _new_counters(r: dict) -> None:
    r.update({"acked_writes_lost": 0, "inconsistent_copies": 0, "split_cgs": 0, "checks": []})


def _one_round(work: Path, rd: Round, skip: int, seconds: float, seed: int, *, recover_by_cli: bool) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    session = Session(work)
    role = "secondary" if rd.victim == "secondary" else "primary"
    r: dict = {"point": rd.point or "untargeted SIGKILL", "controller": rd.controller, "skip": skip, "hit": False}
    try:
        session.start_all()
        session.wait_healthy(60, after_cgs=0)  # the initial copies are behind us
        wl = CrossWorkload(CONTROLLERS, VOLUME_BYTES, seed=seed)
        victim = session.proc(role, rd.controller)
        if rd.point:
            with session.console(role, rd.controller) as con:
                con.run_check(f"fault arm {rd.point} after {skip}")
            asyncio.run(wl.run(session.urls(list(range(CONTROLLERS))), 8, seconds, stop=lambda: not victim.alive()))
            if victim.alive():
                time.sleep(0.5)  # a CG-side point may fire just after the last write
        else:
            # No point is declared on a secondary while the primaries quiesce: kill it at a random moment.
            kill_at = time.monotonic() + random.Random(seed).uniform(0.3, seconds * 0.7)

            def stop() -> bool:
                if time.monotonic() >= kill_at and victim.alive():
                    victim.kill()
                return not victim.alive()
            asyncio.run(wl.run(session.urls(list(range(CONTROLLERS))), 8, seconds, stop=stop))
        if victim.alive():
            with session.console(role, rd.controller) as con:
                con.run_json(f"fault disarm {rd.point}", check=False)
            return r
        r["hit"] = True
        _new_counters(r)
        victim.wait(10)
        if rd.point:
            r["hit_logged"] = f"crash point {rd.point} hit" in victim.logs()
        session.drop(role, rd.controller)
        # The controllers still up go on while the victim is down (the master down: every subordinate too).
        up = [i for i in range(CONTROLLERS) if role == "secondary" or i != rd.controller]
        asyncio.run(wl.run(session.urls(up), 4, OUTAGE_WRITES_S))
        r["acked"], r["cross_writes"] = wl.acked, wl.cross
        if recover_by_cli:
            r["recovery"] = "mirrorfw recover"
            r["recover_cli"] = _recover_cli(session)
        else:
            r["recovery"] = "automatic"
        before = session.master.status()["total_successful_cgs"] if rd.controller != 0 or role != "primary" else 0
        session.start(role, rd.controller)
        _check_primaries(session, wl, r)
        try:
            session.wait_healthy(RECOVER_TIMEOUT_S, after_cgs=before if before else None)
        except TimeoutError as e:
            r.setdefault("problems", []).append(str(e))
        st = session.master.status()
        r["failed_cgs"] = st["total_failed_cgs"]
        r["session_recovery"] = (st.get("session") or {}).get("recovery", {}).get("last")
        _check_session(session, wl, r, "after-recovery", want_all=False)
        if r.get("problems"):  # the session did not recover: catching up would only time out again
            return r
        # More cross-controller writes, then catch up: C holds every acked write.
        asyncio.run(wl.run(session.urls(list(range(CONTROLLERS))), 8, 1.0))
        r["acked"], r["cross_writes"] = wl.acked, wl.cross
        after = session.master.status()["total_successful_cgs"]
        session.wait_healthy(CATCH_UP_TIMEOUT_S, after_cgs=after)
        _check_session(session, wl, r, "caught-up", want_all=True)
        return r
    except BaseException:
        r["kept"] = str(work)  # the logs of a round that broke, for a repro
        raise
    finally:
        session.close()
        _clean(work, r)


def _clean(work: Path, r: dict) -> None:
    """Remove a round's folder, unless something went wrong there: then keep
    its configs and logs (not the images) for a repro."""
    bad = r.get("problems") or r.get("inconsistent_copies") or r.get("acked_writes_lost") or r.get("split_cgs")
    if bad or r.get("kept"):
        r["kept"] = str(work)
        for img in work.glob("c*/*.img"):
            img.unlink(missing_ok=True)
        return
    shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ part 2: a slow subordinate
def run_delay(work: Path, *, seed: int, seconds: float = 4.0, delay_s: float | None = None) -> dict:
    """c1's control link through a LinkProxy; a delay of 4x the coordination
    time on every frame towards c1 fails every CG everywhere while it lasts;
    without it the session commits again."""
    from harness.faults import LinkFaultPlan, LinkProxyThread

    shutil.rmtree(work, ignore_errors=True)
    delay_s = delay_s if delay_s is not None else 4 * MAX_COORD_MS / 1000.0
    session = Session(work)
    port = session.configs.control_ports[1]
    plan = LinkFaultPlan(seed=seed, direction="send")
    proxy = LinkProxyThread(f"127.0.0.1:{port}", plan)
    cfg = session.configs.master.primary
    cfg.write_text(cfg.read_text().replace(f'"127.0.0.1:{port}"', f'"{proxy.address}"', 1))
    r: dict = {"hit": False, "delay_ms": delay_s * 1000, "proxy": proxy.address}
    try:
        session.start_all()
        session.wait_healthy(60, after_cgs=0)
        wl = CrossWorkload(CONTROLLERS, VOLUME_BYTES, seed=seed)
        all_up = list(range(CONTROLLERS))
        asyncio.run(wl.run(session.urls(all_up), 8, 1.0))
        st0 = session.master.status()
        plan.delay_s = delay_s  # frames the proxy sends to c1 from now on
        # The CG in flight when the delay began may still commit: hold the Cs from the first failure on.
        deadline = time.monotonic() + 10
        while session.master.status()["total_failed_cgs"] == st0["total_failed_cgs"]:
            if time.monotonic() > deadline:
                r["problems"] = ["no CG failed with the delay on"]
                return r
            time.sleep(0.02)
        r["hit"] = True
        _new_counters(r)
        time.sleep(3 * delay_s)  # a delayed answer still queued may land on the CG that failed only
        held = session.committed()
        st1 = session.master.status()
        asyncio.run(wl.run(session.urls(all_up), 8, seconds))
        st2 = session.master.status()
        moved = session.committed()
        # The first CG fails everywhere; while c1 still owes the answer to its fail the master
        # starts no other CG (it sends the fail again first), so later ones are not counted as failed.
        r["failed_cgs"] = st2["total_failed_cgs"] - st0["total_failed_cgs"]
        r["committed_cgs_while_delayed"] = st2["total_successful_cgs"] - st1["total_successful_cgs"]
        r["last_reason"] = (st2.get("session") or {}).get("last_reason")
        r["unresolved_while_delayed"] = (st2.get("session") or {}).get("unresolved")
        r["cs_held"] = [c for c, _ in held]
        if [c for c, _ in moved] != [c for c, _ in held] or r["committed_cgs_while_delayed"]:
            r.setdefault("problems", []).append(f"a C moved while c1 was delayed: {held} -> {moved}")
        _check_session_held(session, wl, r)
        plan.delay_s = 0.0
        t0 = time.monotonic()
        session.wait_healthy(RECOVER_TIMEOUT_S, after_cgs=st2["total_successful_cgs"])
        r["recovered_after_s"] = round(time.monotonic() - t0, 2)
        r["cs_after"] = [c for c, _ in session.committed()]
        _check_primaries(session, wl, r)
        _check_session(session, wl, r, "after-delay", want_all=True)
        return r
    except BaseException:
        r["kept"] = str(work)
        raise
    finally:
        session.close()
        proxy.close()
        _clean(work, r)


def _check_session_held(session: Session, wl: CrossWorkload, r: dict) -> None:
    """While the CGs fail, a pause leaves the Cs where they were: one cut."""
    _check_session(session, wl, r, "while-delayed", want_all=False)
