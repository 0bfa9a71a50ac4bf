"""Where a worker's time goes: running totals of the seconds each phase of its step loop took.

The loop marks the end of each phase with :meth:`StepTimer.lap`, which charges the time
since the previous mark to that phase. The marks tile the loop's time with no gaps, so the
phases add up to the loop's wall time (a test checks it against a clock of its own), at
the cost of one ``perf_counter`` call per phase.

The totals travel to the server with heartbeats and pushes (docs/protocol.md, "timing")
and come back in the per-worker statistics, the summary, ``psgd report`` and the dashboard.

A :class:`TimingTrace`, when the worker is given one (``psgd worker --timing-trace DIR``;
``psgd train`` gives one to each worker of a run with a directory), also keeps every lap
in order: which phase it was and when it ended, the first ``TRACE_MAX_LAPS`` of them. It
is what ``psgd.simulate.calibrate`` replays: each step's compute and each push's round
trip as measured, not only their means.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import atomic_write, read_npz

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
# A step is four or five laps (batch, compute, push, other; pull): 100,000 laps are some
# 20,000 steps, 0.9 MB on disk. Laps beyond are counted, not kept.
TRACE_MAX_LAPS = 100_000
TRACE_START = len(PHASES)  # the phase code of a mark where a loop (re)started: no lap ends there


class StepTimer:
    """Seconds per phase since :meth:`start`; ``clock`` is injectable for tests."""

    def __init__(self, clock=time.perf_counter, trace: "TimingTrace | None" = None):
        self.clock = clock
        self.trace = trace  # every lap in order, if given
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.wall = 0.0  # seconds of the loops run so far, finished ones and the current one
        self._started: float | None = None
        self._mark: float | None = None

    def start(self) -> None:
        """A loop begins: time from here is charged. A loop that ended by an exception (a
        lost server) never stopped its timer: its time up to now counts as "other"."""
        self.stop()
        self._started = self._mark = self.clock()
        if self.trace is not None:
            self.trace.add(TRACE_START, self._mark)

    def lap(self, phase: str) -> None:
        """The phase that just ended took the time since the previous mark."""
        now = self.clock()
        if self._mark is not None:
            self.totals[phase] += now - self._mark
            if self.trace is not None:
                self.trace.add(_CODE[phase], now)
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


_CODE = {phase: code for code, phase in enumerate(PHASES)}


class TimingTrace:
    """Laps in order, bounded: ``phase`` codes (indices into PHASES; TRACE_START where a
    loop began) and ``end`` times (seconds of the timer's clock since the first mark), the
    first ``max_laps`` of them; ``dropped`` counts those beyond. ``clock_start`` is the
    clock's reading at the first mark (time.perf_counter: on one machine every process
    reads the same one, so it lines up a local run's workers and server), ``wall_start``
    the wall-clock time (time.time) then."""

    def __init__(self, max_laps: int = TRACE_MAX_LAPS):
        if max_laps < 1:
            raise ValueError(f"a timing trace keeps at least one lap, not {max_laps}")
        self.phase = np.zeros(max_laps, np.uint8)
        self.end = np.zeros(max_laps, np.float64)
        self.n = self.dropped = 0
        self.wall_start: float | None = None
        self.clock_start = 0.0

    def add(self, code: int, now: float) -> None:
        if self.wall_start is None:
            self.wall_start, self.clock_start = time.time(), now
        if self.n == len(self.phase):
            self.dropped += 1
            return
        self.phase[self.n], self.end[self.n] = code, now - self.clock_start
        self.n += 1

    def save(self, path) -> Path:
        """Write it as .npz (no pickles): phase, end, phases (the codes' names), clock_start,
        wall_start, dropped; whole or not at all (psgd.files.atomic_write)."""
        arrays = dict(phase=self.phase[:self.n], end=self.end[:self.n], phases=np.array(PHASES + ("start",)),
                      clock_start=np.float64(self.clock_start), wall_start=np.float64(self.wall_start or 0.0),
                      dropped=np.int64(self.dropped))
        atomic_write(Path(path), lambda f: np.savez(f, **arrays))
        return Path(path)


def read_trace(path) -> dict:
    """A saved trace: {"phase": [names], "end": seconds array, "clock_start", "wall_start",
    "dropped"}; a file that is not one raises DataError naming it."""
    z = read_npz(Path(path), "timing trace")
    try:
        names = [str(x) for x in z["phases"]]
        codes, end = z["phase"], z["end"].astype(np.float64)
        clock_start, wall_start, dropped = float(z["clock_start"]), float(z["wall_start"]), int(z["dropped"])
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"timing trace {path}: not one ({exc})") from None
    if len(codes) != len(end) or (len(codes) and int(codes.max()) >= len(names)):
        raise DataError(f"timing trace {path}: phase codes and times disagree")
    return {"phase": [names[c] for c in codes], "end": end, "clock_start": clock_start, "wall_start": wall_start,
            "dropped": dropped}
