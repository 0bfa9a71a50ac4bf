"""The server's rules without sockets: apply, versions, staleness, refusals."""

import hashlib

import numpy as np
import pytest

from state_util import apply
from psgd.server import checkpoint
from psgd.config import TrainConfig
from psgd.model.layout import Layout
from psgd.model.network import MLP, ModelSpec
from psgd.model.optim import OptimizerSpec
from psgd.wire.protocol import decode, encode
from psgd.model.schedules import ScheduleSpec
from psgd.server.state import ServerState

CONFIG = TrainConfig(model=ModelSpec((6, 5, 3)), optimizer=OptimizerSpec("sgd"), schedule=ScheduleSpec("constant", 0.5, warmup=0))


def checksum(a):
    return hashlib.sha256(a.tobytes()).hexdigest()


def new_state(num_data_shards=2):
    state = ServerState(CONFIG, num_data_shards)
    w0 = state.members.register("w0", "zmq").worker_id
    w1 = state.members.register("w1", "zmq").worker_id
    return state, w0, w1


def request(state, kind, arrays=(), **fields):
    frames = [bytes(f) for f in encode({"type": kind, **fields}, arrays)]
    return state.handle(decode(frames))


def test_apply_updates_in_place_and_counts_versions_and_staleness():
    state, w0, w1 = new_state()
    start = state.store.params.copy()
    g = np.ones(state.store.size, np.float32)
    assert apply(state, w0, 0, 128, g) == (1, 0)
    np.testing.assert_allclose(state.store.params, start - 0.5 * g)
    assert apply(state, w1, 0, 128, g) == (2, 1)  # computed from version 0, applied at 1
    assert apply(state, w0, 1, 64, g) == (3, 1)
    assert apply(state, w1, 3, 64, g) == (4, 0)
    assert state.store.examples == 384
    hist = state.store.staleness
    assert hist.counts[0] == 2 and hist.counts[1] == 2 and hist.total == state.store.version == 4
    per_worker = sum(r.staleness.total for r in state.members.workers.values())
    assert per_worker == 4 and state.members.workers[w0].pushes == 2


def test_shards_are_handed_out_evenly():
    state = ServerState(CONFIG, num_data_shards=3)
    shards = [state.members.register(f"w{i}", "zmq").data_shards for i in range(6)]
    assert sorted(shards) == [[0], [0], [1], [1], [2], [2]]
    assert state.members.register("chosen", "zmq", [1]).data_shards == [1]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_lost_workers_data_shard_goes_to_the_live_ones_and_comes_back_with_it():
    clock = FakeClock()
    state = ServerState(CONFIG.with_(lease_s=5.0), num_data_shards=3, clock=clock)
    a, b, c = (state.members.register(n, "zmq") for n in "abc")
    assert [a.data_shards, b.data_shards, c.data_shards] == [[0], [1], [2]]
    for w in (a, b, c):
        apply(state, w.worker_id, state.store.version, 1, np.zeros(state.store.size, np.float32))
    clock.now = 3.0
    state.members.touch(a.worker_id)
    state.members.touch(c.worker_id)
    clock.now = 6.0
    state.tick()  # b was silent past its lease: dropped, its shard adopted by a (fewest, lowest id)
    assert b.expired and not b.connected and state.members.live() == {a.worker_id, c.worker_id}
    assert a.data_shards == [0, 1] and a.data_generation == 1 and c.data_shards == [2]
    g = np.zeros(state.store.size, np.float32)
    reply, _ = request(state, "push", [g], worker_id=b.worker_id, base_version=0, examples=1)
    assert reply["code"] == "unknown_worker" and "lease" in reply["message"]
    assert b.worker_id in state.members.workers  # it pushed: its record stays, for the statistics  # it must say hello again
    reply, _ = request(state, "heartbeat", worker_id=a.worker_id)
    assert reply == {"type": "assignment", "data_shards": [0, 1], "data_generation": 1}
    back, _ = request(state, "hello", worker="b", transport="zmq", data_shards=[1])
    assert back["data_shards"] == [1] and a.data_shards == [0] and a.data_generation == 2
    reply, _ = request(state, "push", [g], worker_id=a.worker_id, base_version=3, examples=1)
    assert reply["data_generation"] == 2  # how a worker learns that its shards changed


def test_when_every_worker_is_gone_the_next_one_takes_all_the_data():
    state = ServerState(CONFIG, num_data_shards=2)
    a, b = state.members.register("a", "zmq"), state.members.register("b", "zmq")
    state.disconnect(a.worker_id)
    assert b.data_shards == [0, 1]
    state.disconnect(b.worker_id)
    assert state.members.register("c", "zmq").data_shards == [0, 1]


