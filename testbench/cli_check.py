"""``mirrorfw check --log LOG --copy URL [URL...]``: is a copy a consistent cut?
Exit 0 consistent, 1 not (first violations explained), 2 bad input."""

from __future__ import annotations

import argparse
import asyncio
import json
from xml.sax.saxutils import escape, quoteattr

from testbench.errors import TestbenchError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", required=True, help="replay log written by `mirrorfw replay --log`")
    p.add_argument("--copy", nargs="+", required=True, help="the copy's volumes, in the log's volume order (URLs)")
    p.add_argument("--junit", help="write the verdict as JUnit XML here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--max-violations", type=int, default=10, help="violations explained (all are counted)")


def junit_xml(result, name: str = "consistency") -> str:
    failures = 0 if result.consistent else 1
    body = ""
    if not result.consistent:
        text = "\n".join(f"{v.kind}: {v.volume} lba {v.lba}: {v.message}" for v in result.violations)
        body = f"<failure message={quoteattr(f'{result.violation_count} violation(s)')}>{escape(text)}</failure>"
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="mirrorfw-check" tests="1" failures="{failures}">'
            f'<testcase classname="mirrorfw.check" name={quoteattr(name)}>{body}'
            f"<system-out>{escape(result.summary())}</system-out></testcase></testsuite>\n")


async def _check(args):
    from drivers import open_device
    from testbench.checker import check_copy
    from testbench.replaylog import ReplayLog

    rlog = ReplayLog(args.log)
    urls = [u for c in args.copy for u in c.split(",") if u]
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


def run(args) -> int:
    result = asyncio.run(_check(args))
    if args.junit:
        with open(args.junit, "w", encoding="utf-8") as f:
            f.write(junit_xml(result))
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.summary())
    return 0 if result.consistent else 1
