"""A small controller offering the methods the console calls on the Primary
façade (cg_start, cg_pause, run, status, bitmap, ...), for console tests that
must not depend on the firmware core. The CG-cycle test uses the real Primary."""

from __future__ import annotations

import signal

from bitarray import bitarray

from firmware.crashpoints import CrashPoints, declare
from firmware.events import EventBus
from firmware.params import SessionParams
from firmware.remote import RemotePort

FAKE_POINT = declare("console_fake.before_commit", "console tests: the fake controller's commit")


class FakePrimary:
    def __init__(self, volumes: dict[str, int] | None = None, track_bytes: int = 65536) -> None:
        self.session_id = "fake"
        self.params = SessionParams(track_bytes=track_bytes)
        self.events = EventBus()
        self.fired: list[str] = []
        self.crashpoints = CrashPoints(on_hit=self.fired.append)
        self.calls: list[tuple] = []
        self.copy_state = "Running"
        self.cg_seq = 0
        self.ok = 0
        self.failed = 0
        self.last_cg_time: float | None = None
        self.link = "up"
        self.tracks = volumes or {"vol0": 256, "vol1": 100}
        self.oos = {n: bitarray(t) for n, t in self.tracks.items()}
        self.cr = {n: bitarray(t) for n, t in self.tracks.items()}
        for bits in (*self.oos.values(), *self.cr.values()):
            bits.setall(0)

    # ---- writes a test can make (tracks dirtied) ----------------------------
    def dirty(self, volume: str, start: int, end: int) -> None:
        self.oos[volume][start:end] = 1

    # ---- contract: commands -------------------------------------------------
    async def cg_start(self) -> None:
        self.calls.append(("cg_start",))
        self._state("Running")

    async def cg_pause(self) -> None:
        self.calls.append(("cg_pause",))
        self._state("Paused")

    async def cg_resume(self) -> None:
        self.calls.append(("cg_resume",))
        self._state("Running")

    async def suspend(self) -> None:
        self.calls.append(("suspend",))
        self._state("Suspended")

    async def resume_pair(self) -> None:
        self.calls.append(("resume_pair",))
        self._state("Running")

    async def run(self) -> None:
        self.calls.append(("run",))
        self.cg_seq += 1
        self.events.emit("create", "cg", seq=self.cg_seq)
        self.events.emit("change", "cg", seq=self.cg_seq, phase="draining")
        self.crashpoints.hit(FAKE_POINT)
        for bits in self.oos.values():
            bits.setall(0)
        self.ok += 1
        self.last_cg_time = 1_700_000_000.0 + self.cg_seq
        self.events.emit("destroy", "cg", seq=self.cg_seq, result="committed")

    async def cg_fail(self, reason: str = "operator") -> None:
        self.calls.append(("cg_fail", reason))
        self.failed += 1
        self.events.emit("change", "cg", seq=self.cg_seq, result="failed", reason=reason)

    def _state(self, state: str) -> None:
        self.copy_state = state
        self.events.emit("change", "session", copy_state=state)

    def set_param(self, name: str, text: str) -> None:
        self.params.set(name, text)  # a refused value is no call that changed anything
        self.calls.append(("set_param", name, text))

    # ---- contract: queries --------------------------------------------------
    def status(self) -> dict:
        oos = sum(b.count() for b in self.oos.values())
        cr = sum(b.count() for b in self.cr.values())
        return {
            "copy_state": self.copy_state, "fatal_reason": None, "phase": "idle", "cg_seq": self.cg_seq,
            "last_cg_time": self.last_cg_time, "data_exposure_s": 0.25, "total_successful_cgs": self.ok,
            "total_failed_cgs": self.failed, "consecutive_failures": 0,
            "cg_interval_s": self.params.cg_interval_s, "max_coord_ms": self.params.max_coord_ms,
            "max_drain_s": self.params.max_drain_s, "collision_policy": self.params.collision_policy,
            "oos_tracks": oos, "cr_tracks": cr, "recoverable": True, "severity": "Normal",
            "held_ack_ms": {"p50": 0.1, "p99": 1.5, "max": 2.0, "last": 0.2}, "drain_bytes": 0,
            "link": self.link,
        }

    def volumes_info(self) -> list[dict]:
        return [{"name": n, "size_bytes": t * self.params.track_bytes, "track_bytes": self.params.track_bytes,
                 "tracks": t, "oos_tracks": self.oos[n].count(), "cr_tracks": self.cr[n].count(),
                 "url": f"mem://?size={t * self.params.track_bytes}"} for n, t in self.tracks.items()]

    def bitmap(self, kind: str, volume: str, start_track: int = 0, end_track: int | None = None) -> dict:
        bits = (self.oos if kind == "oos" else self.cr)[volume]
        end = len(bits) if end_track is None else end_track
        part = bits[start_track:end]
        runs: list[list[int]] = []
        i = 0
        while len(runs) < 64:
            try:
                s = part.index(1, i)
            except ValueError:
                break
            try:
                e = part.index(0, s)
            except ValueError:
                e = len(part)
            runs.append([start_track + s, start_track + e])
            i = e
        return {"count": part.count(), "tracks": end - start_track, "runs": runs}

    def cache_stats(self) -> dict:
        return {"slots": 1024, "used": 10, "dual": 2, "dirty": 5, "hits": 30, "misses": 10,
                "destaged": 7, "occupancy": 10 / 1024}


