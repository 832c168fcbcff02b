"""Issue 16, trace files: a line too long for any text trace is an error
after a bounded read (a 1 GB single-line file once peaked at 2.1 GB RSS),
and a missing trace says "no such file", not "no such blktrace file"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbench.errors import TraceError
from testbench.traces import read_trace
from testbench.traces.record import MAX_LINE_BYTES, text_lines

ROOT = Path(__file__).parent.parent


def test_a_missing_trace_says_no_such_file(tmp_path):
    missing = tmp_path / "nope.iolog"
    with pytest.raises(FileNotFoundError) as exc:
        list(read_trace(missing))
    assert str(exc.value) == f"{missing}: no such file"


def test_an_overlong_line_is_a_trace_error_naming_the_line(tmp_path):
    path = tmp_path / "long.csv"
    path.write_bytes(b"fio version 3 iolog\n" + b"x" * (MAX_LINE_BYTES + 10) + b"\nmore\n")
    with pytest.raises(TraceError, match=r"long\.csv:2: line longer than"):
        list(text_lines(path))
    with pytest.raises(TraceError, match="line longer than"):
        list(read_trace(path, "fio3"))


def test_a_huge_single_line_trace_fails_in_bounded_memory(tmp_path):
    """256 MiB of one line (sparse on disk), read under a 160 MiB address-space
    limit above the interpreter's start: the old reader needed the whole line."""
    path = tmp_path / "one-line.iolog"
    with path.open("wb") as f:
        f.write(b"fio version 3 iolog\n")
        f.truncate(256 << 20)  # zeros, no newline
    code = f"""
import resource, sys
from testbench.traces.record import text_lines
from testbench.errors import TraceError
with open('/proc/self/status') as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmSize:'))
resource.setrlimit(resource.RLIMIT_AS, (vm + (160 << 20), resource.RLIM_INFINITY))
try:
    for _ in text_lines({str(path)!r}):
        pass
except TraceError as e:
    print('TraceError', e)
    sys.exit(0)
except MemoryError:
    print('MemoryError')
    sys.exit(3)
print('no error')
sys.exit(4)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "line longer than" in res.stdout
