"""``mirrorfw primary --config FILE [--format] [--log-file PATH] [--log-format text|json]``:
run the primary controller."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="controller config (TOML, role = \"primary\")")
    p.add_argument("--format", action="store_true",
                   help="format the NVRAM region (creating it if missing): a full resync follows")
    from harness.logsetup import add_arguments as add_log_arguments

    add_log_arguments(p)


def run(args) -> int:
    from harness.controller import run_controller
    from harness.logsetup import configure

    configure(args.log_file, args.log_format)
    return run_controller("primary", args.config, format=args.format)
