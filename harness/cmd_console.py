"""``mirrorfw console URL [COMMAND...]``: talk to a controller's console.

With a command: run it, print the reply, exit 0 (ok), 1 (error reply) or
2 (the console cannot be reached, refused us, stopped answering, or is a
pty another program is attached to: one line, ``busy: ... attached by ...``).
``--token-file`` sends ``auth TOKEN`` first (a TCP console with a token). ``events`` without
``--now`` streams until interrupted. Without a command: interactive, lines
from stdin go to the console and everything it says goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

EXIT_OK, EXIT_ERROR_REPLY, EXIT_CONNECTION = 0, 1, 2


def add_arguments(p) -> None:
    # Options go before URL: everything after it is the console command, --json included.
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for a reply (default 30)")
    p.add_argument("--log", metavar="FILE", help="append everything the console says to FILE")
    p.add_argument("--token-file", metavar="FILE",
                   help="a TCP console with a token: send 'auth TOKEN' (read from FILE) first")
    p.add_argument("url", help="console URL: socket://127.0.0.1:4001, rfc2217://127.0.0.1:4002, "
                               "pty:///path/link (or a device path)")
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="a console command, e.g. status --json; none: interactive")


def run(args) -> int:
    from harness.console_client import ConsoleClient, ConsoleError

    try:
        client = ConsoleClient(args.url, timeout_s=args.timeout, log_path=args.log, token_file=args.token_file)
    except ConsoleError as exc:
        print(f"mirrorfw console: {exc}", file=sys.stderr)
        return EXIT_CONNECTION
    try:
        if not args.words:
            return _interactive(client)
        line = " ".join(args.words)
        words = line.split()
        if words[0] == "events" and "--now" not in words:
            return _stream(client, line)
        lines, status = client.run(line)
        for text in lines:
            print(text)
        return EXIT_ERROR_REPLY if status else EXIT_OK
    except ConsoleError as exc:
        print(f"mirrorfw console: {exc}", file=sys.stderr)
        return EXIT_CONNECTION
    finally:
        client.close()


def _stream(client, line: str) -> int:
    """``events`` without --now: the snapshot, then the changes until interrupted.
    The snapshot ends with ``exists -`` in text, and is one JSON reply line with
    --json (which has no ``exists -`` line: waiting for one hung until the
    timeout and exited 2 having printed nothing)."""
    client.sendline(line)
    as_json = "--json" in line.split()
    ends = [rb'\{[^\n]*"command": "events"[^\n]*\n'] if as_json else [r"exists -\r?\n"]
    ended = client.expect([*ends, client.prompt])  # the snapshot ends; changes follow
    text = client.before.decode("utf-8", errors="replace").replace("\r\n", "\n")
    if text.startswith(line + "\n"):  # the console's echo
        text = text[len(line) + 1:]
    if ended == 1:  # an error reply instead of a stream
        sys.stdout.write(text)
        return EXIT_ERROR_REPLY
    snapshot = client.after.decode("utf-8", errors="replace").replace("\r", "")
    if as_json:
        sys.stdout.write(text + snapshot)
        try:
            if not json.loads(snapshot).get("ok"):
                return EXIT_ERROR_REPLY
        except ValueError:
            pass
    else:
        sys.stdout.write(text + "exists -\n")
    sys.stdout.flush()
    try:
        while True:
            data = client.read_nonblocking()
            if data:
                sys.stdout.write(data.decode("utf-8", errors="replace").replace("\r", ""))
                sys.stdout.flush()
    except (KeyboardInterrupt, BrokenPipeError):
        client.sendline("")  # ends the stream on the controller side
        return EXIT_OK


def _script(client) -> int:
    """stdin is not a terminal: run its lines one by one; exit 1 if any failed."""
    worst = EXIT_OK
    for raw in sys.stdin:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        lines, status = client.run(line)
        for text in lines:
            print(text)
        if status:
            worst = EXIT_ERROR_REPLY
    return worst


def _interactive(client) -> int:
    from harness.console_client import ConsoleError

    gone = threading.Event()

    def relay_output() -> None:
        try:
            while not gone.is_set():
                data = client.read_nonblocking()
                if data:
                    sys.stdout.write(data.decode("utf-8", errors="replace").replace("\r", ""))
                    sys.stdout.flush()
        except ConsoleError as exc:
            if not gone.is_set():
                print(f"\nmirrorfw console: {exc}", file=sys.stderr)
            gone.set()

    if not sys.stdin.isatty():
        return _script(client)
    sys.stdout.write(client.after.decode("utf-8", errors="replace"))  # the prompt sync consumed
    sys.stdout.flush()
    reader = threading.Thread(target=relay_output, name="console-output", daemon=True)
    reader.start()
    try:
        for line in sys.stdin:
            if gone.is_set():
                return EXIT_CONNECTION
            client.sendline(line.rstrip("\r\n"))
    except KeyboardInterrupt:
        pass
    lost = gone.is_set()
    gone.set()
    reader.join(timeout=1.0)
    return EXIT_CONNECTION if lost else EXIT_OK
