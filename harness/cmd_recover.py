"""``mirrorfw recover --config MASTER.toml [--failover] [--json]``: session
recovery from the configs, without the master (issue 13).

It reads the master's config and talks straight to every member's
secondary: the master's own (``[link] peer``) and each subordinate's
(``[session] secondaries``), over the control link's sealed channel on the
secondary's replication port (firmware/control_service.py says why that
path). It reads what every C holds, applies ``plan_recovery`` (commit the
CG in doubt everywhere when any member committed it, else revert it), and
prints what each member did. ``--failover`` then restores B from C on every
member (fast reverse restore).

It works with every primary down, which is when it is needed most. A
running master recovers by itself (and its console has ``session recover``);
so that this command never reverts a CG a live master is about to commit, a
CG found prepared must stay prepared for ``--settle`` seconds (a master
commits within milliseconds of its last prepare), else it refuses. A
running master learns the outcome from the secondaries and tells its
members in doubt.
"""

from __future__ import annotations

import asyncio
import json
import os

from firmware.member import MemberError
from harness.errors import ConfigError, register

register(MemberError, 1)


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="the session master's config (master = true, secondaries)")
    p.add_argument("--failover", action="store_true",
                   help="after recovery, fast reverse restore C -> B on every member (the secondaries take over)")
    p.add_argument("--settle", type=float, default=2.0, metavar="S",
                   help="a prepared CG must stay so this long before it is resolved (default 2 s)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per-secondary call timeout")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def secondaries_of(cfg) -> dict[str, tuple[str, int]]:
    """Member name -> its secondary's address, named as the master names its members."""
    if cfg.session_role != "master":
        raise ConfigError(f"{cfg.path}: not a session master's config ([session] master = true)")
    if not cfg.session_secondaries:
        raise ConfigError(f"{cfg.path}: [session] secondaries is not set (each subordinate's secondary "
                          "[link] listen, in the order of subordinates)")
    names = ["master"] + [f"{host}:{port}" for host, port in cfg.session_subordinates]
    return dict(zip(names, [cfg.link_peer, *cfg.session_secondaries], strict=True))


async def recover_from_config(cfg, *, failover: bool = False, settle_s: float = 2.0,
                              timeout_s: float = 10.0) -> dict:
    """Recover every member's secondary; returns {"members": rows, "cg": N[, "grains": {...}]}."""
    from firmware.control_remote import ControlRemote
    from firmware.session_recovery import failover as fast_reverse_restore_all
    from firmware.session_recovery import recover_members
    from harness.controller import connect_replication_link

    remotes = {}
    for name, (host, port) in secondaries_of(cfg).items():
        async def dial(host=host, port=port):
            return await connect_replication_link(host, port)

        remotes[name] = ControlRemote(f"{host}:{port}", dial, cfg.secret, session_id=cfg.session_id,
                                      random_bytes=os.urandom, master_name="mirrorfw-recover",
                                      call_timeout_s=timeout_s, drain_timeout_s=max(timeout_s, 300.0))
    try:
        states = await _states(remotes)
        if any(s.prepared_seq is not None for s in states.values()) and settle_s > 0:
            await asyncio.sleep(settle_s)
            again = await _states(remotes)
            if again != states:
                moved = {n: (states[n], again[n]) for n in states if states[n] != again[n]}
                raise MemberError(f"the secondaries changed within {settle_s:g} s ({moved}): a master is "
                                  "forming CGs; it recovers by itself (or use its console's session recover)")
        rows = await recover_members(remotes, states)
        out = {"members": rows, "cg": rows[0]["committed"] if rows else 0}
        if failover:
            out["grains"] = await fast_reverse_restore_all(remotes)
        return out
    finally:
        for r in remotes.values():
            await r.close()


async def _states(remotes) -> dict:
    names = list(remotes)
    got = await asyncio.gather(*(remotes[n].recovery_state() for n in names), return_exceptions=True)
    silent = [f"{n} ({remotes[n].name}): {g}" for n, g in zip(names, got, strict=True) if isinstance(g, BaseException)]
    if silent:
        raise MemberError(f"secondaries not reachable: {'; '.join(silent)}")
    return dict(zip(names, got, strict=True))


def run(args) -> int:
    from firmware.console_format import recovery_text
    from harness.config import load_config

    cfg = load_config(args.config, role="primary")
    out = asyncio.run(recover_from_config(cfg, failover=args.failover, settle_s=args.settle,
                                          timeout_s=args.timeout))
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(recovery_text(out["members"], out["cg"]))
    for name, grains in (out.get("grains") or {}).items():
        print(f"{name}: B restored from C ({grains} grains)")
    if "grains" in out:
        print("failover: done; every B is its C")
    return 0
