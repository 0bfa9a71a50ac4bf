"""Local SGD / DiLoCo: the worker's rounds (psgd.worker.local) against a real ServerState,
in-process, and the outer optimizer (delayed Nesterov) by hand."""

import numpy as np
import pytest

from test_worker_core import StateChannel, problem
from psgd.config import TrainConfig, server_update
from psgd.data import Minibatches
from psgd.errors import ConfigError
from psgd.model.network import MLP, ModelSpec
from psgd.model.optim import OptimizerSpec, make_optimizer
from psgd.model.schedules import ScheduleSpec
from psgd.server.state import ServerState
from psgd.worker.core import StepSettings, WorkerCore
from psgd.worker.local import LocalCore

SPEC32 = ModelSpec((8, 6, 3), "tanh", "softmax_ce", "float32")


def test_one_local_sgd_step_with_outer_rate_1_is_downpours_plain_sgd():
    """H = 1, inner SGD at lr, outer lr 1, no momentum: the same weights as Downpour with SGD
    at lr, to float32 rounding (the pushed change is w0 - (w0 - lr g), not lr g)."""
    X, y = problem()
    base = TrainConfig(model=SPEC32, optimizer=OptimizerSpec("sgd"), schedule=ScheduleSpec("constant", 0.2, warmup=0),
                       staleness_rule="none")
    downpour = ServerState(base)
    local = ServerState(base.with_(algorithm="local", local_steps=1, inner_optimizer="sgd", outer_lr=1.0,
                                   outer_momentum=0.0))
    assert local.store.optimizer_spec.name == "sgd" and local.store.lr() == 1.0
    net = MLP(SPEC32)
    a = WorkerCore(net, Minibatches(X, y, 32, seed=1), StepSettings(max_steps=50), np.random.default_rng(0))
    b = LocalCore(net, Minibatches(X, y, 32, seed=1), StepSettings(max_steps=50), np.random.default_rng(0),
                  OptimizerSpec("sgd"), 0.2, 1)
    a.run(StateChannel(downpour))
    b.run(StateChannel(local))
    assert downpour.store.version == local.store.version == 50
    moved = np.abs(downpour.store.params - net.init_params(0)).max()
    diff = np.abs(downpour.store.params - local.store.params).max()
    assert moved > 0.05 and diff <= 50 * 4 * np.finfo(np.float32).eps * np.abs(downpour.store.params).max()


def test_delayed_nesterov_by_hand():
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(7)]
    opt = make_optimizer(OptimizerSpec("delayed_nesterov", 0.8, nesterov_every=3), 5, np.float64)
    w = w0.copy()
    for g in grads:
        opt.step(w, g, 0.5)
    ref, m, acc = w0.copy(), np.zeros(5), np.zeros(5)
    for k, g in enumerate(grads, start=1):
        ref -= 0.5 / 3 * g
        acc += g
        if k % 3 == 0:
            m = 0.8 * m + acc / 3
            ref -= 0.5 * 0.8 * m
            acc[:] = 0
    np.testing.assert_allclose(w, ref, rtol=1e-12)
    # every = 1 is Nesterov momentum (psgd's own nesterov, at a constant rate)
    a = make_optimizer(OptimizerSpec("delayed_nesterov", 0.8), 5, np.float64)
    b = make_optimizer(OptimizerSpec("nesterov", 0.8), 5, np.float64)
    wa, wb = w0.copy(), w0.copy()
    for g in grads:
        a.step(wa, g, 0.5)
        b.step(wb, g, 0.5)
    np.testing.assert_allclose(wa, wb, rtol=1e-12)
    c = make_optimizer(OptimizerSpec("delayed_nesterov", 0.8, nesterov_every=3), 5, np.float64)
    c.load_state(opt.state())
    assert c.pending == 1 and np.array_equal(c.acc, opt.acc) and np.array_equal(c.m, opt.m)


