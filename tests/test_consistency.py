"""Consistency models on the server's state, without sockets: sync, ssp, leases."""

import numpy as np
import pytest

from state_util import apply
from psgd.config import TrainConfig
from psgd.model.network import MLP, ModelSpec
from psgd.model.optim import OptimizerSpec, make_optimizer
from psgd.model.schedules import ScheduleSpec
from psgd.server.state import ServerState

SPEC = ModelSpec((12, 9, 4), "tanh", "softmax_ce", "float64")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def config(**kw):
    return TrainConfig(model=SPEC, optimizer=OptimizerSpec("momentum", 0.9),
                       schedule=ScheduleSpec("constant", 0.1, warmup=0), **kw)


@pytest.mark.parametrize("n_workers", [2, 3, 4])
def test_sync_equals_one_process_taking_the_union_as_one_batch(n_workers):
    """Each round, every worker's mean gradient over its 8 examples is averaged; that is the
    mean gradient over all 8N examples, so the weights match a single process exactly."""
    state = ServerState(config(consistency="sync"))
    ids = [state.members.register(f"w{i}", "zmq").worker_id for i in range(n_workers)]
    net = MLP(SPEC)
    rng = np.random.default_rng(0)
    reference = state.store.params.copy()
    ref_opt = make_optimizer(OptimizerSpec("momentum", 0.9), net.n_params, np.float64)
    for _ in range(5):
        batches = [(rng.standard_normal((8, 12)), rng.integers(0, 4, 8)) for _ in ids]
        decisions = {}
        for wid, (X, T) in zip(ids, batches):
            _, g = net.loss_and_grad(state.store.params, X, T)
            decisions[wid] = state.push(wid, state.store.version, 8, g.copy())
        # the last push completes the round and is answered at once; the others are released
        released = {w: s for w, _, s in state.take_released()}
        assert [d.outcome for d in decisions.values()] == ["held"] * (n_workers - 1) + ["applied"]
        assert sorted(released) == sorted(ids[:-1]) and set(released.values()) == {0}  # staleness 0
        X_all = np.concatenate([b[0] for b in batches])
        T_all = np.concatenate([b[1] for b in batches])
        _, g_all = net.loss_and_grad(reference, X_all, T_all)
        ref_opt.step(reference, g_all, 0.1)
    np.testing.assert_allclose(state.store.params, reference, rtol=1e-10, atol=1e-12)
    assert state.store.version == 5 and state.store.staleness.total == 5 * n_workers


def test_sync_round_waits_for_every_live_worker_and_drops_a_dead_one_after_its_lease():
    clock = FakeClock()
    state = ServerState(config(consistency="sync", lease_s=5.0), clock=clock)
    a, b, c = (state.members.register(n, "zmq").worker_id for n in "abc")
    g = np.full(state.store.size, 0.01)
    assert state.push(a, 0, 1, g).outcome == state.push(b, 0, 1, g).outcome == "held"
    assert state.take_released() == [] and state.store.version == 0  # c has not pushed: the barrier holds
    clock.now = 4.0
    state.tick()
    assert state.take_released() == []  # c is within its lease
    clock.now = 5.5
    state.tick()  # c's lease ran out: the round completes without it
    assert sorted(w for w, _, _ in state.take_released()) == [a, b] and state.store.version == 1


def test_sync_disconnect_releases_the_barrier_at_once():
    state = ServerState(config(consistency="sync"))
    a, b = (state.members.register(n, "zmq").worker_id for n in "ab")
    assert state.push(a, 0, 1, np.zeros(state.store.size)).outcome == "held"
    state.disconnect(b)
    assert [w for w, _, _ in state.take_released()] == [a]


