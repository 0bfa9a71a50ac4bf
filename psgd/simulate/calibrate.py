"""Timings of a real run, to feed the simulator, and how close a simulation came to it.

A local cluster's run directory keeps each worker's timing trace (RUN_DIR/timing/
worker-i.npz, psgd.worker.timing: every lap of its step loop, in order). From it, per
worker, in order:

- each push window's compute: the laps from one push to the next (minibatch, gradient,
  the loop's own work; not the first pull);
- each push's round trip: its push lap (the gradient's way to the server, the server's
  work on it, the ack and the reading of fresh weights), split into the way there and back
  where the server's push times (RUN_DIR/timing/server.npz, psgd.server.pushtimes) say
  when that push was applied, else by a fixed fraction;
- its start: when its loop began, after the first worker's did.

A run without traces (an older one) is measured from its logs (RUN_DIR/logs/worker-i.log):
the ``worker done`` line's compute and communication seconds give each worker's mean
compute per step and round trip, drawn lognormal around them; the ``joined`` line its start.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from ..errors import DataError
from ..metrics import StalenessHistogram
import numpy as np

from ..server.pushtimes import read_push_times
from ..worker.timing import read_trace
from .engine import SimSpec, staleness_tv
from .events import Dist

_DONE = re.compile(r"worker done: (\d+) steps, (\d+) pushes, .* compute ([0-9.]+) s, communication ([0-9.]+) s")
_JOINED = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) worker INFO \S+ joined")


def trace_windows(trace: dict, applied=None) -> tuple[list[float], list[float], list[float | None]]:
    """(compute seconds of each push window, round trip of each push, its way there) from a
    trace read by psgd.worker.timing.read_trace. A window's compute is every lap since the
    previous push but pulls; a loop's restart (after a reconnect) begins a new window.
    ``applied``: the sorted clock times at which the server applied this worker's pushes
    (psgd.server.pushtimes); a push's way there is from its start to the apply inside its
    round trip, None where there is none (refused, or not recorded)."""
    computes, trips, theres = [], [], []
    previous, window = 0.0, 0.0
    applied = np.asarray(applied if applied is not None else [], np.float64)
    for phase, end in zip(trace["phase"], trace["end"]):
        lap, previous = end - previous, end
        if phase == "start":
            window = 0.0
        elif phase == "push":
            computes.append(window)
            trips.append(lap)
            window = 0.0
            rang = trace["clock_start"] + end - lap
            k = int(np.searchsorted(applied, rang))
            theres.append(float(applied[k] - rang) if k < len(applied) and applied[k] <= rang + lap else None)
        elif phase != "pull":
            window += lap
    return computes, trips, theres


def _first_read(trace: dict) -> float:
    """Seconds from a trace's start to the end of its first pull: when the worker first
    held weights (0 if the trace has no pull before its first push)."""
    for phase, end in zip(trace["phase"], trace["end"]):
        if phase == "pull":
            return float(end)
        if phase == "push":
            break
    return 0.0


def _worker_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern), key=lambda p: int(p.stem.split("-")[1]))


def measured_spec(run_dir, sigma: float = 0.3, before_apply: float = 0.5, server: bool = False,
                  traces: bool = True, **overrides) -> SimSpec:
    """A SimSpec with the compute, delay and start times a real local run measured.

    With timing traces (and ``traces``): each worker's push windows and round trips (split
    where the server's push times say when each was applied, else ``before_apply`` of it on
    the way there), replayed (``replay="ordered"``, the default, or ``"shuffled"`` in the
    overrides), each worker starting when it first read the weights. ``server``: also queue
    the pushes at the server for its CPU seconds per push (the summary's
    ``server_cpu_per_push_us``), taken off the way there. Off by default: a measured way
    there already holds the server's wait and work (with it, 2- and 4-worker runs fitted
    worse: TV 0.10 and 0.21 against 0.003 and 0.011).

    Without traces: from the logs, each worker's mean compute per step (lognormal, deviation
    ``sigma`` of its log: the logs give no spread), one round trip for all (the workers'
    mean), ``before_apply`` of it on the way there, and each worker's start."""
    folder = Path(run_dir) / "timing"
    files = _worker_files(folder, "worker-*.npz") if traces else []
    if files:
        return _traced_spec(run_dir, files, sigma, before_apply, server, **overrides)
    return _logged_spec(run_dir, sigma, before_apply, **overrides)


