"""``psgd train --workers N``: a whole cluster on this machine, and its clean teardown.

The launcher starts one ``psgd server`` and N ``psgd worker`` processes (each worker on
one BLAS thread: N workers share the cores), then watches the run from outside like a
coordinator: it polls the server's statistics, pulls a snapshot of the weights at every
evaluation point, evaluates it on the validation set, feeds the error to the schedule,
and stops the run on its budget of epochs or on a target accuracy. Whatever happens
(a crash, Ctrl-C), no process is left behind: the ``finally`` clause reaps them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import shm
from .config import TrainConfig
from .errors import PsgdError, TransportError
from .metrics import StalenessHistogram
from .network import MLP
from .trainer import RunRecorder, prepare_data
from .transport import Client

READY_TIMEOUT_S = 30.0  # for the server to start listening
STATS_INTERVAL_S = 0.02  # between statistics polls while training
TERMINATE_GRACE_S = 5.0  # after SIGTERM, before SIGKILL
SERVER_EXIT_S = 10.0  # for server and workers to wind down after the run ends
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Child:
    role: str
    proc: subprocess.Popen
    log: Path
    reported: bool = False

    def describe_exit(self) -> str:
        code = self.proc.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        tail = ""
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
            if lines:
                tail = f": {lines[-1][:300]}"
        except OSError:
            pass
        return f"{self.role} (pid {self.proc.pid}) {how}{tail}"


@dataclass
class Cluster:
    """The processes of a local run. ``stop()`` reaps them all, whatever state they are in."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def spawn(self, role: str, args: list[str], extra_env: dict | None = None) -> Child:
        log = self.workdir / f"{role}.log"
        env = dict(os.environ, **(extra_env or {}))
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "psgd", *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        child = Child(role, proc, log)
        self.children.append(child)
        return child

    def newly_dead(self) -> list[Child]:
        dead = []
        for c in self.children:
            if not c.reported and c.proc.poll() is not None:
                c.reported = True
                dead.append(c)
        return dead

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for c in self.children:
            try:
                c.proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self) -> None:
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.terminate()
        if not self.wait(TERMINATE_GRACE_S):
            for c in self.children:
                if c.proc.poll() is None:
                    c.proc.kill()
            for c in self.children:
                c.proc.wait()
        for c in self.children:  # a server that died hard cannot unlink its weights itself
            if c.role == "server":
                for seg in Path(shm.SHM_DIR).glob(f"psgd-weights-{c.proc.pid}-*"):
                    seg.unlink(missing_ok=True)


def _wait_ready(server: Child, ready_file: Path) -> str:
    end = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < end:
        if ready_file.exists():
            return json.loads(ready_file.read_text())["endpoint"]
        if server.proc.poll() is not None:
            raise PsgdError(f"the server did not start: {server.describe_exit()}")
        time.sleep(0.01)
    raise PsgdError(f"the server did not start listening within {READY_TIMEOUT_S:.0f} s")