def test_ssp_holds_a_worker_more_than_s_clocks_ahead_of_the_slowest():
    state = ServerState(config(consistency="ssp", ssp_bound=2))
    fast, slow = (state.members.register(n, "zmq").worker_id for n in ("fast", "slow"))
    g = np.full(state.store.size, 0.001)
    released = []
    for step in range(3):  # clocks 1, 2: within the bound; 3 is 3 ahead of slow's 0
        released.append(state.push(fast, state.store.version, 1, g).outcome == "applied")
    assert released == [True, True, False]
    assert state.store.version == 3  # ssp applies at once; only the ack waits
    decision = state.push(slow, state.store.version, 1, g)  # slow reaches clock 1: fast leads by 2 now
    assert decision.outcome == "applied" and [w for w, _, _ in state.take_released()] == [fast]
    assert state.gate.max_lead <= 2


def test_ssp_bound_holds_over_a_random_schedule_of_pushes():
    """Workers push at random; a worker only pushes again once its ack was released.
    From the clocks at every release, no worker ever ran more than s ahead."""
    s = 3
    state = ServerState(config(consistency="ssp", ssp_bound=s))
    ids = [state.members.register(f"w{i}", "zmq").worker_id for i in range(4)]
    g = np.full(state.store.size, 1e-4)
    rng = np.random.default_rng(1)
    free = set(ids)
    for _ in range(400):
        if not free:
            break
        wid = sorted(free)[rng.integers(len(free))] if rng.random() < 0.9 else sorted(free)[0]
        answered = [wid] if state.push(wid, state.store.version, 1, g).outcome == "applied" else []
        free.discard(wid)
        for worker in answered + [w for w, _, _ in state.take_released()]:
            clocks = [state.members.workers[w].pushes for w in ids]
            assert state.members.workers[worker].pushes - min(clocks) <= s
            free.add(worker)
    assert state.gate.max_lead <= s and sum(state.members.workers[w].pushes for w in ids) > 100


def test_ssp_resent_push_is_not_applied_twice():
    state = ServerState(config(consistency="ssp", ssp_bound=0))
    a, b = (state.members.register(n, "zmq").worker_id for n in "ab")
    g = np.full(state.store.size, 0.001)
    assert state.push(a, 0, 1, g).outcome == "held"  # a leads by 1 > 0
    before = state.store.params.copy()
    assert state.push(a, 0, 1, g).outcome == "held"  # the client gave up waiting and sent it again
    assert np.array_equal(before, state.store.params) and state.store.version == 1


def test_dcasgd_compensates_stale_gradients_by_the_weight_change():
    lam = 0.5
    cfg = TrainConfig(model=SPEC, optimizer=OptimizerSpec("sgd"), schedule=ScheduleSpec("constant", 0.1, warmup=0),
                      staleness_rule="dcasgd", dc_lambda=lam)
    state = ServerState(cfg)
    a, b = (state.members.register(n, "zmq").worker_id for n in "ab")
    rng = np.random.default_rng(0)
    w0 = state.store.params.copy()
    g1, g2 = rng.standard_normal(state.store.size), rng.standard_normal(state.store.size)
    apply(state, a, 0, 1, g1)  # fresh: plain SGD
    np.testing.assert_allclose(state.store.params, w0 - 0.1 * g1)
    w1 = state.store.params.copy()
    apply(state, b, 0, 1, g2)  # computed from w0, applied at w1: compensated
    expected = w1 - 0.1 * (g2 + lam * g2 * g2 * (w1 - w0))
    np.testing.assert_allclose(state.store.params, expected, rtol=1e-12)


def test_dcasgd_is_for_plain_sgd_only():
    from psgd.errors import ConfigError
    with pytest.raises(ConfigError, match="optimizer sgd"):
        TrainConfig(model=SPEC, staleness_rule="dcasgd")


