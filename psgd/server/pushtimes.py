"""When the server applied each push, whose it was, and which weights it was computed
from: the server's half of a run's timing trace.

A worker's trace (psgd.worker.timing) says when it rang with a push and when it had read
the fresh weights after the ack; only the server knows when, in between, the push changed
the weights, and which version the worker had read (its base version). psgd.simulate.
calibrate joins the two: it splits each round trip into its way to the apply and its way
back, and moves a read that the worker's clock put after a later apply back before it (a
worker descheduled between reading and looking at the clock). Times are
``time.perf_counter`` seconds: on one machine every process reads the same monotonic
clock (Linux CLOCK_MONOTONIC), so a local run's server and worker traces line up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import atomic_write, read_npz

PUSH_TIMES_MAX = 1_000_000  # pushes kept (29 bytes each: 29 MB at most); later ones are counted, not kept


class PushTimes:
    """Pushes in order, applied or refused: the worker's name, the clock after the apply
    (or the refusal), the version it made (a refused one: the version then), the version
    its gradient was computed from, whether it was refused, and the learning rate the
    coordinator had set when it was applied (before the momentum rule's factor; NaN for a
    refused push). A replay takes the rates from here: the coordinator sets them when it
    polls, which no distribution of times carries."""

    def __init__(self, max_pushes: int = PUSH_TIMES_MAX, clock=time.perf_counter):
        if max_pushes < 1:
            raise ValueError(f"push times keep at least one push, not {max_pushes}")
        self.clock = clock
        self.worker = np.zeros(max_pushes, np.int32)
        self.time = np.zeros(max_pushes, np.float64)
        self.version = np.zeros(max_pushes, np.int64)
        self.base = np.zeros(max_pushes, np.int64)
        self.refused = np.zeros(max_pushes, np.bool_)
        self.lr = np.full(max_pushes, np.nan, np.float64)
        self.names: dict[str, int] = {}
        self.n = self.dropped = 0

    def add(self, name: str, version: int, base_version: int, refused: bool = False, lr: float = np.nan) -> None:
        if self.n == len(self.time):
            self.dropped += 1
            return
        k = self.n
        self.worker[k] = self.names.setdefault(name, len(self.names))
        self.time[k], self.version[k], self.base[k], self.refused[k] = self.clock(), version, base_version, refused
        self.lr[k] = lr
        self.n += 1

    def save(self, path) -> Path:
        """.npz, no pickles: worker (indices into names), time, version, base, refused, lr,
        names, dropped; whole or not at all (psgd.files.atomic_write)."""
        n = self.n
        arrays = dict(worker=self.worker[:n], time=self.time[:n], version=self.version[:n], base=self.base[:n],
                      refused=self.refused[:n], lr=self.lr[:n], names=np.array(list(self.names) or [""]),
                      dropped=np.int64(self.dropped))
        atomic_write(Path(path), lambda f: np.savez(f, **arrays))
        return Path(path)


@dataclass
class PushLog:
    """A saved PushTimes: per worker name, its pushes in time order (``times``,
    ``versions``, ``bases``, ``refused``), the time each version was made
    (``version_time``, applied pushes only), and the rate the push that made it was
    applied with (``version_lr``; empty for a file written before rates were kept)."""

    times: dict[str, np.ndarray]
    versions: dict[str, np.ndarray]
    bases: dict[str, np.ndarray]
    refused: dict[str, np.ndarray]
    version_time: dict[int, float]
    version_lr: dict[int, float] = field(default_factory=dict)


def read_push_times(path) -> PushLog:
    """Read a saved file; one that is not one raises DataError naming it."""
    z = read_npz(Path(path), "push times")
    try:
        names, worker, times, versions, bases, refused = ([str(x) for x in z["names"]], z["worker"], z["time"],
                                                          z["version"], z["base"], z["refused"].astype(bool))
    except KeyError as exc:
        raise DataError(f"push times {path}: not one (no {exc})") from None
    if not len(worker) == len(times) == len(versions) == len(bases) == len(refused) or \
            (len(worker) and not 0 <= int(worker.min()) <= int(worker.max()) < len(names)):
        raise DataError(f"push times {path}: worker indices, times and versions disagree")
    lr = np.asarray(z["lr"], np.float64) if "lr" in z else np.full(len(times), np.nan)
    if len(lr) != len(times):
        raise DataError(f"push times {path}: rates and times disagree")
    applied = ~refused & np.isfinite(lr) & (lr >= 0)
    log = PushLog({}, {}, {}, {}, dict(zip(versions[~refused].tolist(), times[~refused].tolist())),
                  dict(zip(versions[applied].tolist(), lr[applied].tolist())))
    for k, name in enumerate(names):
        mine = worker == k
        order = np.argsort(times[mine], kind="stable")
        log.times[name], log.versions[name] = times[mine][order], versions[mine][order]
        log.bases[name], log.refused[name] = bases[mine][order], refused[mine][order]
    return log