def test_no_lease_runs_out_while_the_server_holds_the_workers():
    clock = FakeClock()
    state = ServerState(CONFIG.with_(lease_s=1.0), clock=clock)
    w = state.members.register("w", "zmq")
    request(state, "pause")
    clock.now = 10.0
    state.tick()
    request(state, "resume")
    clock.now = 10.5
    state.tick()
    assert w.connected and not w.expired


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adagrad"])
def test_server_shards_together_do_exactly_what_one_server_does(optimizer):
    """Each shard holds a contiguous range with its own optimizer state and version: fed the
    same pushes, split, the shards' ranges put together are bit for bit the one server's."""
    config = CONFIG.with_(optimizer=OptimizerSpec(optimizer, weight_decay=1e-3))
    whole = ServerState(config)
    shards = [ServerState(config, shard=k, num_server_shards=3) for k in range(3)]
    assert [(s.store.lo, s.store.hi) for s in shards] == [(0, 17), (17, 35), (35, 53)] and whole.store.size == 53
    assert np.array_equal(np.concatenate([s.store.params for s in shards]), whole.store.params)
    rng = np.random.default_rng(0)
    ids = [whole.members.register("w", "zmq").worker_id] + [s.members.register("w", "zmq").worker_id for s in shards]
    for step in range(20):
        g = rng.standard_normal(whole.store.size).astype(np.float32)
        base = max(0, step - int(rng.integers(0, 3)))
        apply(whole, ids[0], base, 8, g)
        for s, wid in zip(shards, ids[1:]):
            apply(s, wid, base, 8, g[s.store.lo:s.store.hi])
    assert np.array_equal(np.concatenate([s.store.params for s in shards]), whole.store.params)
    assert all(s.store.version == whole.store.version == 20 for s in shards)


def test_a_shard_refuses_a_gradient_for_another_range():
    state = ServerState(CONFIG, shard=1, num_server_shards=2)
    wid = state.members.register("w", "zmq").worker_id
    welcome = state.welcome(state.members.workers[wid])
    assert welcome["range"] == [state.store.lo, state.store.hi] == [26, 53] and welcome["server_shard"] == 1
    frames = encode({"type": "push", "worker_id": wid, "base_version": 0, "examples": 1},
                    [np.zeros(state.store.size, np.float32)], [0])
    reply, _ = state.handle(decode([bytes(f) for f in frames]))
    assert reply["code"] == "bad_range" and state.store.version == 0
    frames = encode({"type": "push", "worker_id": wid, "base_version": 0, "examples": 1},
                    [np.zeros(state.store.size, np.float32)], [26])
    assert state.handle(decode([bytes(f) for f in frames]))[0]["type"] == "ack"


BAD_PUSHES = [
    ("nan", lambda n: np.full(n, np.nan, np.float32), {}, "not_finite"),
    ("inf", lambda n: np.r_[np.zeros(n - 1), np.inf].astype(np.float32), {}, "not_finite"),
    ("float64", lambda n: np.zeros(n, np.float64), {}, "bad_array"),
    ("short", lambda n: np.zeros(n - 1, np.float32), {}, "bad_range"),
    ("long", lambda n: np.zeros(n + 1, np.float32), {}, "bad_range"),
    ("future version", lambda n: np.zeros(n, np.float32), {"base_version": 99}, "future_version"),
    ("negative version", lambda n: np.zeros(n, np.float32), {"base_version": -1}, "future_version"),
    ("zero examples", lambda n: np.zeros(n, np.float32), {"examples": 0}, "bad_field"),
    ("unknown worker", lambda n: np.zeros(n, np.float32), {"worker_id": 42}, "unknown_worker"),
]


@pytest.mark.parametrize("name,make,fields,code", BAD_PUSHES, ids=[b[0] for b in BAD_PUSHES])
def test_refused_pushes_leave_the_weights_untouched(name, make, fields, code):
    state, w0, _ = new_state()
    before = checksum(state.store.params)
    push = {"worker_id": w0, "base_version": 0, "examples": 10, **fields}
    reply, arrays = request(state, "push", [make(state.store.size)], **push)
    assert reply["type"] == "error" and reply["code"] == code
    assert checksum(state.store.params) == before and state.store.version == 0
    assert state.errors[code] == 1


def test_push_with_offset_outside_the_vector_is_refused():
    state, w0, _ = new_state()
    before = checksum(state.store.params)
    frames = encode({"type": "push", "worker_id": w0, "base_version": 0, "examples": 1},
                    [np.zeros(state.store.size, np.float32)], [5])
    reply, _ = state.handle(decode([bytes(f) for f in frames]))
    assert reply["code"] == "bad_range" and checksum(state.store.params) == before


