"""A run as it goes, for the dashboard and Prometheus: the coordinator feeds a :class:`LiveRun`
(server statistics every poll, per-worker records about once a second, each evaluation,
the summary at the end); HTTP threads read :meth:`LiveRun.snapshot`, a plain JSON-able
dict, under its lock. A finished run directory gives the same snapshot
(:func:`snapshot_of_run_dir`), so ``psgd report --serve`` shows it the same way.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path

from ..metrics import StalenessHistogram, time_shares

WORKERS_EVERY_S = 1.0  # per-worker records (a paged request to shard 0) at most this often
RATE_WINDOW = 3  # a lane's examples/s and staleness are over the last this many polls (a push is 1/10 s or more)
SERIES_POINTS = 600  # a worker lane keeps at most this many points; older ones are thinned by half
STRAGGLER_FACTOR = 0.5  # as psgd.coordinator.loop: below this fraction of the others' median rate

PHASES = ("starting", "training", "finished", "failed")


class LiveRun:
    def __init__(self, name: str = "live", config: dict | None = None, clock=time.monotonic):
        self.name, self.config, self.clock = name, config or {}, clock
        self.lock = threading.Lock()
        self.started = clock()
        self.phase, self.stop_reason, self.error = "starting", None, None
        self.stats: dict = {}
        self.evals: list[dict] = []
        self.workers: dict[str, dict] = {}  # name -> lane
        self.summary: dict | None = None
        # the last RATE_WINDOW + 1 polls: (time, {name: (examples, staleness sum, staleness count)})
        self._polls: deque = deque(maxlen=RATE_WINDOW + 1)

    # --- fed by the coordinator ------------------------------------------------------------

    def on_stats(self, stats: dict) -> None:
        with self.lock:
            self.stats = stats
            if self.phase == "starting" and stats.get("version", 0) > 0:
                self.phase = "training"

    def workers_due(self) -> bool:
        return not self._polls or self.clock() - self._polls[-1][0] >= WORKERS_EVERY_S

    def on_workers(self, records: dict, point: bool = True) -> None:
        """Every per-worker record (``stats["workers"]``): each lane gets a point: examples/s
        and mean staleness since the previous call (``point`` False: the totals only, as at
        the end, when the servers were paused for the final evaluation)."""
        now = self.clock()
        t = now - self.started
        totals: dict[str, list] = {}
        for w in records.values():  # a worker that said hello again has several records: sum them
            hist = StalenessHistogram.from_dict(w["staleness"])
            row = totals.setdefault(w["name"], [0, 0.0, 0, False, None, 0, 0])
            row[0] += w["examples"]
            row[1] += hist.mean() * hist.total
            row[2] += hist.total
            row[3] = w["connected"]
            row[4] = w.get("timing") or row[4]
            row[5] += w["pushes"]
            row[6] += w["refused"]
        previous = self._polls[0] if self._polls else None
        with self.lock:
            for name, (examples, stale_sum, stale_n, connected, timing, pushes, refused) in totals.items():
                lane = self.workers.setdefault(name, {"series": [], "examples_per_s": 0.0})
                if point and previous is not None and name in previous[1] and examples > 0:
                    # (a worker still loading its data has no rate yet: its lane starts at its first push)
                    dt = max(now - previous[0], 1e-9)
                    ex0, ss0, sn0 = previous[1][name]
                    rate = (examples - ex0) / dt
                    stale = (stale_sum - ss0) / (stale_n - sn0) if stale_n > sn0 else None
                    lane["examples_per_s"] = rate
                    lane["series"].append([round(t, 3), rate, stale])
                    if len(lane["series"]) > SERIES_POINTS:
                        lane["series"] = lane["series"][::2]
                lane.update(connected=connected, timing=timing, time_shares=time_shares(timing),
                            pushes=pushes, examples=examples, refused=refused,
                            staleness_mean=stale_sum / stale_n if stale_n else 0.0)
            if point:
                rates = {n: lane["examples_per_s"] for n, lane in self.workers.items() if lane.get("connected")}
                flagged = set(_stragglers(rates)) if previous is not None else set()
                for name, lane in self.workers.items():
                    lane["straggler"] = name in flagged
        if point:
            self._polls.append((now, {n: (r[0], r[1], r[2]) for n, r in totals.items()}))

    def on_eval(self, rec: dict) -> None:
        with self.lock:
            self.evals.append(dict(rec, wall=self.clock() - self.started))

    def finish(self, summary: dict, stats: dict | None = None) -> None:
        with self.lock:
            if stats is not None:
                self.stats = stats
            self.summary = summary
            self.phase, self.stop_reason = "finished", summary.get("stop_reason")
            flagged = set(summary.get("stragglers") or [])
            for name, w in (summary.get("per_worker") or {}).items():  # the whole run's rates now
                if name in self.workers:
                    self.workers[name].update(examples_per_s=w["examples_per_s"], straggler=name in flagged)

    def fail(self, why: str) -> None:
        with self.lock:
            self.phase, self.error = "failed", why

    def lanes(self) -> dict:
        """Each worker's series (time s, examples/s, mean staleness): the summary keeps them."""
        with self.lock:
            return {name: lane["series"] for name, lane in self.workers.items()}

    # --- read by HTTP threads --------------------------------------------------------------

    def snapshot(self) -> dict:
        with self.lock:
            return _snapshot(self.name, self.phase, self.stop_reason, self.error, self.clock() - self.started,
                             self.stats, self.evals, self.workers, self.summary, self.config, live=True)


