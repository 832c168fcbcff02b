"""Prometheus /metrics (harness/metrics.py): scraped with urllib from real
controller processes and checked against ``status --json`` over the console;
the [metrics] config; the HTTP server's refusals and its token."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from drivers.nbd.client import open_async
from harness.config import load_config
from harness.console_client import ConsoleClient
from harness.errors import ConfigError
from harness.supervise import start_controller, write_pair_configs

pytestmark = pytest.mark.timeout(120)


def scrape(base: str, path: str = "/metrics", headers: dict | None = None) -> str:
    req = urllib.request.Request(base + path, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as reply:
        assert reply.status == 200
        return reply.read().decode()


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, (label pairs...)): value} of every sample scraped."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: dict, name: str, **labels) -> float:
    return got[(name, tuple(sorted(labels.items())))]


async def _write_blocks(address: str, count: int) -> int:
    """``count`` one-block writes and a read; the block size."""
    dev = await open_async(f"nbd://{address}/vol0")
    try:
        bs = dev.info.block_size
        for i in range(count):
            await dev.write(i * 97, bytes([i % 251 + 1]) * bs)
        await dev.read(0, 1)
    finally:
        dev.close()
    return bs


@pytest.mark.slow
def test_scrape_a_running_pair_matches_status_over_the_console(tmp_path):
    pair = write_pair_configs(tmp_path, console=True, metrics=True, session={"cg_interval_s": 0.1})
    sec = start_controller(pair.secondary, format=True)
    pri = start_controller(pair.primary, format=True)
    try:
        assert pri.ready["metrics"].startswith("http://127.0.0.1:")
        block = asyncio.run(_write_blocks(pri.ready["nbd"], 40))
        with ConsoleClient(pri.ready["console"]) as con, ConsoleClient(sec.ready["console"]) as scon:
            # Let a CG carry the writes, then hold still so both reads see one state.
            con.run_check("cg pause")
            status = con.run_json("status")["data"]
            got = samples(scrape(pri.ready["metrics"]))
            sstatus = scon.run_json("status")["data"]
            sgot = samples(scrape(sec.ready["metrics"]))
    finally:
        assert pri.stop() == 0 and sec.stop() == 0

    assert status["copy_state"] == "Paused"
    assert value(got, "mirrorfw_info", role="primary", session="test") == 1
    assert value(got, "mirrorfw_copy_state", state="Paused") == 1
    assert value(got, "mirrorfw_copy_state", state="Running") == 0
    assert value(got, "mirrorfw_severity", severity=status["severity"]) == 1
    assert value(got, "mirrorfw_cg_seq") == status["cg_seq"]
    assert value(got, "mirrorfw_cgs_total") == status["total_successful_cgs"] >= 1
    assert value(got, "mirrorfw_cgs_failed_total") == status["total_failed_cgs"]
    assert value(got, "mirrorfw_drain_bytes_total") == status["drain_bytes"] > 0
    assert value(got, "mirrorfw_link_up") == (status["link"] == "up") == 1
    assert value(got, "mirrorfw_volume_oos_tracks", volume="vol0") == status["oos_tracks"]
    assert value(got, "mirrorfw_volume_cr_tracks", volume="vol0") == status["cr_tracks"]
    assert value(got, "mirrorfw_cache_used_slots") == status["cache"]["used"]
    assert value(got, "mirrorfw_cache_slots") == status["cache"]["slots"]
    # Exposure moves with the wall clock while the pair is paused: bounded, not equal.
    assert 0 <= value(got, "mirrorfw_data_exposure_seconds") <= status["data_exposure_s"] + 5
    # Every CG's held acks, from the events; its count is the CGs formed since the start.
    assert value(got, "mirrorfw_held_ack_seconds_count") == status["held_ack_ms"]["count"]
    assert value(got, "mirrorfw_cg_duration_seconds_count") >= 1
    # The host port's requests: 40 writes and a read, all answered ok.
    assert value(got, "mirrorfw_nbd_requests_total", op="write", result="ok") == 40
    assert value(got, "mirrorfw_nbd_requests_total", op="read", result="ok") >= 1
    assert value(got, "mirrorfw_nbd_request_bytes_total", op="write") == 40 * block
    assert value(got, "mirrorfw_nbd_request_duration_seconds_count", op="write") == 40
    assert not [k for k in got if k[0].startswith("mirrorfw_session_member")]  # no session: no members

    assert value(sgot, "mirrorfw_info", role="secondary", session="test") == 1
    assert value(sgot, "mirrorfw_committed_cg") == sstatus["committed_cg"] >= 1
    assert value(sgot, "mirrorfw_received_bytes_total") == sstatus["received_bytes"] > 0
    assert value(sgot, "mirrorfw_received_tracks_total") == sstatus["received_tracks"]
    assert not [k for k in sgot if k[0].startswith(("mirrorfw_copy_state", "mirrorfw_held_ack"))]


@pytest.mark.slow
def test_a_session_master_shows_its_members(tmp_path):
    from harness.supervise import write_session_configs

    session = write_session_configs(tmp_path, controllers=2, console=True, metrics=True,
                                    session={"cg_interval_s": 0.2})
    procs = []
    try:
        for pair in session.pairs:
            procs.append(start_controller(pair.secondary, format=True))
        for pair in reversed(session.pairs):  # subordinates first, the master last
            procs.append(start_controller(pair.primary, format=True))
        master = procs[-1]
        with ConsoleClient(master.ready["console"]) as con:
            members = []
            for _ in range(150):  # until every member has joined
                members = con.run_json("status")["data"].get("members") or []
                if members and all(m["state"] == "ok" for m in members):
                    break
                time.sleep(0.2)
            got = samples(scrape(master.ready["metrics"]))
    finally:
        for proc in reversed(procs):
            proc.stop()
    assert value(got, "mirrorfw_session_members") == len(members) == 2
    for m in members:
        assert value(got, "mirrorfw_session_member_up", member=m["name"]) == (m["state"] == "ok")
        assert value(got, "mirrorfw_session_member_state", member=m["name"], state=m["state"]) == 1


def _config(tmp_path: Path, metrics: str) -> Path:
    pair = write_pair_configs(tmp_path)
    pair.primary.write_text(pair.primary.read_text() + metrics)
    return pair.primary


def test_config_metrics_off_by_default_and_checked(tmp_path):
    pair = write_pair_configs(tmp_path)
    assert load_config(pair.primary).metrics_listen is None
    cfg = load_config(_config(tmp_path, '[metrics]\nlisten = "127.0.0.1:9101"\n'))
    assert cfg.metrics_listen == ("127.0.0.1", 9101) and cfg.metrics_token is None
    with pytest.raises(ConfigError, match=r"primary\.toml: unknown key\(s\): metrics\.lisen"):
        load_config(_config(tmp_path, '[metrics]\nlisten = "127.0.0.1:9101"\nlisen = 1\n'))
    with pytest.raises(ConfigError, match=r"metrics\.listen: missing"):
        load_config(_config(tmp_path, "[metrics]\n"))
    with pytest.raises(ConfigError, match=r"metrics\.listen: 0\.0\.0\.0:9101: binding beyond loopback needs"):
        load_config(_config(tmp_path, '[metrics]\nlisten = "0.0.0.0:9101"\n'))
    token = tmp_path / "metrics.token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    cfg = load_config(_config(tmp_path, '[metrics]\nlisten = "0.0.0.0:9101"\ntoken_file = "metrics.token"\n'))
    assert cfg.metrics_listen == ("0.0.0.0", 9101) and cfg.metrics_token == b"s3cret"


def test_server_refusals_and_token():
    from console_fakes import FakePrimary

    from harness.metrics import MetricsServer

    async def scenario():
        fake = FakePrimary()
        server = MetricsServer("primary", fake, fake.events, session_id="fake", token=b"tok")
        await server.start("127.0.0.1", 0)
        base = server.url

        def get(path, headers=None):
            try:
                return scrape(base, path, headers), 200
            except urllib.error.HTTPError as e:
                return e.read().decode(), e.code

        try:
            assert (await asyncio.to_thread(get, "/metrics"))[1] == 401
            text, code = await asyncio.to_thread(get, "/metrics", {"Authorization": "Bearer tok"})
            assert code == 200 and "mirrorfw_copy_state" in text
            assert (await asyncio.to_thread(get, "/metrics", {"Authorization": "Bearer nope"}))[1] == 401
            doc, code = await asyncio.to_thread(get, "/status.json?token=tok")
            assert code == 200 and json.loads(doc)["role"] == "primary"
            page, code = await asyncio.to_thread(get, "/?token=tok")
            # One file: nothing loaded from elsewhere (the one URI is the SVG namespace's name).
            assert code == 200 and "<script>" in page and "<script src" not in page and "<link" not in page
            assert page.replace('"http://www.w3.org/2000/svg"', "").count("http") == 0
            assert (await asyncio.to_thread(get, "/nope?token=tok"))[1] == 404
            req = urllib.request.Request(base + "/metrics", data=b"x", method="POST")
            with pytest.raises(urllib.error.HTTPError) as e:
                await asyncio.to_thread(urllib.request.urlopen, req, None, 5)
            assert e.value.code == 405
            # Garbage instead of HTTP: a 400, and the server goes on.
            r, w = await asyncio.open_connection(*server.address)
            w.write(b"\x00\x01garbage\r\n\r\n")
            assert (await r.read()).startswith(b"HTTP/1.1 400")
            w.close()
            assert (await asyncio.to_thread(get, "/metrics", {"Authorization": "Bearer tok"}))[1] == 200
        finally:
            await server.close()

    asyncio.run(scenario())