def test_messages_hello_pull_push_stats_shutdown():
    state = ServerState(CONFIG, num_data_shards=2)
    welcome, _ = request(state, "hello", worker="a", transport="zmq")
    assert welcome["type"] == "welcome" and welcome["range"] == [0, state.store.size]
    assert ModelSpec.from_dict(welcome["model"]) == CONFIG.model
    assert Layout.from_wire(welcome["layout"]) == MLP(CONFIG.model).layout
    wid = welcome["worker_id"]
    reply, arrays = request(state, "pull", worker_id=wid)
    assert reply["version"] == 0 and np.array_equal(arrays[0], state.store.params)
    g = np.full(state.store.size, 0.1, np.float32)
    reply, arrays = request(state, "push", [g], worker_id=wid, base_version=0, examples=5, want_params=True)
    assert reply == {"type": "ack", "version": 1, "staleness": 0, "data_generation": 0} and arrays[0] is state.store.params
    stats, _ = request(state, "stats")
    assert stats["stats"]["version"] == 1 and stats["stats"]["workers_connected"] == 1 and "workers" not in stats
    stats, _ = request(state, "stats", workers=True)
    assert [r["pushes"] for r in stats["workers"]] == [1] and stats["next"] is None
    assert request(state, "shutdown")[0]["type"] == "ok"
    assert request(state, "push", [g], worker_id=wid, base_version=1, examples=5)[0]["type"] == "shutdown"
    assert request(state, "hello", worker="late", transport="zmq")[0]["type"] == "shutdown"


def test_max_updates_stops_at_that_very_update(tmp_path):
    """Pushes from two workers arrive together (one poll): the one that reaches the budget
    is acknowledged, the next is told to stop and leaves the weights as they were."""
    state = ServerState(CONFIG, num_data_shards=2, max_updates=3)
    a, b = (request(state, "hello", worker=n, transport="zmq")[0]["worker_id"] for n in "ab")
    g = np.full(state.store.size, 0.1, np.float32)
    for version, wid in enumerate([a, b, a], start=1):
        assert request(state, "push", [g], worker_id=wid, base_version=0, examples=5)[0]["version"] == version
    assert state.phase.stopping and state.store.version == 3
    before = checksum(state.store.params)
    assert request(state, "push", [g], worker_id=b, base_version=2, examples=5)[0]["type"] == "shutdown"
    assert state.store.version == 3 and checksum(state.store.params) == before
    resumed = ServerState(CONFIG, num_data_shards=2, max_updates=3)
    resumed.restore(*checkpoint.read(checkpoint.write(tmp_path, state.store.version, *state.checkpoint())))
    assert resumed.phase.stopping  # a server resumed at its budget has nothing left to do


def test_set_lr_overrides_the_servers_schedule_and_bad_rates_are_refused():
    state = ServerState(CONFIG)
    assert state.store.lr() == 0.5
    assert request(state, "set_lr", lr=0.125)[0]["type"] == "ok"
    assert state.store.lr() == 0.125
    for bad in (float("nan"), float("inf"), -1.0):
        assert request(state, "set_lr", lr=bad)[0]["code"] == "bad_field"
    assert state.store.lr() == 0.125
    described = request(state, "describe")[0]
    assert TrainConfig.from_description(described["config"]) == CONFIG


def test_weights_start_from_the_seed_so_every_server_agrees():
    a, b = ServerState(CONFIG), ServerState(CONFIG)
    assert np.array_equal(a.store.params, b.store.params)
    assert np.array_equal(a.store.params, MLP(CONFIG.model).init_params(CONFIG.seed))


@pytest.mark.parametrize("rule,expected", [("none", [0.5, 0.5, 0.5]), ("dynsgd", [0.5, 0.25, 0.5 / 3]),
                                           ("divide", [0.5, 0.5, 0.25])])
def test_staleness_rules_scale_the_rate_of_stale_pushes(rule, expected):
    state = ServerState(CONFIG.with_(staleness_rule=rule))
    wid = state.members.register("w", "zmq").worker_id
    g = np.ones(state.store.size, np.float32)
    steps = []
    for base in (0, 0, 0):  # staleness 0, 1, 2
        before = state.store.params.copy()
        apply(state, wid, base, 1, g)
        steps.append(float(np.mean(before - state.store.params)))
    np.testing.assert_allclose(steps, expected, rtol=1e-5)


