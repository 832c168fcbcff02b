"""``mirrorfw serve URL [URL...] [--listen HOST:PORT] [--socket PATH] [--name NAME...] [--read-only]
[--limit KEY=VALUE...]``

Serve plain devices over NBD, replication off (benchmarks call this
"mirrorfw_local"). Prints one line ``ready nbd://HOST:PORT/NAME ...`` once
listening; SIGTERM or SIGINT closes cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from harness.errors import ConfigError

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("urls", nargs="+", metavar="URL", help="device URLs to export (mem://?size=1GiB, file:///path?size=1GiB, ...)")
    p.add_argument("--listen", default="127.0.0.1:10809", metavar="HOST:PORT",
                   help="TCP address (default 127.0.0.1:10809; port 0 picks a free one; 'none' for no TCP)")
    p.add_argument("--socket", metavar="PATH", help="also listen on this Unix socket")
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="export name for each URL in order (default vol0, vol1, ...)")
    p.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    p.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                   help="an NBD budget or timeout, as in a controller's [host] table: max_connections, "
                        "max_request_bytes, max_inflight, server_max_inflight, connection_buffer_bytes, "
                        "server_buffer_bytes, handshake_timeout_s, idle_timeout_s, stall_timeout_s")


def parse_limits(texts: list[str]):
    from drivers.nbd.limits import NbdLimits, parse_limit_items

    try:
        return NbdLimits.from_items(parse_limit_items(texts))
    except ValueError as e:
        raise ConfigError(f"--limit {e}") from None


def parse_listen(text: str) -> tuple[str, int] | None:
    if text.lower() in ("none", ""):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:10809")
    return host.strip("[]") or "127.0.0.1", int(port)


def export_names(urls: list[str], names: list[str]) -> list[str]:
    if len(names) > len(urls):
        raise ConfigError(f"{len(names)} --name options for {len(urls)} device URLs")
    out = list(names) + [f"vol{i}" for i in range(len(names), len(urls))]
    if len(set(out)) != len(out):
        raise ConfigError(f"export names must be unique: {', '.join(out)}")
    return out


async def serve(args) -> int:
    from drivers import open_device
    from drivers.nbd.server import NbdServer
    from harness.hostport import DeviceTarget

    listen = parse_listen(args.listen)
    if listen is None and not args.socket:
        raise ConfigError("nothing to listen on: give --listen HOST:PORT or --socket PATH")
    names = export_names(args.urls, args.name)
    limits = parse_limits(args.limit)
    devices = {}
    try:
        for name, url in zip(names, args.urls, strict=True):
            devices[name] = open_device(url, read_only=args.read_only)
        target = DeviceTarget(devices, read_only=args.read_only)
        server = NbdServer(target, read_only=args.read_only, limits=limits)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        addresses = []
        try:
            if listen is not None:
                host, port = await server.start_tcp(*listen)
                addresses += [f"nbd://{host}:{port}/{n}" for n in names]
            if args.socket:
                await server.start_unix(args.socket)
                addresses += [f"nbd+unix:///{n}?socket={args.socket}" for n in names]
            print("ready " + " ".join(addresses), flush=True)
            await stop.wait()
            log.info("serve: stopping")
        finally:
            await server.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    finally:
        for dev in devices.values():
            dev.close()
    return 0


def run(args) -> int:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # optional speed-up
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        code = runner.run(serve(args))
    sys.stdout.flush()
    return code
