"""The server's pure parts on their own: the run's phase, membership, the one door."""

import numpy as np
import pytest

from psgd.config import TrainConfig
from psgd.model.network import ModelSpec
from psgd.model.optim import OptimizerSpec
from psgd.model.schedules import ScheduleSpec
from psgd.server.membership import Membership
from psgd.server.phase import Phase, RunPhase
from psgd.server.state import ServerState
from psgd.server.store import ParameterStore

CONFIG = TrainConfig(model=ModelSpec((6, 5, 3)), optimizer=OptimizerSpec("sgd"),
                     schedule=ScheduleSpec("constant", 0.5, warmup=0))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# --- the run's phase ---------------------------------------------------------------------

def test_pause_and_resume_say_how_long_the_pause_lasted():
    clock = FakeClock()
    phase = RunPhase(clock)
    phase.pause()
    assert phase.phase is Phase.PAUSED and phase.coordinated
    clock.now = 2.5
    assert phase.resume() == 2.5 and phase.phase is Phase.RUNNING
    assert phase.resume() == 0.0  # not paused: nothing to give back


def test_a_stop_drains_until_the_workers_are_gone_or_their_grace_runs_out():
    clock = FakeClock()
    phase = RunPhase(clock, shutdown_grace_s=3.0)
    assert phase.stop("shutdown") and not phase.stop("shutdown")  # only the first begins the drain
    assert phase.stopping and phase.settle(workers_connected=True) is Phase.DRAINING
    clock.now = 1.0
    assert phase.settle(workers_connected=False) is Phase.STOPPED
    other = RunPhase(clock, shutdown_grace_s=3.0)
    other.stop("signal")
    clock.now = 4.5
    assert other.settle(workers_connected=True) is Phase.STOPPED


@pytest.mark.parametrize("reason,waits", [("budget", True), ("interrupt", True), ("requested", True),
                                          ("signal", False), ("shutdown", False)])
def test_a_run_the_server_ended_waits_for_its_coordinator(reason, waits):
    clock = FakeClock()
    phase = RunPhase(clock, shutdown_grace_s=3.0, coordinator_grace_s=30.0)
    phase.pause()
    phase.resume()  # a coordinator watches
    phase.stop(reason)
    clock.now = 10.0
    assert (phase.settle(workers_connected=False) is Phase.DRAINING) == waits
    if waits:
        phase.stop("shutdown")  # the coordinator took the final weights
        assert phase.settle(workers_connected=False) is Phase.STOPPED


def test_sigterm_during_a_warm_stop_ends_the_wait_for_the_coordinator():
    clock = FakeClock()
    phase = RunPhase(clock)
    phase.pause()
    phase.stop("budget")
    clock.now = 5.0
    assert phase.settle(False) is Phase.DRAINING
    phase.stop("signal")
    assert phase.settle(False) is Phase.STOPPED


def test_without_a_coordinator_nobody_is_waited_for():
    phase = RunPhase(FakeClock())
    phase.stop("budget")
    assert phase.settle(False) is Phase.STOPPED


def test_a_stopped_run_is_never_paused_again():
    phase = RunPhase(FakeClock())
    phase.stop("shutdown")
    phase.pause()
    assert phase.phase is Phase.DRAINING
    with pytest.raises(ValueError):
        phase.stop("bored")


# --- membership --------------------------------------------------------------------------

def test_a_pause_stops_the_lease_clock_but_does_not_restart_it():
    """A coordinator pauses for every evaluation. Restarting every lease on resume kept a
    dead worker 'connected' for good whenever evaluations came more often than its lease;
    now a pause only adds its own length to each lease."""
    clock = FakeClock()
    members = Membership(lease_s=5.0, num_data_shards=2, clock=clock)
    alive, dead = members.register("alive", "zmq"), members.register("dead", "zmq")
    for t in range(1, 12):  # a 0.5 s pause every second; only `alive` speaks
        clock.now = t - 0.5
        members.touch(alive.worker_id)
        clock.now = t
        members.extend_leases(0.5)
        members.expire_leases()
    assert not dead.connected and dead.expired and alive.connected
    assert alive.data_shards == [0, 1]  # the dead worker's shard moved


def test_expired_leases_are_looked_for_at_most_every_50_ms():
    clock = FakeClock()
    members = Membership(lease_s=1.0, clock=clock)
    w = members.register("w", "zmq")
    clock.now = 0.99
    assert members.expire_leases() == []
    clock.now = 1.01  # within 50 ms of the last look: not looked at
    assert members.expire_leases() == []
    clock.now = 1.05
    assert members.expire_leases() == [w.worker_id]


# --- the one door ------------------------------------------------------------------------

@pytest.mark.parametrize("consistency", ["async", "ssp", "sync"])
def test_every_push_is_checked_exactly_once(consistency, monkeypatch):
    calls = []
    real_check = ParameterStore.check

    def counting(self, *args, **kw):
        calls.append(args)
        return real_check(self, *args, **kw)

    monkeypatch.setattr(ParameterStore, "check", counting)
    state = ServerState(CONFIG.with_(consistency=consistency, ssp_bound=1))
    a, b = (state.members.register(n, "zmq").worker_id for n in "ab")
    g = np.full(state.store.size, 0.01, np.float32)
    for step in range(6):
        state.push(a if step % 2 else b, state.store.version, 4, g)
    assert len(calls) == 6


