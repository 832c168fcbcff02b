"""Asyncio NBD client, and the ``nbd://`` / ``nbd+unix://`` device driver.

``NbdClient`` does fixed newstyle negotiation with NBD_OPT_GO (asking for
block sizes) and pipelines requests: each gets a handle, one reader task
matches replies to waiting futures, so any number may be in flight.

``open(url)`` returns a BlockDevice. Its geometry is needed at once (the
constructor is synchronous, and the caller may already be inside a running
loop), so ``open`` negotiates once on a private loop in a short-lived
thread and disconnects; the device then connects lazily, on first I/O, in
whatever loop the caller runs, and reconnects if it is later used from a
different loop. ``open_async(url)`` does the same without the thread.

URLs: ``nbd://HOST[:PORT]/EXPORT`` and ``nbd+unix:///EXPORT?socket=PATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import threading
from dataclasses import dataclass

from construct import ConstructError

from hal.block import BlockDevice, DeviceError, DeviceInfo
from hal.url import UrlError, parse_url

from .protocol import (
    DEFAULT_PORT,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    SIMPLE_REPLY_SIZE,
    ClientFlag,
    ClientFlags,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    InfoReply,
    InfoRequest,
    Option,
    OptionHeader,
    Reply,
    ServerEntry,
    ServerGreeting,
)
from .protocol import (
    TransmissionFlag as TF,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0
DEFAULT_MAX_BLOCK = 32 << 20


class NbdProtocolError(DeviceError):
    """The server said something the protocol does not allow."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(errno.EPROTO, message, url)


@dataclass
class NbdAddress:
    host: str = ""
    port: int = DEFAULT_PORT
    socket_path: str = ""
    export: str = ""

    @property
    def url(self) -> str:
        if self.socket_path:
            return f"nbd+unix:///{self.export}?socket={self.socket_path}"
        return f"nbd://{self.host}:{self.port}/{self.export}"


def parse_nbd_url(url: str) -> NbdAddress:
    u = parse_url(url)
    if u.scheme == "nbd":
        u.check_keys(set())
        if not u.host:
            raise UrlError(f"{url}: nbd:// needs a host, e.g. nbd://127.0.0.1:10809/vol0")
        return NbdAddress(host=u.host, port=u.port or DEFAULT_PORT, export=u.path.lstrip("/"))
    if u.scheme == "nbd+unix":
        u.check_keys({"socket"})
        if not u.query.get("socket"):
            raise UrlError(f"{url}: nbd+unix:// needs ?socket=PATH, e.g. nbd+unix:///vol0?socket=/tmp/nbd.sock")
        return NbdAddress(socket_path=u.query["socket"], export=u.path.lstrip("/"))
    raise UrlError(f"{url}: not an nbd:// or nbd+unix:// URL")


