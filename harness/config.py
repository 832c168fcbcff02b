"""Controller configuration: one TOML file per controller process.

```toml
role = "primary"                      # or "secondary"
[session]
id = "demo"
secret_file = "secret"                # relative to this file's folder; required, not empty
cg_interval_s = 0.0                   # and any other SessionParams field
master = true                         # a multi-controller session's master (primary only), which
subordinates = ["127.0.0.1:7801"]     #   drives these subordinates' control ports; or, on a subordinate:
# master_addr = "127.0.0.1:7800"      #   where its master is (for status), with [control] listen
secondaries = ["127.0.0.1:7701"]      # master: each subordinate's secondary ([link] listen), in the order
                                      #   of subordinates, for session recover (its own: [link] peer)
# member = true                       # a secondary of a session: a prepared CG stays in doubt across a
                                      #   restart, for session recover; it answers recovery on [link] listen
[nvram]
url = "nvram:///abs/p.nvram?size=64MiB"
[[volume]]
name = "vol0"
url = "file:///abs/a0.img?size=256MiB"                               # primary
# b_url = "file:///abs/b0.img?size=256MiB", c_url = "file:///abs/c0.img?size=256MiB"   # secondary
[link]
peer = "127.0.0.1:7700"               # primary;  secondary: listen = "127.0.0.1:7700"
encrypt = true                        # DATA payloads encrypted (AES-GCM); false: in clear on a trusted lab
                                      #   network, still authenticated (every frame is sealed either way)
# secondary only (the defaults): max_handshakes = 8, handshake_timeout_s = 10
[host]                                # optional
listen = "127.0.0.1:10809"
socket = "nbd.sock"
# NBD budgets and timeouts (drivers/nbd/limits.py; these are the defaults):
# max_connections = 64, max_request_bytes = "32MiB", max_inflight = 256, server_max_inflight = 4096,
# connection_buffer_bytes = "64MiB", server_buffer_bytes = "512MiB",
# handshake_timeout_s = 10, idle_timeout_s = 300, stall_timeout_s = 30
[console]                             # optional
url = "socket://127.0.0.1:4001"
token_file = "console.token"          # optional; required to bind a TCP console beyond loopback
allow_faults = false
[control]                             # a subordinate primary only: where its master connects
listen = "127.0.0.1:7801"
[metrics]                             # optional (off without it): Prometheus /metrics and the status
listen = "127.0.0.1:9101"             #   page at / (harness/metrics.py); port 0: any free port
# token_file = "metrics.token"        # required to bind beyond loopback (Bearer TOKEN or ?token=TOKEN)
```

Every error is a ConfigError naming the file and the key. Unknown keys are
errors. Relative paths (the secret file, the host socket, and the path of a
``file://``/``nvram://``/``pty://`` URL written without a leading slash,
like ``file://data/a0.img``) are resolved against the config file's folder.

Files named here are read with bounds (``read_small_file``): only regular
files, at most ``SECRET_MAX_BYTES`` of a secret or token (``/dev/zero`` read
until MemoryError and a FIFO hung the loader), and a secret or token that
the group or others may read is named in a warning. A console token turns
into the console URL's ``token_file`` option, which the transport reads
(drivers/console.py): a TCP client then sends ``auth TOKEN`` first.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from drivers.link import split_address
from drivers.nbd.limits import NbdLimits
from hal.url import UrlError, parse_url
from harness.errors import ConfigError

log = logging.getLogger(__name__)

ROLES = ("primary", "secondary")
PATH_SCHEMES = {"file", "nvram", "pty", "blk", "nvme", "sata"}
SECRET_MAX_BYTES = 4096
CONFIG_MAX_BYTES = 1 << 20
TCP_CONSOLES = ("socket", "rfc2217")


def read_small_file(path: Path, limit: int, what: str) -> tuple[bytes, int]:
    """(content, mode) of a regular file of at most ``limit`` bytes; OSError
    or ValueError (the message says why) for anything else. Opened without
    blocking so a FIFO cannot hang us; only ``limit + 1`` bytes are read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file (a {what} must be one)")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path} is longer than {limit} bytes (too long for a {what})")
    return data, st.st_mode


