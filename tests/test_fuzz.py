"""A live server under fire: 10,000 malformed and hostile messages while a worker trains.

The server must stay up and answering, the well-behaved worker must finish its steps, the
weights must change only by that worker's pushes (the version equals its acknowledged
pushes), and the server's error counters must account for every hostile message that
reached it. Frames above the size limit never reach it: ZeroMQ drops the connection, and
the test counts those apart.
"""

import re
import time

import msgpack
import numpy as np
import pytest
import zmq

from cluster_util import Processes
from psgd.wire.protocol import PROTOCOL_VERSION, encode
from psgd.wire.transport import Client

pytestmark = pytest.mark.slow

LAYERS = "784,32,10"
N_PARAMS = 784 * 32 + 32 + 32 * 10 + 10
N_HOSTILE = 10_000
WORKER_STEPS = 600


def hostile_messages(rng, worker_id):
    """Yield (kind, frames) forever: every kind of malformed or hostile message, mixed."""
    good = np.zeros(N_PARAMS, np.float32)

    def push(**fields):
        header = {"v": PROTOCOL_VERSION, "type": "push", "sender": "evil", "seq": 0, "worker_id": worker_id,
                  "base_version": 0, "examples": 1,
                  "arrays": [{"dtype": "<f4", "shape": [N_PARAMS], "offset": 0}]}
        header.update(fields)
        return msgpack.packb(header)

    def topk(idx, values):
        idx, values = np.asarray(idx, "<u4"), np.asarray(values, "<f4")
        return [push(codec="topk", arrays=[{"dtype": "<u4", "shape": [idx.size], "offset": 0},
                                           {"dtype": "<f4", "shape": [values.size], "offset": 0}]),
                idx.tobytes(), values.tobytes()]

    def int8(scales, codes):
        scales, codes = np.asarray(scales, "<f4"), np.asarray(codes, np.int8)
        return [push(codec="int8", arrays=[{"dtype": "<f4", "shape": [scales.size], "offset": 0},
                                           {"dtype": "|i1", "shape": [codes.size], "offset": 0}]),
                scales.tobytes(), codes.tobytes()]

    kinds = [
        ("random bytes", lambda: [rng.bytes(int(rng.integers(1, 200)))]),
        ("random frames", lambda: [rng.bytes(int(rng.integers(0, 50))) for _ in range(int(rng.integers(2, 6)))]),
        ("truncated header", lambda: [push()[: int(rng.integers(1, 60))], good.tobytes()]),
        ("missing array", lambda: [push()]),
        ("extra frames", lambda: [push(), good.tobytes(), b"x", b"y"]),
        # never the current version: an older one, 0, or one from the future
        ("wrong version", lambda: [push(v=int(rng.choice([0, PROTOCOL_VERSION - 1,
                                                          PROTOCOL_VERSION + int(rng.integers(1, 1000))]))),
                                   good.tobytes()]),
        ("unknown type", lambda: [push(type="drop_tables"), good.tobytes()]),
        ("lying shape", lambda: [push(arrays=[{"dtype": "<f4", "shape": [N_PARAMS + 7], "offset": 0}]), good.tobytes()]),
        ("lying offset", lambda: [push(arrays=[{"dtype": "<f4", "shape": [N_PARAMS], "offset": 99}]), good.tobytes()]),
        ("wrong dtype", lambda: [push(arrays=[{"dtype": "<f8", "shape": [N_PARAMS // 2], "offset": 0}]), good.tobytes()]),
        ("object dtype", lambda: [push(arrays=[{"dtype": "|O", "shape": [N_PARAMS], "offset": 0}]), good.tobytes()]),
        ("nan", lambda: [push(), np.full(N_PARAMS, np.nan, np.float32).tobytes()]),
        ("inf", lambda: [push(), np.where(rng.random(N_PARAMS) < 0.001, np.inf, 0).astype(np.float32).tobytes()]),
        ("future version", lambda: [push(base_version=10**9), good.tobytes()]),
        ("unknown worker", lambda: [push(worker_id=10**6), good.tobytes()]),
        ("bool as int", lambda: [push(examples=True), good.tobytes()]),
        ("huge header", lambda: [msgpack.packb({"v": 1, "pad": "x" * 70_000}), good.tobytes()]),
        ("float version", lambda: [push(v=float(PROTOCOL_VERSION)), good.tobytes()]),
        ("want_params not a bool", lambda: [push(want_params=["yes", 1, 0.5, None][int(rng.integers(4))]), good.tobytes()]),
        ("split range", lambda: [push(arrays=[{"dtype": "<f4", "shape": [N_PARAMS // 2], "offset": 0},
                                              {"dtype": "<f4", "shape": [N_PARAMS - N_PARAMS // 2],
                                               "offset": N_PARAMS // 2}]),
                                 good[:N_PARAMS // 2].tobytes(), good[N_PARAMS // 2:].tobytes()]),
        ("pull with an array", lambda: [push(type="pull"), good.tobytes()]),
        ("hello with bad data shards", lambda: [push(type="hello", worker="evil2", transport="zmq", arrays=[],
                                                     data_shards=[[-1], [99], [0, 0], [1.5], [True], "x"][
                                                         int(rng.integers(6))])]),
        ("stats with bad paging", lambda: [push(type="stats", workers=True, after="next", arrays=[])]),
        # compressed pushes (psgd.wire.codecs) that do not fit: each is refused, none applied
        ("top-k unsorted", lambda: topk(np.array([5, 3, 9]), np.ones(3))),
        ("top-k duplicate", lambda: topk(np.array([3, 3]), np.ones(2))),
        ("top-k out of range", lambda: topk(np.array([0, N_PARAMS + int(rng.integers(0, 1 << 20))]), np.ones(2))),
        ("top-k lengths differ", lambda: topk(np.array([1, 2, 3]), np.ones(2))),
        ("top-k more than the vector", lambda: topk(np.arange(N_PARAMS + 1), np.ones(N_PARAMS + 1))),
        ("top-k NaN value", lambda: topk(np.array([4]), np.array([np.nan]))),
        ("top-k one frame", lambda: [push(codec="topk", arrays=[{"dtype": "<u4", "shape": [1], "offset": 0}]),
                                     np.zeros(1, "<u4").tobytes()]),
        ("top-k signed indices", lambda: [push(codec="topk", arrays=[{"dtype": "<i4", "shape": [1], "offset": 0},
                                                                     {"dtype": "<f4", "shape": [1], "offset": 0}]),
                                          np.zeros(1, "<i4").tobytes(), np.ones(1, "<f4").tobytes()]),
        ("int8 NaN scale", lambda: int8(np.full(-(-N_PARAMS // 256), np.nan), np.ones(N_PARAMS))),
        ("int8 too few scales", lambda: int8(np.ones(3), np.ones(N_PARAMS))),
        ("int8 short codes", lambda: int8(np.ones(-(-N_PARAMS // 256)), np.ones(N_PARAMS - 1))),
        ("float16 short", lambda: [push(codec="float16", arrays=[{"dtype": "<f2", "shape": [N_PARAMS - 1], "offset": 0}]),
                                   np.zeros(N_PARAMS - 1, "<f2").tobytes()]),
        ("float16 Inf", lambda: [push(codec="float16", arrays=[{"dtype": "<f2", "shape": [N_PARAMS], "offset": 0}]),
                                 np.full(N_PARAMS, np.inf, "<f2").tobytes()]),
        ("unknown codec", lambda: [push(codec=["zstd", 1, None, ""][int(rng.integers(4))]), good.tobytes()]),
    ]
    while True:
        kind, make = kinds[int(rng.integers(len(kinds)))]
        yield kind, make()


def test_server_survives_ten_thousand_hostile_messages_while_a_worker_trains(tmp_path, data_dir):
    procs = Processes(tmp_path, data_dir)
    try:
        server, endpoint = procs.start_server("--layers", LAYERS, "--data-shards", "1", "--epochs", "1000",
                                              "--schedule", "constant", "--lr", "0.05", "--no-shm")
        worker = procs.start("worker", "--connect", endpoint, "--transport", "zmq", "--max-steps", str(WORKER_STEPS),
                             log="worker", extra_env={"OPENBLAS_NUM_THREADS": "1"})
        ctx = zmq.Context.instance()
        evil = ctx.socket(zmq.DEALER)
        evil.setsockopt(zmq.LINGER, 0)
        evil.setsockopt(zmq.SNDHWM, 100_000)
        evil.connect(endpoint)
        # A hostile client that did say hello: its pushes get past "unknown worker".
        evil.send_multipart(encode({"type": "hello", "worker": "evil", "transport": "zmq", "seq": 1}))
        assert evil.poll(10_000), "no welcome"
        evil_id = msgpack.unpackb(evil.recv_multipart()[0])["worker_id"]
        rng = np.random.default_rng(0)
        sent = {}
        oversize = 0
        t0 = time.monotonic()
        gen = hostile_messages(rng, evil_id)
        for i in range(N_HOSTILE):
            kind, frames = next(gen)
            evil.send_multipart(frames)
            sent[kind] = sent.get(kind, 0) + 1
            if i % 500 == 0:
                while evil.poll(0):
                    evil.recv_multipart()  # drain error replies
            if i % 2000 == 1999:  # a frame over the size limit: zmq drops the connection; reconnect
                big = ctx.socket(zmq.DEALER)
                big.setsockopt(zmq.LINGER, 0)
                big.connect(endpoint)
                big.send_multipart([b"\x80", b"\0" * (N_PARAMS * 4 + 200_000)])
                big.close()
                oversize += 1
        elapsed = time.monotonic() - t0

        monitor = Client(endpoint, "monitor", server_wait=30)
        deadline = time.monotonic() + 120
        while True:  # the server works through its queue; the worker finishes
            stats = monitor.request({"type": "stats"})["stats"]
            if sum(stats["errors"].values()) >= N_HOSTILE and worker.poll() is not None:
                break
            assert time.monotonic() < deadline, (stats["errors"], procs.log("worker"))
            time.sleep(0.1)
        assert worker.wait(30) == 0, procs.log("worker")
        pushes = int(re.search(r"(\d+) pushes", procs.log("worker")).group(1))
        stats = monitor.request({"type": "stats"})["stats"]
        # the server is up, answering, and counted every hostile message
        assert sum(stats["errors"].values()) == N_HOSTILE, (stats["errors"], sent)
        # only the good worker's pushes moved the weights
        assert pushes == WORKER_STEPS and stats["version"] == pushes
        records = {str(r["worker_id"]): r for r in monitor.request({"type": "stats", "workers": True})["workers"]}
        assert stats["workers_known"] == len(records) == 2  # no refused hello registered anyone
        evil_record = next(w for w in records.values() if w["name"] == "evil")
        assert evil_record["pushes"] == 0
        params = monitor.request({"type": "pull"}).arrays[0]
        assert np.isfinite(params).all()
        assert oversize == N_HOSTILE // 2000 and elapsed < 120
        monitor.request({"type": "shutdown"})
        monitor.close()
        evil.close()
        assert server.wait(30) == 0
    finally:
        left = procs.cleanup()
        assert not left, f"processes left behind: {left}"
