"""TcpLink over a connection the peer closed at once (a controller restarting)."""

from __future__ import annotations

import asyncio

import pytest

from drivers.link import TcpLink
from hal.link import LinkDown


async def closed_connection():
    async def slam(reader, writer):
        writer.transport.abort()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.read()  # the peer's reset/close has arrived
    writer.transport.abort()  # and our side is closed too, as after a reset
    await asyncio.sleep(0)
    server.close()
    return reader, writer


def test_a_link_closed_before_setup_is_down_not_an_error():
    # uvloop raised RuntimeError from set_write_buffer_limits on such a transport;
    # it escaped the primary's CG loop, which then never formed another CG.
    uvloop = pytest.importorskip("uvloop", reason="uvloop is the loop the controllers run on")

    async def main():
        reader, writer = await closed_connection()
        link = TcpLink(reader, writer)
        with pytest.raises(LinkDown, match="down"):
            await link.send(b"x")
        with pytest.raises(LinkDown):
            await link.recv()
        await link.close()

    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    try:
        runner.run(main())
    finally:
        runner.close()