def _private_file(r: _Reader, name: str, path: Path, what: str) -> bytes:
    """A secret or token: bounded, not empty, and a warning when others may read it."""
    try:
        data, mode = read_small_file(path, SECRET_MAX_BYTES, what)
    except FileNotFoundError:
        raise r.error(name, f"{path} does not exist") from None
    except OSError as e:
        raise r.error(name, f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise r.error(name, str(e)) from None
    data = data.strip()
    if not data:
        raise r.error(name, f"{path} is empty (the {what} cannot be empty)")
    if mode & 0o077:
        log.warning("%s: %s: %s %s is readable by group or others (mode %04o); chmod 600 it",
                    r.path, r.key(name), what, path, stat.S_IMODE(mode))
    return data


@dataclass
class VolumeConfig:
    name: str
    url: str = ""  # primary: volume A
    b_url: str = ""  # secondary: B
    c_url: str = ""  # secondary: C (the consistent copy)


@dataclass
class ControllerConfig:
    path: Path
    role: str
    session_id: str
    secret: bytes
    secret_file: Path
    params: dict[str, Any]  # SessionParams fields as given (validated)
    nvram_url: str
    volumes: list[VolumeConfig]
    link_peer: tuple[str, int] | None = None  # primary
    link_listen: tuple[str, int] | None = None  # secondary
    link_encrypt: bool = True  # [link] encrypt: DATA payloads encrypted (sent, or required of the primary)
    link_max_handshakes: int = 8  # [link] max_handshakes (secondary): strangers in a handshake at once
    link_handshake_timeout_s: float = 10.0  # [link] handshake_timeout_s (secondary): waiting for one included
    host_listen: tuple[str, int] | None = None
    host_socket: Path | None = None
    host_limits: NbdLimits = field(default_factory=NbdLimits)  # [host] budgets and timeouts of the NBD port
    console_url: str | None = None  # with ?token_file=... when the console needs a token
    console_allow_faults: bool = False
    console_token_file: Path | None = None
    session_master: bool = False  # this primary is the session's master
    session_subordinates: list[tuple[str, int]] = field(default_factory=list)  # master: whom it drives
    session_master_addr: tuple[str, int] | None = None  # subordinate: its master (informational)
    control_listen: tuple[str, int] | None = None  # subordinate: where its master connects
    session_secondaries: list[tuple[str, int]] = field(default_factory=list)  # master: subordinates' secondaries
    session_member: bool = False  # secondary: of a session (keeps a prepared CG in doubt, answers recovery)
    metrics_listen: tuple[str, int] | None = None  # [metrics] listen: /metrics and the status page
    metrics_token: bytes | None = None  # [metrics] token_file's token (required beyond loopback)
    extra: dict = field(default_factory=dict)

    @property
    def session_role(self) -> str:
        """"master", "subordinate", or "" for a primary on its own (or a secondary)."""
        if self.session_master:
            return "master"
        return "subordinate" if self.control_listen is not None else ""

    def session_params(self):
        """A SessionParams with this file's values applied."""
        from firmware.params import SessionParams

        params = SessionParams()
        for name, value in self.params.items():
            params.set(name, _as_text(value))
        return params


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _Reader:
    """Takes keys out of one TOML table; what is left at the end is unknown."""

    def __init__(self, path: Path, table: dict, where: str) -> None:
        self.path = path
        self.table = dict(table)
        self.where = where

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.key(name)}: {message}")

    def take(self, name: str, kind: type | tuple, *, required: bool = False, default: Any = None) -> Any:
        if name not in self.table:
            if required:
                raise self.error(name, "missing (required)")
            return default
        value = self.table.pop(name)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            want = " or ".join(k.__name__ for k in kinds)
            raise self.error(name, f"expected {want}, got {type(value).__name__} {value!r}")
        return value

    def table_of(self, name: str) -> _Reader | None:
        value = self.take(name, dict)
        return None if value is None else _Reader(self.path, value, self.key(name))

    def done(self) -> None:
        if self.table:
            names = ", ".join(self.key(k) for k in sorted(self.table))
            raise ConfigError(f"{self.path}: unknown key(s): {names}")


