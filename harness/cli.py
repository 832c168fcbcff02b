"""The ``mirrorfw`` command line.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``run(args) -> int``; this table is the only place that names them, and
modules load only when their command runs. Errors of every layer become one
line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name: (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("harness.cmd_info", "show what the HAL knows about a device URL"),
    "trace": ("testbench.cli_trace", "trace stats, conversion between formats, synthetic generation"),
    "replay": ("testbench.cli_replay", "replay a trace into volumes with stamped writes and a replay log"),
    "check": ("testbench.cli_check", "check that a copy is a consistent cut of a replay log"),
    "primary": ("harness.cmd_primary", "run the primary controller from a config file"),
    "secondary": ("harness.cmd_secondary", "run the secondary controller from a config file"),
    "serve": ("harness.cmd_serve", "serve plain devices over NBD (replication off)"),
    "demo": ("testbench.cli_demo", "the main job: both controllers on file-backed volumes, a bundled trace replayed, C checked, a report"),
    "recover": ("harness.cmd_recover", "session recovery from the master's config: every member's C to one CG (--failover: then C -> B)"),
    "console": ("harness.cmd_console", "talk to a controller console (socket://, rfc2217://, pty://); one command or interactive"),
    "bench": ("testbench.cli_bench", "run the benchmarks side by side and write bench/results.json"),
    "faults": ("testbench.cli_faults", "seeded fault campaign (crash, link, device, fuzz, load); writes faults/results.json"),
    "sim": ("testbench.cli_sim", "deterministic simulation of whole sessions from seeds (--seeds A:B, --dask, --matrix); coverage, repro lines, shrinking"),
    "completion": ("harness.cmd_completion", "print a shell completion script (bash, zsh, tcsh) or the man page"),
}
ALL = "*"  # build_parser(ALL): every command's options (completion, man page)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default: "(default: X)" unless the
    help already names it; an option without help gets just that."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is argparse.SUPPRESS or not action.option_strings or "default" in text.lower():
            return text
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            return text
        d = action.default
        shown = "off" if d is False else "on" if d is True else "none" if d is None else "%(default)s"
        return f"{text} (default: {shown})".lstrip()


def _formatted(parser: argparse.ArgumentParser) -> None:
    """HelpFormatter on ``parser`` and every subparser below it (argparse
    does not hand formatter_class down)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                _formatted(p)

EXIT_USAGE = 2


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Every command is listed; only ``selected`` loads its module (so a
    controller process never imports the testbench or matplotlib); ``ALL``
    loads every one. ``-v`` is taken before or after the command."""
    parser = argparse.ArgumentParser(
        prog="mirrorfw",
        description="Storage-controller firmware emulator for asynchronous remote "
        "mirroring with consistency groups.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug; default: warnings)")
    verbose = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given after the command it adds to the count; absent, the top level's stays.
    verbose.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                         help="more log output (-vv: debug; default: warnings)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[verbose])
        if name == selected or selected == ALL:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    _formatted(parser)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mirrorfw")
    except PackageNotFoundError:
        return "(not installed)"


def one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if a in COMMANDS), None))
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from harness.errors import exit_code_for

    try:
        return importlib.import_module(args._module).run(args)
    except KeyboardInterrupt:
        print("mirrorfw: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the CLI's one catch-all
        code = exit_code_for(exc)
        if code is None:
            raise
        print(f"mirrorfw {args.command}: {one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
