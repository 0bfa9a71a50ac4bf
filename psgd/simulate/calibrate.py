"""Timings of a real run, to feed the simulator, and how close a simulation came to it.

A local cluster's run directory keeps each worker's log (RUN_DIR/logs/worker-i.log). Its
last line says how long the worker computed and communicated in all (psgd worker's
``worker done`` line); its ``joined`` line says when it started pushing. From those:

- per-worker compute per step = compute seconds / steps;
- a push's round trip = communication seconds / pushes (the push, the server's work on
  it, the ack and the reading of fresh weights), split into the way there and back;
- per-worker start = when it joined, after the first worker did.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from ..errors import DataError
from ..metrics import StalenessHistogram
from .engine import SimSpec, staleness_tv
from .events import Dist

_DONE = re.compile(r"worker done: (\d+) steps, (\d+) pushes, .* compute ([0-9.]+) s, communication ([0-9.]+) s")
_JOINED = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) worker INFO \S+ joined")


def measured_spec(run_dir, sigma: float = 0.3, before_apply: float = 0.5, **overrides) -> SimSpec:
    """A SimSpec with the compute, delay and start times a real local run measured: each
    worker's mean compute per step (lognormal, deviation ``sigma`` of its log: the logs give
    no spread), one round trip for all (the workers' mean), ``before_apply`` of it on the
    way to the server and the rest on the way back, each worker's start."""
    logs = Path(run_dir) / "logs"
    names = sorted((p for p in logs.glob("worker-*.log")), key=lambda p: int(p.stem.split("-")[1]))
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