def _resolve_url(r: _Reader, name: str, url: str) -> str:
    """Check the URL parses; make a relative path in it absolute."""
    try:
        parsed = parse_url(url)
    except UrlError as e:
        raise r.error(name, str(e)) from None
    if parsed.scheme in PATH_SCHEMES:
        rest = url.split("://", 1)[1]
        if rest and not rest.startswith("/"):
            where, sep, query = rest.partition("?")
            absolute = (r.path.parent / where).resolve()
            url = f"{parsed.scheme}://{absolute}{sep}{query}"
    return url


def _address(r: _Reader, name: str, *, required: bool = False) -> tuple[str, int] | None:
    text = r.take(name, str, required=required)
    if text is None:
        return None
    try:
        return split_address(text)
    except ValueError as e:
        raise r.error(name, str(e)) from None


def _session_fields() -> dict[str, Any]:
    try:
        from firmware.params import SessionParams
    except ImportError:  # the firmware core not installed yet: accept the contract's names
        return dict(cg_interval_s=0.0, max_coord_ms=50.0, max_drain_s=240.0, collision_policy="dual-image",
                    track_bytes=65536, max_failures_before_untimed=5, destage_inflight=8, drain_inflight=64)
    return {f.name: f.default for f in dataclasses.fields(SessionParams)}


def _check_param(r: _Reader, name: str, value: Any) -> None:
    try:
        from firmware.params import SessionParams
    except ImportError:
        return
    try:
        SessionParams().set(name, _as_text(value))
    except (ValueError, TypeError) as e:
        raise r.error(name, str(e)) from None