def test_n_async_pushes_move_the_weights_as_one_sync_diloco_round_on_their_mean():
    """Delayed Nesterov with N = 3: three pushes, then the momentum step, land where
    Nesterov (N = 1) lands from one push of their mean; and an async run with no outer
    momentum applies each push at outer_lr / N, not at the full rate."""
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(6)
    rounds = [[rng.standard_normal(6) for _ in range(3)] for _ in range(4)]
    delayed = make_optimizer(OptimizerSpec("delayed_nesterov", 0.9, nesterov_every=3), 6, np.float64)
    sync = make_optimizer(OptimizerSpec("delayed_nesterov", 0.9, nesterov_every=1), 6, np.float64)
    wa, wb = w0.copy(), w0.copy()
    for pushes in rounds:
        for g in pushes:
            delayed.step(wa, g, 0.7)
        sync.step(wb, np.mean(pushes, axis=0), 0.7)
        np.testing.assert_allclose(wa, wb, rtol=1e-12)
    spec = server_update(TrainConfig(algorithm="local", workers=4, outer_momentum=0.0, outer_lr=1.0))[0]
    assert spec.name == "delayed_nesterov" and spec.nesterov_every == 4 and spec.momentum == 0.0
    w = np.zeros(2)
    make_optimizer(spec, 2, np.float64).step(w, np.ones(2), 1.0)
    assert np.array_equal(w, [-0.25, -0.25])
    assert server_update(TrainConfig(algorithm="local", workers=1, outer_momentum=0.0))[0].name == "sgd"


def test_outer_momentum_defaults_to_dilocos_under_sync_and_less_under_async():
    from psgd.config import ASYNC_OUTER_MOMENTUM, SYNC_OUTER_MOMENTUM
    local = TrainConfig(algorithm="local", workers=2)
    assert server_update(local.with_(consistency="sync"))[0].momentum == SYNC_OUTER_MOMENTUM == 0.9
    assert server_update(local)[0].momentum == ASYNC_OUTER_MOMENTUM < SYNC_OUTER_MOMENTUM
    assert server_update(local.with_(outer_momentum=0.9))[0].momentum == 0.9
    with pytest.raises(ConfigError, match="outer momentum"):
        local.with_(outer_momentum=1.0)


@pytest.mark.slow
def test_a_worker_joining_async_local_sgd_late_does_not_knock_the_model_back(mnist):
    """The run the README told of, in-process: 2 async workers of 784-64-10, H = 10 AdamW
    steps at 0.002, outer lr 0.7 and Nesterov 0.9; the second joins after one epoch of the
    first, with fresh AdamW state. When every push was applied at the full outer rate
    (N rounds' worth of steps per round of N workers), accuracy here fell from 93.9% to
    83.1% within 20 rounds of the join; at outer_lr / N the worst was 91.2% from 93.3%."""
    train, test = mnist
    spec = ModelSpec((784, 64, 10), "relu", "softmax_ce", "float32")
    cfg = TrainConfig(model=spec, optimizer=OptimizerSpec("adamw"), schedule=ScheduleSpec("constant", 0.002, warmup=0),
                      workers=2, algorithm="local", local_steps=10, inner_optimizer="adamw", outer_lr=0.7,
                      outer_momentum=0.9)
    state = ServerState(cfg, num_data_shards=2)
    net = MLP(spec)
    X, y = train.X[:30000], train.y[:30000]
    channels = [StateChannel(state, f"w{i}") for i in range(2)]
    cores = [LocalCore(net, Minibatches(np.ascontiguousarray(X[i::2]), np.ascontiguousarray(y[i::2]), 128, seed=i),
                       StepSettings(), np.random.default_rng(i), OptimizerSpec("adamw"), 0.002, 10) for i in range(2)]

    def begin(i):
        c, ch = cores[i], channels[i]
        c.start[...] = c.params
        ch.mark_window()
        c._local_round(ch, lambda: False, None)
        np.subtract(c.start, c.params, out=ch.grad)

    def accuracy():
        return net.evaluate(state.store.params, test.X[:5000], test.y[:5000])[1]

    channels[0].pull(cores[0].params)
    for _ in range(43):  # one epoch of worker 0 alone (43 x 10 x 128 examples)
        begin(0)
        channels[0].push(1280, cores[0].params)
    before = accuracy()
    channels[1].pull(cores[1].params)
    begin(1)
    worst = 1.0
    for r in range(20):  # each push computed from weights one push old (staleness 1)
        begin(0)
        channels[0].push(1280, cores[0].params)
        channels[1].push(1280, cores[1].params)
        begin(1)
        if r % 2:
            worst = min(worst, accuracy())
    assert before > 0.9 and worst > before - 0.05, (before, worst)


