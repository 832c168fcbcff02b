"""The OS primitives the device drivers share, one module per concern.

hal/ holds only the interfaces the firmware programs against; what it takes
to drive a real file or disk from Python lives here, below the drivers and out
of the firmware's reach (an import-linter contract forbids firmware from
importing it, directly or not):

- ``errors``: which errnos mean "not supported here" (fall back) rather than "failed".
- ``buffers``: page-aligned buffers for O_DIRECT, pooled, and the address of a buffer.
- ``pio``: blocking positional I/O that never comes back short, opening with O_DIRECT,
  fallocate and the exclusive lock on an image.
- ``pool``: the one thread pool that keeps blocking calls off the event loop.
- ``ioctl``: ioctl(2) through the cffi module, raising OSError with the errno.
- ``uring``: the io_uring engine (liburing; on for O_DIRECT by default where a ring can be set up): one ring per device and loop.
- ``deviceio``: ``DeviceIo``, a device's reads, writes and syncs off the loop, through
  io_uring or the pool, in issue order for overlapping ranges.
- ``_ioctl``: the cffi module itself, built at install time from ``_ioctl_build.py``.

The package imports nothing itself, so ``import drivers.osio._ioctl`` (or any one
module) loads only what it needs.
"""
