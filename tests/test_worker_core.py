"""The worker's compute loop driven against a real ServerState, in-process: no sockets,
no processes. The channel here is the smallest honest one: it hands each push to the
state's one door and copies the weights back, as the shared-memory path does."""

import threading

import numpy as np
import pytest

from psgd.config import TrainConfig
from psgd.data import Minibatches
from psgd.errors import ShutdownRequested
from psgd.model.network import MLP, ModelSpec
from psgd.model.optim import OptimizerSpec
from psgd.model.schedules import ScheduleSpec
from psgd.server.state import APPLIED, REFUSED, SHUTDOWN, ServerState
from psgd.wire.client import PushResult
from psgd.worker.core import StepSettings, WorkerCore

SPEC = ModelSpec((8, 6, 3), "tanh", "softmax_ce", "float64")


class StateChannel:
    """One worker's channel straight into a ServerState."""

    def __init__(self, state: ServerState, name: str = "w"):
        self.state = state
        self.record = state.members.register(name, "inprocess")
        if not hasattr(self, "grads"):
            self.grad = np.empty(state.store.size, state.store.dtype)
        self.version = 0
        self.base = None
        self.last_contact = 0.0
        self.pushes = []  # the decisions, for the test to read

    def pull(self, params):
        params[...] = self.state.store.params
        self.version = self.state.store.version

    def mark_window(self):
        self.base = self.version

    @property
    def window_open(self):
        return self.base is not None

    def push(self, examples, params):
        decision = self.state.push(self.record.worker_id, self.base, examples, self.grad)
        self.pushes.append(decision)
        self.base = None
        if decision.outcome == SHUTDOWN:
            raise ShutdownRequested("the server ended the run")
        if params is not None:
            self.pull(params)
        return PushResult(decision.staleness, decision.outcome == REFUSED, self.record.data_generation)

    def heartbeat(self, first_only=True):
        record = self.state.members.touch(self.record.worker_id)
        return {"data_shards": record.data_shards, "data_generation": record.data_generation}


def problem(n=256, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 8))
    y = (X[:, :3].argmax(axis=1)).astype(np.int64)
    return X, y


def config(**kw):
    return TrainConfig(model=SPEC, optimizer=OptimizerSpec("sgd"), schedule=ScheduleSpec("constant", 0.2, warmup=0), **kw)


def test_a_worker_core_trains_a_server_state_without_sockets():
    X, y = problem()
    state = ServerState(config())
    net = MLP(SPEC)
    channel = StateChannel(state)
    core = WorkerCore(net, Minibatches(X, y, 32, seed=1), StepSettings(max_steps=200), np.random.default_rng(0))
    before = net.evaluate(state.store.params, X, y)[0]
    core.run(channel)
    after = net.evaluate(state.store.params, X, y)[0]
    assert state.store.version == 200 == core.stats["pushes"] and after < 0.6 * before
    assert all(d.outcome == APPLIED and d.staleness == 0 for d in channel.pushes)


def test_n_push_sums_steps_into_one_push_and_n_fetch_pulls_between():
    X, y = problem()
    state = ServerState(config())
    channel = StateChannel(state)
    core = WorkerCore(MLP(SPEC), Minibatches(X, y, 16, seed=1), StepSettings(n_push=4, n_fetch=2, max_steps=40),
                      np.random.default_rng(0))
    core.run(channel)
    assert state.store.version == 10 and state.store.examples == 40 * 16
    assert core.stats["steps"] == 40 and core.stats["pushes"] == 10


def test_a_push_computed_from_weights_not_fetched_since_counts_as_stale():
    """With n_fetch 3 the worker computes two steps from weights it has already pushed to:
    the server sees those pushes as 1 and 2 versions stale."""
    X, y = problem()
    state = ServerState(config())
    channel = StateChannel(state)
    core = WorkerCore(MLP(SPEC), Minibatches(X, y, 16, seed=1), StepSettings(n_fetch=3, max_steps=9),
                      np.random.default_rng(0))
    core.run(channel)
    assert [d.staleness for d in channel.pushes] == [0, 1, 2] * 3
    assert core.stats["staleness_sum"] == 9