def test_slowest_clock_follows_pushes_joins_and_departures():
    """Membership's O(1) slowest clock equals a scan of the connected workers at every step
    of a random schedule of pushes, hellos, byes and expired leases."""
    clock = FakeClock()
    state = ServerState(config(lease_s=5.0), clock=clock)
    members, rng = state.members, np.random.default_rng(3)
    ids = [members.register(f"w{i}", "zmq").worker_id for i in range(5)]
    for step in range(3000):
        r, connected = rng.random(), [w for w in ids if members.workers.get(w) and members.workers[w].connected]
        if r < 0.02 and len(connected) > 1:
            members.disconnect(connected[rng.integers(len(connected))])
        elif r < 0.04:
            ids.append(members.register(f"w{len(ids)}", "zmq").worker_id)
        elif r < 0.045:  # everyone but one falls silent past the lease
            clock.now += 6.0
            members.touch(connected[0])
            members.expire_leases()
        elif connected:
            members.count(connected[rng.integers(len(connected))], 1, 0)
        expected = min((r.pushes for r in members.workers.values() if r.connected), default=None)
        assert members.slowest_clock() == expected, step
    assert len(members._clock_heap) <= 2 * len(members._at_clock) + 65  # emptied clocks do not pile up


@pytest.mark.parametrize("consistency", ["ssp", "sync"])
def test_a_push_never_scans_every_worker(consistency, monkeypatch):
    """With 2,000 workers, pushes and ticks under ssp and sync never ask for every worker's
    clock or liveness (each push would cost O(workers)); the rules still hold."""
    state = ServerState(config(consistency=consistency, ssp_bound=1))
    ids = [state.members.register(f"w{i}", "zmq").worker_id for i in range(2000)]
    for name in ("clocks", "live"):
        monkeypatch.setattr(type(state.members), name, lambda *a, **k: pytest.fail("scanned every worker"))
    g = np.full(state.store.size, 1e-6)
    for wid in ids[1:]:  # everyone but the first: ssp lets them one clock ahead, sync holds them all
        outcome = state.push(wid, state.store.version, 1, g).outcome
        assert outcome == ("applied" if consistency == "ssp" else "held")
        state.tick()
    if consistency == "ssp":
        assert all(state.push(w, state.store.version, 1, g).outcome == "held" for w in ids[1:100])  # 2 ahead
        assert state.push(ids[0], state.store.version, 1, g).outcome == "applied"  # the slowest moves
        assert sorted(w for w, _, _ in state.take_released()) == sorted(ids[1:100])
    else:
        assert state.take_released() == [] and state.store.version == 0
        assert state.push(ids[0], 0, 1, g).outcome == "applied"  # the round's last gradient
        assert len(state.take_released()) == 1999 and state.store.version == 1


@pytest.mark.parametrize("consistency", ["ssp", "sync"])
def test_a_run_that_knows_its_workers_holds_the_first_acks_until_all_have_joined(consistency):
    """psgd train tells its server the worker count: a worker that joined first does not run
    sync rounds alone, or ssp clocks ahead, while the others are still starting (a real run
    had 11 one-worker rounds before the second worker's hello, 0.35 s later)."""
    state = ServerState(config(consistency=consistency, ssp_bound=0), wait_for_workers=2)
    g = np.full(state.store.size, 1e-3)
    first = state.members.register("w0", "zmq").worker_id
    assert state.push(first, 0, 1, g).outcome == "held"
    state.tick()
    assert state.take_released() == []  # alone, but the run has two workers
    second = state.members.register("w1", "zmq").worker_id
    state.tick()
    if consistency == "ssp":  # the newcomer is at clock 0: the first is 1 ahead of bound 0
        assert state.take_released() == []
        assert state.push(second, state.store.version, 1, g).outcome == "applied"
        assert [w for w, _, _ in state.take_released()] == [first]
    else:
        assert state.push(second, 0, 1, g).outcome == "applied"  # the round's last gradient
        assert [w for w, _, _ in state.take_released()] == [first] and state.store.version == 1


def test_without_a_known_worker_count_a_lone_worker_runs_sync_rounds():
    """A standalone psgd server (no --wait-for-workers) keeps its elastic rule: whoever is connected."""
    state = ServerState(config(consistency="sync"))
    only = state.members.register("w0", "zmq").worker_id
    assert state.push(only, 0, 1, np.full(state.store.size, 1e-3)).outcome == "applied"
