"""The controller processes: wiring firmware to drivers from a config.

``mirrorfw primary`` and ``mirrorfw secondary`` each run one asyncio loop
(uvloop when installed) that opens the devices and NVRAM through the driver
doors, builds the Primary or Secondary with an AsyncioClock, starts the
replication link (the primary connects to ``[link] peer`` with backoff; the
secondary listens), the NBD host port and the console, then prints one
``ready key=value ...`` line on stdout for supervisors.

In a multi-controller session (issue 13) a primary is the master or a
subordinate (harness/config.py): a subordinate serves ``ControlService``
on ``[control] listen`` in front of a ``LocalMember`` of its Primary and
forms no CGs of its own; the master connects a ``ControlRemote`` per
``[session] subordinates`` entry (in the background, with backoff) and
hands them to a ``SessionMaster`` over its own Primary, which forms every
CG. Both come from firmware/session_member.py and session_master.py
through ``local_member`` and ``session_master`` below, the only two places
this module depends on them.
A session's secondaries (``[session] member = true``) keep a prepared CG in
doubt across a restart and answer session recovery on their replication
port; the master reaches them there (``[session] secondaries``).

SIGTERM/SIGINT stop cleanly: the current CG finishes or fails, NVRAM is
persisted and marked clean, exit status 0. Crash points armed from
``MIRRORFW_CRASHPOINTS="name[:after],..."`` (or the console's ``fault arm``)
SIGKILL the process when hit, so tests can prove recovery from NVRAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from drivers.link import Framing, TcpLink, connect_link, listen_links
from firmware import protocol
from firmware.crashpoints import CrashPoints
from firmware.events import EventBus
from hal.clock import AsyncioClock
from hal.url import parse_url
from harness.config import ControllerConfig, load_config
from harness.errors import ConfigError, register

log = logging.getLogger(__name__)

# The replication link's frames carry their own length: the TCP driver reads
# the header, asks the protocol how much follows, then reads that.
# Before a peer is authenticated its frames are capped (a stranger cannot make
# us buffer a 64 MiB frame); the cap lifts once this side sends a sealed frame.
LINK_FRAMING = Framing(protocol.HEADER_BYTES, protocol.rest_length, preauth_bytes=protocol.PREAUTH_FRAME_BYTES,
                       opens=protocol.is_sealed)
CRASHPOINTS_ENV = "MIRRORFW_CRASHPOINTS"
STOP_TIMEOUT_S = 30.0


class ControllerError(Exception):
    """The controller cannot start (NVRAM missing or unreadable, ...)."""


register(ControllerError, 2)


async def connect_replication_link(host: str, port: int, *, timeout_s: float = 5.0) -> TcpLink:
    return await connect_link(host, port, timeout_s=timeout_s, framing=LINK_FRAMING)


async def listen_replication_links(host: str, port: int, on_link) -> asyncio.Server:
    return await listen_links(host, port, on_link, framing=LINK_FRAMING)


# -- a session's members (firmware/session_member.py, session_master.py) --------------
# The control link carries MemberPort calls; what answers them in process is
# theirs. These two are the whole of the harness's dependence on them.


def local_member(primary, name: str):
    """This controller's Primary as a MemberPort (session_member.py's LocalMember)."""
    try:
        from firmware.session_member import LocalMember
    except ImportError as e:
        raise ControllerError(f"a session member needs firmware/session_member.py: {e}") from None
    return LocalMember(primary, name=name)


def session_master(primary, subordinates: list, *, name: str = "master", secondaries: dict | None = None):
    """The SessionMaster over this Primary (a member itself) and the
    subordinates, with each member's secondary for session recovery;
    ``start_loop()`` begins forming CGs, Primary.stop() ends it."""
    try:
        from firmware.session_master import SessionMaster
    except ImportError as e:
        raise ControllerError(f"a session master needs firmware/session_master.py: {e}") from None
    return SessionMaster(primary, subordinates, name=name, secondaries=secondaries)


# -- crash points ---------------------------------------------------------------


def sigkill_self(name: str) -> None:
    """What an armed crash point does in a controller process: die at once,
    the way a power cut or kill -9 would, without any cleanup."""
    with contextlib.suppress(Exception):
        os.write(2, f"mirrorfw: crash point {name} hit: SIGKILL\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)


def cut_power(seed: int | None) -> None:
    """What the console's ``power cut`` does in a controller process: cut
    the power domain of its volatile+ devices and NVRAM (drivers/powerloss.py)
    and end at once, as a power cut to the controller would."""
    from drivers.powerloss import cut_power_and_exit

    cut_power_and_exit(seed)


def parse_crashpoints(text: str) -> list[tuple[str, int]]:
    """``"name[:after],name2"`` -> [(name, after), ...]; ValueError when malformed."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, after = item.partition(":")
        if sep and not after.isdigit():
            raise ValueError(f"{CRASHPOINTS_ENV}: {item!r}: expected name or name:N (N hits to skip)")
        out.append((name, int(after) if sep else 0))
    return out