def test_diloco_rounds_under_sync_average_one_change_per_worker_and_learn():
    X, y = problem(512)
    cfg = TrainConfig(model=SPEC32, optimizer=OptimizerSpec("adamw", weight_decay=0.0),
                      schedule=ScheduleSpec("constant", 0.01, warmup=0), consistency="sync", workers=2,
                      algorithm="local", local_steps=10, inner_optimizer="adamw", outer_lr=0.7, outer_momentum=0.9)
    assert server_update(cfg)[0].nesterov_every == 1  # sync: the momentum moves every round
    state = ServerState(cfg, num_data_shards=2)
    net = MLP(SPEC32)
    before = net.evaluate(state.store.params, X, y)[0]
    channels = [StateChannel(state, f"w{i}") for i in range(2)]
    cores = [LocalCore(net, Minibatches(X[i::2], y[i::2], 32, seed=i), StepSettings(), np.random.default_rng(i),
                       OptimizerSpec("adamw"), 0.01, 10) for i in range(2)]
    for c, ch in zip(cores, channels):
        ch.pull(c.params)
    # drive both workers round by round, by hand: a sync round completes with the second push
    for _ in range(15):
        for c, ch in zip(cores, channels):
            c.start[...] = c.params
            ch.mark_window()
            c._local_round(ch, lambda: False, None)
            np.subtract(c.start, c.params, out=ch.grad)
            ch.push(320, None)
        for c, ch in zip(cores, channels):
            ch.pull(c.params)
    assert state.store.version == 15 and state.store.staleness.total == 30
    after = net.evaluate(state.store.params, X, y)[0]
    assert after < 0.5 * before


def test_async_local_sgd_learns_through_a_worker_core():
    X, y = problem(512)
    cfg = TrainConfig(model=SPEC32, schedule=ScheduleSpec("constant", 0.01, warmup=0), workers=2, algorithm="local",
                      local_steps=5, inner_optimizer="adam", outer_lr=0.7, outer_momentum=0.9)
    state = ServerState(cfg)
    assert state.store.optimizer_spec.name == "delayed_nesterov" and state.store.optimizer_spec.nesterov_every == 2
    assert state.welcome(state.members.register("x", "zmq"))["run"]["local_steps"] == 5
    net = MLP(SPEC32)
    before = net.evaluate(state.store.params, X, y)[0]
    core = LocalCore(net, Minibatches(X, y, 32, seed=1), StepSettings(max_steps=200), np.random.default_rng(0),
                     OptimizerSpec("adam"), 0.01, 5)
    core.run(StateChannel(state))
    assert state.store.version == 40 == core.stats["pushes"] and core.stats["steps"] == 200
    assert net.evaluate(state.store.params, X, y)[0] < 0.5 * before


def test_local_settings_are_checked():
    with pytest.raises(ConfigError, match="local steps"):
        TrainConfig(algorithm="local", local_steps=0)
    with pytest.raises(ConfigError, match="algorithm"):
        TrainConfig(algorithm="diloco")


@pytest.mark.slow
def test_a_diloco_cluster_trains_mnist(procs, tmp_path):
    """psgd train, 2 worker processes, --algorithm local under sync (DiLoCo): 10 AdamW steps
    per push, the averaged change applied with Nesterov momentum. Every round takes one push
    of each worker. Measured under load: 95.5% after 2 epochs, 93% after 1; chance is 10%."""
    import json
    out = tmp_path / "run"
    proc = procs.start("train", "--workers", "2", "--epochs", "1", "--layers", "784,64,10", "--algorithm", "local",
                       "--local-steps", "10", "--inner-optimizer", "adamw", "--lr", "0.002", "--consistency", "sync",
                       "--out", str(out), log="train")
    assert proc.wait(240) == 0, procs.log("train")
    s = json.loads((out / "summary.json").read_text())
    assert s["test_accuracy"] >= 0.88, s["test_accuracy"]
    rounds = s["updates"]
    assert 15 <= rounds <= 30  # 55,000 examples / (2 workers x 10 steps x 128)
    assert all(w["pushes"] == rounds for w in s["per_worker"].values()) and s["staleness"]["max"] == 0
    assert json.loads((out / "config.json").read_text())["algorithm"] == "local"


