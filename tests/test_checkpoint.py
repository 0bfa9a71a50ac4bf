"""Server checkpoints: exact restore, corrupt files refused, other models refused."""

import numpy as np
import pytest

from state_util import apply
from psgd.server import checkpoint

from psgd.wire import shm
from psgd.config import TrainConfig
from psgd.errors import ConfigError, DataError
from psgd.model.network import ModelSpec
from psgd.model.optim import OptimizerSpec
from psgd.model.schedules import ScheduleSpec
from psgd.server.state import ServerState

CONFIG = TrainConfig(model=ModelSpec((6, 5, 3)), optimizer=OptimizerSpec("momentum", 0.9),
                     schedule=ScheduleSpec("step", 0.1, every=3, warmup=0))


def pushes(state, wid, grads):
    for g in grads:
        apply(state, wid, state.store.version, 4, g)


@pytest.mark.parametrize("optimizer", ["momentum", "adam", "adamw"])
def test_restored_server_continues_exactly_as_the_original(tmp_path, optimizer):
    CONFIG = globals()["CONFIG"].with_(optimizer=OptimizerSpec(optimizer, 0.9, weight_decay=0.001))
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(ServerState(CONFIG).store.size).astype(np.float32) for _ in range(8)]
    a = ServerState(CONFIG)
    wa = a.members.register("w", "zmq").worker_id
    pushes(a, wa, grads[:5])
    arrays, meta = a.checkpoint()
    checkpoint.write(tmp_path, a.store.version, arrays, meta)
    b = ServerState(CONFIG)
    loaded, loaded_meta, _ = checkpoint.newest_valid(tmp_path)
    b.restore(loaded, loaded_meta)
    wb = b.members.register("w", "zmq").worker_id
    assert b.store.version == 5 and b.store.examples == 20 and np.array_equal(a.store.params, b.store.params)
    pushes(a, wa, grads[5:])
    pushes(b, wb, grads[5:])
    assert np.array_equal(a.store.params, b.store.params)  # velocity (Adam: moments, step) and schedule came back too
    if optimizer.startswith("adam"):
        assert b.store.optimizer.steps == a.store.optimizer.steps == 8


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_newest_checkpoint_is_refused_and_the_older_one_used(tmp_path, damage):
    state = ServerState(CONFIG)
    wid = state.members.register("w", "zmq").worker_id
    for _ in range(2):
        pushes(state, wid, [np.ones(state.store.size, np.float32)])
        checkpoint.write(tmp_path, state.store.version, *state.checkpoint())
    newest = sorted(tmp_path.glob("checkpoint-*.npz"))[-1]
    raw = bytearray(newest.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 3] ^= 0xFF  # inside the params array
    newest.write_bytes(bytes(raw))
    said = []
    arrays, meta, path = checkpoint.newest_valid(tmp_path, say=said.append)
    assert meta["version"] == 1 and path != newest
    assert len(said) == 1 and str(newest) in said[0] and ("corrupt" in said[0])
    with pytest.raises(DataError, match="corrupt"):
        checkpoint.read(newest)


def test_only_the_newest_few_are_kept_and_other_models_are_refused(tmp_path):
    state = ServerState(CONFIG)
    wid = state.members.register("w", "zmq").worker_id
    for _ in range(5):
        pushes(state, wid, [np.ones(state.store.size, np.float32)])
        checkpoint.write(tmp_path, state.store.version, *state.checkpoint())
    assert len(list(tmp_path.glob("checkpoint-*.npz"))) == checkpoint.KEEP
    other = ServerState(CONFIG.with_(model=ModelSpec((6, 4, 3))))
    arrays, meta, _ = checkpoint.newest_valid(tmp_path)
    with pytest.raises(ConfigError, match="another model"):
        other.restore(arrays, meta)


def test_segments_of_dead_processes_are_reaped_and_live_ones_kept():
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = shm.Segment(f"psgd-test-{dead.pid}-deadbeef", 4, np.float32, create=True)
    live = shm.Segment.create("psgd-test", 4, np.float32)
    import os
    import tempfile
    stale_dir = os.path.join(tempfile.gettempdir(), f"{shm.DOORBELL_PREFIX}{dead.pid}-x")
    os.makedirs(stale_dir)
    live_dir = shm.doorbell_dir()
    try:
        removed = shm.reap_stale()
        assert stale.name in removed and live.name not in removed
        assert not os.path.exists(stale_dir) and os.path.isdir(live_dir)
    finally:
        stale.unlink()
        live.unlink()
        os.rmdir(live_dir)


def test_a_server_checkpoints_every_u_updates_as_well_as_every_t_seconds(tmp_path):
    from psgd.server.loop import Server, ServerOptions
    server = Server(CONFIG, ServerOptions(bind="tcp://127.0.0.1:0", shared_memory=False, checkpoint_dir=str(tmp_path),
                                          checkpoint_every_s=1e9, checkpoint_every_updates=5))
    try:
        wid = server.state.members.register("w", "zmq").worker_id
        g = np.zeros(server.state.store.size, np.float32)
        for _ in range(4):
            apply(server.state, wid, server.state.store.version, 1, g)
            server._maybe_checkpoint()
        assert not list(tmp_path.glob("*.npz"))
        apply(server.state, wid, server.state.store.version, 1, g)
        server._maybe_checkpoint()
        assert [p.name for p in tmp_path.glob("*.npz")] == ["checkpoint-000000000005.npz"]
    finally:
        server.close()
