"""``mirrorfw check --log LOG --copy URL [URL...]``: is a copy a consistent cut?
Exit 0 consistent, 1 not (violations grouped into LBA ranges), 2 bad input.

A secondary's C image file (``c_url`` in its config, ``c-VOLUME.img`` in
the demo's work folder) is not C: it holds only the copy-on-write grains of
a snapshot over B, so read as a whole it looks like thousands of lost
writes. ``check`` refuses such a file and says to read C over NBD from the
secondary (``nbd://HOST:PORT/VOLUME``, or a snapshot ``VOLUME@NAME``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import tomllib
from pathlib import Path
from urllib.parse import urlsplit
from xml.sax.saxutils import escape, quoteattr

from testbench.errors import TestbenchError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", required=True, help="replay log written by `mirrorfw replay --log`")
    p.add_argument("--copy", nargs="+", required=True,
                   help="the copy's volumes, in the log's volume order (URLs or plain paths); a secondary's C: "
                        "nbd://HOST:PORT/VOLUME, never its c-*.img file")
    p.add_argument("--junit", help="write the verdict as JUnit XML here, one test case per LBA range (default: none)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: text)")
    p.add_argument("--max-violations", type=int, default=10,
                   help="violations (and LBA ranges) explained in the text; all are counted")
    p.add_argument("--ignore-foreign", action="store_true",
                   help="blocks holding data that is not a replay stamp (the volume held data before the replay) "
                        "are counted, not violations (default: they are violations)")


def junit_xml(result, name: str = "consistency") -> str:
    """One test case for the verdict, plus one failing case per LBA range
    (kind, volume, range): a copy missing a CG is a few cases, not one per block."""
    ranges = [] if result.consistent else result.ranges
    cases = []
    failure = ""
    if not result.consistent:
        failure = (f"<failure message={quoteattr(f'{result.violation_count} violation(s) in {result.ranges_total} LBA range(s)')}>"
                   f"{escape(', '.join(f'{k} {n}' for k, n in sorted(result.by_kind.items())))}</failure>")
    cases.append(f'<testcase classname="mirrorfw.check" name={quoteattr(name)}>{failure}'
                 f"<system-out>{escape(result.summary())}</system-out></testcase>")
    for r in ranges:
        case = f"{r.kind} {r.volume} lba {r.first_lba}-{r.last_lba}"
        cases.append(f'<testcase classname="mirrorfw.check.{escape(r.volume)}" name={quoteattr(case)}>'
                     f"<failure message={quoteattr(f'{r.count} violation(s)')}>{escape(r.line())}</failure></testcase>")
    failures = len(ranges) + (0 if result.consistent else 1)
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="mirrorfw-check" tests="{len(cases)}" '
            f'failures="{failures}">{"".join(cases)}</testsuite>\n')


def c_image_of(url: str) -> tuple[str, Path] | None:
    """(volume, config) when ``url`` is a file a secondary's config names as
    its C (``c_url``): the configs beside the file and one folder up."""
    path = _file_path(url)
    if path is None:
        return None
    for folder in {path.parent, path.parent.parent}:
        for cfg in sorted(folder.glob("*.toml")):
            try:
                data = tomllib.loads(cfg.read_text())
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
                continue
            if data.get("role") != "secondary":
                continue
            for vol in data.get("volume", []):
                c = _file_path(str(vol.get("c_url", "")), base=cfg.parent)
                if c is not None and c == path:
                    return str(vol.get("name", "?")), cfg
    return None


def _file_path(url: str, base: Path | None = None) -> Path | None:
    if "://" not in url:
        p = Path(url) if base is None or Path(url).is_absolute() else base / url
        return p.resolve() if url else None
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    p = Path(parts.path) if base is None or Path(parts.path).is_absolute() else base / parts.path
    return p.resolve()


def refuse_c_images(urls: list[str]) -> None:
    for url in urls:
        hit = c_image_of(url)
        if hit:
            volume, cfg = hit
            raise TestbenchError(
                f"{url} is the C image file of volume {volume} in {cfg}: it holds only copy-on-write grains "
                f"over B, not C. Read C over NBD from the running secondary: nbd://HOST:PORT/{volume} "
                f"(its ready line's nbd=), or a snapshot nbd://HOST:PORT/{volume}@NAME")


async def _check(args):
    from drivers import open_device
    from testbench.checker import check_copy
    from testbench.replaylog import ReplayLog

    rlog = ReplayLog(args.log)
    urls = [_as_url(u) for c in args.copy for u in c.split(",") if u]
    refuse_c_images(urls)
    if len(urls) != len(rlog.volumes):
        raise TestbenchError(f"the log has {len(rlog.volumes)} volumes ({', '.join(v.name for v in rlog.volumes)}); "
                             f"--copy gave {len(urls)}")
    devices = [open_device(u, read_only=True) for u in urls]
    try:
        for d, v in zip(devices, rlog.volumes, strict=False):
            if d.info.block_size != v.block_size or d.info.num_blocks < v.num_blocks:
                raise TestbenchError(f"{d.info.url}: {d.info.num_blocks} blocks of {d.info.block_size} bytes; "
                                     f"volume {v.name} was {v.num_blocks} of {v.block_size}")
        return await check_copy(devices, rlog, names=[v.name for v in rlog.volumes],
                                max_violations=args.max_violations)
    finally:
        for d in devices:
            d.close()


def _as_url(text: str) -> str:
    """A plain path is a file (as qemu-img takes one)."""
    return text if "://" in text else f"file://{Path(text).resolve()}"


def drop_foreign(result) -> None:
    """--ignore-foreign: blocks that held data before the replay are not
    violations (a lost write over one is still a lost write)."""
    foreign = result.by_kind.pop("foreign-data", 0)
    result.foreign_blocks = foreign
    result.violation_count -= foreign
    result.violations = [v for v in result.violations if v.kind != "foreign-data"]
    kept = [r for r in result.ranges if r.kind != "foreign-data"]
    result.ranges_total -= len(result.ranges) - len(kept)
    result.ranges = kept
    result.consistent = result.violation_count == 0


def run(args) -> int:
    result = asyncio.run(_check(args))
    if args.ignore_foreign:
        drop_foreign(result)
    if args.junit:
        with open(args.junit, "w", encoding="utf-8") as f:
            f.write(junit_xml(result))
    foreign = getattr(result, "foreign_blocks", 0)
    if args.json:
        print(json.dumps(result.as_dict() | ({"foreign_blocks_ignored": foreign} if args.ignore_foreign else {}),
                         indent=2))
    else:
        print(result.summary() + (f"\n{foreign} block(s) of foreign data ignored (--ignore-foreign)" if foreign else ""))
    return 0 if result.consistent else 1