def load_config(path: str | Path, *, role: str | None = None) -> ControllerConfig:
    """Read and check one controller config; ``role`` insists on primary/secondary."""
    path = Path(path).expanduser().resolve()
    try:
        text, _mode = read_small_file(path, CONFIG_MAX_BYTES, "config file")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None

    top = _Reader(path, doc, "")
    cfg_role = top.take("role", str, required=True)
    if cfg_role not in ROLES:
        raise top.error("role", f"{cfg_role!r} is not one of {', '.join(ROLES)}")
    if role is not None and cfg_role != role:
        raise top.error("role", f"this file is for a {cfg_role}, but it was given to `mirrorfw {role}`")

    session = top.table_of("session")
    if session is None:
        raise top.error("session", "missing (required table with id and secret_file)")
    session_id = session.take("id", str, required=True)
    if not session_id or len(session_id) > 200:
        raise session.error("id", "must be 1 to 200 characters")
    secret_name = session.take("secret_file", str, required=True)
    secret_file = (path.parent / Path(secret_name).expanduser()).resolve()
    secret = _private_file(session, "secret_file", secret_file, "link secret")
    master, subordinates, master_addr = _session_role(session, cfg_role)
    session_secondaries = _addresses(session, "secondaries")
    if session_secondaries and not master:
        raise session.error("secondaries", "only the master (master = true) recovers the session's secondaries")
    if session_secondaries and len(session_secondaries) != len(subordinates):
        raise session.error("secondaries", f"{len(session_secondaries)} given for {len(subordinates)} "
                                           "subordinates (one secondary each, in the same order)")
    session_member = session.take("member", bool, default=False)
    if session_member and cfg_role != "secondary":
        raise session.error("member", "only a secondary is a session member this way (a primary is the "
                                      "master or a subordinate)")
    params: dict[str, Any] = {}
    known = _session_fields()
    for name in list(session.table):
        if name not in known:
            continue
        value = session.take(name, (str, int, float, bool))
        _check_param(session, name, value)
        params[name] = value
    session.done()

    nvram = top.table_of("nvram")
    if nvram is None:
        raise top.error("nvram", "missing (required table with url)")
    nvram_url = nvram.take("url", str, required=True)
    nvram_url = _resolve_url(nvram, "url", nvram_url)
    if parse_url(nvram_url).scheme not in ("nvram", "volatile+nvram"):  # volatile+: power-cut tests
        raise nvram.error("url", f"{nvram_url}: expected an nvram:// URL")
    nvram.done()

    raw_volumes = top.take("volume", list, required=True)
    if not raw_volumes:
        raise top.error("volume", "at least one [[volume]] is required")
    volumes: list[VolumeConfig] = []
    seen: set[str] = set()
    url_keys = ("url",) if cfg_role == "primary" else ("b_url", "c_url")
    for i, raw in enumerate(raw_volumes):
        if not isinstance(raw, dict):
            raise top.error(f"volume[{i}]", "expected a table ([[volume]])")
        v = _Reader(path, raw, f"volume[{i}]")
        name = v.take("name", str, required=True)
        if not name or len(name) > 200 or any(c.isspace() or c == "/" for c in name):
            raise v.error("name", f"{name!r}: 1 to 200 characters, no spaces or slashes")
        if name in seen:
            raise v.error("name", f"{name!r} is used by another volume")
        seen.add(name)
        urls = {k: _resolve_url(v, k, v.take(k, str, required=True)) for k in url_keys}
        for other in ("url", "b_url", "c_url"):
            if other in v.table:
                raise v.error(other, f"not used by a {cfg_role} (expected {', '.join(url_keys)})")
        v.done()
        volumes.append(VolumeConfig(name=name, **urls))

    link = top.table_of("link")
    if link is None:
        raise top.error("link", "missing (required table: peer for a primary, listen for a secondary)")
    if cfg_role == "primary":
        link_peer, link_listen = _address(link, "peer", required=True), None
    else:
        link_peer, link_listen = None, _address(link, "listen", required=True)
    link_encrypt = link.take("encrypt", bool, default=True)
    link_max_handshakes, link_handshake_timeout_s = 8, 10.0
    if cfg_role == "secondary":
        link_max_handshakes = link.take("max_handshakes", int, default=8)
        if not 1 <= link_max_handshakes <= 1024:
            raise link.error("max_handshakes", f"{link_max_handshakes}: expected 1 to 1024")
        link_handshake_timeout_s = float(link.take("handshake_timeout_s", (int, float), default=10.0))
        if not 0.1 <= link_handshake_timeout_s <= 300:
            raise link.error("handshake_timeout_s", f"{link_handshake_timeout_s:g}: expected 0.1 to 300 seconds")
    link.done()

    host_listen = host_socket = None
    host_limits = NbdLimits()
    host = top.table_of("host")
    if host is not None:
        host_listen = _address(host, "listen")
        sock = host.take("socket", str)
        if sock is not None:
            host_socket = (path.parent / Path(sock).expanduser()).resolve()
        host_limits = _nbd_limits(host)
        host.done()

    console_url, allow_faults, token_file = None, False, None
    console = top.table_of("console")
    if console is not None:
        console_url = console.take("url", str)
        if console_url is not None:
            console_url = _resolve_url(console, "url", console_url)
        token_name = console.take("token_file", str)
        if token_name is not None:
            token_file = (path.parent / Path(token_name).expanduser()).resolve()
            _private_file(console, "token_file", token_file, "console token")
        allow_faults = console.take("allow_faults", bool, default=False)
        console_url = _console_access(console, console_url, token_file)
        console.done()

    control_listen = None
    control = top.table_of("control")
    if control is not None:
        if cfg_role != "primary" or master:
            raise top.error("control", "only a subordinate primary listens for its master "
                                       "(a master connects to its [session] subordinates)")
        control_listen = _address(control, "listen", required=True)
        control.done()
    if master_addr is not None and control_listen is None:
        raise session.error("master_addr", "a subordinate needs [control] listen for its master to connect to")

    metrics_listen, metrics_token = _metrics(top, path)
    top.done()
    return ControllerConfig(
        metrics_listen=metrics_listen, metrics_token=metrics_token,
        path=path, role=cfg_role, session_id=session_id, secret=secret, secret_file=secret_file,
        params=params, nvram_url=nvram_url, volumes=volumes, link_peer=link_peer, link_listen=link_listen,
        link_encrypt=link_encrypt, link_max_handshakes=link_max_handshakes,
        link_handshake_timeout_s=link_handshake_timeout_s,
        host_listen=host_listen, host_socket=host_socket, host_limits=host_limits, console_url=console_url,
        console_allow_faults=allow_faults, console_token_file=token_file,
        session_master=master, session_subordinates=subordinates, session_master_addr=master_addr,
        control_listen=control_listen, session_secondaries=session_secondaries, session_member=session_member,
    )


