"""Session recovery: every member's C brought to one CG after crashes
(DESIGN.md section 3; issue 13).

- ``plan_recovery``/``recover``/``recover_members``: commit all when any
  member committed the highest prepared CG, revert all otherwise;
  ``failover`` then restores B from C on every member.
- ``MasterRecovery``, the master's part (SessionMaster, firmware/
  session_master.py, inherits it): given each member's secondary as a
  ``FlashPort`` (``secondaries``: a ControlRemote straight to that
  secondary's replication port, firmware/control_service.py says why),
  ``recover_session`` (the console's ``session recover``) applies
  ``recover`` between two CGs, then tells every member primary still in
  doubt the outcome (commit or fail of that CG), so its next start is not
  refused. The master's loop does this by itself (``auto_recover``,
  ``_check_recovery``) at its start and after a failed CG, when some
  secondary holds a CG prepared (a master or a member primary died between
  prepare and commit) and every secondary answers; until then
  ``status()["recovery"]`` says what waits for what.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from firmware.copystate import CopyState
from firmware.member import FlashPort, MemberError, RecoveryState

log = logging.getLogger(__name__)


def plan_recovery(states: Mapping[str, RecoveryState]) -> dict[str, str]:
    """What brings every member's C to one CG: with P the highest CG any
    member holds prepared, commit P everywhere it is prepared when any member
    already committed P (the master had passed the commit point), else revert
    every prepared CG. Returns {member: "commit" | "revert" | "none"}."""
    prepared = [s.prepared_seq for s in states.values() if s.prepared_seq is not None]
    if not prepared:
        return {name: "none" for name in states}
    top = max(prepared)
    roll_forward = any(s.committed_seq >= top for s in states.values())
    plan = {}
    for name, s in states.items():
        if s.prepared_seq is None:
            plan[name] = "none"
        elif roll_forward and s.prepared_seq == top:
            plan[name] = "commit"
        else:
            plan[name] = "revert"
    return plan


async def recover(members: Mapping[str, FlashPort]) -> dict[str, str]:
    """``session recover``: read every member's secondary, apply
    ``plan_recovery``, and check that every C now shows the same CG."""
    rows = await recover_members(members)
    return {r["name"]: r["action"] for r in rows}


async def recover_members(members: Mapping[str, FlashPort],
                          states: Mapping[str, RecoveryState] | None = None) -> list[dict]:
    """``recover`` with what each member did: one row per member with
    ``name``, ``committed_before``, ``prepared`` (the CG in doubt, or None),
    ``action`` (commit | revert | none) and ``committed`` (its C's CG after).
    MemberError when the Cs still differ afterwards."""
    names = list(members)
    if states is None:
        states = dict(zip(names, await asyncio.gather(*(members[n].recovery_state() for n in names)),
                          strict=True))
    plan = plan_recovery(states)

    async def apply(name: str) -> None:
        seq = states[name].prepared_seq
        if plan[name] == "commit":
            await members[name].commit_flash(seq)
        elif plan[name] == "revert":
            await members[name].revert_flash(seq)
    await asyncio.gather(*(apply(n) for n in names))
    after = await asyncio.gather(*(members[n].recovery_state() for n in names))
    seqs = {n: s.committed_seq for n, s in zip(names, after, strict=True)}
    if len(set(seqs.values())) > 1:
        raise MemberError(f"after recovery the members' C show different CGs: {seqs}")
    log.info("session recover: %s -> CG %s", plan, next(iter(seqs.values()), None))
    return [{"name": n, "committed_before": states[n].committed_seq, "prepared": states[n].prepared_seq,
             "action": plan[n], "committed": seqs[n]} for n in names]


async def failover(members: Mapping[str, FlashPort]) -> dict[str, int]:
    """Fast reverse restore C -> B on every member (after ``recover``: every C
    at one CG). Returns grains restored per member."""
    names = list(members)
    states = await asyncio.gather(*(members[n].recovery_state() for n in names))
    doubt = {n: s.prepared_seq for n, s in zip(names, states, strict=True) if s.prepared_seq is not None}
    seqs = {s.committed_seq for s in states}
    if doubt or len(seqs) > 1:
        raise MemberError(f"failover needs every C at one CG (session recover first): in doubt {doubt}, "
                          f"committed {sorted(seqs)}")
    grains = await asyncio.gather(*(members[n].fast_reverse_restore() for n in names))
    return dict(zip(names, grains, strict=True))


class MasterRecovery:
    """SessionMaster's recovery methods (they use the master's members,
    records, ``secondaries``, ``unresolved`` and ``resolve``)."""

    def _can_recover(self) -> bool:
        return all(m.name in self.secondaries for m in self.members)

    async def _states(self) -> dict[str, RecoveryState]:
        """Every member's secondary's state; MemberError naming those that do not answer."""
        timeout = max(1.0, self.params.max_coord_ms / 1000.0 * 20)
        names = [m.name for m in self.members]
        missing = [n for n in names if n not in self.secondaries]
        if missing:
            raise MemberError(f"session recover needs every member's secondary; not configured for "
                              f"{', '.join(missing)} ([session] secondaries on the master)")
        got = await asyncio.gather(*(self._bounded(self.secondaries[n].recovery_state(), timeout)
                                     for n in names), return_exceptions=True)
        silent = [f"{n} ({type(g).__name__}: {g})" for n, g in zip(names, got, strict=True)
                  if isinstance(g, BaseException)]
        if silent:
            raise MemberError(f"secondaries not reachable: {'; '.join(silent)}")
        return dict(zip(names, got, strict=True))

    async def recover_session(self, reason: str = "operator") -> list[dict]:
        """``session recover``: between two CGs, bring every member's C to one
        CG (``recover``), then tell each member primary still in doubt what
        became of its CG. One row per member (``recover_members``)."""
        async with self._formation:
            return await self._recover(await self._states(), reason)

    async def _recover(self, states: Mapping[str, RecoveryState], reason: str) -> list[dict]:
        rows = await recover_members({n: self.secondaries[n] for n in states}, states)
        cg = rows[0]["committed"] if rows else 0
        self.recovery["runs"] += 1
        self.recovery["last"] = {"reason": reason, "cg": cg, "time": self.clock.wall(),
                                 "actions": {r["name"]: r["action"] for r in rows}}
        self.recovery["needed"] = ""
        for r in rows:
            if r["action"] != "none":
                self.events.emit("change", f"member name:{r['name']}", recovery=r["action"], seq=r["prepared"],
                                 committed=r["committed"])
        self.events.emit("change", "session", recover=reason, cg=cg)
        log.info("session recover (%s): %s -> every C at CG %d", reason,
                 {r["name"]: r["action"] for r in rows}, cg)
        # Each member primary in doubt learns the outcome from its own secondary's C.
        committed = {r["name"]: r["committed"] for r in rows}
        for m in self.members:
            rec = self.records[m.name]
            doubt = rec.in_doubt_seq or self.unresolved.get(m.name, (0, ""))[0]
            if doubt:
                self.unresolved[m.name] = (doubt, "commit" if committed[m.name] >= doubt else "revert")
        if self.unresolved:
            await self.resolve()
        await self._refresh()
        for r in rows:
            r["member"] = self.records[r["name"]].state
        return rows

    async def _check_recovery(self, force: bool = False) -> None:
        """The loop's automatic recovery: at most once a second, look at every
        secondary; one holding a prepared CG (in doubt) means recover, once
        every secondary answers."""
        doubt = {n: r.in_doubt_seq for n, r in self.records.items() if r.in_doubt_seq}
        if not self.auto_recover or not self._can_recover():
            if doubt and not self.unresolved:
                self.recovery["needed"] = (f"CG in doubt at {doubt}: run session recover (the master has no "
                                           "[session] secondaries to do it by itself)")
            return
        now = self.clock.now()
        if not force and now - self._last_check < 1.0:
            return
        self._last_check = now
        try:
            states = await self._states()
        except MemberError as e:
            if doubt:
                self.recovery["needed"] = f"CG in doubt at {doubt}; recovery waits: {e}"
            return
        prepared = {n: s.prepared_seq for n, s in states.items() if s.prepared_seq is not None}
        if not prepared and all(n in self.unresolved for n in doubt):
            self.recovery["needed"] = ""  # nothing in doubt, or only what resolve() sends again
            return
        try:
            async with self._formation:
                await self._recover(states, "automatic")
        except Exception as e:  # noqa: BLE001 - said in status; the next check tries again
            self.recovery["needed"] = f"automatic recovery failed: {type(e).__name__}: {e}"
            log.warning("session: automatic recovery failed: %s", e)

    async def failover_session(self) -> dict[str, int]:
        """``session failover``: fast reverse restore C -> B on every member's
        secondary. Refused while CGs form (pause first) or a CG is in doubt."""
        if self.primary.copy_state is CopyState.RUNNING:
            raise MemberError("session failover: CGs are being formed; cg pause (or pair suspend) first")
        async with self._formation:
            await self._states()  # every secondary configured and answering
            grains = await failover(self.secondaries)
        self.events.emit("change", "session", failover="done", grains=sum(grains.values()))
        return grains
