"""The console's `power cut [SEED]`: gated like `fault`, calls the switch the
harness gives it, and in a controller process cuts the volatile+ devices'
power domain and ends the process (status 137); the controller restarts on
what survived."""

from __future__ import annotations

import asyncio

import pytest
from console_fakes import FakePrimary

from firmware.console import CommandSet
from harness.console_client import ConsoleClient
from harness.supervise import start_controller, write_pair_configs

pytestmark = pytest.mark.timeout(120)


def run(cs: CommandSet, line: str):
    return asyncio.run(cs.execute(line))


def test_power_cut_is_refused_without_allow_faults():
    calls = []
    cs = CommandSet(FakePrimary(), allow_faults=False, power_cut=calls.append)
    reply = run(cs, "power cut 3")
    assert not reply.ok and "allow_faults" in reply.text and calls == []


def test_power_cut_calls_the_harness_switch_with_its_seed():
    calls = []
    for role in ("primary", "secondary"):
        cs = CommandSet(FakePrimary(), role=role, allow_faults=True, power_cut=calls.append)
        assert run(cs, "power cut 7 --json").ok
        assert run(cs, "power cut").ok
        assert not run(cs, "power cut x").ok  # a seed is a whole number
    assert calls == [7, None, 7, None]
    help_text = run(cs, "help power").text
    assert "power cut [SEED]" in help_text


def test_power_cut_without_a_switch_says_so():
    cs = CommandSet(FakePrimary(), allow_faults=True)
    reply = run(cs, "power cut 1")
    assert not reply.ok and "no power switch" in reply.text


def test_a_controller_process_loses_power_from_its_console_and_restarts(tmp_path):
    cfg = write_pair_configs(tmp_path, size="1MiB", nvram_size="4MiB", console=True)
    text = cfg.secondary.read_text().replace('url = "file://', 'url = "volatile+file://')
    text = text.replace('b_url = "file://', 'b_url = "volatile+file://').replace('c_url = "file://',
                                                                                 'c_url = "volatile+file://')
    text = text.replace('url = "nvram://', 'url = "volatile+nvram://').replace("size=4MiB", "size=4MiB&persist=msync")
    assert text.count("volatile+") == 3
    cfg.secondary.write_text(text)
    proc = start_controller(cfg.secondary, format=True, verbose=0)
    try:
        con = ConsoleClient(proc.ready["console"], timeout_s=20.0)
        try:
            assert con.run_json("status")["ok"]
            with pytest.raises(Exception):  # noqa: B017 - the process ends before it can reply
                con.run_json("power cut 5")
        finally:
            con.close()
        assert proc.wait(20) == 137
        assert "mirrorfw: power cut:" in proc.logs()
        again = start_controller(cfg.secondary, verbose=0)  # what survived opens without a format
        try:
            con = ConsoleClient(again.ready["console"], timeout_s=20.0)
            try:
                assert con.run_json("status")["data"]["established"] is False
            finally:
                con.close()
        finally:
            again.kill()
    finally:
        if proc.alive():
            proc.kill()