def test_a_stopping_server_ends_the_core_with_shutdown():
    X, y = problem()
    state = ServerState(config(), max_updates=5)
    core = WorkerCore(MLP(SPEC), Minibatches(X, y, 16, seed=1), StepSettings(), np.random.default_rng(0))
    with pytest.raises(ShutdownRequested):
        core.run(StateChannel(state))
    assert state.store.version == 5 and core.stats["pushes"] == 5


def test_a_worker_whose_push_was_too_stale_goes_on_from_fresh_weights():
    X, y = problem()
    state = ServerState(config(max_staleness=1))
    channel = StateChannel(state)
    core = WorkerCore(MLP(SPEC), Minibatches(X, y, 16, seed=1), StepSettings(n_fetch=4, max_steps=12),
                      np.random.default_rng(0))
    core.run(channel)
    # staleness 0, 1, then 2 > 1: refused, and the worker pulls; then the pattern repeats
    assert [(d.outcome, d.staleness) for d in channel.pushes[:4]] == [
        ("applied", 0), ("applied", 1), ("refused", 0), ("applied", 0)]
    assert core.stats["refused"] == sum(d.outcome == "refused" for d in channel.pushes) == 3


class OverlapStateChannel(StateChannel):
    """Two gradient buffers and a push in two halves, as ParameterClient has: the state
    takes the push at push_begin (a server applies it while the worker computes on); the
    ack, and the fresh weights, come at push_end. It checks that the buffer in flight is
    not written before its ack."""

    def __init__(self, state, name="w"):
        self.grads = [np.empty(state.store.size, state.store.dtype) for _ in range(2)]
        self.slot = 0
        super().__init__(state, name)
        self.slot = 0
        self.flight = None

    @property
    def grad(self):
        return self.grads[self.slot]


    def push_begin(self, examples, params):
        assert self.flight is None, "a second push before the first one's ack"
        buffer = self.grads[self.slot]
        decision = self.state.push(self.record.worker_id, self.base, examples, buffer)
        self.pushes.append(decision)
        self.base = None
        self.flight = (buffer, buffer.copy(), decision, params)
        self.slot = 1 - self.slot

    def push_end(self):
        buffer, sent, decision, params = self.flight
        self.flight = None
        assert np.array_equal(buffer, sent), "the worker wrote into the gradient in flight"
        if decision.outcome == SHUTDOWN:
            raise ShutdownRequested("the server ended the run")
        if params is not None:
            self.pull(params)
        return PushResult(decision.staleness, decision.outcome == REFUSED, self.record.data_generation)


class ThreadedOverlapChannel(OverlapStateChannel):
    """push_end in two halves, as ParameterClient has: ``await_acks`` (run on the core's
    helper thread while the next step computes: it reads the fresh weights into the spare
    buffer, and must not move the version that mark_window takes) and ``settle`` (on the
    loop's thread). It checks that the helper never reads into the weights being computed
    from (see ``lent``), and that the helper really ran on another thread."""

    acks_in_background = True

    def __init__(self, state, name="w"):
        super().__init__(state, name)
        self.helper_threads = set()
        self.lent = None  # the weights buffer lent to the helper, from push_begin to settle

    def push_begin(self, examples, params):
        self.lent = params
        super().push_begin(examples, params)

    def await_acks(self):
        self.helper_threads.add(threading.get_ident())
        buffer, sent, decision, params = self.flight
        self.flight = None
        assert np.array_equal(buffer, sent), "the worker wrote into the gradient in flight"
        if decision.outcome == SHUTDOWN:
            raise ShutdownRequested("the server ended the run")
        version = None
        if params is not None:
            params[...] = self.state.store.params
            version = self.state.store.version
        return decision, version

    def catch_up(self, params):
        if self.state.store.version > self.version:
            self.pull(params)

    def settle(self, acks):
        self.lent = None
        decision, version = acks
        if version is not None:
            self.version = version
        return PushResult(decision.staleness, decision.outcome == REFUSED, self.record.data_generation)


