"""First-hour traps of `mirrorfw check`: a secondary's c-*.img file is refused
(it is a copy-on-write overlay on B, not C), --ignore-foreign for volumes that
held data before the replay, violations grouped into LBA ranges in the text
and the JUnit XML."""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET

import pytest

from drivers import open_device
from harness.cli import main
from harness.supervise import write_pair_configs
from testbench import stamp
from testbench.replaylog import LogVolumeInfo, WriteRecord, write_log

pytestmark = pytest.mark.timeout(60)
BS = 512
BLOCKS = 4096


def _log(tmp_path, writes):
    path = tmp_path / "replay.log"
    write_log(path, [LogVolumeInfo("vol0", BS, BLOCKS)], writes, start_mono_ns=0, start_wall_ns=0)
    return path


def _image(tmp_path, writes, name="copy.img", *, foreign=()):
    path = tmp_path / name
    dev = open_device(f"file://{path}?size={BLOCKS * BS}")

    async def fill():
        for w in writes:
            data = stamp.encode(w.write_id, w.volume, w.lba, w.nblocks, BS)
            for i in range(w.nblocks):
                await dev.write(w.lba + i, data[i * BS:(i + 1) * BS])
        for lba in foreign:
            await dev.write(lba, b"old data".ljust(BS, b"\x01"))
    try:
        asyncio.run(fill())
    finally:
        dev.close()
    return path


def _writes(n, nblocks=8):
    return [WriteRecord(i, 0, (i - 1) * nblocks, nblocks, issue_ns=i * 100, ack_ns=i * 100 + 50)
            for i in range(1, n + 1)]


def test_check_refuses_a_secondarys_c_image_file_and_says_to_read_c_over_nbd(tmp_path, capsys):
    pair = write_pair_configs(tmp_path, volumes=("vol0",), size=f"{BLOCKS * BS}")
    log = _log(tmp_path, _writes(4))
    c_file = _image(tmp_path, [], "c-vol0.img")
    for given in (f"file://{c_file}", str(c_file)):  # a URL or a plain path
        assert main(["check", "--log", str(log), "--copy", given]) == 2
        err = capsys.readouterr().err
        assert "C image file of volume vol0" in err and str(pair.secondary) in err
        assert "nbd://HOST:PORT/vol0" in err and "lost" not in err
    # The same bytes under a name no secondary config gives C are checked as usual.
    other = _image(tmp_path, _writes(4), "a-copy.img")
    assert main(["check", "--log", str(log), "--copy", str(other)]) == 0


def test_violations_are_grouped_into_lba_ranges_in_text_and_junit(tmp_path, capsys):
    writes = _writes(400)  # 400 writes of 8 blocks, blocks 0..3199
    log = _log(tmp_path, writes)
    # The copy lacks writes 101..300 (a missing stretch) yet shows write 400: 200 lost writes, one range.
    copy = _image(tmp_path, [w for w in writes if not 101 <= w.write_id <= 300])
    junit = tmp_path / "check.xml"
    assert main(["check", "--log", str(log), "--copy", str(copy), "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert "INCONSISTENT: 200 violation(s)" in out and "1 LBA range(s)" in out
    assert "lost-write: vol0 lba 800-2392 (200 violations)" in out
    suite = ET.parse(junit).getroot()
    cases = suite.findall("testcase")
    assert suite.get("tests") == "2" and len(cases) == 2  # the verdict and one range, not 200 cases
    assert cases[1].get("name") == "lost-write vol0 lba 800-2392"
    assert main(["check", "--log", str(log), "--copy", str(copy), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["by_kind"] == {"lost-write": 200} and data["ranges"][0]["count"] == 200


def test_ignore_foreign_for_volumes_that_held_data_before_the_replay(tmp_path, capsys):
    writes = _writes(10)
    log = _log(tmp_path, writes)
    copy = _image(tmp_path, writes, foreign=range(3000, 3100))
    assert main(["check", "--log", str(log), "--copy", str(copy)]) == 1
    assert "foreign-data: vol0 lba 3000-3099 (100 violations)" in capsys.readouterr().out
    assert main(["check", "--log", str(log), "--copy", str(copy), "--ignore-foreign"]) == 0
    assert "100 block(s) of foreign data ignored" in capsys.readouterr().out
    # A lost write is still one with --ignore-foreign.
    lossy = _image(tmp_path, [w for w in writes if w.write_id != 5], "lossy.img", foreign=range(3000, 3010))
    assert main(["check", "--log", str(log), "--copy", str(lossy), "--ignore-foreign"]) == 1
    assert "lost-write: vol0 lba 32" in capsys.readouterr().out