def test_a_push_to_a_stopping_server_is_told_shutdown_the_same_way_on_every_path():
    state = ServerState(CONFIG)
    w = state.members.register("w", "zmq")
    state.stop("shutdown")
    decision = state.push(w.worker_id, 0, 1, np.zeros(state.store.size, np.float32))
    assert decision.outcome == "shutdown" and not w.connected and state.store.version == 0


def test_a_refused_push_says_why_and_changes_nothing():
    state = ServerState(CONFIG)
    w = state.members.register("w", "zmq")
    before = state.store.params.copy()
    decision = state.push(w.worker_id, 0, 1, np.full(state.store.size, np.nan, np.float32))
    assert (decision.outcome, decision.code) == ("refused", "not_finite")
    assert np.array_equal(before, state.store.params) and w.refused == 1 and state.errors["not_finite"] == 1
    assert state.push(12345, 0, 1, np.zeros(state.store.size, np.float32)).code == "unknown_worker"


def test_stats_name_the_phase_and_why_it_ended():
    state = ServerState(CONFIG, max_updates=1)
    w = state.members.register("w", "zmq")
    assert state.stats()["phase"] == "running"
    state.push(w.worker_id, 0, 1, np.zeros(state.store.size, np.float32))
    stats = state.stats()
    assert (stats["phase"], stats["stop_reason"], stats["stopping"]) == ("draining", "budget", True)


def test_data_shards_are_bounded_so_that_every_list_of_them_fits_a_header():
    import msgpack
    from psgd.errors import ConfigError
    from psgd.server.membership import MAX_DATA_SHARDS, Membership
    from psgd.wire.protocol import MAX_HEADER_BYTES
    with pytest.raises(ConfigError):
        Membership(10.0, MAX_DATA_SHARDS + 1)
    members = Membership(10.0, MAX_DATA_SHARDS)
    record = members.register("all", "zmq", list(range(MAX_DATA_SHARDS)))
    assert len(msgpack.packb(record.to_dict(0.0))) < MAX_HEADER_BYTES // 4


# --- the staleness bound -------------------------------------------------------------------

def test_a_push_staler_than_the_bound_is_refused_and_counted():
    """After a server restart one worker came back 5 s late and a push 444-526 versions
    stale was applied; now the bound refuses it (the worker then pulls fresh weights)."""
    state = ServerState(CONFIG.with_(max_staleness=3))
    w = state.members.register("w", "zmq")
    g = np.full(state.store.size, 0.01, np.float32)
    for _ in range(5):
        state.push(w.worker_id, state.store.version, 1, g)
    before = state.store.params.copy()
    assert state.push(w.worker_id, 1, 1, g).outcome == "refused"  # staleness 4 > 3
    decision = state.push(w.worker_id, 1, 1, g)
    assert (decision.outcome, decision.code) == ("refused", "too_stale")
    assert np.array_equal(before, state.store.params) and state.errors["too_stale"] == 2 and w.refused == 2
    assert state.push(w.worker_id, 2, 1, g).outcome == "applied"  # staleness 3: within the bound


def test_the_default_bound_grows_with_the_workers_and_zero_means_none():
    state = ServerState(CONFIG)
    for i in range(10):
        state.members.register(f"w{i}", "zmq")
    assert state.staleness_bound() == 4 * 10 + 16 and state.update_rule()["max_staleness"] == 56
    assert ServerState(CONFIG.with_(max_staleness=0)).staleness_bound() == 0


# --- a rollback's set_params -------------------------------------------------------------

def test_set_params_replaces_the_weights_resets_the_optimizer_and_refuses_what_does_not_fit():
    from psgd.wire.protocol import decode, encode
    state = ServerState(CONFIG.with_(optimizer=OptimizerSpec("momentum", 0.9)))
    w = state.members.register("w", "zmq")
    g = np.full(state.store.size, 0.1, np.float32)
    state.push(w.worker_id, 0, 1, g)
    target = np.linspace(-1, 1, state.store.size).astype(np.float32)

    def send(arrays, offsets):
        return state.handle(decode([bytes(f) for f in encode({"type": "set_params"}, arrays, offsets)]))[0]

    before = state.store.params.copy()
    for arrays, offsets, code in [([target.astype(np.float64)], [0], "bad_array"), ([target[1:]], [1], "bad_range"),
                                  ([np.full_like(target, np.nan)], [0], "not_finite")]:
        assert send(arrays, offsets)["code"] == code
        assert np.array_equal(state.store.params, before) and state.store.version == 1
    assert send([target], [0])["type"] == "ok"
    assert np.array_equal(state.store.params, target) and state.store.version == 2
    state.push(w.worker_id, 2, 1, g)  # momentum starts afresh: the step is lr * g, not lr * (g + 0.9 v)
    np.testing.assert_allclose(state.store.params, target - 0.5 * g, rtol=1e-6)


def test_after_a_rollback_a_gradient_of_the_replaced_weights_is_refused():
    """In-flight gradients computed from the diverged weights blew the rolled-back weights
    up again at once; they are now too_stale, and their workers pull the restored ones."""
    from psgd.wire.protocol import decode, encode
    state = ServerState(CONFIG)
    w = state.members.register("w", "zmq")
    g = np.full(state.store.size, 0.1, np.float32)
    state.push(w.worker_id, 0, 1, g)
    good = state.store.params.copy()
    state.handle(decode([bytes(f) for f in encode({"type": "set_params"}, [good], [0])]))
    decision = state.push(w.worker_id, 1, 1, g)  # computed from version 1, before the rollback
    assert (decision.outcome, decision.code) == ("refused", "too_stale") and np.array_equal(state.store.params, good)
    assert state.push(w.worker_id, state.store.version, 1, g).outcome == "applied"