def _stragglers(rates: dict[str, float]) -> list[str]:
    from .loop import stragglers  # one rule for the summary and the dashboard
    return stragglers(rates)


def _snapshot(name, phase, stop_reason, error, elapsed, stats, evals, workers, summary, config, live) -> dict:
    """The one shape the page and the exporter read (docs: README "Live dashboard")."""
    s = summary or {}
    hist = stats.get("staleness") or s.get("staleness_histogram")
    last = evals[-1] if evals else {}
    return {
        "name": name, "live": live, "phase": phase, "stop_reason": stop_reason, "error": error,
        "elapsed_s": s.get("wall_time", elapsed),
        "updates": stats.get("version", s.get("updates", 0)), "examples": stats.get("examples", s.get("examples", 0)),
        "lr": stats.get("lr", last.get("lr")), "bytes_in": stats.get("bytes_in", s.get("bytes_in", 0)),
        "bytes_out": stats.get("bytes_out", s.get("bytes_out", 0)),
        "errors": stats.get("errors", s.get("errors")) or {},
        "workers_alive": stats.get("workers_connected", sum(1 for w in workers.values() if w.get("connected"))),
        "staleness": hist, "staleness_summary": StalenessHistogram.from_dict(hist).summary() if hist else None,
        "val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy"),
        "test_loss": s.get("test_loss"), "test_accuracy": s.get("test_accuracy"),
        "epochs": last.get("epoch") if not s else s.get("epochs"),
        "evals": [{k: r.get(k) for k in ("time", "train_time", "updates", "examples", "epoch", "lr", "train_loss",
                                         "val_loss", "val_accuracy", "examples_per_s", "staleness_mean", "stragglers")}
                  for r in evals],
        "workers": {n: dict(lane, series=list(lane.get("series", []))) for n, lane in sorted(workers.items())},
        "config": _config_line(config),
    }


def _config_line(c: dict) -> dict:
    m = c.get("model") or {}
    return {"workers": c.get("workers"), "servers": c.get("servers"), "consistency": c.get("consistency"),
            "staleness_rule": c.get("staleness_rule"), "batch_size": c.get("batch_size"),
            "model": "-".join(map(str, m.get("sizes", []))) if m.get("sizes") else m.get("arch") or m.get("factory"),
            "optimizer": (c.get("optimizer") or {}).get("name"), "lr": (c.get("schedule") or {}).get("lr")}


def snapshot_of_run_dir(path: Path) -> dict:
    """A finished run directory in the live shape: curves from metrics.jsonl, totals and
    per-worker lanes from summary.json (the lanes a live coordinator kept)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    summary = json.loads((path / "summary.json").read_text())
    evals = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
    series = summary.get("worker_series") or {}
    flagged = set(summary.get("stragglers") or [])
    workers = {}
    for name, w in (summary.get("per_worker") or {}).items():
        workers[name] = {"series": series.get(name, []), "examples_per_s": w["examples_per_s"],
                         "connected": w["connected"], "timing": w.get("timing"), "time_shares": w.get("time_shares"),
                         "pushes": w["pushes"], "examples": w["examples"], "refused": w["refused"],
                         "staleness_mean": w["staleness"]["mean"], "straggler": name in flagged}
    return _snapshot(path.name, "finished", summary.get("stop_reason"), None, summary.get("wall_time", 0.0), {},
                     evals, workers, summary, config, live=False)
