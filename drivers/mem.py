"""``mem://?size=64MiB[&block_size=512]``: a device in memory, allocated lazily
per 1 MiB chunk so a sparse 16 TiB volume costs only what is written."""

from __future__ import annotations

import errno

from hal.block import BlockDevice, DeviceError, DeviceInfo
from hal.url import UrlError, parse_url

CHUNK = 1 << 20


class MemDevice(BlockDevice):
    def __init__(self, info: DeviceInfo) -> None:
        super().__init__(info)
        self._chunks: dict[int, bytearray] = {}

    def _spans(self, offset: int, length: int):
        while length:
            index, within = divmod(offset, CHUNK)
            n = min(length, CHUNK - within)
            yield index, within, n
            offset += n
            length -= n

    async def _read(self, lba: int, count: int) -> bytes:
        bs = self.info.block_size
        out = bytearray(count * bs)
        pos = 0
        for index, within, n in self._spans(lba * bs, count * bs):
            chunk = self._chunks.get(index)
            if chunk is not None:
                out[pos : pos + n] = chunk[within : within + n]
            pos += n
        return bytes(out)

    async def _write(self, lba: int, data, fua: bool) -> None:
        bs = self.info.block_size
        src = memoryview(data).cast("B")
        pos = 0
        for index, within, n in self._spans(lba * bs, len(src)):
            chunk = self._chunks.get(index)
            if chunk is None:
                chunk = self._chunks[index] = bytearray(CHUNK)
            chunk[within : within + n] = src[pos : pos + n]
            pos += n

    def can_extents(self) -> bool:
        return True  # chunks never written (or zeroed whole) are holes

    async def _extents(self, lba: int, count: int) -> list[tuple[int, bool]]:
        bs = self.info.block_size
        runs: list[tuple[int, bool]] = []
        for index, _, n in self._spans(lba * bs, count * bs):
            hole = index not in self._chunks
            if runs and runs[-1][1] == hole:
                runs[-1] = (runs[-1][0] + n, hole)
            else:
                runs.append((n, hole))
        # Chunks (1 MiB) are whole blocks; a range's ends are block-aligned too.
        return [(n // bs, hole) for n, hole in runs]

    async def _discard(self, lba: int, count: int) -> None:
        await self._zeroout(lba, count)

    async def _zeroout(self, lba: int, count: int) -> None:
        bs = self.info.block_size
        for index, within, n in self._spans(lba * bs, count * bs):
            if n == CHUNK:
                self._chunks.pop(index, None)
            elif index in self._chunks:
                self._chunks[index][within : within + n] = bytes(n)


def open(url: str, *, read_only: bool = False) -> MemDevice:  # noqa: A001 - the driver door
    u = parse_url(url)
    u.check_keys({"size", "block_size"})
    size = u.size()
    if size is None:
        raise UrlError(f"{url}: mem:// needs ?size=..., e.g. mem://?size=64MiB")
    bs = u.int_param("block_size", 512)
    if bs < 512 or bs & (bs - 1):
        raise UrlError(f"{url}: block_size {bs} must be a power of two >= 512")
    if size % bs:
        raise DeviceError(errno.EINVAL, f"size {size} is not a multiple of block_size {bs}", url)
    info = DeviceInfo(
        url=url, transport="mem", block_size=bs, num_blocks=size // bs,
        physical_block_size=bs, model="mirrorfw memory device", discard=True, read_only=read_only,
        max_transfer_bytes=32 << 20,
    )
    return MemDevice(info)
