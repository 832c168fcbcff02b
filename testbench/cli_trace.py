"""``mirrorfw trace stats|convert|generate``: look at, convert and make traces."""

from __future__ import annotations

import argparse
import json
import os
import sys

from testbench.errors import TestbenchError


def add_reader_options(p: argparse.ArgumentParser) -> None:
    from testbench.traces import FORMATS

    p.add_argument("--format", dest="fmt", help=f"input format (default: detect): {', '.join(FORMATS)}")
    p.add_argument("--events", choices=["Q", "D"], default="Q", help="blktrace/blkparse: queue (Q) or issue (D) events")
    p.add_argument("--v3-unit", choices=["ns", "us", "ms", "s"], default="us", help="fio v3 timestamp unit (fio writes µs)")
    p.add_argument("--columns", help="generic csv column spec, e.g. ts=0:ns,op=1,offset=2:byte,length=3:byte,device=4 "
                   "(what `trace generate --format csv` writes; the ts unit as the file has it)")
    p.add_argument("--ops", help="generic csv: op values, e.g. R=0|read,W=1|write (default: r/read, w/write, t/trim, f/flush)")
    p.add_argument("--delimiter", default=",", help="generic csv delimiter")
    p.add_argument("--skip-lines", type=int, default=0, help="generic csv: header lines to skip")


def format_used(args) -> str:
    """The format the trace is read as: --format, or the detected one."""
    from testbench.traces import detect_format

    return args.fmt or detect_format(args.trace).name


def warn_rate(st, opts: dict) -> None:
    """A csv read with a ts unit that makes its rate absurd: say so on stderr."""
    spec = opts.get("spec")
    if spec is None:
        return
    from testbench.traces.generic_csv import implausible_rate

    text = implausible_rate(st.iops, st.records, spec)
    if text:
        print(f"mirrorfw: warning: {text}", file=sys.stderr)


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
    s.add_argument("--json", action="store_true", help="print the stats as JSON")
    c = sub.add_parser("convert", help="convert a trace to another format")
    c.add_argument("trace", help="trace file to read")
    c.add_argument("out", help="file to write in the --to format")
    c.add_argument("--to", required=True, help="output format")
    c.add_argument("--device-map", help="rename devices on the way, OLD=NEW[,OLD=NEW...], e.g. "
                   "8,0=/dev/nbd0 or dev0=/tmp/a.img, so fio can open the files a converted iolog names; "
                   "'trace stats' lists a trace's devices (default: names kept)")
    add_reader_options(c)
    g = sub.add_parser("generate", help="write a seeded synthetic trace (--format all: a sample of every format into a folder)")
    g.add_argument("out", help="file to write (a folder with --format all)")
    g.add_argument("--format", dest="fmt", default="fio3", help="output format, or 'all' (OUT is then a folder)")
    g.add_argument("--seed", type=int, default=1, help="random seed: the same seed, the same trace")
    g.add_argument("--duration-s", type=float, default=10.0, help="trace length in seconds")
    g.add_argument("--iops", type=float, default=500.0, help="mean I/O rate")
    g.add_argument("--devices", type=int, default=2, help="number of devices")
    g.add_argument("--span", default="256MiB", help="address range per device")
    g.add_argument("--write-ratio", type=float, default=0.7, help="share of writes")
    g.add_argument("--flush-ratio", type=float, default=0.0, help="share of flushes")
    g.add_argument("--trim-ratio", type=float, default=0.0, help="share of trims")
    g.add_argument("--seq-prob", type=float, default=0.3, help="chance an I/O follows the previous one")
    g.add_argument("--hot-prob", type=float, default=0.5, help="chance an I/O goes to the hot region")
    g.add_argument("--burst-prob", type=float, default=0.1, help="chance of a burst")
    g.add_argument("--columns", help="generic csv output layout (default: ts=0:ns,op=1,offset=2,length=3,device=4)")


def _stats(args) -> int:
    from testbench.traces import read_trace, scan

    opts = reader_options(args)
    fmt = format_used(args)
    st = scan(read_trace(args.trace, fmt, **opts))
    warn_rate(st, opts)
    if args.json:
        print(json.dumps({"format": fmt} | st.as_dict(), indent=2))
        return 0
    print(f"{args.trace}: {fmt} ({'given' if args.fmt else 'detected'}): {st.records} records over "
          f"{st.duration_s:.3f} s ({st.iops:.1f} IOPS)")
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
    records = read_trace(args.trace, args.fmt, **opts)
    if args.device_map:
        records = map_devices(records, parse_device_map(args.device_map))
    result = fmt.write(args.out, records, **_writer_options(args))
    print(f"{args.out}: wrote {result.written} records as {fmt.name}"
          + (f"; skipped {result.skipped} the format cannot express" if result.skipped else ""))
    return 0


def parse_device_map(text: str) -> dict[str, str]:
    """``OLD=NEW,OLD=NEW``; a blktrace device ``8,0`` has a comma of its own,
    so a part without ``=`` belongs to the name before it."""
    parts: list[str] = []
    for piece in text.split(","):
        if parts and "=" not in piece:
            parts[-1] += "," + piece
        else:
            parts.append(piece)
    out = {}
    for part in parts:
        old, eq, new = part.partition("=")
        if not eq or not old.strip() or not new.strip():
            raise TestbenchError(f"--device-map: {part!r} is not OLD=NEW")
        out[old.strip()] = new.strip()
    if len(out) == 0:
        raise TestbenchError("--device-map: no OLD=NEW given")
    return out


def map_devices(records, mapping: dict[str, str]):
    from dataclasses import replace

    for rec in records:
        yield replace(rec, device=mapping[rec.device]) if rec.device in mapping else rec


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
        from testbench.traces.generic_csv import DEFAULT_WRITE_SPEC

        os.makedirs(args.out, exist_ok=True)
        for f in FORMATS.values():
            path = os.path.join(args.out, "sample" + f.suffix)
            r = f.write(path, generate(params))
            print(f"{path}: {r.written} records" + (f" ({r.skipped} skipped)" if r.skipped else "")
                  + (f"; read it with --columns {DEFAULT_WRITE_SPEC}" if f.name == "csv" else ""))
        return 0
    fmt = format_named(args.fmt)
    r = fmt.write(args.out, generate(params), **_writer_options(args))
    print(f"{args.out}: {r.written} records as {fmt.name}" + (f" ({r.skipped} skipped)" if r.skipped else ""))
    return 0


def run(args) -> int:
    return {"stats": _stats, "convert": _convert, "generate": _generate}[args.trace_command](args)