def _traced_spec(run_dir, files: list[Path], sigma: float, before_apply: float, server: bool, **overrides) -> SimSpec:
    config = Path(run_dir) / "config.json"
    if config.exists() and json.loads(config.read_text()).get("overlap"):
        # with overlap a step has two push laps (the previous push's ack, this one's send)
        raise DataError(f"{run_dir} ran with --overlap, which the simulator does not model: no replay")
    names = [p.stem for p in files]
    if names != [f"worker-{i}" for i in range(len(files))]:
        raise DataError(f"{run_dir}/timing: worker traces {', '.join(names)} are not worker-0 to worker-{len(files) - 1}")
    server_file = files[0].parent / "server.npz"
    applied = read_push_times(server_file) if server_file.exists() else {}
    computes, trips, theres, reads = [], [], [], []
    for path in files:
        trace = read_trace(path)
        compute, trip, there = trace_windows(trace, applied.get(path.stem))
        if not compute:
            raise DataError(f"{path}: the worker never pushed: no round trip to replay")
        computes.append(tuple(compute))
        trips.append(tuple(trip))
        # where the apply was not seen (a refused push), the way there is the usual fraction
        theres.append(tuple(t * before_apply if way is None else min(way, t) for t, way in zip(trip, there)))
        reads.append(trace["clock_start"] + _first_read(trace))
    service = 0.0
    if server:
        summary = Path(run_dir) / "summary.json"
        per_push_us = json.loads(summary.read_text()).get("server_cpu_per_push_us") if summary.exists() else None
        service = (per_push_us or 0.0) * 1e-6
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    trip = mean([mean(t) for t in trips])
    return SimSpec(compute=Dist("lognormal", mean([mean(c) for c in computes]), sigma),
                   delay=Dist("lognormal", trip * before_apply, sigma),
                   reply_delay=Dist("lognormal", trip * (1 - before_apply), sigma),
                   server=Dist("constant", service), before_apply=before_apply,
                   worker_compute_trace=tuple(computes), worker_trip_trace=tuple(trips),
                   worker_there_trace=tuple(theres) if applied else (),
                   worker_start=tuple(t - min(reads) for t in reads), start_holding_weights=True, **overrides)


def _logged_spec(run_dir, sigma: float, before_apply: float, **overrides) -> SimSpec:
    logs = Path(run_dir) / "logs"
    names = _worker_files(logs, "worker-*.log")
    if not names:
        raise DataError(f"{run_dir}: no worker logs (logs/worker-*.log): is it a local cluster run?")
    computes, delays, starts = [], [], []
    for path in names:
        done = joined = None
        for line in path.read_text().splitlines():
            joined = joined or _JOINED.match(line)
            done = _DONE.search(line) or done
        if done is None or joined is None:
            raise DataError(f"{path}: no 'joined' and 'worker done' lines to measure")
        steps, pushes, compute, comm = int(done[1]), int(done[2]), float(done[3]), float(done[4])
        computes.append(compute / max(steps, 1))
        delays.append(comm / max(pushes, 1))
        starts.append(datetime.strptime(joined[1], "%H:%M:%S.%f"))
    first = min(starts)
    start_s = tuple((t - first).total_seconds() for t in starts)
    trip = sum(delays) / len(delays)
    return SimSpec(compute=Dist("lognormal", sum(computes) / len(computes), sigma),
                   delay=Dist("lognormal", trip * before_apply, sigma),
                   reply_delay=Dist("lognormal", trip * (1 - before_apply), sigma),
                   worker_compute=tuple(computes), worker_start=start_s, **overrides)


def compare(real_dir, sim_dir) -> dict:
    """Staleness total-variation distance and accuracy gap between two run directories."""
    real, sim = (json.loads((Path(d) / "summary.json").read_text()) for d in (real_dir, sim_dir))
    tv = staleness_tv(StalenessHistogram.from_dict(real["staleness_histogram"]),
                      StalenessHistogram.from_dict(sim["staleness_histogram"]))
    return {"tv": tv, "real_accuracy": real["test_accuracy"], "sim_accuracy": sim["test_accuracy"],
            "accuracy_gap": abs(real["test_accuracy"] - sim["test_accuracy"]),
            "real_staleness": real["staleness"], "sim_staleness": sim["staleness"]}
