"""The coordinator: watches and steers a run from outside the server.

Every few milliseconds it reads the server's statistics; at every evaluation point
(``evals_per_epoch`` times an epoch) it pauses the server, pulls a snapshot, evaluates it
on the validation set and resumes, so evaluation costs no training time. It owns the
learning rate: the schedule is computed here (plateau listens to the validation error)
and sent to the server whenever it changes. It flags stragglers, stops the run on a
target accuracy, an epoch or update budget or a wall-clock limit, tells the server to
shut down (which ends the workers), and writes the run directory.

It runs inside ``psgd train`` (the local cluster) or alone as ``psgd coordinator``.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from ..config import TrainConfig, server_update
from ..errors import Interrupted, PsgdError, TransportError
from ..metrics import FLAG_AFTER_OUTLIERS, StalenessHistogram, time_shares
from .report import momentum_line, rollback_line, traffic_line
from ..model.interface import build_model
from ..data.prepared import PreparedData
from .live import LiveRun
from .rundir import RunRecorder
from ..wire.client import SHUTDOWN_WAIT_S, ParameterClient
from ..wire.transport import max_reply_bytes

STATS_INTERVAL_S = 0.02  # the shortest wait between statistics polls: evaluations land near their example count
STATS_INTERVAL_MAX_S = 0.25  # the longest: stalls, stops and a Ctrl-C are noticed at least this soon
STALL_S = 20.0  # no new examples, and no worker joining, for this long (not paused): the run is stuck
# Before the first update the workers are loading data and saying hello: on a machine with
# fewer cores than workers that takes about this long per worker (48 workers on 2 cores
# tripped the fixed 20 s), so the start may take this much longer than STALL_S.
STARTUP_PER_WORKER_S = 1.0
INHERITED_NOTE_MIN = 400  # updates found at the first look worth a line in the report (a poll sees ~1-100)
STRAGGLER_FACTOR = 0.5  # a worker below this fraction of the median rate is a straggler
LR_CHANGE = 1e-9  # relative change of the rate worth telling the server
NAN_STALL_S = 2.0  # no new examples this long while the servers refuse NaN/Inf gradients: diverged
DIVERGED_FACTOR = 10.0  # a validation loss this many times the best so far has diverged (stop, or roll back)
TRAIN_LOSS_SAMPLE = 2000  # training examples the training loss is measured on at each evaluation


def stragglers(rates: dict[str, float], factor: float = STRAGGLER_FACTOR) -> list[str]:
    """Names of workers whose examples/s is below ``factor`` x the median of the others'."""
    slow = []
    for name, rate in rates.items():
        others = [r for n, r in rates.items() if n != name]
        if others and rate < factor * statistics.median(others):
            slow.append(name)
    return sorted(slow)