def make_crashpoints(env: dict[str, str] | None = None) -> CrashPoints:
    """Crash points that SIGKILL this process, armed from the environment.
    Call after the firmware modules that declare the points are imported."""
    points = CrashPoints(on_hit=sigkill_self)
    text = (os.environ if env is None else env).get(CRASHPOINTS_ENV, "")
    try:
        for name, after in parse_crashpoints(text):
            points.arm(name, after)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{CRASHPOINTS_ENV}={text!r}: {e.args[0] if e.args else e}") from None
    return points


# -- opening NVRAM ----------------------------------------------------------------


def open_nvram_checked(url: str, *, format: bool):
    """Open the NVRAM region; refuse a missing file unless formatting."""
    from drivers import open_nvram

    path = parse_url(url).path
    if not format and not os.path.exists(path):
        raise ControllerError(
            f"NVRAM {path} does not exist: refusing to start without the write cache and bitmaps; "
            "start with --format to create it and do a full resync"
        )
    return open_nvram(url)


def nvram_refusal(exc: BaseException, url: str) -> ControllerError:
    return ControllerError(
        f"NVRAM {url} is unreadable ({exc}): refusing to start; start with --format to "
        "reformat it and do a full resync (cached writes in it are lost)"
    )


# -- the process ---------------------------------------------------------------------


