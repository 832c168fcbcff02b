"""The testbench's error family; the CLI turns each into one line and an exit code."""

from __future__ import annotations

from harness.errors import register


class TestbenchError(Exception):
    """Base of every error the testbench raises on bad input or a failed run."""

    __test__ = False  # not a pytest class, despite the name


class TraceError(TestbenchError):
    """A trace file that cannot be read: names the file and the line (or record)."""

    def __init__(self, file: str, line_no: int, message: str) -> None:
        self.file = str(file)
        self.line_no = line_no
        self.message = message
        where = f"{self.file}:{line_no}" if line_no else self.file
        super().__init__(f"{where}: {message}")


class ReplayLogError(TestbenchError):
    """A replay log that is not one, or is cut short."""


class ReplayError(TestbenchError):
    """A replay that could not run (bad target, bad option)."""


# Bad input (a malformed trace, log or option) is a usage error: exit code 2.
register(TestbenchError, 2)
