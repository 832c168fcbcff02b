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


class CountingWriter:
    """A StreamWriter over a real connection that counts the writes handed
    to its transport (each a send on the socket when its buffer is empty)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.transport = writer.transport
        self.writes = 0

    def get_extra_info(self, name, default=None):
        return self._writer.get_extra_info(name, default)

    def write(self, data) -> None:
        self.writes += 1
        self._writer.write(data)

    def writelines(self, data) -> None:
        self.writes += 1
        self._writer.writelines(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()


def test_frames_sent_in_one_loop_turn_go_out_in_one_write_in_order_and_before_a_close():
    async def main():
        got = asyncio.get_running_loop().create_future()

        async def peer(reader, writer):
            link = TcpLink(reader, writer)
            got.set_result([await link.recv() for _ in range(21)])
            await link.close()

        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        counting = CountingWriter(writer)
        link = TcpLink(reader, counting)
        frames = [bytes([i]) * (100 + i) for i in range(20)]
        await asyncio.gather(*(link.send(f) for f in frames))  # 20 senders in one turn (the drain's workers)
        await asyncio.sleep(0)
        assert counting.writes == 1  # was one write per frame
        await link.send(b"last")
        await link.close()  # queued in this turn: it still goes out before the close
        assert await asyncio.wait_for(got, 5) == [*frames, b"last"]
        server.close()
        await server.wait_closed()

    asyncio.run(main())
