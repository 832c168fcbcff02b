"""cffi builder for hal._ioctl (API mode, compiled at install time by
setuptools through ``cffi_modules``; nothing compiles at import).

It binds ioctl(2) and the kernel's request numbers and structures for block
device geometry, NVMe admin commands and SG_IO, taken from the system
headers so their layouts are the kernel's, not a guess.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    r"""
    int ioctl(int fd, unsigned long request, ...);

    #define BLKGETSIZE64 ...
    #define BLKSSZGET ...
    #define BLKPBSZGET ...
    #define BLKIOMIN ...
    #define BLKIOOPT ...
    #define BLKROGET ...
    #define BLKFLSBUF ...
    #define BLKDISCARD ...
    #define BLKZEROOUT ...
    #define BLKROTATIONAL ...
    """
)

ffibuilder.set_source(
    "hal._ioctl",
    r"""
    #include <sys/ioctl.h>
    #include <linux/fs.h>
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
