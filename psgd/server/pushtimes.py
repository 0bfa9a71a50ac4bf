"""When the server applied each push, and whose: the server's half of a run's timing trace.

A worker's trace (psgd.worker.timing) says when it rang with a push and when it had read
the fresh weights after the ack; only the server knows when, in between, the push changed
the weights. psgd.simulate.calibrate joins the two to split each round trip into its way
to the apply and its way back, as measured. Times are ``time.perf_counter`` seconds: on one
machine every process reads the same monotonic clock (Linux CLOCK_MONOTONIC), so a local
run's server and worker traces line up without any exchange.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import atomic_write, read_npz

PUSH_TIMES_MAX = 1_000_000  # pushes kept (12 bytes each: 12 MB at most); later ones are counted, not kept


class PushTimes:
    """Applied pushes in order: the worker's name and the clock after the apply."""

    def __init__(self, max_pushes: int = PUSH_TIMES_MAX, clock=time.perf_counter):
        if max_pushes < 1:
            raise ValueError(f"push times keep at least one push, not {max_pushes}")
        self.clock = clock
        self.worker = np.zeros(max_pushes, np.int32)
        self.time = np.zeros(max_pushes, np.float64)
        self.names: dict[str, int] = {}
        self.n = self.dropped = 0

    def add(self, name: str) -> None:
        if self.n == len(self.time):
            self.dropped += 1
            return
        self.worker[self.n] = self.names.setdefault(name, len(self.names))
        self.time[self.n] = self.clock()
        self.n += 1

    def save(self, path) -> Path:
        """.npz, no pickles: worker (indices into names), time, names, dropped; whole or not
        at all (psgd.files.atomic_write)."""
        arrays = dict(worker=self.worker[:self.n], time=self.time[:self.n],
                      names=np.array(list(self.names) or [""]), dropped=np.int64(self.dropped))
        atomic_write(Path(path), lambda f: np.savez(f, **arrays))
        return Path(path)


def read_push_times(path) -> dict[str, np.ndarray]:
    """A saved file as {worker name: sorted clock times of its applied pushes}; a file that
    is not one raises DataError naming it."""
    z = read_npz(Path(path), "push times")
    try:
        names, worker, times = [str(x) for x in z["names"]], z["worker"], z["time"]
    except KeyError as exc:
        raise DataError(f"push times {path}: not one (no {exc})") from None
    if len(worker) != len(times) or (len(worker) and not 0 <= int(worker.min()) <= int(worker.max()) < len(names)):
        raise DataError(f"push times {path}: worker indices and times disagree")
    return {name: np.sort(times[worker == k]) for k, name in enumerate(names)}
