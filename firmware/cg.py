"""The life of a consistency group: one transition table.

    idle --START--> quiescing --RECORDING_ON--> draining --DRAINED--> committing --COMMITTED--> idle
    quiescing | draining | committing --FAIL / TIMEOUT--> idle   (CR OR-merged into OOS)

START closes the quiesce gate; RECORDING_ON is the moment CR exists and the
held acknowledgements are released (claims 1, 2, 10); DRAINED means every
OOS bit was sent and cleared; COMMITTED is the swap (CR becomes OOS).
Side effects live in one place per target phase: ``on_enter[phase](event)``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from firmware.errors import InvalidTransition


class Phase(enum.Enum):
    IDLE = "idle"
    QUIESCING = "quiescing"
    DRAINING = "draining"
    COMMITTING = "committing"


class Event(enum.Enum):
    START = "start"
    RECORDING_ON = "recording_on"
    DRAINED = "drained"
    COMMITTED = "committed"
    FAIL = "fail"
    TIMEOUT = "timeout"


NEXT: dict[tuple[Phase, Event], Phase] = {
    (Phase.IDLE, Event.START): Phase.QUIESCING,
    (Phase.QUIESCING, Event.RECORDING_ON): Phase.DRAINING,
    (Phase.QUIESCING, Event.FAIL): Phase.IDLE,
    (Phase.QUIESCING, Event.TIMEOUT): Phase.IDLE,
    (Phase.DRAINING, Event.DRAINED): Phase.COMMITTING,
    (Phase.DRAINING, Event.FAIL): Phase.IDLE,
    (Phase.DRAINING, Event.TIMEOUT): Phase.IDLE,
    (Phase.COMMITTING, Event.COMMITTED): Phase.IDLE,
    (Phase.COMMITTING, Event.FAIL): Phase.IDLE,
    (Phase.COMMITTING, Event.TIMEOUT): Phase.IDLE,
}

# Phases in which change recording is on (new writes set CR, not OOS).
RECORDING = {Phase.DRAINING, Phase.COMMITTING}


class CgMachine:
    def __init__(self, on_enter: dict[Phase, Callable[[Event], None]] | None = None) -> None:
        self.phase = Phase.IDLE
        self.on_enter = on_enter or {}

    def handle(self, event: Event) -> Phase:
        try:
            phase = NEXT[self.phase, event]
        except KeyError:
            raise InvalidTransition(self.phase, event) from None
        self.phase = phase
        effect = self.on_enter.get(phase)
        if effect is not None:
            effect(event)
        return phase

    @property
    def recording(self) -> bool:
        return self.phase in RECORDING
