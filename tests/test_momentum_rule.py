"""The adaptive momentum rule: the pure rule, its state, and the server applying it."""

import numpy as np
import pytest

from state_util import apply
from psgd.config import TrainConfig, adapts_momentum
from psgd.errors import ConfigError
from psgd.model.momentum_rule import LR_FACTOR_MAX, MomentumAdaptation, adapted
from psgd.model.network import ModelSpec
from psgd.model.optim import OptimizerSpec
from psgd.model.schedules import ScheduleSpec
from psgd.server import checkpoint
from psgd.server.state import ServerState

LR = 0.1
CONFIG = TrainConfig(model=ModelSpec((6, 5, 3)), optimizer=OptimizerSpec("momentum", 0.9),
                     schedule=ScheduleSpec("constant", LR, warmup=0), staleness_rule="none")


# --- the rule ---------------------------------------------------------------------------


def test_fresh_pushes_keep_the_configured_momentum_and_rate():
    for target in (0.0, 0.5, 0.9, 0.99):
        assert adapted(target, 0.0) == (target, 1.0)


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95])
def test_momentum_shrinks_with_staleness_and_the_effective_step_holds(target):
    means = [0.0, 0.5, 1.0, 2.0, 6.2, 15.0, 100.0, 1000.0]
    chosen = [adapted(target, s) for s in means]
    momenta = [m for m, _ in chosen]
    assert all(a >= b for a, b in zip(momenta, momenta[1:])) and momenta[-1] == 0.0
    for m, factor in chosen:
        assert 0.0 <= m <= target and 1.0 <= factor <= LR_FACTOR_MAX
        if factor < LR_FACTOR_MAX:  # lr / (1 - mu): the configured pair's, until the factor's cap
            assert factor / (1.0 - m) == pytest.approx(1.0 / (1.0 - target))


def test_the_rule_in_figures():
    """mu = max(0, 1 - (1 - mu*)(S + 1)), f = min(3, (1 - mu)/(1 - mu*))."""
    assert adapted(0.9, 1.0) == pytest.approx((0.8, 2.0))
    assert adapted(0.9, 2.0) == pytest.approx((0.7, 3.0))
    assert adapted(0.9, 4.0) == pytest.approx((0.5, 3.0))  # the factor's cap
    assert adapted(0.9, 9.0) == pytest.approx((0.0, 3.0))
    assert adapted(0.9, 50.0) == pytest.approx((0.0, 3.0))


def test_the_mean_is_plain_then_a_moving_average():
    a = MomentumAdaptation(0.9, window=4)
    for s in (2, 4):
        a.observe(s)
    assert a.staleness_mean == pytest.approx(3.0) and a.pushes == 2  # the plain mean while pushes < window
    for _ in range(50):
        a.observe(8)
    assert a.staleness_mean == pytest.approx(8.0, abs=1e-5)  # forgets the start
    assert (a.momentum, a.lr_factor) == pytest.approx(adapted(0.9, a.staleness_mean))
    a.observe(0)
    assert a.staleness_mean == pytest.approx(6.0, abs=1e-4)  # 1/window of the new value


def test_off_observes_but_never_changes_anything():
    a = MomentumAdaptation(0.9, on=False)
    for s in range(100):
        a.observe(s)
    assert (a.momentum, a.lr_factor) == (0.9, 1.0) and a.staleness_mean > 0
    assert a.to_dict()["rule"] == "fixed"


def test_state_round_trips_and_bad_state_is_refused():
    a = MomentumAdaptation(0.9)
    for s in (3, 5, 7):
        a.observe(s)
    b = MomentumAdaptation(0.9)
    b.load_state(a.state())
    assert b.to_dict() == a.to_dict() and b.pushes == 3
    b.load_state({})  # a checkpoint from before the rule: starts afresh
    assert b.to_dict() == MomentumAdaptation(0.9).to_dict()
    for bad in ({"staleness_mean": float("nan"), "pushes": 1}, {"staleness_mean": -1.0, "pushes": 1},
                {"staleness_mean": 1.0, "pushes": -1}):
        with pytest.raises(ConfigError):
            b.load_state(bad)
    with pytest.raises(ConfigError):
        MomentumAdaptation(1.0)
    with pytest.raises(ConfigError):
        TrainConfig(momentum_rule="sometimes")


def test_in_force_for_downpour_momentum_under_async_and_ssp_only():
    assert adapts_momentum(CONFIG) and adapts_momentum(CONFIG.with_(consistency="ssp"))
    assert adapts_momentum(CONFIG.with_(optimizer=OptimizerSpec("nesterov", 0.9)))
    assert not adapts_momentum(CONFIG.with_(momentum_rule="fixed"))
    assert not adapts_momentum(CONFIG.with_(consistency="sync"))
    assert not adapts_momentum(CONFIG.with_(algorithm="local"))
    for name in ("sgd", "adam", "adamw", "adagrad"):
        assert not adapts_momentum(CONFIG.with_(optimizer=OptimizerSpec(name, 0.9)))
    assert TrainConfig().momentum_rule == "adaptive"


# --- the server applying it -------------------------------------------------------------


def stale_pushes(state, grads, lag):
    """Pushes computed ``lag`` versions back (staleness ``lag`` once there are that many)."""
    wid = state.members.register("w", "zmq").worker_id
    for g in grads:
        apply(state, wid, max(0, state.store.version - lag), 1, g)


