"""``mirrorfw completion bash|zsh|tcsh|man``: a shell completion script
(shtab) or the man page (argparse-manpage), both made from the same argparse
parser as ``--help``, so they never drift from it.

    eval "$(mirrorfw completion bash)"      # or save it under ~/.local/share/bash-completion/completions/mirrorfw
    mirrorfw completion man > mirrorfw.1 && man ./mirrorfw.1
"""

from __future__ import annotations

from harness.errors import ConfigError

SHELLS = ("bash", "zsh", "tcsh")


def add_arguments(p) -> None:
    p.add_argument("shell", choices=[*SHELLS, "man"], help="the shell to complete for, or 'man' for a man page (roff)")


def full_parser():
    from harness.cli import ALL, build_parser

    return build_parser(ALL)


def run(args) -> int:
    parser = full_parser()
    if args.shell == "man":
        try:
            from argparse_manpage.manpage import Manpage
        except ImportError:
            raise ConfigError("the man page needs argparse-manpage: pip install argparse-manpage") from None
        print(str(Manpage(parser, _data={"project_name": "mirrorfw"})), end="")
        return 0
    try:
        import shtab
    except ImportError:
        raise ConfigError("shell completion needs shtab: pip install shtab") from None
    print(shtab.complete(parser, shell=args.shell))
    return 0