@pytest.mark.parametrize("channel_kind", [OverlapStateChannel, ThreadedOverlapChannel])
def test_an_overlapping_worker_computes_while_its_push_travels_and_leaves_none_in_flight(channel_kind):
    X, y = problem()
    state = ServerState(config())
    net = MLP(SPEC)
    channel = channel_kind(state)
    core = WorkerCore(net, Minibatches(X, y, 32, seed=1), StepSettings(max_steps=200, overlap=True),
                      np.random.default_rng(0))
    if channel_kind is ThreadedOverlapChannel:  # the weights each step computes from, checked
        compute = net.loss_and_grad

        def watched(params, *args):  # a step never computes from the buffer the helper reads into
            assert channel.lent is None or params is not channel.lent, "computing from weights being read"
            return compute(params, *args)
        net.loss_and_grad = watched
    before = net.evaluate(state.store.params, X, y)[0]
    core.run(channel)
    after = net.evaluate(state.store.params, X, y)[0]
    assert channel.flight is None  # the last push was acked before run() returned
    assert state.store.version == 200 == core.stats["pushes"] and after < 0.6 * before
    # each gradient but the first was computed while the previous push was applied: one
    # update old (the helper's fresh weights do not move the version a window starts from)
    assert [d.staleness for d in channel.pushes] == [0] + [1] * 199
    if channel_kind is ThreadedOverlapChannel:
        assert channel.helper_threads and threading.get_ident() not in channel.helper_threads


class BusyServerChannel(ThreadedOverlapChannel):
    """As ThreadedOverlapChannel, with another worker's push landing on the server just
    after each helper read the fresh weights (``catch_up``: whether the loop reads again)."""

    def __init__(self, state, catch_up: bool):
        super().__init__(state)
        self.other = state.members.register("other", "inprocess")
        self.catches_up = catch_up

    def await_acks(self):
        acks = super().await_acks()
        self.state.push(self.other.worker_id, self.state.store.version, 1, np.zeros(self.state.store.size))
        return acks

    def catch_up(self, params):
        if self.catches_up:
            super().catch_up(params)


@pytest.mark.parametrize("catch_up", [True, False])
def test_weights_the_server_moved_on_from_since_the_helper_read_them_are_read_again(catch_up):
    """One other push lands after each helper read. Caught up, a gradient is as old as one
    read on the loop's thread would be: its own previous push and the other worker's one
    (staleness 2); not caught up, one more."""
    X, y = problem()
    state = ServerState(config())
    channel = BusyServerChannel(state, catch_up)
    core = WorkerCore(MLP(SPEC), Minibatches(X, y, 16, seed=1), StepSettings(max_steps=30, overlap=True),
                      np.random.default_rng(0))
    core.run(channel)
    staleness = [d.staleness for d in channel.pushes]
    assert staleness[2:] == [2 if catch_up else 3] * 28, staleness


def test_overlap_with_a_helper_thread_ends_as_the_loop_does_on_a_shutdown():
    X, y = problem()
    state = ServerState(config(), max_updates=7)
    core = WorkerCore(MLP(SPEC), Minibatches(X, y, 16, seed=1), StepSettings(overlap=True), np.random.default_rng(0))
    before = threading.active_count()
    with pytest.raises(ShutdownRequested):  # raised on the helper thread, heard on the loop's
        core.run(ThreadedOverlapChannel(state))
    assert state.store.version == 7 and core.stats["pushes"] == 7
    assert threading.active_count() == before  # the helper thread is gone


@pytest.mark.parametrize("channel_kind", [OverlapStateChannel, ThreadedOverlapChannel])
def test_overlap_with_pushes_every_few_steps_still_sums_each_window_from_its_own_weights(channel_kind):
    X, y = problem()
    state = ServerState(config())
    channel = channel_kind(state)
    core = WorkerCore(MLP(SPEC), Minibatches(X, y, 32, seed=1),
                      StepSettings(max_steps=60, n_push=3, n_fetch=3, overlap=True), np.random.default_rng(0))
    core.run(channel)
    assert state.store.version == 20 == core.stats["pushes"] and core.stats["examples"] == 60 * 32
    assert all(d.outcome == APPLIED for d in channel.pushes)
    # the ack of a window's push (and its fresh weights) comes one step into the next
    # window, whose base stays the weights its first step was computed from: one update old
    assert [d.staleness for d in channel.pushes] == [0] + [1] * 19


def test_sync_consistency_refuses_overlap_which_would_average_gradients_a_round_old():
    from psgd.errors import ConfigError
    with pytest.raises(ConfigError, match="sync"):
        config(consistency="sync", overlap=True)
    assert config(consistency="ssp", overlap=True).overlap
