"""The one thread pool that keeps blocking system calls off the event loop.

Every blocking call a driver makes (pread/pwrite on the pool path of
``DeviceIo``, fdatasync, ioctl, fallocate) goes through this executor rather
than asyncio's default one, so the number of I/O threads is set in one place
(MIRRORFW_IO_THREADS) and sized for the queue depths the drivers run at.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

# Enough threads for queue depth 32 on one device plus a few on others; every
# blocking call releases the GIL (os.pread/pwrite, cffi calls).
IO_THREADS = int(os.environ.get("MIRRORFW_IO_THREADS", "48"))
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    """The process-wide I/O pool, created on first use."""
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="mirrorfw-io")
    return _executor
