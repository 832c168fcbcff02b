"""cffi builder for drivers.osio._ioctl (API mode, compiled at install time by
setuptools through ``cffi_modules``; nothing compiles at import).

It binds ioctl(2), fallocate(2) and the kernel's request numbers and
structures for block device geometry, NVMe admin commands and SG_IO, taken
from the system headers (linux-libc-dev, libc6-dev) so their layouts are the
kernel's, not a guess. Where an old header lacks one (linux/nvme_ioctl.h
before 4.x), the C source carries the kernel's own definition instead, so the
build works on any machine with a C compiler; cffi checks every declared
field against the compiled layout either way.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    r"""
    int ioctl(int fd, unsigned long request, ...);
    int fallocate(int fd, int mode, long offset, long len);

    /* Non-variadic wrappers: cffi passes these arguments without guessing. */
    int mfw_ioctl_ptr(int fd, unsigned long request, void *arg);
    int mfw_ioctl_int(int fd, unsigned long request, unsigned long arg);

    #define O_DIRECT ...
    #define O_DSYNC ...

    /* <linux/fs.h> block device requests */
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
    #define BLKDISCARDZEROES ...

    /* <linux/falloc.h> */
    #define FALLOC_FL_KEEP_SIZE ...
    #define FALLOC_FL_PUNCH_HOLE ...
    #define FALLOC_FL_ZERO_RANGE ...

    /* <linux/nvme_ioctl.h>: struct nvme_admin_cmd is #defined to this one */
    struct nvme_passthru_cmd {
        uint8_t  opcode;
        uint8_t  flags;
        uint16_t rsvd1;
        uint32_t nsid;
        uint32_t cdw2;
        uint32_t cdw3;
        uint64_t metadata;
        uint64_t addr;
        uint32_t metadata_len;
        uint32_t data_len;
        uint32_t cdw10;
        uint32_t cdw11;
        uint32_t cdw12;
        uint32_t cdw13;
        uint32_t cdw14;
        uint32_t cdw15;
        uint32_t timeout_ms;
        uint32_t result;
    };
    #define NVME_IOCTL_ID ...
    #define NVME_IOCTL_ADMIN_CMD ...

    /* <scsi/sg.h> */
    typedef struct sg_io_hdr {
        int interface_id;
        int dxfer_direction;
        unsigned char cmd_len;
        unsigned char mx_sb_len;
        unsigned short iovec_count;
        unsigned int dxfer_len;
        void *dxferp;
        unsigned char *cmdp;
        unsigned char *sbp;
        unsigned int timeout;
        unsigned int flags;
        int pack_id;
        void *usr_ptr;
        unsigned char status;
        unsigned char masked_status;
        unsigned char msg_status;
        unsigned char sb_len_wr;
        unsigned short host_status;
        unsigned short driver_status;
        int resid;
        unsigned int duration;
        unsigned int info;
    } sg_io_hdr_t;
    #define SG_IO ...
    #define SG_DXFER_NONE ...
    #define SG_DXFER_TO_DEV ...
    #define SG_DXFER_FROM_DEV ...
    #define SG_INFO_OK_MASK ...
    #define SG_INFO_OK ...
    """
)

ffibuilder.set_source(
    "drivers.osio._ioctl",
    r"""
    #define _GNU_SOURCE
    #include <fcntl.h>
    #include <stdint.h>
    #include <sys/ioctl.h>
    #include <linux/fs.h>
    #include <linux/falloc.h>
    #include <scsi/sg.h>

    #if defined(__has_include)
    #  if __has_include(<linux/nvme_ioctl.h>)
    #    include <linux/nvme_ioctl.h>
    #    define MFW_HAVE_NVME_IOCTL_H 1
    #  endif
    #endif
    #ifndef MFW_HAVE_NVME_IOCTL_H
    /* The kernel's uapi definition (include/uapi/linux/nvme_ioctl.h). */
    #include <linux/types.h>
    struct nvme_passthru_cmd {
        __u8 opcode; __u8 flags; __u16 rsvd1; __u32 nsid; __u32 cdw2; __u32 cdw3;
        __u64 metadata; __u64 addr; __u32 metadata_len; __u32 data_len;
        __u32 cdw10; __u32 cdw11; __u32 cdw12; __u32 cdw13; __u32 cdw14; __u32 cdw15;
        __u32 timeout_ms; __u32 result;
    };
    #define nvme_admin_cmd nvme_passthru_cmd
    #define NVME_IOCTL_ID _IO('N', 0x40)
    #define NVME_IOCTL_ADMIN_CMD _IOWR('N', 0x41, struct nvme_admin_cmd)
    #endif

    static int mfw_ioctl_ptr(int fd, unsigned long request, void *arg)
    {
        return ioctl(fd, request, arg);
    }

    static int mfw_ioctl_int(int fd, unsigned long request, unsigned long arg)
    {
        return ioctl(fd, request, arg);
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
