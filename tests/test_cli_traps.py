"""First-hour traps of the command line, each as a new user meets it: trace
stats names the format, replay --json is only JSON, a csv ts unit that makes
the rate absurd is called out, convert --device-map, plain paths to info,
every option's help with its default, -v after the command, completion and
man page from the same parser, and the demo's ready lines and restart
commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.cli import ALL, build_parser, main
from testbench.cli_demo import ready_line, restart_command

pytestmark = pytest.mark.timeout(120)


def _gen(tmp_path, fmt="fio3", name="t.iolog", *extra):
    out = tmp_path / name
    assert main(["trace", "generate", "--format", fmt, "--duration-s", "2", "--iops", "200", "--span", "1MiB",
                 str(out), *extra]) == 0
    return out


def test_trace_stats_names_the_format_it_read(tmp_path, capsys):
    trace = _gen(tmp_path)
    capsys.readouterr()
    assert main(["trace", "stats", str(trace)]) == 0
    assert f"{trace}: fio3 (detected):" in capsys.readouterr().out
    assert main(["trace", "stats", str(trace), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "fio3"


def test_csv_with_a_ts_unit_that_makes_the_rate_absurd_is_warned_about(tmp_path, capsys):
    main(["trace", "generate", "--format", "all", "--duration-s", "2", "--iops", "200", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "read it with --columns ts=0:ns,op=1,offset=2,length=3,device=4" in out
    csv = tmp_path / "s" / "sample.csv"
    assert main(["trace", "stats", str(csv), "--columns", "ts=0:ns,op=1,offset=2,length=3,device=4"]) == 0
    right = capsys.readouterr()
    assert "warning" not in right.err and "IOPS" in right.out
    assert main(["trace", "stats", str(csv), "--columns", "ts=0:us,op=1,offset=2,length=3,device=4"]) == 0
    wrong = capsys.readouterr()
    assert "warning" in wrong.err and "check the unit" in wrong.err and "writes ns" in wrong.err


def test_replay_json_prints_only_json_on_stdout(tmp_path, capsys):
    trace = _gen(tmp_path)
    capsys.readouterr()
    targets = ",".join(f"file://{tmp_path}/v{i}.img?size=2MiB" for i in range(2))
    assert main(["replay", str(trace), "--target", targets, "--json", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["writes"] > 0
    assert cap.err.strip()  # the volume mapping went to stderr


def test_convert_device_map_names_files_fio_can_open(tmp_path, capsys):
    trace = _gen(tmp_path)
    capsys.readouterr()
    main(["trace", "stats", str(trace), "--json"])
    devices = sorted(json.loads(capsys.readouterr().out)["devices"])
    mapping = ",".join(f"{d}={tmp_path}/img{i}" for i, d in enumerate(devices))
    out = tmp_path / "mapped.iolog"
    assert main(["trace", "convert", str(trace), str(out), "--to", "fio2", "--device-map", mapping]) == 0
    text = out.read_text()
    assert all(f"{tmp_path}/img{i}" in text for i in range(len(devices)))
    assert main(["trace", "convert", str(trace), str(out), "--to", "fio2", "--device-map", "nothing"]) == 2


def test_info_takes_a_plain_path_as_qemu_img_does(tmp_path, capsys, monkeypatch):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    monkeypatch.chdir(tmp_path)
    for given in (str(img), "disk.img"):
        assert main(["info", given, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["url"] == f"file://{img}" and info["size_bytes"] == 1 << 20


def _parsers(p: argparse.ArgumentParser, path=("mirrorfw",)):
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_has_help_that_ends_with_its_default():
    missing = []
    for path, p in _parsers(build_parser(ALL)):
        fmt = p._get_formatter()
        for a in p._actions:
            if not a.option_strings or isinstance(a, argparse._HelpAction | argparse._VersionAction):
                continue
            text = fmt._expand_help(a)  # HelpFormatter adds "(default: X)", to an option without help too
            if "default" not in text.lower():
                missing.append(f"{' '.join(path)} {a.option_strings[0]}: {text!r}")
    assert not missing, "\n".join(missing)


def test_verbose_is_taken_after_the_command_too(tmp_path, capsys):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    assert build_parser("info").parse_args(["info", "-v", str(img)]).verbose == 1
    assert build_parser("info").parse_args(["-vv", "info", str(img)]).verbose == 2
    assert build_parser("info").parse_args(["info", str(img)]).verbose == 0
    assert main(["info", str(img), "-v"]) == 0


def test_completion_and_man_page_come_from_the_parser(capsys):
    assert main(["completion", "bash"]) == 0
    bash = capsys.readouterr().out
    assert "complete" in bash and "--fidelity-fail-lateness-ms" in bash and "--ignore-foreign" in bash
    assert main(["completion", "man"]) == 0
    man = capsys.readouterr().out
    assert man.startswith(".TH MIRRORFW") and "demo" in man


def test_demo_prints_the_controllers_ready_lines_and_restarts_without_format():
    proc = SimpleNamespace(role="primary", config=Path("/w d/primary.toml"),
                           ready={"role": "primary", "session": "test", "nbd": "127.0.0.1:1", "console": "socket://x"})
    assert ready_line(proc) == "ready role=primary session=test nbd=127.0.0.1:1 console=socket://x"
    assert restart_command(proc) == "mirrorfw primary --config '/w d/primary.toml'"
    assert "--format" not in restart_command(proc)
