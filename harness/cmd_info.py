"""``mirrorfw info URL [--json]``."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("url", help="device URL: mem://?size=1GiB, file:///path?size=1GiB, blk:///dev/loop0, "
                   "nvme:///dev/nvme0n1, sata:///dev/sda; or a plain path, as qemu-img takes it (a file: file://PATH)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def as_url(text: str) -> str:
    """A plain path means the file there (``/path/img`` = ``file:///path/img``), as qemu-img reads it."""
    if "://" in text:
        return text
    from pathlib import Path

    path = Path(text).resolve()
    return f"blk://{path}" if str(path).startswith("/dev/") else f"file://{path}"


FIELDS = ["url", "transport", "block_size", "physical_block_size", "num_blocks", "size_bytes",
          "model", "serial", "firmware", "rotational", "write_cache", "discard", "direct_io", "read_only"]


def run(args) -> int:
    from drivers import open_device

    dev = open_device(as_url(args.url), read_only=True)
    try:
        info = dev.info.as_dict()
    finally:
        dev.close()
    shown = {k: info[k] for k in FIELDS}
    if args.json:
        print(json.dumps(shown | {"extra": info.get("extra", {})}, indent=2))
    else:
        width = max(map(len, FIELDS))
        for k in FIELDS:
            print(f"{k:<{width}}  {shown[k]}")
    return 0
