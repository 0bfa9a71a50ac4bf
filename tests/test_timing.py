"""Where a worker's time goes: the step timer, the wire field that carries its totals, the
server record that keeps them, and the shares that must add up to the worker's wall time."""

import time

import numpy as np
import pytest

from psgd.data import Minibatches
from psgd.errors import ProtocolError
from psgd.metrics import time_shares
from psgd.model.network import MLP, ModelSpec
from psgd.server.state import ServerState
from psgd.wire.protocol import TIMING_KEYS, SERVER_TAKES, decode, encode
from psgd.worker.core import StepSettings, WorkerCore
from psgd.worker.timing import PHASES, StepTimer
from psgd.config import TrainConfig
from psgd.model.optim import OptimizerSpec
from psgd.model.schedules import ScheduleSpec
from test_worker_core import OverlapStateChannel, StateChannel

WIDE = ModelSpec((64, 128, 10), "tanh", "softmax_ce", "float32")  # a step of a fraction of a millisecond


def test_laps_charge_the_time_since_the_previous_mark_and_tile_the_wall_time():
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    timer.start()
    for phase, seconds in [("batch", 0.5), ("compute", 2.0), ("sleep", 4.0), ("push", 1.0), ("other", 0.25)]:
        now[0] += seconds
        timer.lap(phase)
    now[0] += 0.25
    timer.stop()
    snap = timer.snapshot()
    assert snap == {"wall": 8.0, "batch": 0.5, "compute": 2.0, "sleep": 4.0, "push": 1.0, "pull": 0.0, "other": 0.5}
    assert time_shares(snap)["sleep"] == 0.5 and time_shares(snap)["accounted"] == pytest.approx(1.0)
    timer.start()  # a second loop (after a reconnect) adds to the totals
    now[0] += 2.0
    timer.lap("pull")
    now[0] += 1.5  # mid-phase: a report sent now counts up to the last mark
    assert timer.snapshot()["wall"] == 10.0 and timer.snapshot()["pull"] == 2.0
    assert time_shares(None) is None and time_shares({"wall": 0.0}) is None


def _config():
    return TrainConfig(model=WIDE, optimizer=OptimizerSpec("sgd"), schedule=ScheduleSpec("constant", 0.05, warmup=0))


def _core(slowdown: float, steps: int = 25, overlap: bool = False):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 64))
    y = rng.integers(0, 10, 512)
    state = ServerState(_config())
    channel = (OverlapStateChannel if overlap else StateChannel)(state)
    core = WorkerCore(MLP(WIDE), Minibatches(X, y, 64, seed=1),
                      StepSettings(max_steps=steps, slowdown=slowdown, overlap=overlap), np.random.default_rng(0))
    return state, channel, core


@pytest.mark.parametrize("overlap", [False, True], ids=["push-then-compute", "overlap"])
def test_a_worker_s_time_shares_add_up_to_its_wall_time_and_show_a_straggler_s_sleep(overlap):
    state, channel, core = _core(slowdown=3.0, steps=None, overlap=overlap)
    t0 = time.perf_counter()
    core.run(channel, should_stop=lambda: time.perf_counter() - t0 > 0.5)  # long enough that 5% is 25 ms
    wall = time.perf_counter() - t0  # the test's own clock, not the timer's
    timing = core.timer.snapshot()
    assert set(timing) == set(TIMING_KEYS)
    accounted = sum(timing[p] for p in PHASES)
    assert accounted == pytest.approx(wall, rel=0.05), (timing, wall)
    assert timing["wall"] == pytest.approx(wall, rel=0.05)
    shares = time_shares(timing)
    # slowdown 3: each step sleeps twice what its minibatch and gradient took
    assert shares["sleep"] > 0.4 and shares["sleep"] > shares["compute"] and shares["push"] > 0


def test_without_the_straggler_option_no_time_is_slept():
    state, channel, core = _core(slowdown=1.0, steps=10)
    core.run(channel)
    timing = core.timer.snapshot()
    assert timing["sleep"] == 0 and timing["compute"] > 0 and timing["pull"] > 0


def _push_frames(timing):
    header = {"type": "push", "worker_id": 1, "base_version": 0, "examples": 4, "timing": timing}
    return [bytes(f) for f in encode(header, [np.zeros(3, "<f4")])]


@pytest.mark.parametrize("bad", [
    [1.0], {"wall": -1.0}, {"wall": float("nan")}, {"wall": float("inf")}, {"wall": 2e9}, {"wall": True},
    {"wall": "1"}, {"naps": 1.0}, {**{k: 1.0 for k in TIMING_KEYS}, "extra": 1.0},
])
def test_a_timing_field_outside_its_bounds_is_bad_field(bad):
    with pytest.raises(ProtocolError) as err:
        decode(_push_frames(bad), accept=SERVER_TAKES)
    assert err.value.code == "bad_field" and "timing" in str(err.value)


def test_the_server_keeps_the_latest_totals_a_heartbeat_or_push_reports():
    state = ServerState(_config())
    record = state.members.register("w", "zmq")
    assert record.to_dict(0.0)["timing"] is None
    totals = {"wall": 2.0, "compute": 1.5, "push": 0.5}
    frames = encode({"type": "heartbeat", "worker_id": record.worker_id, "timing": totals})
    reply, _ = state.handle(decode([bytes(f) for f in frames], accept=SERVER_TAKES))
    assert reply["type"] == "assignment" and record.to_dict(0.0)["timing"] == totals
    grad = np.zeros(state.store.size, state.store.dtype)
    later = {"wall": 3.0, "compute": 2.0, "push": 1.0}
    frames = encode({"type": "push", "worker_id": record.worker_id, "base_version": 0, "examples": 4,
                     "timing": later}, [grad])
    reply, _ = state.handle(decode([bytes(f) for f in frames], accept=SERVER_TAKES))
    assert reply["type"] == "ack" and record.timing == later


def test_psgd_report_shows_each_worker_s_time_shares():
    from psgd.coordinator.loop import per_worker
    from psgd.coordinator.report import time_table
    state = ServerState(_config())
    fast, slow = state.members.register("fast", "shm"), state.members.register("slow", "shm")
    fast.timing = {"wall": 10.0, "batch": 0.5, "compute": 6.0, "push": 3.5}
    slow.timing = {"wall": 10.0, "batch": 0.1, "compute": 2.0, "sleep": 6.9, "push": 1.0}
    rows = per_worker(r.to_dict(0.0) for r in state.members.workers.values())
    assert rows["slow"]["time_shares"]["sleep"] == pytest.approx(0.69)
    table = time_table(rows)
    assert "sleep" in table[1] and "compute" in table[1]
    assert table[2].split()[:5] == ["fast", "5.0%", "60.0%", "0.0%", "35.0%"]
    assert table[3].split()[:4] == ["slow", "1.0%", "20.0%", "69.0%"]
