"""Timings of a real run, to feed the simulator, and how close a simulation came to it.

A local cluster's run directory keeps each worker's timing trace (RUN_DIR/timing/
worker-i.npz, psgd.worker.timing: every lap of its step loop, in order). From it, per
worker, in order:

- each push window's compute: the laps from one push to the next (minibatch, gradient,
  the loop's own work; not the first pull);
- each push's round trip: its push lap (the gradient's way to the server, the server's
  work on it, the ack and the reading of fresh weights), split into the way there and back
  where the server's push times (RUN_DIR/timing/server.npz, psgd.server.pushtimes) say
  when that push was applied or refused, else by a fixed fraction. The clocks are read
  after the events they time, and a process descheduled in between reads them late: a
  read the worker's clock put after an apply whose version it did not see moves back
  before that apply, and an apply the server's clock put after a read that saw it moves
  back before that read (the server's log says which version each push came from);
- its start: when it first read the weights, after the first worker did. A worker that
  never joined (the run ended while it started) starts a minute after the run's end.

And from the server's push log, the rate each update was applied with: the coordinator
sets it when it polls (every 20 ms or more), so during a warm-up the real rate lags the
schedule the simulator would follow, and a 2-epoch run's accuracy moves by a point with it.

A run without traces (an older one) is measured from its logs (RUN_DIR/logs/worker-i.log):
the ``worker done`` line's compute and communication seconds give each worker's mean
compute per step and round trip, drawn lognormal around them; the ``joined`` line its start.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..metrics import StalenessHistogram
from ..server.pushtimes import PushLog, read_push_times
from ..worker.timing import read_trace
from .engine import SimSpec, staleness_tv
from .events import Dist

_DONE = re.compile(r"worker done: (\d+) steps, (\d+) pushes, .* compute ([0-9.]+) s, communication ([0-9.]+) s")
_JOINED = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) worker INFO \S+ joined")


READ_BEFORE_S = 1e-6  # a read moved back before an apply lands this long before it


@dataclass
class Windows:
    """One worker's measured cycle, push by push (seconds): ``compute`` from its read of
    the weights to its push, ``trip`` the push's round trip to the next read, ``there`` the
    part of it before the server applied (or refused) the push, None where the server's
    push log has no record of it;
    ``first_read``: when it first held weights, since its trace began; ``unfinished``:
    the compute of the window the run's end cut short; ``reads``: (clock time, version
    read) of the read before each push, as the worker's clock put it (version None where
    no apply was seen)."""

    compute: list
    trip: list
    there: list
    first_read: float
    unfinished: float = 0.0
    reads: list = field(default_factory=list)


def trace_windows(trace: dict, log: PushLog | None = None, name: str = "") -> Windows:
    """A worker's cycle from its trace (psgd.worker.timing.read_trace) and, if given, the
    server's push log (psgd.server.pushtimes) in which it is ``name``.

    A read is where a pull or a push lap ends; a window's compute is every lap from it to
    the next push (the minibatch, the gradient, the loop's own work); a loop's restart
    (after a reconnect) begins a new window. With the push log, a push's way there ends
    when the server applied it, and a read that the worker's clock put after the apply of
    version ``base + 1`` (the worker read version ``base``: it was descheduled between
    reading and looking at the clock) moves back to just before that apply: the way back
    shortens and the next window's compute grows by as much."""
    computes, trips, theres, reads = [], [], [], []
    start = trace["clock_start"]
    previous, window = 0.0, 0.0
    read, first_read = start, None  # clock times: of the latest read, of the first one
    floor = start  # a read is never moved before this: its worker's own previous apply
    applied = log.times.get(name, np.empty(0)) if log is not None else np.empty(0)
    for phase, end in zip(trace["phase"], trace["end"]):
        lap, previous = end - previous, end
        if phase == "start":
            window, read, floor = 0.0, start + end, start + end
        elif phase == "pull":
            read = start + end
            first_read = read if first_read is None else first_read
        elif phase == "push":
            rang = start + end - lap
            k = int(np.searchsorted(applied, rang))
            seen = k < len(applied) and applied[k] <= rang + lap
            base = int(log.bases[name][k]) if seen else None
            reads.append((read, base))
            made = log.version_time.get(base + 1) if seen else None
            if made is not None and floor <= made - READ_BEFORE_S < read:
                early = read - (made - READ_BEFORE_S)
                window += early
                if computes:
                    trips[-1] -= early
                else:
                    first_read = read - early
            computes.append(window)
            trips.append(lap)
            theres.append(float(applied[k] - rang) if seen else None)
            first_read = read if first_read is None else first_read
            window, read = 0.0, start + end
            floor = float(applied[k]) if seen else read
        else:
            window += lap
    return Windows(computes, trips, theres, (first_read if first_read is not None else start) - start, window,
                   reads)


def settle_applies(log: PushLog, reads) -> PushLog:
    """The push log with each apply moved back before the first read that saw it: a read
    of version ``b`` (``reads``: (clock time, version read) of every worker) came after the
    applies of versions up to ``b``, and a server descheduled between an apply and its
    clock records the apply late."""
    seen_by = {}  # version -> the earliest read of it or a later one
    for t, base in reads:
        if base is not None:
            seen_by[base] = min(t, seen_by.get(base, t))
    latest = float("inf")
    version_time = dict(log.version_time)
    for v in sorted(version_time, reverse=True):
        latest = min(latest, seen_by.get(v, latest))
        version_time[v] = min(version_time[v], latest - READ_BEFORE_S)
    times = {name: np.where(log.refused[name], log.times[name],  # a refusal keeps its own time
                            [version_time.get(int(v), 0.0) for v in log.versions[name]]) for name in log.versions}
    return replace(log, times=times, version_time=version_time)


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _worker_files(folder: Path, pattern: str) -> list[Path]:
    """psgd train's worker-i files, in order (other names: not a local cluster's)."""
    files = [p for p in folder.glob(pattern) if re.fullmatch(r"worker-\d+", p.stem)]
    return sorted(files, key=lambda p: int(p.stem.split("-")[1]))


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


NEVER_JOINED_AFTER_S = 60.0  # a worker that never joined starts this long after the real run ended


def _run_facts(run_dir) -> tuple[int | None, float]:
    """(the run's worker count, seconds after the first worker's start that a worker which
    never joined is given: the run's length and a minute), from config.json and
    summary.json where they exist."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    if config.get("overlap"):
        # with overlap a step has two push laps (the previous push's ack, this one's send)
        raise DataError(f"{run_dir} ran with --overlap, which the simulator does not model: no replay")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return config.get("workers"), float(summary.get("wall_time") or 0.0) + NEVER_JOINED_AFTER_S


def _per_worker(run_dir, files: list[Path], kind: str) -> list[Path | None]:
    """worker-0 to worker-(N-1)'s files, None for a worker that left none (it never joined:
    the run ended while it started)."""
    workers, _ = _run_facts(run_dir)
    by_index = {int(p.stem.split("-")[1]): p for p in files}
    n = workers or max(by_index) + 1
    if max(by_index) >= n:
        raise DataError(f"{run_dir}: {kind} of worker-{max(by_index)} in a run of {n} workers")
    return [by_index.get(i) for i in range(n)]


def _traced_spec(run_dir, files: list[Path], sigma: float, before_apply: float, server: bool, **overrides) -> SimSpec:
    server_file = files[0].parent / "server.npz"
    log = read_push_times(server_file) if server_file.exists() else None
    paths = _per_worker(run_dir, files, "the timing trace")
    traces = [read_trace(path) if path is not None else None for path in paths]
    if log is not None:  # applies the workers' reads say were recorded late move back first
        seen = [read for t, p in zip(traces, paths) if t is not None for read in trace_windows(t, log, p.stem).reads]
        log = settle_applies(log, seen)
    cycles, reads = [], []
    for trace, path in zip(traces, paths):
        cycles.append(trace_windows(trace, log, path.stem) if trace is not None else None)
        reads.append(trace["clock_start"] + cycles[-1].first_read if trace is not None else None)
    pushed = [c for c in cycles if c is not None and c.trip]
    if not pushed:
        raise DataError(f"{run_dir}: no worker pushed: no round trip to replay")
    mean_trip = _mean([_mean(c.trip) for c in pushed])
    computes, trips, theres = [], [], []
    for cycle in cycles:
        if cycle is None:  # never joined: the others' mean times, from after the run's end
            cycle = Windows([_mean([_mean(c.compute) for c in pushed])], [mean_trip], [None], 0.0)
        elif not cycle.trip:  # it joined late and the run ended during its first window: that window, then
            # a round trip as the others' on average (the simulation stops at the real run's end anyway)
            cycle = Windows([cycle.unfinished], [mean_trip], [None], 0.0)
        computes.append(tuple(cycle.compute))
        trips.append(tuple(cycle.trip))
        # where the server's log has no record of the push, the way there is the usual fraction
        theres.append(tuple(t * before_apply if way is None else min(way, t) for t, way in zip(cycle.trip, cycle.there)))
    service = 0.0
    if server:
        summary = Path(run_dir) / "summary.json"
        per_push_us = json.loads(summary.read_text()).get("server_cpu_per_push_us") if summary.exists() else None
        service = (per_push_us or 0.0) * 1e-6
    first, never = min(r for r in reads if r is not None), _run_facts(run_dir)[1]
    trip = _mean([_mean(t) for t in trips])
    return SimSpec(compute=Dist("lognormal", _mean([_mean(c) for c in computes]), sigma),
                   delay=Dist("lognormal", trip * before_apply, sigma),
                   reply_delay=Dist("lognormal", trip * (1 - before_apply), sigma),
                   server=Dist("constant", service), before_apply=before_apply,
                   worker_compute_trace=tuple(computes), worker_trip_trace=tuple(trips),
                   worker_there_trace=tuple(theres) if log is not None else (),
                   worker_start=tuple(r - first if r is not None else never for r in reads),
                   start_holding_weights=True, lr_trace=_rate_trace(log), **overrides)


def _rate_trace(log: PushLog | None) -> tuple[float, ...]:
    """The rate each update was applied with, by the version it started from (entry k: the
    push that made version k + 1), NaN where the log does not say; () without a log, or
    with one from before rates were kept."""
    if log is None or not log.version_lr:
        return ()
    trace = [math.nan] * max(log.version_lr)
    for version, lr in log.version_lr.items():
        if version >= 1:
            trace[version - 1] = lr
    return tuple(trace)


def _logged_spec(run_dir, sigma: float, before_apply: float, **overrides) -> SimSpec:
    logs = Path(run_dir) / "logs"
    names = _worker_files(logs, "worker-*.log")
    if not names:
        raise DataError(f"{run_dir}: no worker logs (logs/worker-*.log): is it a local cluster run?")
    computes, delays, starts = [], [], []
    for path in _per_worker(run_dir, names, "the log"):
        done = joined = None
        for line in (path.read_text().splitlines() if path is not None else []):
            joined = joined or _JOINED.match(line)
            done = _DONE.search(line) or done
        if done is None or joined is None or int(done[2]) == 0:  # it never joined, or never pushed
            computes.append(None)
            delays.append(None)
            starts.append(None)
            continue
        steps, pushes, compute, comm = int(done[1]), int(done[2]), float(done[3]), float(done[4])
        computes.append(compute / max(steps, 1))
        delays.append(comm / max(pushes, 1))
        starts.append(datetime.strptime(joined[1], "%H:%M:%S.%f"))
    if not [s for s in starts if s is not None]:
        raise DataError(f"{run_dir}: no worker log has 'joined' and 'worker done' lines with pushes to measure")
    first, never = min(s for s in starts if s is not None), _run_facts(run_dir)[1]
    start_s = tuple((t - first).total_seconds() if t is not None else never for t in starts)
    compute = _mean([c for c in computes if c is not None])
    trip = _mean([d for d in delays if d is not None])
    return SimSpec(compute=Dist("lognormal", compute, sigma),
                   delay=Dist("lognormal", trip * before_apply, sigma),
                   reply_delay=Dist("lognormal", trip * (1 - before_apply), sigma),
                   worker_compute=tuple(c if c is not None else compute for c in computes), worker_start=start_s,
                   **overrides)


def replay_config(real_dir, out_dir, seed: int | None = None):
    """The real run's configuration, to simulate it again into ``out_dir``: stopped at the
    update whose weights the real run evaluated last and kept (its last metrics record). A
    real coordinator polls, and notices the last example of the last epoch some updates late
    (866 for 860 in 2 epochs of one worker; its servers applied 6 more pushes while it
    evaluated and stopped them), and the test accuracy of weights a few updates apart
    differs by up to a point or more at 2 epochs."""
    from ..config import TrainConfig
    real_dir = Path(real_dir)
    try:
        config = TrainConfig.from_dict(json.loads((real_dir / "config.json").read_text()))
        last = json.loads((real_dir / "metrics.jsonl").read_text().splitlines()[-1])
        ended = json.loads((real_dir / "summary.json").read_text())
    except (OSError, ValueError, IndexError) as exc:
        raise DataError(f"{real_dir} is not a finished run directory (config.json, metrics.jsonl, summary.json): "
                        f"{exc}") from None
    return config.with_(out_dir=str(out_dir), seed=config.seed if seed is None else seed,
                        max_updates=last["updates"], epochs=max(config.epochs, ended["epochs"]) + 1)


def compare(real_dir, sim_dir) -> dict:
    """Staleness total-variation distance and accuracy gap between two run directories."""
    real, sim = (json.loads((Path(d) / "summary.json").read_text()) for d in (real_dir, sim_dir))
    tv = staleness_tv(StalenessHistogram.from_dict(real["staleness_histogram"]),
                      StalenessHistogram.from_dict(sim["staleness_histogram"]))
    return {"tv": tv, "real_accuracy": real["test_accuracy"], "sim_accuracy": sim["test_accuracy"],
            "accuracy_gap": abs(real["test_accuracy"] - sim["test_accuracy"]),
            "real_staleness": real["staleness"], "sim_staleness": sim["staleness"]}
