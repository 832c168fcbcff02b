"""``mirrorfw replay TRACE --target URL[,URL...]``: play a trace into block devices."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from testbench.cli_trace import add_reader_options, reader_options
from testbench.errors import ReplayError

COUNT_LIMIT_BYTES = 256 << 20  # pre-count records (for the progress bar's ETA) below this size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="trace file (format detected, or --format; .gz read transparently)")
    p.add_argument("--target", action="append", required=True,
                   help="device URL(s), one per volume, comma-separated or repeated: nbd://host:port/vol0, file:///a.img")
    p.add_argument("--volume-names", help="names of the volumes, comma-separated (default vol0, vol1, ...)")
    p.add_argument("--timing", default="afap", help="afap | original | scale=X (X times the original speed)")
    p.add_argument("--queue-depth", type=int, default=16, help="I/Os in flight at most")
    p.add_argument("--replay-time-scale", type=float, help="fio's replay_time_scale: percent, 200 = twice as fast (default: none, --timing rules)")
    p.add_argument("--replay-no-stall", action="store_true", help="fio's replay_no_stall: ignore trace times")
    p.add_argument("--replay-redirect", help="fio's replay_redirect: send every device to this one volume")
    p.add_argument("--log", help="replay log file (issue/ack of every write), for `mirrorfw check`")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is on stderr, and only on a terminal)")
    p.add_argument("--json", action="store_true", help="print only the result as JSON on stdout (the mapping goes to stderr)")
    add_reader_options(p)


def run(args) -> int:
    from drivers import open_device
    from testbench.replay import Replayer, ReplayOptions
    from testbench.traces import read_trace, scan

    urls = [u for t in args.target for u in t.split(",") if u]
    names = args.volume_names.split(",") if args.volume_names else None
    opts = reader_options(args)
    from testbench.cli_trace import warn_rate

    st = scan(read_trace(args.trace, args.fmt, **opts))  # devices (sorted for the mapping) and count
    warn_rate(st, opts)
    devices = [open_device(u) for u in urls]
    try:
        replay_opts = ReplayOptions(timing=args.timing, queue_depth=args.queue_depth,
                                    replay_time_scale=args.replay_time_scale, replay_no_stall=args.replay_no_stall,
                                    replay_redirect=args.replay_redirect, progress=not args.no_progress,
                                    total=st.records - st.by_op["T"], trace_name=os.path.basename(args.trace))
        rp = Replayer(devices, args.log, replay_opts, volume_names=names)
        print(rp.mapping_for(st.devices).describe(), file=sys.stderr if args.json else sys.stdout)
        try:
            result = asyncio.run(rp.run(read_trace(args.trace, args.fmt, **opts), st.devices))
        except ReplayError:
            raise
    finally:
        for d in devices:
            d.close()
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.summary())
    return 0
