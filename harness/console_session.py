"""Glue between a console transport and the firmware's command set.

``run_session(port, commands)``: banner, then prompt -> line -> reply, until
the peer goes away; ``events`` (without ``--now``) streams until the peer
sends a line or disconnects. ``start_console(url, controller, ...)`` serves
a controller's console on a URL (what `mirrorfw primary|secondary` call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from drivers.console import ConsoleServer, serve_console
from firmware.console import CommandSet, EventStream
from firmware.events import EventBus
from hal.console import ConsolePort

log = logging.getLogger(__name__)


async def run_session(port: ConsolePort, commands: CommandSet, *, banner: bool = True) -> None:
    if banner:
        await port.write(commands.banner + "\n")
    while True:
        await port.write(commands.prompt)
        line = await port.readline()
        if line is None:
            return
        reply = await commands.execute(line)
        if reply.text:
            await port.write(reply.text + "\n")
        if reply.stream is not None and not await stream_events(port, reply.stream):
            return


async def stream_events(port: ConsolePort, stream: EventStream) -> bool:
    """Write events as they come until the peer sends a line (True) or goes away (False)."""
    reader = asyncio.ensure_future(port.readline())
    nxt: asyncio.Future | None = None
    try:
        while True:
            nxt = asyncio.ensure_future(stream.next_line())
            done, _ = await asyncio.wait({reader, nxt}, return_when=asyncio.FIRST_COMPLETED)
            if nxt in done:
                await port.write(nxt.result() + "\n")
                nxt = None
            if reader in done:
                return reader.result() is not None
    finally:
        stream.close()
        for fut in (nxt, reader):
            if fut is not None and not fut.done():
                fut.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fut


async def start_console(url: str, controller: Any, *, role: str = "primary", allow_faults: bool = False,
                        crashpoints: Any = None, events: EventBus | None = None,
                        power_cut: Callable[[int | None], None] | None = None) -> ConsoleServer:
    commands = CommandSet(controller, role=role, allow_faults=allow_faults, crashpoints=crashpoints,
                          events=events, power_cut=power_cut)

    async def handle(port: ConsolePort) -> None:
        await run_session(port, commands)

    return await serve_console(url, handle)
