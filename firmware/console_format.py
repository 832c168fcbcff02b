"""How console replies look: aligned text for the operator, plain JSON for
scripts. Pure functions of the values they are given; no controller here.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

HELP_USAGE_CHARS = 40  # wider usages go on a line of their own in `help`

# The status fields every primary status reply carries, in display order
# (IBM Copy Services Manager vocabulary first). Missing values show as null.
STATUS_KEYS = (
    "copy_state", "fatal_reason", "severity", "recoverable", "phase", "cg_seq",
    "last_cg_time", "data_exposure_s", "total_successful_cgs", "total_failed_cgs",
    "consecutive_failures", "cg_interval_s", "max_coord_ms", "max_drain_s",
    "collision_policy", "oos_tracks", "cr_tracks", "held_ack_ms", "drain_bytes", "link", "cache_full_waits",
)
CACHE_KEYS = ("slots", "used", "dual", "dirty", "hits", "misses", "destaged", "occupancy")
SECONDARY_STATUS_KEYS = ("role", "session_id", "committed_cg", "last_commit_time", "prepared_cg",
                         "established", "receiving_cg", "received_tracks", "received_bytes", "cow_copies",
                         "volumes")


def table(rows: list[tuple[str, str]]) -> str:
    """``key  value`` lines, the keys padded to one width."""
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def columns(keys: list[str], records: list[dict]) -> str:
    """A header row of ``keys``, then one row per record, each column padded to its widest cell."""
    rows = [keys] + [[show(k, r.get(k)) for k in keys] for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def show(key: str, value: Any) -> str:
    """One value as the operator reads it: '-' for absent, yes/no, UTC times, 4 significant digits."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_time") and isinstance(value, (int, float)):
        when = datetime.datetime.fromtimestamp(value, tz=datetime.UTC)
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={show(k, v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(show(key, v) for v in value) or "-"
    return str(value)


MEMBER_COLUMNS = ("name", "state", "phase", "link", "last_cg", "last_cg_time", "held_ack_ms", "oos_tracks",
                  "cr_tracks", "in_doubt_seq", "reason")


def members_table(members: list[dict]) -> str:
    """A session master's members, one row each; held_ack_ms as p99/max."""
    rows = []
    for m in members:
        held = m.get("held_ack_ms") or {}
        rows.append(m | {"held_ack_ms": f"{show('', held.get('p99', 0.0))}/{show('', held.get('max', 0.0))}"
                         if held else None, "in_doubt_seq": m.get("in_doubt_seq") or None})
    return columns(list(MEMBER_COLUMNS), rows)


def session_line(session: dict) -> str:
    """The session role in one line of `status`."""
    if session["role"] == "subordinate":
        master = session.get("master") or f"not connected ({session.get('master_down_reason') or 'none yet'})"
        doubt = f", CG {session['in_doubt_seq']} in doubt" if session.get("in_doubt_seq") else ""
        return f"subordinate {session['name']} of master {master}{doubt}"
    rec = session.get("recovery") or {}
    line = (f"master of {session['members']} members; CG {session['cg_seq']}, {session['successful']} committed, "
            f"{session['failed']} failed")
    if session.get("unresolved"):
        line += f"; in doubt (outcome known, to resend): {show('', session['unresolved'])}"
    if rec.get("needed"):
        line += f"; RECOVERY NEEDED: {rec['needed']}"
    elif not rec.get("automatic"):
        line += "; no automatic recovery ([session] secondaries not set): session recover after a crash"
    return line


def recovery_text(rows: list[dict], cg: int) -> str:
    """What `session recover` did, one line per member."""
    lines = []
    for r in rows:
        was = f"committed {r['committed_before']}" + (f", prepared {r['prepared']}" if r["prepared"] else "")
        lines.append(f"{r['name']}: secondary {was} -> {r['action']}; C at CG {r['committed']}"
                     + (f"; member {r['member']}" if r.get("member") else ""))
    lines.append(f"session recover: done; every C at CG {cg}")
    return "\n".join(lines)


def cache_line(cache: dict) -> str:
    """The write cache in one line of `status`."""
    if cache.get("slots") is None:
        return "-"
    occ = cache.get("occupancy")
    pct = f" ({100 * occ:.1f}%)" if isinstance(occ, (int, float)) else ""
    return f"{cache.get('used')}/{cache.get('slots')} slots used{pct}, {cache.get('dual')} dual, {cache.get('dirty')} dirty"


def help_text(entries: list[dict], *, listing_all: bool) -> str:
    """`help`: one line per command (usage, then what it does); a long usage gets its own line."""
    width = min(HELP_USAGE_CHARS, max(len(e["usage"]) for e in entries))
    lines = []
    for e in entries:
        about = e["help"] + ("  (needs allow_faults)" if "requires" in e else "")
        if len(e["usage"]) > width:
            lines += [e["usage"], f"{'':<{width}}  {about}"]
        else:
            lines.append(f"{e['usage']:<{width}}  {about}")
    if listing_all:
        lines.append("every command takes --json: one line of JSON {ok, command, data|error}")
    return "\n".join(lines)


def bitmap_text(b: dict) -> str:
    """`bitmap show`: the count, the cell map and the runs of one bitmap range."""
    start, end, n, runs = b["start_track"], b["end_track"], b["tracks"], b["runs"]
    pct = 100.0 * b["count"] / n
    return "\n".join([
        f"{b['kind']} {b['volume']} tracks {start}..{end - 1}: {b['count']} of {n} set ({pct:.1f}%)",
        f"map ({len(b['map'])} cells of ~{b['cell_tracks']:.4g} tracks): [{b['map']}]",
        "runs: " + (" ".join(f"{a}-{e}" for a, e in runs) or "none")
        + (" (first 64, END exclusive)" if runs else ""),
    ])


def crashpoint_lines(points: list[dict]) -> str:
    """`fault list`: name, armed or '-', and why the point exists."""
    width = max(len(p["name"]) for p in points)
    return "\n".join(f"{p['name']:<{width}}  {'armed after ' + str(p['after']) if p['armed'] else '-':<14}"
                     f"  {p['why']}" for p in points)


def present(fields: dict) -> dict:
    """events2 lines show an absent value as '-', never as Python's None."""
    return {k: ("-" if v is None or v == "" else v) for k, v in fields.items()}


def short(text: str, limit: int = 40) -> str:
    """An operator's token quoted back in an error, cut so a long one cannot flood the reply."""
    return text if len(text) <= limit else text[:limit] + "..."


def one_line(exc: BaseException) -> str:
    """An exception's message, first line only (a KeyError's without its quotes)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return (text.splitlines() or [type(exc).__name__])[0]


def jsonable(value: Any) -> Any:
    """Plain JSON: no NaN/inf (they are not JSON), tuples as lists, odd types as text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
