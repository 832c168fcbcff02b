"""Page-aligned memory for O_DIRECT I/O, pooled by size, and the address of a
buffer.

O_DIRECT wants the buffer (not just the offset and length) aligned to the
device's logical block, which Python's bytes and bytearray never promise;
anonymous mmap memory is page-aligned. Mapping and unmapping per I/O costs
more than a small 4 KiB write itself, so buffers are reused through one
process-wide pool (``buffers``).
"""

from __future__ import annotations

import mmap

from drivers.osio._ioctl import ffi

PAGE_BYTES = mmap.PAGESIZE


class AlignedBuffer:
    """Page-aligned anonymous memory (mmap), usable for O_DIRECT I/O."""

    __slots__ = ("size_bytes", "_map", "view")

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self._map = mmap.mmap(-1, max(size_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._map)[:size_bytes]

    def close(self) -> None:
        self.view.release()
        self._map.close()


class BufferPool:
    """Reuses aligned buffers by size: an mmap/munmap pair per I/O costs more
    than a small 4 KiB write itself.

    No lock: it is taken twice per I/O, and what it would guard is safe under
    the GIL anyway (list.pop and list.append are atomic, dict.setdefault too);
    two threads racing at the bound may keep a buffer or two more than it."""

    def __init__(self, keep_per_size: int = 64) -> None:
        self._free: dict[int, list[AlignedBuffer]] = {}
        self._keep = keep_per_size

    def get(self, size_bytes: int) -> AlignedBuffer:
        free = self._free.get(size_bytes)
        if free:
            try:
                return free.pop()
            except IndexError:  # another thread took the last one
                pass
        return AlignedBuffer(size_bytes)

    def put(self, buf: AlignedBuffer) -> None:
        size = buf.size_bytes
        free = self._free.get(size)
        if free is None:
            free = self._free.setdefault(size, [])
        if len(free) < self._keep and size <= (4 << 20):
            free.append(buf)
            return
        buf.close()


buffers = BufferPool()


def address_of(data) -> int:
    """The memory address of a bytes-like object (for alignment checks and
    for the kernel structures that carry a buffer pointer)."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(data)))
