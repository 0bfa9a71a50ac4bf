"""The run's phase, as a server sees it: one explicit state and its transitions.

    RUNNING  --pause-->  PAUSED  --resume-->  RUNNING
    RUNNING or PAUSED  --stop(reason)-->  DRAINING  --settle-->  STOPPED

- RUNNING: pushes are applied, pulls answered.
- PAUSED: a coordinator evaluates a snapshot; the loop holds the workers' pushes, pulls
  and hellos unanswered (a monitor's pulls and stats still go through), and no lease runs
  out meanwhile.
- DRAINING: the run is over. Every training request is answered ``shutdown``; the loop
  waits up to SHUTDOWN_GRACE_S for the connected workers to hear it and go. If the run
  ended by the server's own budget (an interrupt, an operator's request) while a coordinator watches, it then
  also waits, up to COORDINATOR_GRACE_S, for that coordinator to take the final weights
  and say ``shutdown``.
- STOPPED: the loop writes its last checkpoint and exits.

Why a run stopped (``reason``): ``"shutdown"`` (a client said so), ``"requested"`` (a
client said so with ``finish``: an operator's ``psgd status --shutdown``, after which a
watching coordinator still writes the run), ``"budget"`` (the server's own --max-updates or --max-seconds), ``"signal"`` (SIGTERM: stop now, do not wait
for a coordinator: a SIGKILLed launcher's children get it and must not linger),
``"interrupt"`` (SIGINT: a warm stop that lets a watching coordinator finish the run).
"""

from __future__ import annotations

import enum
import time

SHUTDOWN_GRACE_S = 3.0  # after a stop, how long connected workers have to hear it
COORDINATOR_GRACE_S = 30.0  # how long a run ended by the server waits for its coordinator

STOP_REASONS = ("shutdown", "requested", "budget", "signal", "interrupt")
_WAIT_FOR_COORDINATOR = ("requested", "budget", "interrupt")


class Phase(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    DRAINING = "draining"
    STOPPED = "stopped"


class RunPhase:
    def __init__(self, clock=time.monotonic, shutdown_grace_s: float = SHUTDOWN_GRACE_S,
                 coordinator_grace_s: float = COORDINATOR_GRACE_S):
        self.clock = clock
        self.shutdown_grace_s, self.coordinator_grace_s = shutdown_grace_s, coordinator_grace_s
        self.phase = Phase.RUNNING
        self.reason: str | None = None  # why the run stopped (STOP_REASONS)
        self.coordinated = False  # a coordinator set the rate or paused: it will want the final weights
        self.coordinator_done = False  # ... and has said shutdown since
        self._since = clock()  # when the current phase began

    # --- transitions --------------------------------------------------------------------

    def pause(self) -> None:
        self.coordinated = True
        if self.phase is Phase.RUNNING:
            self._enter(Phase.PAUSED)

    def resume(self) -> float:
        """Back to RUNNING; returns how long the pause lasted (0 if there was none)."""
        self.coordinated = True  # (also after a restart, when the rate is not sent again)
        if self.phase is not Phase.PAUSED:
            return 0.0
        paused_for = self.clock() - self._since
        self._enter(Phase.RUNNING)
        return paused_for

    def stop(self, reason: str) -> bool:
        """End the run; True if this call began the drain (the loop then tells everyone).
        A later ``shutdown`` from a client while draining releases the coordinator wait."""
        if reason not in STOP_REASONS:
            raise ValueError(f"unknown stop reason {reason!r}")
        if reason == "shutdown":
            self.coordinator_done = True
        if self.phase in (Phase.DRAINING, Phase.STOPPED):
            if reason == "signal":
                self.reason = "signal"  # a SIGTERM after a warm stop: do not wait any longer
            return False
        self.reason = reason
        self._enter(Phase.DRAINING)
        return True

    def settle(self, workers_connected: bool) -> Phase:
        """While DRAINING, move to STOPPED once the workers are gone (or their grace ran
        out) and no coordinator is owed the final weights; returns the phase."""
        if self.phase is not Phase.DRAINING:
            return self.phase
        waited = self.clock() - self._since
        if workers_connected and waited < self.shutdown_grace_s:
            return self.phase
        if self.awaits_coordinator and waited < self.coordinator_grace_s:
            return self.phase
        self._enter(Phase.STOPPED)
        return self.phase

    # --- what the phase means -----------------------------------------------------------

    @property
    def awaits_coordinator(self) -> bool:
        return self.coordinated and not self.coordinator_done and self.reason in _WAIT_FOR_COORDINATOR

    @property
    def paused(self) -> bool:
        return self.phase is Phase.PAUSED

    @property
    def stopping(self) -> bool:
        """Training is over: every training request is answered ``shutdown``."""
        return self.phase in (Phase.DRAINING, Phase.STOPPED)

    def _enter(self, phase: Phase) -> None:
        self.phase, self._since = phase, self.clock()
