"""``mirrorfw primary --config FILE [--format]``: run the primary controller."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="controller config (TOML, role = \"primary\")")
    p.add_argument("--format", action="store_true",
                   help="format the NVRAM region (creating it if missing): a full resync follows")


def run(args) -> int:
    from harness.controller import run_controller

    return run_controller("primary", args.config, format=args.format)