class Controller:
    role = ""

    def __init__(self, cfg: ControllerConfig, *, format: bool = False, out: TextIO | None = None,
                 freeze_gc: bool = False) -> None:
        self.cfg = cfg
        self.format = format
        self.freeze_gc = freeze_gc  # a process of its own (run_controller): see run()
        self.out = out or sys.stdout
        self.clock = AsyncioClock()
        self.events = EventBus()
        self.crashpoints = CrashPoints(on_hit=sigkill_self)  # armed in start(), once the points are declared
        self._stop = asyncio.Event()
        self._exits = contextlib.AsyncExitStack()  # what start() opened, closed in reverse on stop
        self.addresses: dict[str, str] = {}
        self.nbd_server = None  # the host port, once started (its requests feed the metrics)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            async with self._exits:
                await self.start()
                if self.freeze_gc:
                    # What start() built lives as long as the process: out of the
                    # collector's generations, so a full collection walks only what
                    # came later (one took ~14 ms over the modules alone, inside
                    # host writes' and held acks' latency).
                    gc.collect()
                    gc.freeze()
                fields = " ".join(f"{k}={v}" for k, v in self.addresses.items())
                print(f"ready role={self.role} session={self.cfg.session_id} pid={os.getpid()} {fields}",
                      file=self.out, flush=True)
                await self._stop.wait()
                log.info("%s: stopping", self.role)
                await asyncio.wait_for(self.stop(), STOP_TIMEOUT_S)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return 0

    def _close_on_exit(self, close: Callable[[], object]) -> None:
        """Run ``close`` (sync or async) when run() ends, in reverse order of
        opening; a failure is logged, not raised, so the rest still close."""
        async def close_logged() -> None:
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception as e:  # noqa: BLE001 - closing everything else matters more
                log.warning("%s: while closing: %s", self.role, e)

        self._exits.push_async_callback(close_logged)

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def _open_nvram(self):
        nvram = open_nvram_checked(self.cfg.nvram_url, format=self.format)
        self._close_on_exit(nvram.close)
        return nvram

    def _arm_crashpoints(self) -> None:
        """From MIRRORFW_CRASHPOINTS; after the firmware import has declared the points."""
        self.crashpoints.armed.update(make_crashpoints().armed)

    async def _listen_with_retry(self, host: str, port: int, serve, what: str,
                                 wait_s: float = 15.0) -> asyncio.Server:
        """Bind a link port. Right after a crash of the previous process the
        port may still be held by its closing connections (FIN_WAIT, which
        SO_REUSEADDR does not override): retry for a while instead of failing."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            try:
                return await listen_replication_links(host, port, serve)
            except OSError as e:
                log.debug("%s: binding the %s port: %r (errno %s)", self.role, what, e, e.errno)
                if e.errno != errno.EADDRINUSE or asyncio.get_running_loop().time() > deadline:
                    raise
                log.info("%s: %s port %s:%d still busy; retrying", self.role, what, host, port)
                await asyncio.sleep(0.2)

    def _open_device(self, url: str):
        from drivers import open_device

        dev = open_device(url)
        self._close_on_exit(dev.close)
        return dev

    async def _open_firmware(self, controller) -> None:
        """Recover (or format) the Primary's or Secondary's NVRAM; a refusal is one clear line."""
        from firmware.errors import NvramError

        try:
            await controller.open(format=self.format)
        except NvramError as e:
            raise nvram_refusal(e, self.cfg.nvram_url) from None

    async def _start_host_port(self, target, *, read_only: bool) -> None:
        from drivers.nbd.server import NbdServer

        if self.cfg.host_listen is None and self.cfg.host_socket is None:
            return
        server = self.nbd_server = NbdServer(target, read_only=read_only, limits=self.cfg.host_limits)
        self._close_on_exit(server.close)
        if self.cfg.host_listen is not None:
            host, port = await server.start_tcp(*self.cfg.host_listen)
            self.addresses["nbd"] = f"{host}:{port}"
        if self.cfg.host_socket is not None:
            await server.start_unix(str(self.cfg.host_socket))
            self.addresses["nbd_socket"] = str(self.cfg.host_socket)

    async def _start_console(self, controller) -> None:
        if not self.cfg.console_url:
            return
        from harness.console_session import start_console

        server = await start_console(
            self.cfg.console_url, controller, role=self.role, allow_faults=self.cfg.console_allow_faults,
            crashpoints=self.crashpoints, events=self.events, power_cut=cut_power,
        )
        self._close_on_exit(server.close)
        self.addresses["console"] = server.url

    async def _start_metrics(self, firmware) -> None:
        """``[metrics] listen``: /metrics and the status page, on this loop (harness/metrics.py)."""
        if self.cfg.metrics_listen is None:
            return
        from harness.metrics import serve_metrics

        server = await serve_metrics(*self.cfg.metrics_listen, self.role, firmware, self.events,
                                     session_id=self.cfg.session_id, nbd=self.nbd_server,
                                     token=self.cfg.metrics_token)
        self._close_on_exit(server.close)
        self.addresses["metrics"] = server.url


class PrimaryController(Controller):
    role = "primary"

    async def start(self) -> None:
        cfg = self.cfg
        params = cfg.session_params()
        nvram = self._open_nvram()
        # Imported here so a refused NVRAM is reported before anything heavy loads.
        from firmware.link_primary import LinkRemote
        from firmware.primary import Primary

        if cfg.session_role:  # its crash points (session.*) are declared on import
            with contextlib.suppress(ImportError):  # said in one line by local_member/session_master
                import firmware.session_master  # noqa: F401
        self._arm_crashpoints()
        volumes = {v.name: self._open_device(v.url) for v in cfg.volumes}
        host, port = cfg.link_peer

        async def link_factory():
            return await connect_replication_link(host, port)

        self.remote = LinkRemote(link_factory, cfg.secret, random_bytes=os.urandom, clock=self.clock,
                                 events=self.events, encrypt=cfg.link_encrypt)
        self._close_on_exit(self.remote.close)
        self.primary = Primary(volumes, nvram, self.clock, params, self.remote, session_id=cfg.session_id,
                               events=self.events, crashpoints=self.crashpoints)
        await self._open_firmware(self.primary)
        self.addresses["link_peer"] = f"{host}:{port}"
        self.session_master = None
        if cfg.session_role:
            self.addresses["session"] = cfg.session_role
        if cfg.session_role == "subordinate":
            await self._serve_control()
        await self._start_host_port(self.primary.host_target(), read_only=False)
        await self._start_console(self.primary)
        await self._start_metrics(self.primary)
        if cfg.session_role == "master":
            self._start_session()
        # In a session the master forms every CG; a primary on its own forms its own.
        self._starter = asyncio.ensure_future(self._start_replication(form_cgs=not cfg.session_role))
        self._close_on_exit(self._cancel_starter)

    async def _serve_control(self) -> None:
        """A subordinate: answer the master's MemberPort calls on [control] listen."""
        from firmware.control_service import ControlService

        cfg = self.cfg
        host, port = cfg.control_listen
        self.member = local_member(self.primary, name=f"{host}:{port}")
        self.control = ControlService(self.member, cfg.secret, cfg.session_id, random_bytes=os.urandom,
                                      clock=self.clock, events=self.events)
        self._close_on_exit(self.control.close)
        server = await self._listen_with_retry(host, port, self.control.serve, "control")
        self._close_on_exit(server.close)
        bound = server.sockets[0].getsockname()[:2]
        self.addresses["control"] = f"{bound[0]}:{bound[1]}"

    def _start_session(self) -> None:
        """The master: a ControlRemote per subordinate, connecting in the
        background; the SessionMaster over them and this Primary."""
        from firmware.control_remote import ControlRemote

        cfg = self.cfg
        remotes = []
        for host, port in cfg.session_subordinates:
            async def dial(host=host, port=port) -> TcpLink:
                return await connect_replication_link(host, port)

            remote = ControlRemote(f"{host}:{port}", dial, cfg.secret, session_id=cfg.session_id,
                                   random_bytes=os.urandom, clock=self.clock, events=self.events)
            self._close_on_exit(remote.close)
            remote.start_connecting()
            remotes.append(remote)
        # Session recovery reaches each member's secondary straight on its
        # replication port (firmware/control_service.py serve_link_or_control).
        secondaries = {}
        if cfg.session_secondaries:
            targets = [("master", cfg.link_peer)] + [
                (r.name, address) for r, address in zip(remotes, cfg.session_secondaries, strict=True)]
            for member, (host, port) in targets:
                async def dial_secondary(host=host, port=port) -> TcpLink:
                    return await connect_replication_link(host, port)

                flash = ControlRemote(f"{host}:{port}", dial_secondary, cfg.secret, session_id=cfg.session_id,
                                      random_bytes=os.urandom, clock=self.clock, master_name="master")
                self._close_on_exit(flash.close)
                secondaries[member] = flash
        self.session_master = session_master(self.primary, remotes, name="master", secondaries=secondaries)
        self.addresses["members"] = ",".join(m.name for m in self.session_master.members)

    async def _start_replication(self, form_cgs: bool = True) -> None:
        """Primary.start() connects the remote; while the secondary is away,
        try again with backoff (host I/O goes on meanwhile). Then a master's
        SessionMaster begins forming CGs."""
        delay = 0.1
        while True:
            try:
                await self.primary.start(form_cgs=form_cgs)
                break
            except (ConnectionError, TimeoutError) as e:
                log.warning("primary: secondary not reachable yet (%s); retrying in %.1f s", e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        if self.session_master is not None:
            self.session_master.start_loop()

    async def _cancel_starter(self) -> None:
        if not self._starter.done():
            self._starter.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._starter

    async def stop(self) -> None:
        await self._cancel_starter()
        await self.primary.stop(clean=True)  # stops a master's session loop first


class SecondaryController(Controller):
    role = "secondary"

    async def start(self) -> None:
        cfg = self.cfg
        nvram = self._open_nvram()
        # Imported here so a refused NVRAM is reported before anything heavy loads.
        from firmware.link_secondary import ReplicationService
        from firmware.secondary import Secondary

        self._arm_crashpoints()
        volumes = {v.name: (self._open_device(v.b_url), self._open_device(v.c_url)) for v in cfg.volumes}
        self.secondary = Secondary(volumes, nvram, self.clock, session_id=cfg.session_id, events=self.events,
                                   crashpoints=self.crashpoints,
                                   max_pinned_bytes=cfg.session_params().max_pinned_bytes,
                                   session_member=cfg.session_member)
        await self._open_firmware(self.secondary)
        self.service = ReplicationService(self.secondary, cfg.secret, cfg.session_id, random_bytes=os.urandom,
                                          clock=self.clock, events=self.events, encrypt=cfg.link_encrypt,
                                          max_handshakes=cfg.link_max_handshakes,
                                          handshake_timeout_s=cfg.link_handshake_timeout_s)
        serve = self.service.serve
        if cfg.session_member:  # session recovery (FlashPort) on the same port, on the control link's channel
            from firmware.control_service import ControlService, serve_link_or_control

            self.flash = ControlService(self.secondary, cfg.secret, cfg.session_id, random_bytes=os.urandom,
                                        clock=self.clock)
            self._close_on_exit(self.flash.close)

            async def serve(link, replication=self.service.serve, control=self.flash.serve):
                await serve_link_or_control(link, replication, control, self.clock)
        server = await self._listen_with_retry(*cfg.link_listen, serve, "link")
        self._close_on_exit(server.close)
        host, port = server.sockets[0].getsockname()[:2]
        self.addresses["link"] = f"{host}:{port}"
        await self._start_host_port(self.secondary.host_target(), read_only=True)
        await self._start_console(self.secondary)
        await self._start_metrics(self.secondary)

    async def stop(self) -> None:
        await self.secondary.close()


CONTROLLERS = {"primary": PrimaryController, "secondary": SecondaryController}


def run_controller(role: str, config_path: str | Path, *, format: bool = False) -> int:
    """Load the config and run the controller until a stop signal (the CLI's body)."""
    cfg = load_config(config_path, role=role)
    controller_cls = CONTROLLERS[role]

    async def main() -> int:
        return await controller_cls(cfg, format=format, freeze_gc=True).run()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