class NbdClient:
    """One negotiated NBD connection in transmission phase."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: NbdAddress) -> None:
        self.reader = reader
        self.writer = writer
        self.address = address
        self.url = address.url
        self.loop = asyncio.get_running_loop()
        self.size = 0
        self.flags = 0
        self.min_block = 1
        self.preferred_block = 4096
        self.max_block = DEFAULT_MAX_BLOCK
        self.closed = False
        self._handles = itertools.count(1)
        self._pending: dict[int, tuple[int, int, asyncio.Future]] = {}
        self._reader_task: asyncio.Task | None = None
        self._failure: BaseException | None = None

    # -- connecting -----------------------------------------------------------
    @classmethod
    async def connect(cls, address: NbdAddress | str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> NbdClient:
        if isinstance(address, str):
            address = parse_nbd_url(address)
        reader, writer = await cls._open_stream(address, timeout_s)
        client = cls(reader, writer, address)
        try:
            await asyncio.wait_for(client._go(), timeout_s)
        except BaseException:
            writer.close()
            raise
        client._reader_task = client.loop.create_task(client._read_replies())
        return client

    @staticmethod
    async def _open_stream(address: NbdAddress, timeout_s: float):
        try:
            if address.socket_path:
                coro = asyncio.open_unix_connection(address.socket_path, limit=1 << 20)
            else:
                coro = asyncio.open_connection(address.host, address.port, limit=1 << 20)
            return await asyncio.wait_for(coro, timeout_s)
        except (TimeoutError, OSError) as e:
            err = getattr(e, "errno", None) or errno.ECONNREFUSED
            raise DeviceError(err, f"cannot connect: {e}", address.url) from None

    async def _recv(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise DeviceError(errno.ECONNRESET, "server closed the connection", self.url) from None

    async def _greet(self) -> None:
        try:
            greeting = ServerGreeting.parse(await self._recv(ServerGreeting.sizeof()))
        except ConstructError:
            raise NbdProtocolError("not an NBD newstyle server (bad greeting)", self.url) from None
        if not greeting.flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise NbdProtocolError("server does not speak fixed newstyle", self.url)
        cflags = ClientFlag.C_FIXED_NEWSTYLE
        if greeting.flags & HandshakeFlag.NO_ZEROES:
            cflags |= ClientFlag.C_NO_ZEROES
        self.writer.write(ClientFlags.build(dict(flags=int(cflags))))

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self.writer.write(OptionHeader.build(dict(option=option, length=len(data))) + data)

    async def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, reply, length = OPTION_REPLY_HEADER.unpack(await self._recv(OPTION_REPLY_HEADER.size))
        if magic != OPTION_REPLY_MAGIC or opt != option:
            raise NbdProtocolError(f"bad option reply (magic {magic:#x}, option {opt})", self.url)
        if length > 1 << 20:
            raise NbdProtocolError(f"option reply of {length} bytes", self.url)
        return reply, await self._recv(length)

    def _option_error(self, option: int, reply: int, data: bytes) -> DeviceError:
        try:
            name = Reply(reply).name
        except ValueError:
            name = f"reply {reply:#x}"
        text = data.decode("utf8", "replace")
        err = errno.ENOENT if reply == Reply.ERR_UNKNOWN else errno.EPROTO
        return DeviceError(err, f"{Option(option).name} refused: {name}{': ' + text if text else ''}", self.url)

    async def _go(self) -> None:
        await self._greet()
        data = InfoRequest.build(dict(name=self.address.export, requests=[Info.BLOCK_SIZE]))
        self._send_option(Option.GO, data)
        got_export = False
        while True:
            reply, body = await self._option_reply(Option.GO)
            if reply == Reply.ACK:
                break
            if reply == Reply.INFO:
                try:
                    info = InfoReply.parse(body)
                except ConstructError:
                    raise NbdProtocolError("malformed NBD_REP_INFO", self.url) from None
                if info.type == Info.EXPORT:
                    self.size, self.flags = info.body.size, info.body.flags
                    got_export = True
                elif info.type == Info.BLOCK_SIZE:
                    self.min_block = info.body.minimum
                    self.preferred_block = info.body.preferred
                    self.max_block = info.body.maximum
            elif reply & (1 << 31):
                raise self._option_error(Option.GO, reply, body)
        if not got_export:
            raise NbdProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT", self.url)

    @classmethod
    async def list_exports(cls, address: NbdAddress | str) -> list[str]:
        """NBD_OPT_LIST, then NBD_OPT_ABORT."""
        if isinstance(address, str):
            address = parse_nbd_url(address)
        reader, writer = await cls._open_stream(address, CONNECT_TIMEOUT_S)
        client = cls(reader, writer, address)
        try:
            await client._greet()
            client._send_option(Option.LIST)
            names = []
            while True:
                reply, body = await client._option_reply(Option.LIST)
                if reply == Reply.ACK:
                    break
                if reply == Reply.SERVER:
                    names.append(ServerEntry.parse(body).name)
                elif reply & (1 << 31):
                    raise client._option_error(Option.LIST, reply, body)
            client._send_option(Option.ABORT)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client._option_reply(Option.ABORT), 2.0)
            return names
        finally:
            writer.close()

    # -- transmission ---------------------------------------------------------
    @property
    def read_only(self) -> bool:
        return bool(self.flags & TF.READ_ONLY)

    def _request(self, cmd: int, offset: int, length: int, data=None, flags: int = 0) -> asyncio.Future:
        if self.closed or self._failure is not None:
            raise DeviceError(errno.ESHUTDOWN if self.closed else errno.EIO,
                              f"connection is {'closed' if self.closed else 'broken'}", self.url)
        handle = next(self._handles)
        fut = self.loop.create_future()
        self._pending[handle] = (cmd, length, fut)
        self.writer.write(REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length))
        if data is not None:
            self.writer.write(data)
        return fut

    async def _call(self, cmd: int, offset: int, length: int, data=None, flags: int = 0):
        fut = self._request(cmd, offset, length, data, flags)
        if self.writer.transport.get_write_buffer_size() > (4 << 20):
            await self.writer.drain()
        return await fut

    async def _read_replies(self) -> None:
        try:
            while True:
                header = await self.reader.readexactly(SIMPLE_REPLY_SIZE)
                magic, err, handle = SIMPLE_REPLY.unpack(header)
                if magic != SIMPLE_REPLY_MAGIC:
                    raise NbdProtocolError(f"bad reply magic {magic:#x}", self.url)
                entry = self._pending.pop(handle, None)
                if entry is None:
                    raise NbdProtocolError(f"reply for unknown handle {handle}", self.url)
                cmd, length, fut = entry
                if err:
                    if not fut.done():
                        fut.set_exception(DeviceError(
                            err, f"{_cmd_name(cmd)} failed: {os.strerror(err)}", self.url))
                    continue
                result = await self.reader.readexactly(length) if cmd == Cmd.READ else None
                if not fut.done():
                    fut.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self._fail(DeviceError(errno.ECONNRESET, f"connection lost: {e or 'closed by server'}", self.url))
        except DeviceError as e:
            self._fail(e)
            self.writer.close()
        except asyncio.CancelledError:
            self._fail(DeviceError(errno.ESHUTDOWN, "client closed", self.url))
            raise

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        pending, self._pending = self._pending, {}
        for _cmd, _len, fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def read(self, offset: int, length: int) -> bytes:
        return await self._call(Cmd.READ, offset, length)

    async def write(self, offset: int, data, *, fua: bool = False) -> None:
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        await self._call(Cmd.WRITE, offset, n, data, CmdFlag.FUA if fua else 0)

    async def flush(self) -> None:
        await self._call(Cmd.FLUSH, 0, 0)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._call(Cmd.TRIM, offset, length, None, CmdFlag.FUA if fua else 0)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._call(Cmd.WRITE_ZEROES, offset, length, None, CmdFlag.FUA if fua else 0)

    async def raw_request(self, cmd: int, offset: int, length: int, data=None, flags: int = 0):
        """Any request, unchecked (tests use it to probe the server's checks)."""
        return await self._call(cmd, offset, length, data, flags)

    async def close(self) -> None:
        """Soft disconnect: wait for in-flight replies, send NBD_CMD_DISC."""
        if self.closed:
            return
        if self._pending:
            with contextlib.suppress(Exception):
                await asyncio.wait([f for _c, _l, f in self._pending.values()], timeout=CONNECT_TIMEOUT_S)
        self.close_nowait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task

    def close_nowait(self) -> None:
        """Send NBD_CMD_DISC and close, without waiting (usable from sync code)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            if not self.writer.is_closing():
                self.writer.write(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
            self.writer.close()


def _cmd_name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"command {cmd}"


# -- the device driver ----------------------------------------------------------
class NbdDevice(BlockDevice):
    """A remote NBD export as a BlockDevice; connects lazily in the caller's loop."""

    def __init__(self, info: DeviceInfo, address: NbdAddress, client: NbdClient | None = None) -> None:
        super().__init__(info)
        self.address = address
        self._client = client
        self._connecting: asyncio.Task | None = None

    async def client(self) -> NbdClient:
        loop = asyncio.get_running_loop()
        c = self._client
        if c is not None and c.loop is loop and not c.closed and c._failure is None:
            return c
        task = self._connecting
        if task is None or task.get_loop() is not loop or (task.done() and task.exception() is not None):
            if c is not None and c.loop is not loop:
                with contextlib.suppress(Exception):
                    c.close_nowait()
            task = self._connecting = loop.create_task(NbdClient.connect(self.address))
        c = await asyncio.shield(task)
        if c.size != self.info.size_bytes:
            raise DeviceError(errno.EIO, f"export size changed from {self.info.size_bytes} to {c.size}", self.info.url)
        self._client = c
        return c

    def _chunks(self, offset: int, length: int):
        step = max(self.info.block_size, self.info.max_transfer_bytes)
        for start in range(offset, offset + length, step):
            yield start, min(step, offset + length - start)

    async def _read(self, lba: int, count: int) -> bytes:
        c = await self.client()
        bs = self.info.block_size
        parts = await asyncio.gather(*(c.read(o, n) for o, n in self._chunks(lba * bs, count * bs)))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _write(self, lba: int, data, fua: bool) -> None:
        c = await self.client()
        bs = self.info.block_size
        view = memoryview(data).cast("B")
        base = lba * bs
        native_fua = bool(c.flags & TF.SEND_FUA)
        await asyncio.gather(*(c.write(o, view[o - base : o - base + n], fua=fua and native_fua)
                               for o, n in self._chunks(base, view.nbytes)))
        if fua and not native_fua:
            await self._flush()

    async def _flush(self) -> None:
        c = await self.client()
        if c.flags & TF.SEND_FLUSH:
            await c.flush()

    async def _discard(self, lba: int, count: int) -> None:
        c = await self.client()
        if not c.flags & TF.SEND_TRIM:
            raise DeviceError(errno.EOPNOTSUPP, "export does not support trim", self.info.url)
        bs = self.info.block_size
        await c.trim(lba * bs, count * bs)

    async def _zeroout(self, lba: int, count: int) -> None:
        c = await self.client()
        if not c.flags & TF.SEND_WRITE_ZEROES:
            return await super()._zeroout(lba, count)
        bs = self.info.block_size
        step = 1 << 30  # a 32-bit length field; stay well inside it
        for o, n in ((o, min(step, (lba + count) * bs - o)) for o in range(lba * bs, (lba + count) * bs, step)):
            await c.write_zeroes(o, n)

    def _close(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            try:
                if not c.loop.is_closed():
                    if c.loop.is_running() and c.loop is not _running_loop():
                        c.loop.call_soon_threadsafe(c.close_nowait)
                    else:
                        c.close_nowait()
            except RuntimeError:
                pass


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _device_info(url: str, c: NbdClient, read_only: bool) -> DeviceInfo:
    block = max(1, c.min_block)
    if block < 512 and c.size % 512 == 0:
        block = 512  # the HAL addresses devices in sectors at least
    return DeviceInfo(
        url=url, transport="nbd", block_size=block, num_blocks=c.size // block,
        physical_block_size=max(block, c.preferred_block), model="NBD export",
        serial=c.address.export, write_cache=bool(c.flags & TF.SEND_FLUSH),
        discard=bool(c.flags & TF.SEND_TRIM), read_only=read_only or c.read_only,
        max_transfer_bytes=min(c.max_block or DEFAULT_MAX_BLOCK, DEFAULT_MAX_BLOCK),
        extra={"export": c.address.export, "transmission_flags": c.flags},
    )


async def open_async(url: str, *, read_only: bool = False) -> NbdDevice:
    """Connect in the running loop and keep the connection."""
    address = parse_nbd_url(url)
    c = await NbdClient.connect(address)
    return NbdDevice(_device_info(url, c, read_only), address, c)


def open(url: str, *, read_only: bool = False) -> NbdDevice:  # noqa: A001 - the driver door
    """Probe the export on a private loop (in a thread, so this works inside a
    running loop too), then return a device that connects lazily."""
    address = parse_nbd_url(url)
    result: dict = {}

    async def probe():
        c = await NbdClient.connect(address)
        try:
            return _device_info(url, c, read_only)
        finally:
            await c.close()

    def run():
        try:
            result["info"] = asyncio.run(probe())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    t = threading.Thread(target=run, name="nbd-probe", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return NbdDevice(result["info"], address)
