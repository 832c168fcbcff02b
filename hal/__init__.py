"""Hardware abstraction layer: the interfaces the firmware programs against,
and the OS primitives the drivers share (aligned buffers, O_DIRECT, the cffi
ioctl module). The interface modules (block, nvram, link, host, console,
clock) import only the standard library."""
