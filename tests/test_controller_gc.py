"""A controller process moves what its start built out of the garbage
collector's generations (harness/controller.py, run_controller): full
collections then walk only later objects, not tens of thousands that live
as long as the process."""

from __future__ import annotations

import subprocess
import sys

from harness.supervise import write_pair_configs

REPORT_AFTER_START = """
import asyncio, gc, os, sys
from harness import controller

start = controller.SecondaryController.start

def report():
    print("frozen", gc.get_freeze_count(), flush=True)
    os._exit(0)  # the freeze is the question here; stopping has tests of its own

async def start_then_report(self):
    await start(self)
    asyncio.get_running_loop().call_soon(report)  # runs once run() is past start()

controller.SecondaryController.start = start_then_report
controller.run_controller("secondary", sys.argv[1], format=True)
"""


def test_a_started_controller_process_has_frozen_its_long_lived_objects(tmp_path):
    pair = write_pair_configs(tmp_path)
    run = subprocess.run([sys.executable, "-c", REPORT_AFTER_START, str(pair.secondary)],
                         capture_output=True, text=True, timeout=60)
    words = run.stdout.split()
    assert "frozen" in words, run.stdout + run.stderr
    assert int(words[words.index("frozen") + 1]) > 10_000, run.stdout