def test_worker_ids_of_a_restarted_server_are_not_those_of_the_old_one():
    """A worker of a killed server still sends its old id: the new server must not take it
    for one of its own workers' (it answers unknown_worker, and the worker says hello)."""
    old, new = ServerState(CONFIG), ServerState(CONFIG)
    old_id = old.members.register("a", "zmq").worker_id
    new.members.register("b", "zmq")
    reply, _ = request(new, "push", [np.zeros(new.store.size, np.float32)], worker_id=old_id, base_version=0, examples=1)
    assert reply["code"] == "unknown_worker" and new.store.version == 0


def test_a_flood_of_hellos_is_bounded_and_leaves_no_records(monkeypatch):
    """Workers that say hello and then nothing are dropped at their lease without a trace,
    and no more than MAX_WORKERS are connected at once: hellos cannot grow the server."""
    import psgd.server.membership as membership
    monkeypatch.setattr(membership, "MAX_WORKERS", 50)
    clock = FakeClock()
    state = ServerState(CONFIG.with_(lease_s=1.0), num_data_shards=2, clock=clock)
    real = state.members.register("real", "zmq")
    apply(state, real.worker_id, 0, 1, np.zeros(state.store.size, np.float32))
    replies = [request(state, "hello", worker=f"flood{i}", transport="zmq")[0] for i in range(60)]
    assert sum(r["type"] == "welcome" for r in replies) == 49
    assert {r["code"] for r in replies if r["type"] == "error"} == {"too_many_workers"}
    assert state.errors["too_many_workers"] == 11
    clock.now = 2.0
    state.members.touch(real.worker_id)  # the real worker is alive; the flood is silent
    state.tick()
    assert list(state.members.workers) == [real.worker_id]  # the real worker's record stays (it pushed)
    assert real.data_shards == [0, 1] and request(state, "hello", worker="late", transport="zmq")[0]["type"] == "welcome"


@pytest.mark.parametrize("consistency", ["async", "ssp", "sync"])
def test_a_push_sent_again_with_its_seq_is_answered_again_and_applied_once(consistency):
    """A client that lost an ack resends the same frames with the same seq (psgd's transport
    does): the server answers with the first ack and does not apply the gradient twice."""
    import dataclasses
    state = ServerState(dataclasses.replace(CONFIG, consistency=consistency, ssp_bound=0), 1)
    wid = request(state, "hello", worker="a", transport="zmq")[0]["worker_id"]
    g = np.full(state.store.size, 0.1, np.float32)
    first = request(state, "push", [g], worker_id=wid, base_version=0, examples=5, seq=7)
    assert first[0]["type"] == "ack" and first[0]["version"] == 1  # alone: nothing to wait for
    after_one = state.store.params.copy()
    again = request(state, "push", [g], worker_id=wid, base_version=0, examples=5, seq=7, want_params=True)
    assert again[0] == first[0] and np.array_equal(again[1][0], after_one)
    assert state.store.version == 1 and np.array_equal(state.store.params, after_one)
    assert state.members.workers[wid].pushes == 1 and state.store.examples == 5
    new = request(state, "push", [g], worker_id=wid, base_version=1, examples=5, seq=8)  # same frames, new seq
    assert new[0]["version"] == 2
    # seq 0 is no sequence: never taken for a retry
    assert request(state, "push", [g], worker_id=wid, base_version=2, examples=5, seq=0)[0]["version"] == 3
    assert request(state, "push", [g], worker_id=wid, base_version=3, examples=5, seq=0)[0]["version"] == 4


def test_a_retry_of_a_held_push_waits_and_its_ack_is_the_first_ones():
    import dataclasses
    state = ServerState(dataclasses.replace(CONFIG, consistency="sync"), 2)
    a = request(state, "hello", worker="a", transport="zmq")[0]["worker_id"]
    b = request(state, "hello", worker="b", transport="zmq")[0]["worker_id"]
    g = np.full(state.store.size, 0.1, np.float32)
    assert request(state, "push", [g], worker_id=a, base_version=0, examples=5, seq=3) is None  # held for b
    assert request(state, "push", [g * 5], worker_id=a, base_version=0, examples=5, seq=3) is None  # not added
    ack_b = request(state, "push", [g], worker_id=b, base_version=0, examples=5, seq=3)
    assert ack_b[0]["version"] == 1
    assert [ack[0] for ack in state.take_released()] == [a]
    assert np.allclose(state.store.params, MLP(CONFIG.model).init_params(CONFIG.seed) - 0.5 * g)  # the mean of g, g
    assert request(state, "push", [g], worker_id=a, base_version=0, examples=5, seq=3)[0]["version"] == 1
    assert state.store.version == 1