class Coordinator:
    """One run's coordinator. ``watch()``, if given, is called every poll and returns
    descriptions of processes that failed since the last call (the local launcher's view);
    a failure of the server ends the run with an error."""

    def __init__(self, config: TrainConfig, endpoint: str, data: PreparedData, on_event=None, say=None,
                 watch=None, append: bool = False, keys=None, stop_requested=None, live: LiveRun | None = None):
        """``stop_requested()``, if given, is asked every poll: once true (a first Ctrl-C) the
        run stops warm, as on a budget: a final evaluation, then the summary. ``live``
        (the dashboard's and /metrics' view of the run) is fed as the run goes."""
        self.config = config
        self.live = live or LiveRun(config=config.to_dict())
        self.stop_requested = stop_requested or (lambda: False)
        self.data = data
        self.net = build_model(config.model)
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.recorder = RunRecorder(config, on_event, append=append, say=self.say)
        self.watch = watch or (lambda: [])
        self.servers = ParameterClient(endpoint, "coordinator", keys,  # one or all K shards
                                       max_message=max_reply_bytes(self.net.n_params, self.net.dtype.itemsize))
        self.schedule = server_update(config)[1].build()  # local SGD: the outer rate
        self.params = np.empty(self.net.n_params, self.net.dtype)
        self.failures: list[str] = []
        self.checkpoint_failures: dict[int, int] = {}  # server shard -> failed checkpoint writes seen
        self._checkpoint_streak: dict[int, int | None] = {}  # shard -> version of a failure not yet mended
        self.lr_sent: float | None = None
        self.lr_scale = 1.0  # lowered by each rollback
        self.rollbacks: list[dict] = []
        # (version, weights, examples) of the last healthy evaluation
        self._validated: tuple[int, np.ndarray, int] | None = None
        self._best_val_loss = float("inf")
        self._not_finite_seen = 0  # gradients the servers refused as NaN/Inf, at the last poll
        self._rates_at: tuple[float, dict] | None = None
        self._cpu_at_first: tuple[float | None, int] = (None, 0)  # servers' CPU seconds and version at the first update
        # examples and updates already applied when this coordinator first saw an update: a
        # resumed run's, or those of workers that started before it. Rates count only what
        # came after, in the time it watched.
        self._before: tuple[int, int] = (0, 0)

    def run(self) -> dict:
        """Coordinate until a stop condition holds; return the summary (also written to disk)."""
        try:
            return self._run()
        except BaseException as exc:
            self.live.fail(str(exc) or type(exc).__name__)
            raise

    def _run(self) -> dict:
        c, d = self.config, self.data
        n_train = len(d.train)
        total = int(c.epochs * n_train)
        eval_every = max(1, n_train // c.evals_per_epoch)
        next_eval = eval_every
        self.recorder.on_event("start", {"total_examples": total})
        t0 = time.perf_counter()
        t_first, eval_time, stop_reason = None, 0.0, "epochs"
        last_examples, last_joined, progress_at = -1, -1, time.perf_counter()
        nan_at = None  # when the servers last refused a gradient as NaN/Inf
        start_version = None  # the servers' version at the first poll (a resumed run's is its checkpoint's)
        try:
            self._set_lr(0)
            if c.on_divergence == "rollback":  # the start is the first healthy state, and its loss the baseline
                version = self.servers.pull(self.params)
                self._validated = (version, self.params.copy(), self.servers.stats()["examples"])
                self._best_val_loss = self.net.evaluate(self.params, *d.eval_set)[0]
            while True:
                self._check_processes()
                stats = self._stats()
                self.live.on_stats(stats)
                if self.live.workers_due():  # the dashboard's worker lanes: paged, about once a second
                    self.live.on_workers(self.servers.worker_records())
                self._check_checkpoints(stats)
                examples, version = stats["examples"], stats["version"]
                if start_version is None:
                    start_version = version
                refused_nan = (stats.get("errors") or {}).get("not_finite", 0)
                if refused_nan > self._not_finite_seen:
                    nan_at = time.perf_counter()
                force_eval = refused_nan > self._not_finite_seen and c.on_divergence == "rollback"
                self._not_finite_seen = refused_nan
                now = time.perf_counter()
                stalled_for = now - progress_at
                refusing_now = nan_at is not None and now - nan_at < 0.5  # NaN/Inf pushes keep coming
                joined = stats.get("workers_connected", 0)
                stall_limit = STALL_S if version > 0 else STALL_S + STARTUP_PER_WORKER_S * c.workers
                if examples != last_examples or joined != last_joined:  # a worker joining is progress too
                    last_examples, last_joined, progress_at = examples, joined, now
                elif stalled_for > stall_limit or (refusing_now and stalled_for > NAN_STALL_S):
                    raise PsgdError(_stall_message(stats, stalled_for, c))
                if t_first is None and version > 0:
                    t_first = time.perf_counter()
                    self._cpu_at_first = (stats.get("cpu_s", 0.0), version)  # the servers' start-up is not per push
                    self._before = (examples, version)
                self._set_lr(version)
                elapsed = time.perf_counter() - t0
                server_ended = stats.get("stopping", False)  # its own budget, or a signal
                interrupted = self.stop_requested()
                if interrupted and version == start_version:
                    # A Ctrl-C before any update: an evaluation of the starting weights and a
                    # summary of nothing would pass for a run. Say so instead, and stop.
                    raise Interrupted("interrupted before the first update: nothing was trained")
                budget_hit = examples >= total or (c.max_updates is not None and version >= c.max_updates) \
                    or (c.max_seconds is not None and elapsed >= c.max_seconds) or server_ended or interrupted
                if examples >= next_eval or budget_hit or force_eval:
                    while next_eval <= examples:
                        next_eval += eval_every
                    t_eval = time.perf_counter()
                    try:
                        rec = self._evaluate(t_eval - t0, (t_eval - t_first - eval_time) if t_first else 0.0, n_train)
                    except _Diverged as diverged:
                        # or raise, when rollbacks are off or used up; the examples trained on
                        # since the weights it went back to are owed to the budget
                        total += self._roll_back(diverged)
                        progress_at = time.perf_counter()
                        continue
                    finally:
                        eval_time += time.perf_counter() - t_eval
                    if c.target_accuracy and (rec["val_accuracy"] or 0) >= c.target_accuracy:
                        stop_reason = "target accuracy"
                        break
                    if budget_hit:
                        stop_reason = "interrupted" if interrupted else "epochs" if examples >= total else (
                            "updates" if c.max_updates is not None and version >= c.max_updates else
                            "server stop" if server_ended else "time limit")
                        break
                else:
                    self.recorder.on_event("progress", {"examples": examples, "loss": None})
                time.sleep(self._poll_wait(examples, min(next_eval, total), t_first))
            # Every way out of the loop has just evaluated a snapshot: those weights, the ones
            # the validation set saw (and that met the target), are the run's result, not
            # the few unvalidated pushes the workers made since. The servers hold the
            # workers meanwhile, so the summary and the per-worker pages that follow it
            # count the same pushes; the run ends next anyway.
            self.servers.control({"type": "pause"})
            stats = self.servers.stats(workers=True)
        except TransportError as exc:
            raise PsgdError(f"lost the server: {exc}") from None
        train_time = (time.perf_counter() - eval_time - t_first) if t_first else 0.0
        test_loss, test_acc = self.net.evaluate(self.params, d.test.X, d.T_test)
        summary = self._summary(stats, n_train, test_loss, test_acc, t0, t_first, train_time, eval_time, stop_reason)
        self.live.on_workers(stats["workers"], point=False)
        summary["worker_series"] = self.live.lanes()  # so psgd report --serve draws the lanes too
        self.live.finish(summary, stats)
        return summary

    def finish(self, summary: dict) -> dict:
        """Write weights and summary (after the caller added what it knows, e.g. exits)."""
        return self.recorder.finish(self.params, summary)

    def end_run(self) -> None:
        """Tell the server(s) to end the run, which ends the workers. Separate from run() so
        that a coordinator on its own writes the run directory first: a container
        orchestrator may stop it as soon as the server exits."""
        try:
            self.servers.control({"type": "shutdown"}, server_wait=SHUTDOWN_WAIT_S)
        except (TransportError, PsgdError):
            pass  # already gone: nothing left to end
        finally:
            self.servers.close()

    # --- steps of the loop ----------------------------------------------------------------

    def _stats(self) -> dict:
        """The summary (polled every STATS_INTERVAL_S: its size does not grow with the workers)."""
        return self.servers.stats()

    def _check_processes(self):
        for failure in self.watch():
            self.failures.append(failure)
            self.say(f"psgd: {failure}")

    def _check_checkpoints(self, stats: dict) -> None:
        """Say when a server shard fails to write a checkpoint (a full disk), and when it
        writes again; the run goes on either way."""
        for shard, status in enumerate(stats.get("checkpoints") or []):
            if not status:
                continue
            seen = self.checkpoint_failures.get(shard, 0)
            if status["failures"] > seen and status["error"] is not None:
                if self._checkpoint_streak.get(shard) is None:
                    kept = f"version {status['version']}" if status["version"] is not None else "none"
                    self.say(f"psgd: server shard {shard} cannot write its checkpoint (version {status['failed_version']}): "
                             f"{status['error']}; it keeps its newest good one ({kept}) and training goes on")
                self._checkpoint_streak[shard] = status["failed_version"]
            elif status["error"] is None and self._checkpoint_streak.get(shard) is not None:
                self.say(f"psgd: server shard {shard} writes checkpoints again (version {status['version']})")
                self._checkpoint_streak[shard] = None
            self.checkpoint_failures[shard] = status["failures"]

    def _set_lr(self, version: int) -> None:
        lr = float(self.schedule(version)) * self.lr_scale
        if self.lr_sent is None or abs(lr - self.lr_sent) > LR_CHANGE * max(abs(lr), 1e-30):
            self.servers.control({"type": "set_lr", "lr": lr})
            self.lr_sent = lr

    def _evaluate(self, wall: float, train_time: float, n_train: int) -> dict:
        """Pause, snapshot, resume, then evaluate the snapshot and feed the schedule."""
        self.servers.control({"type": "pause"})
        try:
            snap_version = self.servers.pull(self.params)
            stats = self.servers.stats(workers=True)  # per-worker rates: paged, only at an evaluation
            val_loss, val_acc = self.net.evaluate(self.params, *self.data.eval_set)
        finally:
            self.servers.control({"type": "resume"})
        if not np.isfinite(val_loss) or (self.rollbacks and self._refusing_nan(stats)):
            raise _Diverged(val_loss, stats["version"])
        # Finite, but blowing up: the outlier guard can keep a diverging run's weights finite
        # (it refuses the largest pushes), so a loss of 1e22 must stop a run as NaN does.
        if val_loss > DIVERGED_FACTOR * self._best_val_loss:
            raise _Diverged(val_loss, stats["version"])
        self._best_val_loss = min(self._best_val_loss, val_loss)
        if self.config.on_divergence == "rollback":
            self._validated = (snap_version, self.params.copy(), stats["examples"])
        # The training curve: the same snapshot on a fixed slice of the training set, after
        # the servers resumed (the workers' own losses are of older weights, mid-dropout).
        train_loss = self.net.evaluate(self.params, self.data.train.X[:TRAIN_LOSS_SAMPLE],
                                       self.data.T_train[:TRAIN_LOSS_SAMPLE])[0]
        self.schedule.observe(val_loss if val_acc is None else 1.0 - val_acc)
        self._set_lr(stats["version"])
        hist = StalenessHistogram.from_dict(stats["staleness"]).summary()
        rates = self._worker_rates(stats)
        rec = {
            "time": wall, "train_time": train_time, "epoch": stats["examples"] / n_train,
            "examples": stats["examples"], "updates": snap_version, "lr": self.lr_sent, "train_loss": float(train_loss),
            "val_loss": val_loss, "val_accuracy": val_acc, "staleness_mean": hist["mean"],
            "staleness_p99": hist["p99"], "staleness_max": hist["max"],
            "examples_per_s": (stats["examples"] - self._before[0]) / train_time if train_time else 0.0,
            "worker_examples_per_s": rates, "stragglers": stragglers(rates),
            # what crossed ZeroMQ so far: every frame either way, and the workers' array payload alone
            "bytes": stats["bytes_in"] + stats["bytes_out"],
            "payload_bytes": sum(sum(by_codec.values()) for by_codec in (stats.get("traffic") or {}).values()),
            **momentum_in_force(stats),
        }
        self.recorder.record(rec)
        self.live.on_eval(rec)
        return rec

    def _refusing_nan(self, stats: dict) -> bool:
        """Since the last rollback, the servers still refuse gradients as NaN/Inf."""
        return (stats.get("errors") or {}).get("not_finite", 0) > self.rollbacks[-1]["not_finite"]

    def _roll_back(self, diverged: "_Diverged") -> int:
        """Every server takes back the last validated weights; the rate goes down; on we go.
        Without rollbacks (or with all of them used) the run stops with today's error.

        Returns the examples the rollback threw away (those trained on since the weights it
        went back to): the run trains them again, so that --epochs counts the training its
        weights kept. Without that, a rollback late in a run to its starting weights left it
        a tenth of an epoch to train (test loss 1.47 from 1.84 in a CI run)."""
        c = self.config
        if c.on_divergence != "rollback" or len(self.rollbacks) >= c.max_rollbacks or self._validated is None:
            tried = f" after {len(self.rollbacks)} rollbacks" if self.rollbacks else ""
            raise PsgdError(f"training diverged{tried}: the validation loss is {diverged.val_loss} after "
                            f"{diverged.version} updates (learning rate {self.lr_sent}); {divergence_advice(c)}")
        version, weights, examples_then = self._validated
        self.servers.set_params(weights)
        self.lr_scale *= c.rollback_factor
        self.lr_sent = None  # send the lowered rate now
        stats = self.servers.stats()
        self._set_lr(stats["version"])
        discarded = max(0, stats["examples"] - examples_then)
        self.rollbacks.append({"at_update": diverged.version, "to_update": version, "lr": self.lr_sent,
                               "examples_discarded": discarded,
                               "not_finite": (stats.get("errors") or {}).get("not_finite", 0)})
        self._not_finite_seen = self.rollbacks[-1]["not_finite"]
        self.say(f"psgd: training diverged at update {diverged.version} (validation loss {diverged.val_loss}); "
                 f"every server rolled back to the weights validated at update {version}, learning rate now "
                 f"{self.lr_sent:.4g} (rollback {len(self.rollbacks)} of {c.max_rollbacks}); the run trains the "
                 f"{discarded} examples since again")
        return discarded

    def _worker_rates(self, stats: dict) -> dict[str, float]:
        """Each connected worker's examples/s since the previous evaluation (at the first one,
        since it joined)."""
        now = time.perf_counter()
        live = [w for w in stats["workers"].values() if w["connected"]]
        current = {w["name"]: w["examples"] for w in live}
        previous = self._rates_at
        self._rates_at = (now, current)
        if previous is None:  # the first evaluation: rates since each worker joined
            return {w["name"]: w["examples_per_s"] for w in live}
        dt = max(now - previous[0], 1e-9)
        return {name: (n - previous[1].get(name, 0)) / dt for name, n in current.items()}

    def _poll_wait(self, examples: int, next_due: float, t_first: float | None) -> float:
        """How long to wait before the next statistics poll: half the time the workers need
        to reach the next evaluation at their rate so far, within [STATS_INTERVAL_S,
        STATS_INTERVAL_MAX_S]. Every poll costs the servers a reply: a fixed 20 ms cadence
        spent their time on polls that could change nothing."""
        c = self.config
        if t_first is None or c.max_updates is not None or c.max_seconds is not None:
            return STATS_INTERVAL_S  # the start, or a budget in updates or seconds: look often
        elapsed = time.perf_counter() - t_first
        rate = examples / elapsed if elapsed > 0 else 0.0
        if rate <= 0:
            return STATS_INTERVAL_S
        return min(STATS_INTERVAL_MAX_S, max(STATS_INTERVAL_S, 0.5 * (next_due - examples) / rate))

    def _cpu_per_push(self, stats) -> float | None:
        """The servers' CPU microseconds per applied push since the first (all shards together)."""
        cpu0, version0 = self._cpu_at_first
        if cpu0 is None or "cpu_s" not in stats or stats["version"] <= version0:
            return None
        return (stats["cpu_s"] - cpu0) / (stats["version"] - version0) * 1e6

    def _summary(self, stats, n_train, test_loss, test_acc, t0, t_first, train_time, eval_time, stop_reason) -> dict:
        c = self.config
        hist = StalenessHistogram.from_dict(stats["staleness"]).summary()
        updates, examples = stats["version"], stats["examples"]
        workers = per_worker(stats["workers"].values())
        summary = {
            "workers": c.workers, "transport": c.transport, "consistency": c.consistency,
            "staleness_rule": c.staleness_rule, "stop_reason": stop_reason,
            "updates": updates, "examples": examples, "epochs": examples / n_train,
            "test_loss": test_loss, "test_accuracy": test_acc,
            "setup_time": (t_first - t0) if t_first else 0.0, "train_time": train_time, "eval_time": eval_time,
            "wall_time": time.perf_counter() - t0,
            "examples_per_s": (examples - self._before[0]) / train_time if train_time else 0.0,
            "pushes_per_s": (updates - self._before[1]) / train_time if train_time else 0.0,
            "updates_before_watched": self._before[1],
            "staleness": hist, "staleness_histogram": stats["staleness"],
            "bytes_in": stats["bytes_in"], "bytes_out": stats["bytes_out"], "errors": stats["errors"],
            "per_worker": workers, "failures": self.failures, "rollbacks": self.rollbacks, "ssp_max_lead": stats.get("ssp_max_lead"),
            "checkpoint_failures": sum(self.checkpoint_failures.values()),
            "stragglers": stragglers({n: w["examples_per_s"] for n, w in workers.items() if w["connected"]}),
            "worker_transports": sorted({w["transport"] for w in stats["workers"].values()}),
            "server_cpu_per_push_us": self._cpu_per_push(stats),
            "push_codec": c.push_codec, "pull_codec": c.pull_codec, "algorithm": c.algorithm,
            "traffic": stats.get("traffic") or {"pushed": {}, "pulled": {}},  # payload bytes by codec
            "momentum_rule": stats.get("momentum_rule"),  # what the server's momentum rule chose, at the end
        }
        summary["first_reaching"] = {str(a): r["train_time"] for a in (0.97, 0.98)
                                     if (r := self.recorder.first_reaching(a))}
        summary["report"] = [
            f"{updates} updates applied, {summary['pushes_per_s']:.0f} pushes/s; staleness mean {hist['mean']:.2f}, "
            f"{StalenessHistogram.text(hist)}; stopped on {stop_reason}",
            f"{stats['bytes_in'] / 1e6:.1f} MB in and {stats['bytes_out'] / 1e6:.1f} MB out over ZeroMQ; "
            f"workers pushed via {', '.join(summary['worker_transports'])}",
        ]
        if self._before[1] > max(INHERITED_NOTE_MIN, 0.01 * updates):  # more than one poll's worth
            summary["report"].append(
                f"{self._before[1]} of the updates were applied before this coordinator saw the run (resumed, or "
                f"workers that started before it): rates count only the {updates - self._before[1]} since")
        if summary["momentum_rule"]:
            summary["report"].append(momentum_line(summary["momentum_rule"]))
        if self.rollbacks:
            summary["report"].append(rollback_line(self.rollbacks, examples, n_train))
        if c.compresses:
            summary["report"].append(traffic_line(summary["traffic"]))
        flagged = sorted(n for n, w in workers.items() if w["flagged"])
        summary["flagged_workers"] = flagged
        if flagged:
            summary["report"].append("flagged (pushes refused again and again as outliers): " + ", ".join(
                f"{n} ({workers[n]['outliers']} refused)" for n in flagged))
        if summary["checkpoint_failures"]:
            summary["report"].append(f"{summary['checkpoint_failures']} checkpoint writes failed on the servers "
                                     "(see their logs); training went on")
        return summary


def momentum_in_force(stats: dict) -> dict:
    """An evaluation record's view of the momentum rule (shard 0's): the momentum and the
    rate factor it applies now; nothing for a server that does not tell."""
    rule = stats.get("momentum_rule")
    return {"momentum": rule["momentum"], "lr_factor": rule["lr_factor"]} if rule else {}


def per_worker(records) -> dict[str, dict]:
    """The server's worker records by worker name. A worker that said hello again (its
    lease ran out, its server restarted, a reconnect) has several records: its counts are
    their sums, the rest is its latest record's (the server lists them in joining order)."""
    out: dict[str, dict] = {}
    hists: dict[str, StalenessHistogram] = {}
    for w in records:
        name, hist = w["name"], StalenessHistogram.from_dict(w["staleness"])
        row = {k: w[k] for k in ("pushes", "examples", "refused", "transport", "connected", "data_shards",
                                 "examples_per_s")}
        row.update({k: w.get(k, d) for k, d in (("push_codec", "none"), ("pull_codec", "none"),
                                                ("bytes_pushed", 0), ("bytes_pulled", 0))})
        row["outliers"] = w.get("outliers", 0)
        row["flagged"] = bool(w.get("flagged"))
        # The worker's totals run across its reconnects: its latest report stands for all.
        row["timing"] = w.get("timing") or (out[name]["timing"] if name in out else None)
        row["time_shares"] = time_shares(row["timing"])
        if name in out:
            for k in ("pushes", "examples", "refused", "outliers", "bytes_pushed", "bytes_pulled"):
                row[k] += out[name][k]
            row["flagged"] = row["flagged"] or out[name]["flagged"] or row["outliers"] >= FLAG_AFTER_OUTLIERS
            row["records"] = out[name]["records"] + 1
            hists[name].merge(hist)
        else:
            row["records"] = 1
            hists[name] = hist
        out[name] = row
    for name, row in out.items():
        row["staleness"] = hists[name].summary()
    return out


class _Diverged(Exception):
    def __init__(self, val_loss: float, version: int):
        super().__init__(f"diverged at update {version}")
        self.val_loss, self.version = val_loss, version


def divergence_advice(c) -> str:
    """What may help a diverged run, leaving out what it already did (an exhausted rollback
    was told to try rollback, and dynsgd, the default, to use dynsgd)."""
    tips = ["lower --lr"]
    if c.schedule.warmup == 0:
        tips.append("add --warmup")
    if c.staleness_rule in ("none", "divide") and c.workers != 1:
        tips.append("use --staleness-rule dynsgd")
    if c.on_divergence != "rollback":
        tips.append("or --on-divergence rollback")
    elif c.max_rollbacks > 0:
        tips.append("or a smaller --rollback-factor")
    return ", ".join(tips)


def _stall_message(stats: dict, seconds: float, config) -> str:
    errors = stats.get("errors") or {}
    live = stats["workers_connected"]
    why = ""
    if errors.get("not_finite"):
        why = (f"; the server refused {errors['not_finite']} gradients as NaN/Inf: training diverged "
               f"({divergence_advice(config)})")
    elif errors:
        why = f"; the server refused pushes: {errors}"
    return f"no training progress for {seconds:.0f} s at {stats['examples']} examples with {live} workers connected{why}"