def train_cluster(config: TrainConfig, on_event=None, say=None) -> dict:
    """Run a local cluster of ``config.workers`` workers; returns the run summary."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    data = prepare_data(config)  # first: a bad option fails here, before any process starts
    workdir = Path(tempfile.mkdtemp(prefix="psgd-run-"))
    cluster = Cluster(workdir)
    try:
        cfg_file = workdir / "config.json"
        cfg_file.write_text(config.to_json())
        ready = workdir / "ready.json"
        server = cluster.spawn("server", ["server", "--config", str(cfg_file), "--bind", "tcp://127.0.0.1:0",
                                          "--num-shards", str(config.workers), "--ready-file", str(ready)])
        endpoint = _wait_ready(server, ready)
        for i in range(config.workers):
            args = ["worker", "--connect", endpoint, "--name", f"worker-{i}", "--shard", str(i),
                    "--transport", config.transport]
            if config.data_dir:
                args += ["--data-dir", str(config.data_dir)]
            cluster.spawn(f"worker-{i}", args, WORKER_ENV)
        return _monitor(config, cluster, server, endpoint, data, on_event, say, t0)
    finally:
        cluster.stop()
        for f in workdir.iterdir():
            f.unlink()
        workdir.rmdir()


def _monitor(config, cluster, server, endpoint, d, on_event, say, t0) -> dict:
    net = MLP(config.model)
    recorder = RunRecorder(config, on_event)
    client = Client(endpoint, "launcher", server_wait=10.0)
    params = np.empty(net.n_params, net.dtype)
    n_train = len(d.train)
    total = int(config.epochs * n_train)
    eval_every = max(1, n_train // config.evals_per_epoch)
    next_eval = eval_every
    recorder.on_event("start", {"total_examples": total})
    failures, eval_time = [], 0.0
    t_first = None
    last_stats = None
    try:
        while True:
            for child in cluster.newly_dead():
                failures.append(child.describe_exit())
                say(f"psgd: {failures[-1]}")
                if child.role == "server":
                    raise PsgdError(f"the server failed: {failures[-1]}")
            if all(c.reported for c in cluster.children if c.role != "server"):
                raise PsgdError("every worker has failed: " + "; ".join(failures))
            stats = client.request({"type": "stats"})["stats"]
            last_stats = stats
            examples = stats["examples"]
            if t_first is None and stats["version"] > 0:
                t_first = time.perf_counter()
            if examples >= next_eval or examples >= total:
                while next_eval <= examples:
                    next_eval += eval_every
                # Stop the world while evaluating: workers wait on their next push, so the
                # evaluation neither steals their CPU nor counts as training time.
                t_eval = time.perf_counter()
                client.request({"type": "pause"})
                snap = client.request({"type": "pull"})
                params[...] = snap.arrays[0]
                stats = client.request({"type": "stats"})["stats"]
                train_time = (t_eval - t_first - eval_time) if t_first else 0.0
                val_loss, val_acc = net.evaluate(params, *d.eval_set)
                err = val_loss if val_acc is None else 1.0 - val_acc
                client.request({"type": "observe", "validation_error": err})
                client.request({"type": "resume"})
                eval_time += time.perf_counter() - t_eval
                rec = _record(stats, snap, t_eval - t0, train_time, n_train, val_loss, val_acc)
                recorder.record(rec)
                if config.target_accuracy and val_acc is not None and val_acc >= config.target_accuracy:
                    break
                if examples >= total:
                    break
            else:
                recorder.on_event("progress", {"examples": examples, "loss": None})
            time.sleep(STATS_INTERVAL_S)
        final = client.request({"type": "pull"})
        params[...] = final.arrays[0]
        last_stats = client.request({"type": "stats"})["stats"]
        client.request({"type": "shutdown"})
    except TransportError as exc:
        raise PsgdError(f"lost the server: {exc}") from None
    finally:
        client.close()
    train_end = time.perf_counter() - eval_time
    if not cluster.wait(SERVER_EXIT_S):
        say("psgd: some processes did not stop in time and were terminated")
    for child in cluster.newly_dead():
        if child.proc.returncode not in (0, None):
            failures.append(child.describe_exit())
    test_loss, test_acc = net.evaluate(params, d.test.X, d.T_test)
    summary = _summary(config, last_stats, n_train, test_loss, test_acc, t0, t_first, train_end, eval_time, failures)
    summary["first_reaching"] = {str(a): r["time"] for a in (0.97, 0.98) if (r := recorder.first_reaching(a))}
    return recorder.finish(params, summary)


def _record(stats, snap, wall, train_time, n_train, val_loss, val_acc) -> dict:
    hist = StalenessHistogram.from_dict(stats["staleness"]).summary()
    return {"time": wall, "train_time": train_time, "epoch": stats["examples"] / n_train, "examples": stats["examples"],
            "updates": snap["version"], "lr": stats["lr"], "train_loss": None, "val_loss": val_loss, "val_accuracy": val_acc,
            "staleness_mean": hist["mean"], "staleness_max": hist["max"],
            "examples_per_s": stats["examples"] / train_time if train_time else 0.0}


def _summary(config, stats, n_train, test_loss, test_acc, t0, t_first, train_end, eval_time, failures) -> dict:
    hist = StalenessHistogram.from_dict(stats["staleness"]).summary()
    train_time = train_end - t_first if t_first else 0.0
    updates, examples = stats["version"], stats["examples"]
    summary = {
        "workers": config.workers, "transport": config.transport, "updates": updates, "examples": examples,
        "epochs": examples / n_train, "test_loss": test_loss, "test_accuracy": test_acc,
        "setup_time": (t_first - t0) if t_first else 0.0, "train_time": train_time, "eval_time": eval_time,
        "wall_time": time.perf_counter() - t0,
        "examples_per_s": examples / train_time if train_time else 0.0,
        "pushes_per_s": updates / train_time if train_time else 0.0,
        "staleness": hist, "bytes_in": stats["bytes_in"], "bytes_out": stats["bytes_out"],
        "errors": stats["errors"], "failures": failures,
        "worker_transports": sorted({w["transport"] for w in stats["workers"].values()}),
    }
    summary["report"] = [
        f"{updates} updates applied, {summary['pushes_per_s']:.0f} pushes/s; staleness mean {hist['mean']:.2f}, "
        f"p50 {hist['p50']}, p99 {hist['p99']}, max {hist['max']}",
        f"{stats['bytes_in'] / 1e6:.1f} MB in and {stats['bytes_out'] / 1e6:.1f} MB out over ZeroMQ; "
        f"workers pushed via {', '.join(summary['worker_transports'])}",
    ] + [f"failed: {f}" for f in failures]
    return summary
