"""The console's handlers that show state: ``status``, ``volume ...``,
``bitmap show``, ``cache stats``, ``link status`` and the ``events``
snapshot and stream. CommandSet (firmware/console.py) inherits them."""

from __future__ import annotations

import time
from typing import Any

from firmware import console_format as fmt
from firmware.console_events import EventStream, format_event, snapshot, timestamp
from firmware.console_grammar import CommandError
from firmware.events import Event, EventBus

MAP_CELLS = 64


class InspectCommands:
    controller: Any
    role: str
    events: EventBus | None

    # ---- status -------------------------------------------------------------

    async def _status(self, args, flags, as_json):
        raw = self.controller.status()
        if self.role == "secondary":
            data = {k: raw.get(k) for k in fmt.SECONDARY_STATUS_KEYS}
            data["role"] = "secondary"
            text = fmt.table([(k, fmt.show(k, data[k])) for k in fmt.SECONDARY_STATUS_KEYS])
            return data, text, None
        data = {k: raw.get(k) for k in fmt.STATUS_KEYS}
        cache = self._cache()
        data["cache"] = cache
        rows = [(k, fmt.show(k, data[k])) for k in fmt.STATUS_KEYS]
        rows.append(("cache", fmt.cache_line(cache)))
        session = self._session_role()
        text = fmt.table(rows + ([("session", fmt.session_line(session))] if session else []))
        if session is not None:
            data["session"] = session
        if "members" in raw:
            data["members"] = raw["members"]
            text += "\nmembers:\n" + fmt.members_table(raw["members"])
        return data, text, None

    def _session_role(self) -> dict | None:
        """What this primary is in a multi-controller session (None: on its own)."""
        master = getattr(self.controller, "session_master", None)
        if master is not None:
            st = master.status()
            return {"role": "master", "members": len(st["members"]), "cg_seq": st["seq"],
                    "successful": st["successful"], "failed": st["failed"], "last_reason": st["last_reason"],
                    "unresolved": st["unresolved"], "recovery": st["recovery"]}
        member = getattr(self.controller, "session_member", None)
        if member is not None:
            return {"role": "subordinate", "name": member.name, "master": member.master or None,
                    "master_link": "up" if member.master else "down",
                    "master_down_reason": member.master_down_reason or None,
                    "in_doubt_seq": member.in_doubt_seq}
        return None

    def _cache(self) -> dict:
        stats = getattr(self.controller, "cache_stats", None)
        raw = stats() if stats else {}
        return {k: raw.get(k) for k in fmt.CACHE_KEYS}

    # ---- volumes and bitmaps ------------------------------------------------

    def _volumes(self) -> list[dict]:
        if self.role == "secondary":
            vols = self.controller.status().get("volumes") or []
            if isinstance(vols, dict):
                return [{"name": k, **(v if isinstance(v, dict) else {"info": v})} for k, v in vols.items()]
            return [v if isinstance(v, dict) else {"name": str(v)} for v in vols]
        return list(self.controller.volumes_info())

    def _volume(self, name: str) -> dict:
        vols = self._volumes()
        for v in vols:
            if v.get("name") == name:
                return v
        names = ", ".join(str(v.get("name")) for v in vols) or "none"
        raise CommandError(f"no volume {fmt.short(name)!r}; volumes: {names}")

    async def _volume_list(self, args, flags, as_json):
        vols = self._volumes()
        if not vols:
            return {"volumes": []}, "no volumes", None
        keys = [k for k in ("name", "size_bytes", "tracks", "oos_tracks", "cr_tracks", "copied_grains",
                            "url", "b_url", "c_url")
                if any(k in v for v in vols)] or sorted({k for v in vols for k in v})
        return {"volumes": vols}, fmt.columns(keys, vols), None

    async def _volume_show(self, args, flags, as_json):
        vol = self._volume(args["NAME"])
        return {"volume": vol}, fmt.table([(k, fmt.show(k, v)) for k, v in vol.items()]), None

    async def _bitmap_show(self, args, flags, as_json):
        kind, name = args["KIND"], args["VOLUME"]
        tracks_total = int(self._volume(name).get("tracks") or 0)
        start, end = args.get("START[-END]", (0, None))
        end = tracks_total if end is None else end
        if start >= tracks_total or end > tracks_total:
            raise CommandError(f"range {start}-{end}: volume {name} has tracks 0..{tracks_total - 1}")
        whole = self.controller.bitmap(kind, name, start, end)
        n = end - start
        cells = min(MAP_CELLS, n)
        chars = []
        for i in range(cells):
            cs, ce = start + i * n // cells, start + (i + 1) * n // cells
            count = whole["count"] if (cs, ce) == (start, end) else \
                self.controller.bitmap(kind, name, cs, ce)["count"]
            chars.append("#" if count == ce - cs else "+" if count else ".")
        bitmap_map = "".join(chars)
        runs = [list(r) for r in whole.get("runs", [])]
        data = {"kind": kind, "volume": name, "start_track": start, "end_track": end,
                "count": whole["count"], "tracks": n, "runs": runs, "map": bitmap_map,
                "cell_tracks": n / cells}
        return data, fmt.bitmap_text(data), None

    async def _cache_stats(self, args, flags, as_json):
        cache = self._cache()
        rows = [(k, fmt.show(k, cache[k])) for k in fmt.CACHE_KEYS]
        hits, misses = cache.get("hits") or 0, cache.get("misses") or 0
        hit_rate = hits / (hits + misses) if hits + misses else None
        cache["hit_rate"] = hit_rate
        rows.append(("hit_rate", "-" if hit_rate is None else f"{100 * hit_rate:.1f}%"))
        return cache, fmt.table(rows), None

    async def _link_status(self, args, flags, as_json):
        s = self.controller.status()
        data = {k: s.get(k) for k in ("link", "copy_state", "phase", "cg_seq", "drain_bytes",
                                      "consecutive_failures", "data_exposure_s")}
        return data, fmt.table([(k, fmt.show(k, v)) for k, v in data.items()]), None

    # ---- events -------------------------------------------------------------

    async def _events(self, args, flags, as_json):
        stats = "--statistics" in flags
        status = self.controller.status()
        volumes = self._volumes()
        cache = self._cache() if self.role == "primary" else {}
        now = snapshot(self.role, status, volumes, cache, stats=stats,
                       session_id=getattr(self.controller, "session_id", "default"))
        now.append(Event("exists", "-", {}))
        clock = getattr(self.controller, "clock", None)
        wall = getattr(clock, "wall", None)
        stamp = (wall() if wall else time.time()) if "--timestamps" in flags else None
        data = {"events": [{"action": e.action, "object": e.obj, "fields": e.fields}
                           | ({"timestamp": timestamp(stamp)} if stamp is not None else {}) for e in now]}
        text = "\n".join(format_event(e, as_json=False, stamp=stamp) for e in now)
        stream = None
        if "--now" not in flags:
            if self.events is None:
                raise CommandError("this controller has no event bus; use events --now")
            stream = EventStream(self.events, as_json=as_json, timestamps="--timestamps" in flags,
                                 coalesce="--all-cgs" not in flags, wall=wall,
                                 now=getattr(clock, "now", None))
        return data, text, stream
