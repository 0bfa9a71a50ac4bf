"""The outlier guard: alone (pure), inside the server state's one door, and with a worker
core training through it in-process (an honest run loses nothing; a worker whose
gradients are scaled by 1e6 changes nothing)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from psgd.config import TrainConfig
from psgd.data import Minibatches
from psgd.errors import ConfigError, ProtocolError
from psgd.metrics import FLAG_AFTER_OUTLIERS
from psgd.model.network import MLP
from psgd.server.guard import WARMUP, OutlierGuard
from psgd.server.state import APPLIED, REFUSED, ServerState
from psgd.wire.transport import Client
from psgd.worker.core import StepSettings, WorkerCore
from test_worker_core import SPEC, StateChannel, config, problem


def test_the_guard_accepts_everything_during_its_warm_up_then_refuses_far_larger_norms():
    guard = OutlierGuard(k=10, window=50, warmup=5)
    for _ in range(5):
        guard.admit(1e12)  # nothing to compare with yet: even a huge one passes
    assert guard.judging
    guard = OutlierGuard(k=10, window=50, warmup=5)
    for n2 in (1.0, 2.0, 1.5, 0.5, 1.0):
        guard.admit(n2)
    assert guard.median_norm2() == 1.0
    guard.admit(99.0)  # squared norms: the norm is 9.95 x the median's, within k
    assert guard.median_norm2() == 1.25
    with pytest.raises(ProtocolError) as exc:
        guard.admit(126.0)  # 10.04 x
    assert exc.value.code == "outlier" and "10" in exc.value.detail
    assert len(guard._sorted) == 6  # the refused one does not count towards the median


def test_the_median_runs_over_the_last_window_of_accepted_pushes():
    guard = OutlierGuard(k=3, window=4, warmup=4)
    for n2 in (1.0, 1.0, 1.0, 1.0, 4.0, 4.0, 4.0, 4.0):  # the norms double, slowly enough
        guard.admit(n2)
    assert guard.median_norm2() == 4.0 and len(guard._sorted) == 4
    guard.admit(30.0)  # sqrt(30/4) = 2.7 x: accepted against the new median
    with pytest.raises(ProtocolError):
        guard.admit(1000.0)


@pytest.mark.parametrize("k", [0, None])
def test_a_guard_with_k_zero_is_off(k):
    guard = OutlierGuard(k=k, window=4, warmup=1)
    for n2 in (1.0, 1e30, 1.0):
        guard.admit(n2)
    assert not guard.judging and guard.to_dict()["on"] is False


def test_the_guard_options_are_checked():
    with pytest.raises(ConfigError, match="outlier bound"):
        TrainConfig(outlier_k=0.5)
    with pytest.raises(ConfigError, match="outlier window"):
        TrainConfig(outlier_window=0)


def test_the_server_state_refuses_an_outlier_push_counts_it_and_flags_its_worker():
    state = ServerState(config(outlier_window=20))
    honest, hostile = (state.members.register(name, "inprocess").worker_id for name in ("honest", "hostile"))
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert state.push(honest, state.store.version, 1, rng.standard_normal(state.store.size)).outcome == APPLIED
    before = state.store.params.copy()
    version = state.store.version
    for i in range(FLAG_AFTER_OUTLIERS):
        decision = state.push(hostile, version, 1, 1e6 * rng.standard_normal(state.store.size))
        assert decision.outcome == REFUSED and decision.code == "outlier"
        assert state.members.workers[hostile].flagged == (i + 1 >= FLAG_AFTER_OUTLIERS)
    assert np.array_equal(state.store.params, before) and state.store.version == version
    stats = state.stats()
    assert stats["errors"] == {"outlier": FLAG_AFTER_OUTLIERS} and stats["outlier_guard"]["judging"]
    record = state.members.workers[hostile].to_dict(state.clock())
    assert record["outliers"] == record["refused"] == FLAG_AFTER_OUTLIERS and record["flagged"]
    assert state.members.workers[honest].to_dict(state.clock())["flagged"] is False


class ScalingChannel(StateChannel):
    """A faulty (or crude hostile) worker: every gradient it pushes is scaled by 1e6."""

    def push(self, examples, params):
        self.grad *= 1e6
        return super().push(examples, params)


def _train(outlier_k, hostile_steps=0):
    """An honest worker for 60 steps, a scaling one for ``hostile_steps``, the honest one
    for 140 more, against one ServerState; returns (state, channels)."""
    X, y = problem()
    state = ServerState(config(outlier_k=outlier_k))
    net = MLP(SPEC)
    honest = StateChannel(state, "honest")
    core = WorkerCore(net, Minibatches(X, y, 32, seed=1), StepSettings(max_steps=60), np.random.default_rng(0))
    core.run(honest)
    hostile = ScalingChannel(state, "scaled")
    if hostile_steps:
        WorkerCore(net, Minibatches(X, y, 32, seed=2), StepSettings(max_steps=hostile_steps),
                   np.random.default_rng(1)).run(hostile)
    core.settings = StepSettings(max_steps=200)
    core.run(honest)
    return state, honest, hostile


def test_an_honest_run_is_the_same_with_the_guard_on_and_off():
    """Same seed, same pushes: the guard refused none of them, so the weights are equal
    bit for bit (nothing is lost, measurably or otherwise)."""
    on, honest_on, _ = _train(outlier_k=10.0)
    off, honest_off, _ = _train(outlier_k=0)
    assert all(d.outcome == APPLIED for d in honest_on.pushes) and len(honest_on.pushes) == 200
    assert on.stats()["errors"] == {} and on.stats()["outlier_guard"]["judging"]
    assert np.array_equal(on.store.params, off.store.params)


def test_pushes_scaled_by_a_million_are_all_refused_and_change_nothing():
    """The scaled worker joins after the warm-up; every push of it is refused, so the run
    ends exactly where the honest worker alone takes it."""
    attacked, _, hostile = _train(outlier_k=10.0, hostile_steps=30)
    alone, _, _ = _train(outlier_k=10.0)
    assert len(hostile.pushes) == 30 and all(d.outcome == REFUSED and d.code == "outlier" for d in hostile.pushes)
    assert np.array_equal(attacked.store.params, alone.store.params)
    assert attacked.members.workers[hostile.record.worker_id].flagged
    X, y = problem()
    loss, _ = MLP(SPEC).evaluate(attacked.store.params, X, y)
    assert np.isfinite(loss)


def test_a_worker_pushing_gradients_scaled_by_a_million_is_refused_flagged_and_named(procs, tmp_path):
    """Real processes: a server, an honest worker, once the guard's warm-up is over a
    worker whose every gradient is scaled by 1e6, and (once that one is pushing) a
    coordinator to 90%. The run reaches its target, every scaled push is refused, and
    `psgd report` names the worker."""
    server, endpoint = procs.start_server("--layers", "784,32,10", "--epochs", "3", "--data-shards", "2",
                                          "--evals-per-epoch", "4", "--no-shm")
    env = {"OPENBLAS_NUM_THREADS": "1"}
    honest_worker = procs.start("worker", "--connect", endpoint, "--name", "honest", "--transport", "zmq", log="honest",
                                extra_env=env)
    monitor = Client(endpoint, "monitor", server_wait=10)
    deadline = time.monotonic() + 60
    while monitor.request({"type": "stats"})["stats"]["version"] < 2 * WARMUP:
        assert time.monotonic() < deadline and server.poll() is None, procs.log("honest")
        time.sleep(0.05)
    hostile_log = open(tmp_path / "hostile.log", "w")
    hostile = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hostile_worker.py")), "--connect",
                                endpoint, "--name", "scaled", "--transport", "zmq"], stdout=hostile_log,
                               stderr=subprocess.STDOUT, env={**procs.env, **env})
    procs.procs.append(hostile)
    hostile_log.close()
    while monitor.request({"type": "stats"})["stats"]["errors"].get("outlier", 0) < FLAG_AFTER_OUTLIERS:
        assert time.monotonic() < deadline + 60 and hostile.poll() is None, (tmp_path / "hostile.log").read_text()
        time.sleep(0.05)
    status = subprocess.run([sys.executable, "-m", "psgd", "status", "--connect", endpoint], capture_output=True,
                            text=True, timeout=60, env=procs.env)
    assert status.returncode == 0, status.stderr
    assert "outlier guard: refuses a gradient norm above 100 x the median" in status.stdout
    assert [line for line in status.stdout.splitlines() if line.strip().startswith("scaled:")][0].endswith("FLAGGED")
    out = tmp_path / "run"
    coordinator = procs.start("coordinator", "--connect", endpoint, "--out", str(out), "--target-accuracy", "0.9",
                              log="coordinator")
    assert coordinator.wait(180) == 0, procs.log("coordinator")
    monitor.close()
    assert server.wait(30) == 0 and hostile.wait(30) == 0 and honest_worker.wait(30) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "target accuracy" and summary["test_accuracy"] >= 0.88
    scaled, honest = summary["per_worker"]["scaled"], summary["per_worker"]["honest"]
    assert scaled["pushes"] == 0 and scaled["outliers"] == scaled["refused"] >= FLAG_AFTER_OUTLIERS
    assert scaled["flagged"] and not honest["flagged"] and honest["outliers"] == 0
    assert summary["errors"].get("outlier") == scaled["outliers"] and summary["flagged_workers"] == ["scaled"]
    report = subprocess.run([sys.executable, "-m", "psgd", "report", str(out), "--no-plots"], capture_output=True,
                            text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "flagged workers (gradients refused again and again by the outlier guard): scaled" in report.stdout
    assert "flagged" in (tmp_path / "server.log").read_text()


def test_when_every_worker_is_refused_again_and_again_the_guard_warms_up_again():
    """The run, not a worker, moved (say the gradients grew for good): rather than refuse
    every push forever, the guard starts its warm-up again."""
    from psgd.server.guard import RESTART_STREAK
    guard = OutlierGuard(k=10, window=50, warmup=5)
    for _ in range(5):
        guard.admit(1.0, "a", 2)
    for i in range(RESTART_STREAK - 1):
        with pytest.raises(ProtocolError):
            guard.admit(1e6, "ab"[i % 2], 2)
    guard.admit(1e6, "a", 2)  # the streak's last, both workers refused: the yardstick is stale
    assert guard.restarts == 1 and not guard.judging and guard.median_norm2() == 1e6


def test_an_honest_worker_keeps_the_guard_judging_however_long_another_sends_outliers():
    guard = OutlierGuard(k=10, window=50, warmup=5)
    for _ in range(5):
        guard.admit(1.0, "honest", 2)
    for _ in range(10 * 50):
        for _ in range(5):  # the hostile worker pushes five times as often
            with pytest.raises(ProtocolError):
                guard.admit(1e12, "hostile", 2)
        guard.admit(1.0, "honest", 2)
    assert guard.restarts == 0 and guard.judging
    for _ in range(10 * 50):  # nor does a long run of them alone, while another worker is connected
        with pytest.raises(ProtocolError):
            guard.admit(1e12, "hostile", 2)
    assert guard.restarts == 0 and guard.judging


def test_a_rollback_restarts_the_guard():
    state = ServerState(config())
    wid = state.members.register("w", "inprocess").worker_id
    for _ in range(25):
        state.push(wid, state.store.version, 1, np.ones(state.store.size))
    assert state.guard.judging
    header, _ = state.handle(_set_params(state), "control")
    assert header["type"] == "ok" and not state.guard.judging and state.guard.restarts == 1


def _set_params(state):
    from psgd.wire.protocol import Message
    return Message({"type": "set_params", "arrays": [{"offset": 0}]}, [state.store.params.copy()])
