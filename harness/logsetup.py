"""Where a controller's log goes and in which shape: ``--log-file PATH`` and
``--log-format text|json`` of ``mirrorfw primary|secondary``.

``configure(log_file, log_format)`` replaces the root logger's handlers
(``harness/cli.py`` set up stderr in text before the command ran) and keeps
its level (``-v``). A log file is appended to through a WatchedFileHandler,
so logrotate may move it away; it is created 0600 (a log names peers and
paths). JSON is one object per line: ``time`` (ISO 8601 with the local
offset), ``level``, ``logger``, ``message``, ``pid``, and ``exc`` with the
traceback when there is one.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
from datetime import datetime
from pathlib import Path

from harness.errors import ConfigError

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"  # as harness/cli.py's


class JsonFormatter(logging.Formatter):
    """One JSON object per record, one line each."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False)


def add_arguments(p) -> None:
    """The two options, for the controller commands."""
    p.add_argument("--log-file", metavar="PATH",
                   help="append the log to PATH (created 0600) instead of stderr (default: stderr)")
    p.add_argument("--log-format", choices=FORMATS, default="text",
                   help="text lines, or one JSON object per line (default: text)")


def configure(log_file: str | Path | None = None, log_format: str = "text") -> logging.Handler:
    """Send the root logger's records to ``log_file`` (else stderr) in ``log_format``."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(FORMATS)}")
    if log_file is not None:
        path = Path(log_file).expanduser()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)  # 0600 if new
            os.close(fd)
            handler: logging.Handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--log-file {path}: {e.strerror or e}") from None
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    return handler
