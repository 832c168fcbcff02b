"""The session's copy state (the CSM vocabulary operators see): one table of
allowed transitions, one setter, one ``change session`` event per change.

    Suspended --start / resume_pair--> Running
    Running --pause, no CG in flight--> Paused
    Running --pause, a CG in flight--> Pause in Progress --the CG ended--> Paused
    Pause in Progress | Paused --resume / cg start--> Running
    any --suspend / stop--> Suspended
    any --the secondary refused the pairing--> Fatal --resume_pair--> Running

The CG phase (firmware/cg.py) says where one CG is; the copy state says
whether CGs are being formed at all.
"""

from __future__ import annotations

import enum

from firmware.errors import InvalidTransition
from firmware.events import EventBus


class CopyState(enum.StrEnum):
    RUNNING = "Running"
    PAUSED = "Paused"
    PAUSING = "Pause in Progress"
    SUSPENDED = "Suspended"
    FATAL = "Fatal"


S = CopyState
ALLOWED: dict[CopyState, frozenset[CopyState]] = {
    S.SUSPENDED: frozenset({S.RUNNING, S.FATAL}),
    S.RUNNING: frozenset({S.PAUSED, S.PAUSING, S.SUSPENDED, S.FATAL}),
    S.PAUSING: frozenset({S.PAUSED, S.RUNNING, S.SUSPENDED, S.FATAL}),
    S.PAUSED: frozenset({S.RUNNING, S.SUSPENDED, S.FATAL}),
    S.FATAL: frozenset({S.RUNNING, S.SUSPENDED}),
}


class CopyStateMachine:
    def __init__(self, events: EventBus, state: CopyState = CopyState.SUSPENDED) -> None:
        self.events = events
        self.state = state
        self.fatal_reason = ""

    def to(self, state: CopyState, **fields) -> bool:
        """Move to ``state``; emit one event if it changed. Setting the state
        it is already in is a no-op (False). Raises InvalidTransition for a
        pair the table does not allow."""
        if state is self.state:
            return False
        if state not in ALLOWED[self.state]:
            raise InvalidTransition(self.state, state)
        self.state = state
        self.fatal_reason = fields.get("reason", "") if state is CopyState.FATAL else ""
        self.events.emit("change", "session", copy_state=state.value, **fields)
        return True