class LoopThread:
    """An asyncio loop on its own thread, so blocking pyserial clients in the
    test thread can talk to a server the loop runs."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="console-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout_s: float = 30.0):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn, *args, timeout_s: float = 30.0):
        """Run a plain function on the loop thread (the controller is not thread-safe)."""
        async def wrapper():
            return fn(*args)

        return self.run(wrapper(), timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class MemNvram:
    """An in-memory NvramRegion test double (a crash of the test is not simulated)."""

    def __init__(self, size_bytes: int) -> None:
        self.url = f"mem-nvram://?size={size_bytes}"
        self.size_bytes = size_bytes
        self._buf = bytearray(size_bytes)
        self.persisted = 0

    @property
    def view(self) -> memoryview:
        return memoryview(self._buf)

    def persist(self, offset: int, length: int) -> None:
        self.persisted += 1

    def close(self) -> None:
        return None


class RecordingRemote(RemotePort):
    """A RemotePort test double: B and C as dicts of track images, with the
    contract's commit semantics (C becomes B atomically at commit)."""

    def __init__(self) -> None:
        self.b: dict[tuple[str, int], bytes] = {}
        self.c: dict[tuple[str, int], bytes] = {}
        self.committed = 0
        self.connects = 0

    async def connect(self, session_id, volumes, generation=0):
        from firmware.remote import RemoteState

        self.connects += 1
        return RemoteState(session_id, self.committed, self.committed == 0, list(volumes))

    async def send_track(self, volume, track, cg_seq, data) -> None:
        self.b[(volume, track)] = bytes(data)

    async def sync(self, cg_seq) -> None:
        return None

    async def drain_done(self, cg_seq) -> None:
        return None

    async def prepare(self, cg_seq) -> None:
        return None

    async def commit(self, cg_seq) -> None:
        self.c = dict(self.b)
        self.committed = cg_seq

    async def abort(self, cg_seq) -> None:
        self.b = dict(self.c)

    async def close(self) -> None:
        return None


def ctrl_c_as_in_a_terminal() -> None:
    """Popen preexec_fn for a CLI a test stops with SIGINT: SIGINT at its
    default, as a terminal's foreground job has it. A job a non-interactive
    shell starts in the background (a CI script run with &) inherits SIGINT
    ignored; Python then installs no KeyboardInterrupt handler, and the CLI
    never stopped (two tests timed out in such a CI run)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
