"""Hardware abstraction layer: the interfaces the firmware programs against
(block, nvram, link, host, console, clock, and url for the device URLs). They
import only the standard library; the OS primitives the drivers share
(aligned buffers, O_DIRECT, the cffi ioctl module, io_uring) live in
drivers.osio, below the drivers and out of the firmware's reach."""
