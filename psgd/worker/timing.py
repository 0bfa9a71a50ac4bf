"""Where a worker's time goes: running totals of the seconds each phase of its step loop took.

The loop marks the end of each phase with :meth:`StepTimer.lap`, which charges the time
since the previous mark to that phase. The marks tile the loop's time with no gaps, so the
phases add up to the loop's wall time (a test checks it against a clock of its own), at
the cost of one ``perf_counter`` call per phase.

The totals travel to the server with heartbeats and pushes (docs/protocol.md, "timing")
and come back in the per-worker statistics, the summary, ``psgd report`` and the dashboard.
"""

from __future__ import annotations

import time

from ..wire.protocol import TIMING_KEYS

# The phases of a step, in the order the loop runs them; on the wire with "wall" beside them.
PHASES = TIMING_KEYS[1:]
PHASE_MEANING = {
    "batch": "preparing the minibatch (augmentation included)",
    "compute": "forward and backward pass: the gradient",
    "sleep": "the straggler option's sleep (--slow-worker / --slowdown)",
    "push": "sending the gradient and waiting for its ack (with n_fetch 1, the fresh weights too; "
            "a refused push's fresh pull)",
    "pull": "pulling the weights",
    "other": "heartbeats, data-shard moves, the rest of the loop",
}
REPORT_EVERY_S = 1.0  # how often the totals go to the server when pushes cannot carry them


class StepTimer:
    """Seconds per phase since :meth:`start`; ``clock`` is injectable for tests."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.wall = 0.0  # seconds of the loops run so far, finished ones and the current one
        self._started: float | None = None
        self._mark: float | None = None

    def start(self) -> None:
        """A loop begins: time from here is charged. A loop that ended by an exception (a
        lost server) never stopped its timer: its time up to now counts as "other"."""
        self.stop()
        self._started = self._mark = self.clock()

    def lap(self, phase: str) -> None:
        """The phase that just ended took the time since the previous mark."""
        now = self.clock()
        if self._mark is not None:
            self.totals[phase] += now - self._mark
        self._mark = now

    def stop(self) -> None:
        """The loop ended: the time since the last mark is "other"; the wall clock stops."""
        if self._started is None:
            return
        self.lap("other")
        self.wall += self._mark - self._started
        self._started = self._mark = None

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds

    def snapshot(self) -> dict:
        """The running totals as they go on the wire: ``wall`` and each phase, in seconds, up
        to the latest mark (a report sent mid-phase, from inside a push, counts that phase
        next time: the phases always add up to ``wall``)."""
        wall = self.wall + (self._mark - self._started if self._started is not None else 0.0)
        return {"wall": wall, **self.totals}
