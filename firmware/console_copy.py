"""The console's handlers that act on the copy: CG formation and the pair
(``cg ...``, ``run``, ``pause``, ``pair ...``), the session master's
``session recover``/``session failover`` and the secondary's named
snapshots. CommandSet (firmware/console.py) inherits them; its table binds
each row to one of these methods."""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any

from firmware import console_format as fmt
from firmware.console_grammar import CommandError
from firmware.member import MemberError
from firmware.pins import SnapshotError


@contextmanager
def refused_as(what: str, *kinds: type[Exception]) -> Iterator[None]:
    """The controller's refusal (one of ``kinds``) becomes the command's error."""
    try:
        yield
    except kinds as exc:
        raise CommandError(f"{what}: {fmt.one_line(exc)}") from None


class CopyCommands:
    controller: Any
    role: str

    # ---- cg / pair ----------------------------------------------------------

    async def _after(self, done: Awaitable[None]) -> dict:
        """Await one controller command, then the session fields its reply shows."""
        await done
        status = self.controller.status()
        return {k: status.get(k) for k in ("copy_state", "phase", "cg_seq", "total_successful_cgs",
                                           "total_failed_cgs", "severity")}

    async def _cg_start(self, args, flags, as_json):
        data = await self._after(self.controller.cg_start())
        return data, f"cg start: done; copy_state {data['copy_state']}", None

    async def _cg_pause(self, args, flags, as_json):
        data = await self._after(self.controller.cg_pause())
        return data, f"cg pause: done; copy_state {data['copy_state']}", None

    async def _cg_resume(self, args, flags, as_json):
        data = await self._after(self.controller.cg_resume())
        return data, f"cg resume: done; copy_state {data['copy_state']}", None

    async def _cg_run(self, args, flags, as_json):
        data = await self._after(self.controller.run())
        return data, (f"cg run: done; copy_state {data['copy_state']}, phase {data['phase']}, "
                      f"cg_seq {data['cg_seq']}"), None

    async def _cg_fail(self, args, flags, as_json):
        reason = args.get("REASON") or "operator"
        data = await self._after(self.controller.cg_fail(reason))
        data["reason"] = reason
        return data, f"cg fail: done ({reason}); failed CGs {data['total_failed_cgs']}", None

    async def _pair_suspend(self, args, flags, as_json):
        data = await self._after(self.controller.suspend())
        return data, f"pair suspend: done; copy_state {data['copy_state']}", None

    async def _pair_resume(self, args, flags, as_json):
        data = await self._after(self.controller.resume_pair())
        return data, f"pair resume: done; copy_state {data['copy_state']}", None

    # ---- session (the master of a multi-controller session) -------------------

    def _master(self):
        master = getattr(self.controller, "session_master", None)
        if master is None:
            member = getattr(self.controller, "session_member", None)
            where = (f"; it is a subordinate (master {member.master or 'not connected'}): run it on the master"
                     if member is not None else "")
            raise CommandError(f"this primary is not a session's master{where}")
        return master

    async def _session_recover(self, args, flags, as_json):
        master = self._master()
        with refused_as("session recover", MemberError):
            rows = await master.recover_session("operator")
        cg = rows[0]["committed"] if rows else 0
        return {"members": rows, "cg": cg}, fmt.recovery_text(rows, cg), None

    async def _session_failover(self, args, flags, as_json):
        master = self._master()
        with refused_as("session failover", MemberError):
            grains = await master.failover_session()
        lines = [f"{name}: B restored from C ({n} grains)" for name, n in grains.items()]
        return {"grains": grains}, "\n".join(lines + ["session failover: done; every B is its C"]), None

    # ---- snapshots (secondary) ------------------------------------------------

    async def _snapshot_create(self, args, flags, as_json):
        with refused_as("snapshot create", SnapshotError):
            made = self.controller.snapshot_create(args["NAME"])
        return made, f"snapshot {made['name']}: CG {made['cg']}, exported as {', '.join(made['exports'])}", None

    async def _snapshot_delete(self, args, flags, as_json):
        with refused_as("snapshot delete", SnapshotError):
            gone = self.controller.snapshot_delete(args["NAME"])
        return gone, f"snapshot {gone['name']} (CG {gone['cg']}) deleted", None

    async def _snapshot_list(self, args, flags, as_json):
        snaps = self.controller.snapshot_list()
        pins = self.controller.status().get("pins") or {}
        data = {"snapshots": snaps, "pinned_bytes": pins.get("pinned_bytes"),
                "max_pinned_bytes": pins.get("max_pinned_bytes")}
        table = fmt.columns(["name", "cg", "kept_bytes", "lost"], snaps) if snaps else "no snapshots"
        budget = (f"kept in memory by every pin: {data['pinned_bytes']} of max_pinned_bytes "
                  f"{data['max_pinned_bytes']} bytes")
        return data, f"{table}\n{budget}", None