def test_dynamic_local_steps_size_each_workers_h_to_its_speed():
    """Two workers, one pushing 4x the examples per second of the other: acks tell the
    fast one H and the slow one H / 4, so that both push at a similar cadence."""
    from test_server_state import FakeClock
    from psgd.wire.client import PushResult
    clock = FakeClock()
    cfg = TrainConfig(model=SPEC32, algorithm="local", local_steps=20, dynamic_local_steps=True, workers=2)
    assert cfg.wire_only and not TrainConfig(model=SPEC32, algorithm="local", inner_schedule="constant").wire_only
    state = ServerState(cfg, num_data_shards=2, clock=clock)
    fast, slow = (state.members.register(n, "zmq") for n in ("fast", "slow"))
    g = np.zeros(state.store.size, np.float32)
    clock.now = 10.0
    state.push(fast.worker_id, state.store.version, 4000, g)
    state.push(slow.worker_id, state.store.version, 1000, g)
    told = {r.name: state.ack_reply((r.worker_id, state.store.version, 0), False)[0]["local_steps"] for r in (fast, slow)}
    assert told == {"fast": 20, "slow": 5}
    plain = ServerState(cfg.with_(dynamic_local_steps=False))
    w = plain.members.register("w", "zmq")
    assert "local_steps" not in plain.ack_reply((w.worker_id, 0, 0), False)[0]
    core = LocalCore(MLP(SPEC32), None, StepSettings(), None, OptimizerSpec("sgd"), 0.1, 20)
    core._take_local_steps(PushResult(0, False, 0, 5).local_steps)
    assert core.local_steps == 5
    core._take_local_steps(10 ** 6)  # a confused server cannot stall the worker
    assert core.local_steps == 80
    with pytest.raises(ConfigError, match="ZeroMQ"):
        cfg.with_(transport="shm")


def test_local_sgd_without_workers_is_refused_in_one_line():
    from click.testing import CliRunner
    from psgd.cli import cli
    result = CliRunner().invoke(cli, ["train", "--workers", "0", "--algorithm", "local", "--out", ""])
    assert result.exit_code == 2 and "local SGD pushes to a server" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_local_sgds_adam_inside_defaults_to_its_own_rate_unless_one_is_given():
    """--lr's default, 0.1, is SGD's: AdamW's inner steps at 0.1 would throw the weights
    about, so a local-SGD run with an Adam-family inner optimizer and no --lr takes
    LOCAL_ADAM_DEFAULT_LR; an explicit --lr, an SGD inside or Downpour keep theirs."""
    import psgd.cli as cli_mod
    cmd = cli_mod.cli.commands["train"]
    seen = []
    for args in (["--algorithm", "local"], ["--algorithm", "local", "--inner-optimizer", "adam"],
                 ["--algorithm", "local", "--lr", "0.01"], ["--algorithm", "local", "--inner-optimizer", "sgd"],
                 ["--optimizer", "adamw"]):
        ctx = cmd.make_context("train", ["--workers", "2", *args])
        seen.append(cli_mod.build_config(ctx, **ctx.params).schedule.lr)
    assert seen == [cli_mod.LOCAL_ADAM_DEFAULT_LR] * 2 + [0.01, 0.1, 0.1]


def test_a_scheduled_inner_rate_follows_the_runs_schedule_in_downpours_updates():
    """--inner-schedule run: the welcome and every ack tell the run's schedule at the run's
    progress, examples applied / batch size, here a step schedule dropping x0.2 every 10
    such updates after 4 of warm-up; constant: no ack says a rate."""
    cfg = TrainConfig(model=SPEC32, schedule=ScheduleSpec("step", 0.01, every=10, factor=0.2, warmup=4), batch_size=32,
                      workers=1, algorithm="local", local_steps=3, inner_schedule="run")
    assert cfg.wire_only and cfg.schedules_inner_lr
    state = ServerState(cfg)
    w = state.members.register("w", "zmq")
    assert state.welcome(w)["run"]["inner_lr"] == pytest.approx(0.01 * 1 / 4)  # update 0 of the warm-up
    g = np.zeros(state.store.size, np.float32)
    told = []
    for examples in (96, 192, 32, 320):  # updates 3, 9, 10, 20
        decision = state.push(w.worker_id, state.store.version, examples, g)
        told.append(state.ack_reply((w.worker_id, decision.version, decision.staleness), False)[0]["inner_lr"])
    assert told == pytest.approx([0.01, 0.01, 0.002, 0.0004])
    constant = ServerState(cfg.with_(inner_schedule="constant"))
    c = constant.members.register("w", "zmq")
    assert "inner_lr" not in constant.ack_reply((c.worker_id, 0, 0), False)[0]
    assert constant.welcome(c)["run"]["inner_lr"] == 0.01


