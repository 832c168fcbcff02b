"""The live status page (harness/statuspage.html) in headless Chromium
(Debian's ``chromium``; ``make deps`` installs it) against a running pair:
the DOM after the page's script ran holds the numbers ``status --json``
and ``bitmap show`` give over the console, and a screenshot is drawn."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from drivers.nbd.client import open_async
from harness.console_client import ConsoleClient
from harness.supervise import start_controller, write_pair_configs

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make deps installs Debian's)")


def chromium(*args: str) -> subprocess.CompletedProcess:
    # --virtual-time-budget: run the page's timers (its polls) for 5 s of page time, then dump or shoot.
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


class Dom(HTMLParser):
    """Text by element id, the volume rows' cells, and map cells by class."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.attrs_of: dict[str, dict] = {}
        self.rows: dict[str, list[str]] = {}
        self.maps: dict[str, str] = {}
        self._id: str | None = None
        self._row: str | None = None
        self._map: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self._id = a["id"]
            self.by_id[a["id"]] = ""
            self.attrs_of[a["id"]] = a
        if tag == "tr" and "data-volume" in a:
            self._row = a["data-volume"]
            self.rows[self._row] = []
        if tag == "td" and self._row is not None:
            self._cell = self.rows[self._row]
            self._cell.append("")
        cls = a.get("class", "")
        if tag == "span" and cls.startswith("map ") and self._row is not None:
            self._map = f"{self._row}:{cls.split()[1]}"
            self.maps[self._map] = ""
        elif tag == "span" and self._map is not None and cls.startswith("c-"):
            self.maps[self._map] += {"c-all": "#", "c-some": "+", "c-none": "."}[cls]

    def handle_endtag(self, tag):
        self._id = None  # an empty element's text is empty, not what follows it
        if tag == "tr":
            self._row = None
        if tag == "td":
            self._cell = None
            self._map = None

    def handle_data(self, data):
        if self._id is not None:
            self.by_id[self._id] += data
            self._id = None
        if self._cell is not None:
            self._cell[-1] += data


async def _write(address: str, offsets: list[int]) -> None:
    dev = await open_async(f"nbd://{address}/vol0")
    try:
        bs = dev.info.block_size
        for lba in offsets:
            await dev.write(lba, b"\x5a" * bs)
    finally:
        dev.close()


@needs_chromium
def test_status_page_shows_what_status_json_says(tmp_path):
    pair = write_pair_configs(tmp_path, console=True, metrics=True, size="8MiB",
                              session={"cg_interval_s": 0.2})
    sec = start_controller(pair.secondary, format=True)
    pri = start_controller(pair.primary, format=True)
    try:
        page = pri.ready["metrics"] + "/"
        asyncio.run(_write(pri.ready["nbd"], list(range(0, 4096, 64))))
        with ConsoleClient(pri.ready["console"]) as con:
            con.run_check("cg pause")
            # Paused: these writes stay out of sync, so the OOS map has set cells to show.
            asyncio.run(_write(pri.ready["nbd"], list(range(0, 16384, 2048)) + list(range(8192, 9216, 128))))
            status = con.run_json("status")["data"]
            oos = con.run_json("bitmap show oos vol0")["data"]
            cr = con.run_json("bitmap show cr vol0")["data"]
            dumped = chromium("--dump-dom", page)
            shot = tmp_path / "statuspage.png"
            shooting = chromium("--window-size=1100,1000", f"--screenshot={shot}", page)
            after = con.run_json("status")["data"]
    finally:
        assert pri.stop() == 0 and sec.stop() == 0

    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = Dom()
    dom.feed(dumped.stdout)
    assert 'data-ready="yes"' in dumped.stdout, "the page's script never drew a status"
    assert dom.by_id["error"] == ""
    assert int(dom.by_id["polls"]) >= 2  # it polls on, not once
    assert dom.by_id["role"] == "primary" and dom.by_id["session"] == "test"
    # Paused, nothing changes these between the console's reads and the page's.
    assert status["cg_seq"] == after["cg_seq"] and status["oos_tracks"] == after["oos_tracks"]
    assert dom.by_id["copy_state"] == status["copy_state"] == "Paused"
    assert dom.by_id["severity"] == status["severity"]
    assert int(dom.by_id["cg_seq"]) == status["cg_seq"]
    assert int(dom.by_id["total_successful_cgs"]) == status["total_successful_cgs"] >= 1
    assert int(dom.by_id["total_failed_cgs"]) == status["total_failed_cgs"]
    assert dom.by_id["tracks"] == f"{status['oos_tracks']} / {status['cr_tracks']}"
    assert int(dom.by_id["drain_bytes"]) == status["drain_bytes"]
    assert dom.by_id["link"] == status["link"] == "up"
    assert dom.by_id["cache_used"] == f"{status['cache']['used']} of {status['cache']['slots']}"
    _name, tracks, oos_count, _oos_map, cr_count, _cr_map = dom.rows["vol0"]
    assert (int(tracks), int(oos_count), int(cr_count)) == (oos["tracks"], oos["count"], cr["count"])
    assert oos["count"] == status["oos_tracks"] > 0
    # The maps cell for cell as `bitmap show` draws them.
    assert dom.maps["vol0:oos"] == oos["map"] and "#" in oos["map"] and "." in oos["map"]
    assert dom.maps["vol0:cr"] == cr["map"]
    assert int(dom.attrs_of["timeline"].get("data-cgs", 0)) >= 1
    assert int(dom.attrs_of["rpo"].get("data-samples", 0)) >= 1

    assert shooting.returncode == 0 and shot.exists(), shooting.stderr[-2000:]
    from matplotlib.image import imread

    image = imread(shot)
    assert image.shape[:2] == (1000, 1100)
    # Not a blank page: the OOS map's set cells are drawn in their red.
    red = (image[..., 0] > 0.7) & (image[..., 1] < 0.3) & (image[..., 2] < 0.3)
    assert red.sum() > 100
    assert len({tuple(p) for p in image.reshape(-1, image.shape[2])[::97].round(2).tolist()}) > 10


def test_page_is_package_data_with_nothing_from_elsewhere():
    from harness.statuspage import page_html

    html = page_html().decode()
    assert re.search(r"<script>", html) and "<script src" not in html and "<link" not in html
    assert "status.json" in html and "setInterval(poll" in html
