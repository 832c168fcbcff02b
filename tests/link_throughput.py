"""Tracks/s through the replication link over loopback TCP: LinkRemote ->
TcpLink -> ReplicationService -> a secondary that does nothing, one process,
the window full (64 tracks in flight). Not a test (no assertions); run:

    .venv/bin/python tests/link_throughput.py [--encrypt on|off] [--seconds 3]

It is how the link's cost was measured before and after sealing (issue 16)."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware.link_primary import LinkRemote  # noqa: E402
from firmware.link_secondary import ReplicationService  # noqa: E402
from firmware.remote import RemoteState, VolumeGeometry  # noqa: E402
from harness.controller import connect_replication_link, listen_replication_links  # noqa: E402

logging.getLogger().setLevel(logging.ERROR)  # each run's closing link says "down"

SECRET = b"benchmark secret"


class NullSecondary:
    async def hello(self, session_id, volumes, generation=0):
        return RemoteState(session_id=session_id, committed_cg=0, new=False, volumes=list(volumes))

    async def receive_track(self, volume, track, cg_seq, data):
        pass

    async def sync(self, cg_seq):
        pass

    drain_done = prepare = commit = abort = sync


def _encrypt_kw(cls, encrypt):
    # Before sealing there was no such option: measure the link as it was.
    if encrypt is None or "encrypt" not in inspect.signature(cls).parameters:
        return {}
    return {"encrypt": encrypt}


async def measure(track_bytes: int, seconds: float, encrypt) -> float:
    service = ReplicationService(NullSecondary(), SECRET, "bench", random_bytes=os.urandom,
                                 **_encrypt_kw(ReplicationService, encrypt))
    server = await listen_replication_links("127.0.0.1", 0, service.serve)
    port = server.sockets[0].getsockname()[1]

    async def factory():
        return await connect_replication_link("127.0.0.1", port)

    remote = LinkRemote(factory, SECRET, random_bytes=os.urandom, window=64, **_encrypt_kw(LinkRemote, encrypt))
    geometry = [VolumeGeometry("vol0", track_bytes * 1024, track_bytes)]
    await remote.connect("bench", geometry)
    payload = os.urandom(track_bytes)
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker(first: int) -> None:
        nonlocal sent
        track = first
        while time.perf_counter() < deadline:
            await remote.send_track("vol0", track % 1024, 1, payload)
            sent += 1
            track += 64

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(i) for i in range(64)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await remote.close()
    server.close()
    await server.wait_closed()
    return sent / elapsed, sent / cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encrypt", choices=["on", "off"], default=None)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--uvloop", action="store_true", help="the loop the controllers run on")
    args = ap.parse_args()
    encrypt = None if args.encrypt is None else args.encrypt == "on"
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    for size in (64 << 10, 1 << 20):
        rates = []
        for _ in range(args.runs):
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                rates.append(runner.run(measure(size, args.seconds, encrypt)))
        # Per CPU second too: both ends run in this one process, and on a shared
        # machine wall time says as much about the neighbours as about the link.
        print(f"{size >> 10:5d} KiB tracks: best {max(r for r, _ in rates):8.0f} tracks/s, "
              f"{max(c for _, c in rates):8.0f} tracks/CPU-s "
              f"(runs: {', '.join(f'{r:.0f}' for r, _ in rates)}); encrypt={args.encrypt or 'default'}"
              f"{' uvloop' if args.uvloop else ''}")


if __name__ == "__main__":
    main()