def _session_role(session: _Reader, cfg_role: str) -> tuple[bool, list[tuple[str, int]], tuple[str, int] | None]:
    """``[session] master``/``subordinates`` (a master) or ``master_addr`` (a subordinate)."""
    master = session.take("master", bool, default=False)
    raw = session.take("subordinates", list)
    master_addr = _address(session, "master_addr")
    given = [k for k, v in (("master", master or None), ("subordinates", raw), ("master_addr", master_addr))
             if v is not None]
    if given and cfg_role != "primary":
        raise session.error(given[0], "only a primary is a session's master or subordinate")
    if raw is not None and not master:
        raise session.error("subordinates", "only the master (master = true) drives subordinates")
    if master and master_addr is not None:
        raise session.error("master_addr", "the master has no master (drop master_addr or master = true)")
    return master, _address_list(session, "subordinates", raw), master_addr


def _addresses(r: _Reader, key: str) -> list[tuple[str, int]]:
    return _address_list(r, key, r.take(key, list))


def _address_list(r: _Reader, key: str, raw: list | None) -> list[tuple[str, int]]:
    """A list of distinct host:port strings; an error names ``key[i]``."""
    out: list[tuple[str, int]] = []
    for i, text in enumerate(raw or []):
        if not isinstance(text, str):
            raise r.error(f"{key}[{i}]", f"expected a host:port string, got {text!r}")
        try:
            address = split_address(text)
        except ValueError as e:
            raise r.error(f"{key}[{i}]", str(e)) from None
        if address in out:
            raise r.error(f"{key}[{i}]", f"{text!r} is listed twice")
        out.append(address)
    return out


def _nbd_limits(r: _Reader) -> NbdLimits:
    """The NBD budget and timeout keys of [host]; each is checked, an error names it."""
    items = {}
    for name in [f.name for f in dataclasses.fields(NbdLimits)]:
        value = r.take(name, (int, float, str))
        if value is not None:
            items[name] = value
    try:
        return NbdLimits.from_items(items)
    except ValueError as e:  # "key: what is wrong"
        name, _, message = str(e).partition(": ")
        raise r.error(name, message) from None


def is_loopback(host: str) -> bool:
    if host in ("", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _console_access(r: _Reader, url: str | None, token_file: Path | None) -> str | None:
    """Anything that reaches a console can pause, suspend and ``set``: a TCP
    console beyond loopback needs a token. The token rides in the URL as
    ``token_file`` (the transport reads it)."""
    if url is None:
        if token_file is not None:
            raise r.error("token_file", "given without a console url")
        return None
    parsed = parse_url(url)
    if parsed.scheme not in TCP_CONSOLES:
        if token_file is not None:
            raise r.error("token_file", f"a token guards TCP consoles ({', '.join(TCP_CONSOLES)}); "
                                        f"a {parsed.scheme} console is guarded by its file permissions")
        return url
    if "token_file" in parsed.query:
        raise r.error("url", "give the token as [console] token_file, not in the URL")
    if token_file is None:
        if not is_loopback(parsed.host):
            raise r.error("url", f"{url}: a console bound beyond loopback ({parsed.host}) needs "
                                 "[console] token_file (anyone who reaches it could pause or suspend)")
        return url
    return f"{url}{'&' if '?' in url else '?'}token_file={quote(str(token_file), safe='/')}"


def _metrics(top: _Reader, path: Path) -> tuple[tuple[str, int] | None, bytes | None]:
    """``[metrics] listen`` and ``token_file``. The page and /metrics only read,
    but they show the session's state to whoever reaches them: beyond
    loopback a token is required, as for the console."""
    metrics = top.table_of("metrics")
    if metrics is None:
        return None, None
    listen = _address(metrics, "listen", required=True)
    token = None
    token_name = metrics.take("token_file", str)
    if token_name is not None:
        token_file = (path.parent / Path(token_name).expanduser()).resolve()
        token = _private_file(metrics, "token_file", token_file, "metrics token")
    elif not is_loopback(listen[0]):
        raise metrics.error("listen", f"{listen[0]}:{listen[1]}: binding beyond loopback needs [metrics] "
                                      "token_file (the page and /metrics show the session to anyone who "
                                      "reaches them)")
    metrics.done()
    return listen, token