@pytest.mark.parametrize("rule", ["none", "divide"])
def test_the_server_applies_the_rules_momentum_and_rate(rule):
    """Each push: the mean takes its staleness, then momentum v = mu v - lr f g / rule(s)."""
    rng = np.random.default_rng(0)
    state = ServerState(CONFIG.with_(staleness_rule=rule))
    grads = [rng.standard_normal(state.store.size).astype(np.float32) for _ in range(12)]
    w, v, mirror = state.store.params.astype(np.float64), 0.0, MomentumAdaptation(0.9)
    for k, g in enumerate(grads):
        s = min(k, 3)
        mirror.observe(s)
        lr = LR * mirror.lr_factor / (max(s, 1) if rule == "divide" else 1)
        v = mirror.momentum * v - lr * g
        w = w + v
    stale_pushes(state, grads, 3)
    np.testing.assert_allclose(state.store.params, w, rtol=1e-4, atol=1e-5)
    assert state.store.optimizer.momentum == pytest.approx(mirror.momentum) and mirror.momentum < 0.9
    rule_now = state.stats()["momentum_rule"]
    assert rule_now["rule"] == "adaptive" and rule_now["momentum"] == pytest.approx(mirror.momentum)
    assert rule_now["lr_factor"] == pytest.approx(mirror.lr_factor) and rule_now["staleness_mean"] > 2
    assert state.update_rule()["momentum_rule"] == "adaptive"


def test_fixed_and_fresh_change_nothing():
    """One worker (fresh pushes) with the rule, and stale pushes without it (staleness rule
    none), step exactly as plain momentum 0.9 at the scheduled rate."""
    rng = np.random.default_rng(1)
    fresh, fixed = ServerState(CONFIG), ServerState(CONFIG.with_(momentum_rule="fixed"))
    grads = [rng.standard_normal(fresh.store.size).astype(np.float32) for _ in range(6)]
    w, v = fresh.store.params.astype(np.float64), 0.0
    for g in grads:
        v = 0.9 * v - LR * g
        w = w + v
    stale_pushes(fresh, grads, 0)
    stale_pushes(fixed, grads, 3)
    np.testing.assert_allclose(fresh.store.params, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fixed.store.params, w, rtol=1e-5, atol=1e-6)
    assert fresh.stats()["momentum_rule"]["momentum"] == 0.9 and fixed.store.optimizer.momentum == 0.9
    assert fixed.stats()["momentum_rule"]["rule"] == "fixed" and fixed.store.staleness.mean() >= 2


def test_a_restored_server_continues_the_rule_exactly(tmp_path):
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(ServerState(CONFIG).store.size).astype(np.float32) for _ in range(10)]
    a = ServerState(CONFIG)
    stale_pushes(a, grads[:6], 4)
    arrays, meta = a.checkpoint()
    checkpoint.write(tmp_path, a.store.version, arrays, meta)
    b = ServerState(CONFIG)
    loaded, loaded_meta, _ = checkpoint.newest_valid(tmp_path)
    b.restore(loaded, loaded_meta)
    assert b.store.adaptation.to_dict() == a.store.adaptation.to_dict() and b.store.optimizer.momentum < 0.9
    stale_pushes(a, grads[6:], 4)
    stale_pushes(b, grads[6:], 4)
    assert np.array_equal(a.store.params, b.store.params)


# --- the simulator: MNIST, 2 epochs, the server's own rules -----------------------------


def simulated_accuracy(mnist_config, workers, seed, cores, **settings):
    import dataclasses

    from threadpoolctl import threadpool_limits

    from psgd.data.prepared import prepare_data
    from psgd.simulate import SimSpec, Simulator
    data = prepare_data(mnist_config.with_(workers=workers, seed=seed, **settings))
    sim = Simulator(dataclasses.replace(data, config=data.config), SimSpec(cores=cores), say=lambda text: None)
    with threadpool_limits(1):  # small gradients one at a time: BLAS threads only cost (a second a run, not ten)
        return sim.run()["test_accuracy"]


@pytest.fixture(scope="module")
def mnist_config(data_dir):
    return TrainConfig(model=ModelSpec((784, 64, 10)), epochs=2.0, data_dir=str(data_dir))


@pytest.mark.long  # about 30 s: CI runs it with the long set, keeping the default suite under 10 minutes
def test_sixteen_simulated_workers_on_two_cores_come_within_a_point_of_two(mnist_config):
    """On 2 cores (as the machine whose 16 workers reached 37% and 55%), the defaults at
    16 workers against 2, 2 epochs, seeds 0-2. Measured when written: 2 workers 96.13,
    95.51, 95.34%; 16 workers 94.90, 94.43, 94.71%: 1.23, 1.08 and 0.63 points behind,
    0.98 on average. The bar: within a point on average, and 1.5 for every seed; the old
    defaults (fixed momentum, divide) were 1.8 to 8.5 points behind."""
    gaps = [simulated_accuracy(mnist_config, 2, seed, 2) - simulated_accuracy(mnist_config, 16, seed, 2)
            for seed in (0, 1, 2)]
    assert max(gaps) <= 0.015 and sum(gaps) / len(gaps) <= 0.01, gaps


@pytest.mark.slow
def test_the_rule_rescues_sixteen_workers_with_a_core_each(mnist_config):
    """A core per worker: staleness about 14. Fixed momentum 0.9 (divide) ends near 42%
    (seed 0); the rule near 90%. Not 2 workers' 95%: a 14-stale gradient allows a step
    about 1/15 of a fresh one's, and 2 epochs are 860 updates."""
    before = simulated_accuracy(mnist_config, 16, 0, 0, momentum_rule="fixed", staleness_rule="divide")
    after = simulated_accuracy(mnist_config, 16, 0, 0)
    assert after >= 0.85 and after - before >= 0.2, (before, after)
