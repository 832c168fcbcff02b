"""``MirrorfwStrategy``: a controller's life as labgrid strategy states.

    off ---------> formatted ---------> replicating
     ^  console up,          pair resume,
     |  pair suspended       a CG committed
     +---- console released (and the power driver off, if one is bound)

``formatted``: the controller answers on its console with its volumes
formatted and the pair suspended (nothing crosses the link; OOS is
recorded). ``replicating``: the pair runs, the link is up and a consistency
group has committed since the transition began. A lab test does
``strategy.transition("replicating")``; going to a state passes through the
ones before it, as labgrid's own strategies do.

A ``PowerProtocol`` driver is optional: bound, ``off`` switches it off and
``formatted`` on (the lab's power-on starts the controller, e.g. a
ManualPowerDriver or an ExternalPowerDriver that runs ``mirrorfw primary
--format``); unbound, the controller is expected to be running and ``off``
only lets go of its console.
"""

from __future__ import annotations

import enum
import time

import attr
from labgrid.factory import target_factory
from labgrid.step import step
from labgrid.strategy import Strategy, StrategyError, never_retry

from harness.console_client import ConsoleError


class Status(enum.Enum):
    unknown = 0
    off = 1
    formatted = 2
    replicating = 3


# The states in order; a transition walks up through the ones before its target.
ORDER = [Status.off, Status.formatted, Status.replicating]


@target_factory.reg_driver
@attr.s(eq=False)
class MirrorfwStrategy(Strategy):
    bindings = {
        "console": "MirrorfwConsoleDriver",
        "power": {"PowerProtocol", None},
    }

    status = attr.ib(default=Status.unknown)
    ready_timeout = attr.ib(default=60.0, validator=attr.validators.instance_of(float))

    @never_retry
    @step(args=["status"])
    def transition(self, status, *, step):
        if not isinstance(status, Status):
            status = Status[status]
        if status is Status.unknown:
            raise StrategyError(f"can not transition to {status}")
        if status is self.status:
            step.skip("nothing to do")
            return
        if status is Status.off:
            self._off()
        else:
            below = ORDER[ORDER.index(status) - 1]
            if self.status is not below:
                self.transition(below)
            {Status.formatted: self._formatted, Status.replicating: self._replicating}[status]()
        self.status = status

    # -- one method per state entered --------------------------------------------------
    def _off(self) -> None:
        self.target.deactivate(self.console)
        if self.power is not None:
            self.target.activate(self.power)
            self.power.off()

    def _formatted(self) -> None:
        if self.power is not None:
            self.target.activate(self.power)
            self.power.on()
        self._activate_console()
        if self.console.status()["copy_state"] != "Suspended":
            self.console.run_check("pair suspend")
        self._wait("the pair suspended", lambda s: s["copy_state"] == "Suspended")

    def _replicating(self) -> None:
        committed = self.console.status()["total_successful_cgs"]
        self.console.run_check("pair resume")
        self._wait("the link up and copy_state Running",
                   lambda s: s["copy_state"] == "Running" and s["link"] == "up")
        self.console.run_check("cg run")
        self._wait("a consistency group committed", lambda s: s["total_successful_cgs"] > committed)

    # -- waits -------------------------------------------------------------------------
    def _activate_console(self) -> None:
        """The console, once the controller answers on it (it may still be starting)."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                self.target.activate(self.console)
                return
            except ConsoleError as exc:
                if time.monotonic() > deadline:
                    raise StrategyError(f"console not answering after {self.ready_timeout} s: {exc}") from exc
                time.sleep(0.5)

    def _wait(self, what: str, ok) -> dict:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            status = self.console.status()
            if ok(status):
                return status
            if time.monotonic() > deadline:
                raise StrategyError(f"no {what} within {self.ready_timeout} s: copy_state "
                                    f"{status['copy_state']}, link {status['link']}, phase {status['phase']}")
            time.sleep(0.2)
