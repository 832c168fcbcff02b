"""What a console command is, and how a line of text becomes one.

``Command`` and ``Arg`` are the rows of the command table (the table itself
is ``CommandSet._table`` in firmware/console.py); ``Grammar`` turns a line
into (command, arguments, flags) against the commands one console accepts,
or raises ``CommandError`` with the one message the operator sees. Nothing
here touches a controller: a line is refused before any controller method
runs.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from firmware.console_format import short

if TYPE_CHECKING:
    from firmware.console_events import EventStream

MAX_LINE_CHARS = 4096

PRIMARY = frozenset({"primary"})
SECONDARY = frozenset({"secondary"})
BOTH = frozenset({"primary", "secondary"})


class CommandError(Exception):
    """A line the console refuses; the message is shown to the operator."""


@dataclass(frozen=True)
class Arg:
    """One positional argument. ``keyword`` makes it the pair ``KEYWORD VALUE``."""

    name: str
    kind: str = "word"  # word | int | choice | range | text (the rest of the line)
    choices: tuple[str, ...] = ()
    optional: bool = False
    keyword: str | None = None

    def usage(self) -> str:
        shown = "|".join(self.choices) if self.kind == "choice" else self.name
        if self.kind == "text":
            shown += "..."
        if self.keyword:
            shown = f"{self.keyword} {shown}"
        return f"[{shown}]" if self.optional else shown


# What a command runs: the parsed arguments, flags and --json in; (data, text, stream) out.
Handler = Callable[[dict, set, bool], Awaitable[tuple[Any, str, "EventStream | None"]]]


@dataclass(frozen=True)
class Command:
    name: str  # one or two words: "status", "cg start"
    run: Handler = field(repr=False)
    help: str
    args: tuple[Arg, ...] = ()
    flags: tuple[str, ...] = ()  # command-specific options besides --json
    roles: frozenset = PRIMARY
    faults: bool = False  # refused unless the console was started with allow_faults

    def usage(self) -> str:
        parts = [self.name, *(f"[{f}]" for f in self.flags), *(a.usage() for a in self.args), "[--json]"]
        return " ".join(parts)


class Grammar:
    """The commands one console accepts, and how a line becomes one of them.

    ``other_role_words`` are the first words of the other role's commands,
    so an unknown command can say it is one of ``other_role``'s.
    """

    def __init__(self, commands: Sequence[Command], *, other_role_words: Iterable[str] = (),
                 other_role: str = "primary") -> None:
        self.commands = list(commands)
        self.by_name = {c.name: c for c in self.commands}
        self.groups = {c.name.split()[0] for c in self.commands if " " in c.name}
        self.other_role_words = frozenset(other_role_words)
        self.other_role = other_role

    def parse(self, line: str, *, allow_faults: bool) -> tuple[Command | None, dict, set]:
        """(command, args, flags); (None, {}, set()) for a blank or comment line."""
        if len(line) > MAX_LINE_CHARS:
            raise CommandError(f"line too long (more than {MAX_LINE_CHARS} characters)")
        line = line.strip(" \t\r\n")
        for column, ch in enumerate(line, 1):
            if _is_binary(ch):
                raise CommandError(f"line holds binary data (U+{ord(ch):04X} at column {column}); "
                                   "commands are printable text, type help")
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            raise CommandError(f"cannot parse the line: {exc}") from None
        if not tokens:
            return None, {}, set()
        tokens = [t for t in tokens if t != "--json"]
        if not tokens:
            raise CommandError("--json needs a command, e.g. status --json")
        command, rest = self._find(tokens)
        if command.faults and not allow_faults:
            raise CommandError("fault injection is disabled on this console "
                               "(set allow_faults = true in the [console] config section)")
        flags = {t for t in rest if t.startswith("--")}
        for flag in flags:
            if flag not in command.flags:
                known = ", ".join([*command.flags, "--json"])
                raise CommandError(f"{command.name}: unknown option {flag}; options: {known}")
        positional = [t for t in rest if not t.startswith("--")]
        return command, _bind(command, positional), flags

    def _find(self, tokens: list[str]) -> tuple[Command, list[str]]:
        word = tokens[0].lower()
        if len(tokens) > 1 and f"{word} {tokens[1].lower()}" in self.by_name:
            return self.by_name[f"{word} {tokens[1].lower()}"], tokens[2:]
        if word in self.by_name:
            return self.by_name[word], tokens[1:]
        if word in self.groups:
            subs = [c.name.split()[1] for c in self.commands if c.name.split()[0] == word]
            given = f" {tokens[1]!r}" if len(tokens) > 1 else ""
            raise CommandError(f"{word}: unknown or missing subcommand{given}; expected one of: "
                               f"{', '.join(subs)}")
        other = f" (it is a {self.other_role} command)" if word in self.other_role_words else ""
        raise CommandError(f"unknown command {short(tokens[0])!r}{other}; type help")


def _bind(command: Command, tokens: list[str]) -> dict:
    """The positional tokens as {Arg.name: value}, each validated by its Arg."""
    args: dict[str, Any] = {}
    i = 0
    for spec in command.args:
        if spec.kind == "text":
            if i < len(tokens):
                args[spec.name] = " ".join(tokens[i:])
                i = len(tokens)
            elif not spec.optional:
                raise CommandError(f"missing {spec.name}; usage: {command.usage()}")
            continue
        if spec.keyword:
            if i < len(tokens) and tokens[i].lower() == spec.keyword:
                if i + 1 >= len(tokens):
                    raise CommandError(f"{spec.keyword} needs {spec.name}; usage: {command.usage()}")
                args[spec.name] = _value(spec, tokens[i + 1])
                i += 2
            elif not spec.optional:
                raise CommandError(f"missing {spec.keyword} {spec.name}; usage: {command.usage()}")
            continue
        if i < len(tokens):
            args[spec.name] = _value(spec, tokens[i])
            i += 1
        elif not spec.optional:
            raise CommandError(f"missing {spec.name}; usage: {command.usage()}")
    if i < len(tokens):
        raise CommandError(f"unexpected argument {short(tokens[i])!r}; usage: {command.usage()}")
    return args


def _value(spec: Arg, token: str) -> Any:
    if spec.kind == "choice":
        if token.lower() not in spec.choices:
            raise CommandError(f"{spec.name.lower()} {short(token)!r}: expected one of "
                               f"{', '.join(spec.choices)}")
        return token.lower()
    if spec.kind == "int":
        if not re.fullmatch(r"\d{1,18}", token):
            raise CommandError(f"{spec.name} {short(token)!r}: expected a whole number >= 0")
        return int(token)
    if spec.kind == "range":
        m = re.fullmatch(r"(\d{1,18})(?:-(\d{0,18}))?", token)
        if not m:
            raise CommandError(f"{spec.name} {short(token)!r}: expected START or START-END "
                               "(track numbers, END exclusive)")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else None
        if end is not None and end <= start:
            raise CommandError(f"range {token}: END must be greater than START (END is exclusive)")
        return (start, end)
    return token


def _is_binary(ch: str) -> bool:
    o = ord(ch)
    return (o < 32 and ch != "\t") or 0x7F <= o <= 0x9F or ch == "\ufffd" or 0xD800 <= o <= 0xDFFF
