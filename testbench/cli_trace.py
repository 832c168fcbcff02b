"""``mirrorfw trace stats|convert|generate``: look at, convert and make traces."""

from __future__ import annotations

import argparse
import json
import os

from testbench.errors import TestbenchError


def add_reader_options(p: argparse.ArgumentParser) -> None:
    from testbench.traces import FORMATS

    p.add_argument("--format", dest="fmt", help=f"input format (default: detect): {', '.join(FORMATS)}")
    p.add_argument("--events", choices=["Q", "D"], default="Q", help="blktrace/blkparse: queue (Q) or issue (D) events")
    p.add_argument("--v3-unit", choices=["ns", "us", "ms", "s"], default="us", help="fio v3 timestamp unit (fio writes µs)")
    p.add_argument("--columns", help="generic csv: ts=0:us,op=1,offset=2:byte,length=3:byte,device=4")
    p.add_argument("--ops", help="generic csv: op values, e.g. R=0|read,W=1|write")
    p.add_argument("--delimiter", default=",", help="generic csv delimiter")
    p.add_argument("--skip-lines", type=int, default=0, help="generic csv: header lines to skip")


def reader_options(args) -> dict:
    opts: dict = {"events": args.events, "v3_unit": args.v3_unit}
    if args.columns:
        args.fmt = args.fmt or "csv"
        from testbench.traces.generic_csv import CsvSpec

        try:
            opts["spec"] = CsvSpec.parse(args.columns, ops=args.ops, delimiter=args.delimiter, skip_lines=args.skip_lines)
        except ValueError as e:
            raise TestbenchError(f"--columns: {e}") from None
    return opts


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)
    s = sub.add_parser("stats", help="count records, devices, time span and IOPS of a trace")
    s.add_argument("trace", help="trace file (format detected, or --format; .gz read transparently)")
    add_reader_options(s)
    s.add_argument("--json", action="store_true")
    c = sub.add_parser("convert", help="convert a trace to another format")
    c.add_argument("trace", help="trace file to read")
    c.add_argument("out", help="file to write in the --to format")
    c.add_argument("--to", required=True, help="output format")
    add_reader_options(c)
    g = sub.add_parser("generate", help="write a seeded synthetic trace (--format all: a sample of every format into a folder)")
    g.add_argument("out", help="file to write (a folder with --format all)")
    g.add_argument("--format", dest="fmt", default="fio3", help="output format, or 'all' (OUT is then a folder)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--duration-s", type=float, default=10.0)
    g.add_argument("--iops", type=float, default=500.0)
    g.add_argument("--devices", type=int, default=2)
    g.add_argument("--span", default="256MiB", help="address range per device")
    g.add_argument("--write-ratio", type=float, default=0.7)
    g.add_argument("--flush-ratio", type=float, default=0.0)
    g.add_argument("--trim-ratio", type=float, default=0.0)
    g.add_argument("--seq-prob", type=float, default=0.3)
    g.add_argument("--hot-prob", type=float, default=0.5)
    g.add_argument("--burst-prob", type=float, default=0.1)
    g.add_argument("--columns", help="generic csv output layout")


def _stats(args) -> int:
    from testbench.traces import read_trace, scan

    opts = reader_options(args)
    st = scan(read_trace(args.trace, args.fmt, **opts))
    if args.json:
        print(json.dumps(st.as_dict(), indent=2))
        return 0
    print(f"{args.trace}: {st.records} records over {st.duration_s:.3f} s ({st.iops:.1f} IOPS)")
    for op, name in (("R", "reads"), ("W", "writes"), ("T", "trims"), ("F", "flushes")):
        print(f"  {name:<8} {st.by_op[op]:>10}  {st.bytes_by_op[op] / 2**20:12.1f} MiB")
    for dev, n in sorted(st.devices.items()):
        print(f"  device {dev}: {n} records, highest byte {st.max_offset_end.get(dev, 0)}")
    if st.out_of_order:
        print(f"  {st.out_of_order} records are earlier than the one before them")
    return 0


def _convert(args) -> int:
    from testbench.traces import format_named, read_trace

    fmt = format_named(args.to)
    opts = reader_options(args)
    result = fmt.write(args.out, read_trace(args.trace, args.fmt, **opts), **_writer_options(args))
    print(f"{args.out}: wrote {result.written} records as {fmt.name}"
          + (f"; skipped {result.skipped} the format cannot express" if result.skipped else ""))
    return 0


def _writer_options(args) -> dict:
    if getattr(args, "columns", None):
        from testbench.traces.generic_csv import CsvSpec

        try:
            return {"spec": CsvSpec.parse(args.columns)}
        except ValueError as e:
            raise TestbenchError(f"--columns: {e}") from None
    return {}


def _generate(args) -> int:
    from hal.url import parse_size
    from testbench.generate import GeneratorParams, generate
    from testbench.traces import FORMATS, format_named

    params = GeneratorParams(seed=args.seed, duration_s=args.duration_s, iops=args.iops, devices=args.devices,
                             span_bytes=parse_size(args.span), write_ratio=args.write_ratio,
                             flush_ratio=args.flush_ratio, trim_ratio=args.trim_ratio, seq_prob=args.seq_prob,
                             hot_prob=args.hot_prob, burst_prob=args.burst_prob)
    try:
        params.check()
    except ValueError as e:
        raise TestbenchError(f"generate: {e}") from None
    if args.fmt == "all":
        os.makedirs(args.out, exist_ok=True)
        for f in FORMATS.values():
            path = os.path.join(args.out, "sample" + f.suffix)
            r = f.write(path, generate(params))
            print(f"{path}: {r.written} records" + (f" ({r.skipped} skipped)" if r.skipped else ""))
        return 0
    fmt = format_named(args.fmt)
    r = fmt.write(args.out, generate(params), **_writer_options(args))
    print(f"{args.out}: {r.written} records as {fmt.name}" + (f" ({r.skipped} skipped)" if r.skipped else ""))
    return 0


def run(args) -> int:
    return {"stats": _stats, "convert": _convert, "generate": _generate}[args.trace_command](args)
