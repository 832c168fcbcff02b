"""The live status page of one controller, served beside ``/metrics``
(harness/metrics.py): ``/`` is ``statuspage.html`` (package data: plain
HTML and JavaScript in one file, no build step, nothing fetched from
elsewhere), which polls ``/status.json`` once a second and draws the
session, each volume's OOS and CR maps, the CG timeline and the data
exposure (RPO) over time.

``status_document`` is what ``/status.json`` holds: the controller's
``status()`` (with ``cache`` on a primary), the volumes with a
``MAP_CELLS``-cell map of each bitmap (``#`` every track of the cell set,
``+`` some, ``.`` none, as the console's ``bitmap show``), the last CGs as
the events told them (``cgs``: wall times of quiesce, drain, commit, end)
and the sampled exposure (``rpo``: [wall time, seconds]).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from firmware.console_format import jsonable

MAP_CELLS = 64


def page_html() -> bytes:
    return resources.files("harness").joinpath("statuspage.html").read_bytes()


def bitmap_map(firmware: Any, kind: str, name: str, tracks: int, cells: int = MAP_CELLS) -> str:
    """``cells`` characters over the volume's tracks: '#' all set, '+' some, '.' none."""
    if tracks <= 0:
        return ""
    cells = min(cells, tracks)
    out = []
    for i in range(cells):
        start, end = i * tracks // cells, (i + 1) * tracks // cells
        count = firmware.bitmap(kind, name, start, end)["count"]
        out.append("#" if count == end - start else "+" if count else ".")
    return "".join(out)


def status_document(role: str, firmware: Any, *, session_id: str, recorder: Any = None) -> dict:
    status = dict(firmware.status())
    volumes: list[dict] = []
    if role == "primary":
        status["cache"] = firmware.cache_stats()
        for v in firmware.volumes_info():
            v = dict(v)
            tracks = int(v.get("tracks") or 0)
            v["oos_map"] = bitmap_map(firmware, "oos", v["name"], tracks)
            v["cr_map"] = bitmap_map(firmware, "cr", v["name"], tracks)
            volumes.append(v)
    else:
        volumes = [dict(v) for v in status.get("volumes") or []]
    doc = {"role": role, "session_id": session_id, "time": recorder.wall() if recorder else None,
           "status": status, "volumes": volumes,
           "cgs": list(recorder.cgs) if recorder else [], "rpo": list(recorder.rpo) if recorder else []}
    return jsonable(doc)