def test_a_local_core_takes_each_rate_the_server_tells_for_its_next_round():
    """The worker's side: the rate an ack tells is the one the next round's inner steps
    use; an ack that tells none leaves the rate as it was."""
    from psgd.wire.client import PushResult

    class TellingChannel(StateChannel):
        def push(self, examples, params):
            r = super().push(examples, params)
            told = self.state.ack_reply((self.record.worker_id, self.state.store.version, 0), False)[0].get("inner_lr")
            return PushResult(r.staleness, r.refused, r.data_generation, inner_lr=told)

    X, y = problem(512)
    cfg = TrainConfig(model=SPEC32, schedule=ScheduleSpec("step", 0.01, every=20, factor=0.5, warmup=0), batch_size=32,
                      workers=1, algorithm="local", local_steps=5, inner_optimizer="adam", inner_schedule="run")
    state = ServerState(cfg)
    core = LocalCore(MLP(SPEC32), Minibatches(X, y, 32, seed=1), StepSettings(max_steps=60), np.random.default_rng(0),
                     OptimizerSpec("adam"), state.inner_lr(), 5)
    used = []
    step = core.inner.step
    core.inner.step = lambda w, g, lr: (used.append(lr), step(w, g, lr))
    core.run(TellingChannel(state))
    # rounds of 5 steps; the ack after update 20 (4 rounds) and 40 (8 rounds) halves the rate
    assert used == [0.01] * 20 + [0.005] * 20 + [0.0025] * 20
    assert core.inner_lr == 0.00125  # told after the last round
    core._take_inner_lr(None)
    assert core.inner_lr == 0.00125


def test_the_inner_schedule_is_checked():
    local = TrainConfig(algorithm="local", inner_schedule="run")
    with pytest.raises(ConfigError, match="inner schedule"):
        TrainConfig(algorithm="local", inner_schedule="cosine")
    with pytest.raises(ConfigError, match="ZeroMQ"):
        local.with_(transport="shm")
    with pytest.raises(ConfigError, match="plateau"):
        local.with_(schedule=ScheduleSpec("plateau", 0.002))
    assert not TrainConfig(inner_schedule="run").wire_only  # Downpour: no inner rate to tell
    # the default, without a warm-up unless one is given (Downpour's is fitted to the run)
    assert TrainConfig(algorithm="local").inner_schedule == "run"
    assert TrainConfig(algorithm="local").fitted_to(60000).schedule.warmup == 0
    assert TrainConfig().fitted_to(60000).schedule.warmup == 500
    assert ServerState(TrainConfig(model=SPEC32, algorithm="local")).inner_lr() == 0.1
    assert ServerState(TrainConfig(model=SPEC32, algorithm="local",
                                   schedule=ScheduleSpec(warmup=10))).inner_lr() == pytest.approx(0.01)
    assert local.with_(inner_schedule="constant", transport="shm").transport == "shm"


def test_an_ack_that_tells_a_rate_is_checked_on_the_wire():
    from psgd.errors import ProtocolError
    from psgd.wire.protocol import decode, encode
    ack = {"type": "ack", "version": 3, "staleness": 0, "data_generation": 0}
    assert decode(encode({**ack, "inner_lr": 0.002}))["inner_lr"] == 0.002
    for bad in (float("nan"), -0.1, float("inf"), "0.1", True):
        with pytest.raises(ProtocolError, match="inner_lr"):
            decode(encode({**ack, "inner_lr": bad}))
