"""Wire conformance: a real ``psgd server`` process, spoken to only as docs/protocol.md says.

Nothing of psgd's client side is imported here (no protocol encode/decode, no transport,
no client): the frames are built by hand with msgpack and numpy and sent over a raw pyzmq
DEALER socket, and the shared-memory path is driven with mmap, struct and a Unix socket.
Every row of the spec's error table is sent with a valid ``seq`` and must come back as an
``error`` with that code echoing that ``seq`` (only an unreadable header gets seq 0), and
nothing a refused message carries may change the weights or the membership.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import secrets
import socket
import struct
import time

import msgpack
import numpy as np
import pytest
import zmq

from cluster_util import Processes, doorbell_dirs, shm_segments

LAYERS = (784, 8, 10)
N = 784 * 8 + 8 + 8 * 10 + 10  # the flat vector: W1, b1, W2, b2
LR = 0.5
NUM_DATA_SHARDS = 4
HEADER_LIMIT = 65_536
MAX_STALENESS = 3
SERVER_ARGS = ("--layers", ",".join(map(str, LAYERS)), "--optimizer", "sgd", "--schedule", "constant",
               "--warmup", "0", "--lr", str(LR), "--staleness-rule", "none", "--data-shards", str(NUM_DATA_SHARDS),
               "--epochs", "1000", "--lease", "120", "--max-staleness", str(MAX_STALENESS))
_seqs = itertools.count(1000)


def next_seq() -> int:
    return next(_seqs)


def pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def message(kind: str, seq: int, arrays=(), **fields) -> list[bytes]:
    """Frames of one message: header + one raw little-endian frame per (array, offset)."""
    meta = [{"dtype": a.dtype.str, "shape": [a.size], "offset": off} for a, off in arrays]
    header = {"v": 2, "type": kind, "sender": "conformance", "seq": seq, "arrays": meta, **fields}
    return [pack(header)] + [a.tobytes() for a, _ in arrays]


class Raw:
    """A bare DEALER: send frames, read one reply as (header, arrays)."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)
        self.last_header_bytes = 0

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 10.0) -> tuple[dict, list[np.ndarray]]:
        assert self.sock.poll(int(timeout_s * 1000)), "no reply from the server"
        frames = self.sock.recv_multipart()
        self.last_header_bytes = len(frames[0])
        assert len(frames[0]) <= HEADER_LIMIT, f"a reply header of {len(frames[0])} bytes"
        header = msgpack.unpackb(frames[0], raw=False)
        assert type(header["v"]) is int and header["v"] == 2 and isinstance(header["seq"], int)
        assert len(header.get("arrays", [])) == len(frames) - 1
        arrays = [np.frombuffer(f, np.dtype(m["dtype"])) for m, f in zip(header["arrays"], frames[1:])]
        for m, a in zip(header["arrays"], arrays):
            assert m["shape"] == [a.size] and isinstance(m["offset"], int)
        return header, arrays

    def request(self, frames: list[bytes]) -> tuple[dict, list[np.ndarray]]:
        seq = msgpack.unpackb(frames[0], raw=False)["seq"]
        self.send(frames)
        header, arrays = self.recv()
        assert header["seq"] == seq, (header, seq)
        return header, arrays

    def call(self, kind: str, arrays=(), **fields) -> tuple[dict, list[np.ndarray]]:
        return self.request(message(kind, next_seq(), arrays, **fields))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    procs = Processes(tmp_path_factory.mktemp("conformance"), data_dir)
    try:
        proc, endpoint = procs.start_server(*SERVER_ARGS)
        yield proc, endpoint
        ctx = zmq.Context.instance()
        raw = Raw(ctx, endpoint)
        assert raw.call("shutdown")[0]["type"] == "ok"
        raw.close()
        assert proc.wait(30) == 0, procs.log("server")
    finally:
        left = procs.cleanup()
    assert not left, f"processes left behind: {left}"
    # (other test runs may share this machine: look only at what this server and this test made)
    mine = f"-{proc.pid}-", f"-{os.getpid()}-"
    assert not [s for s in shm_segments() if any(m in s for m in mine)], "shared-memory segments left behind"
    assert not [d for d in doorbell_dirs() if f"-{proc.pid}-" in d], "doorbell folders left behind"


@pytest.fixture
def raw(server):
    client = Raw(zmq.Context.instance(), server[1])
    yield client
    client.close()


def hello(raw: Raw, name: str = "conformance", transport: str = "zmq", **fields) -> dict:
    welcome, _ = raw.call("hello", worker=name, transport=transport, **fields)
    assert welcome["type"] == "welcome", welcome
    return welcome


def pull(raw: Raw) -> tuple[int, np.ndarray]:
    params, arrays = raw.call("pull")
    assert params["type"] == "params" and len(arrays) == 1 and params["arrays"][0]["offset"] == 0
    return params["version"], arrays[0].copy()


def summary(raw: Raw) -> dict:
    reply, _ = raw.call("stats")
    assert reply["type"] == "stats_reply" and "workers" not in reply
    return reply["stats"]


def all_records(raw: Raw) -> list[dict]:
    records, after, pages = [], None, 0
    while True:
        reply, _ = raw.call("stats", workers=True, after=after)
        assert reply["type"] == "stats_reply" and len(reply["workers"]) <= 128
        assert all(r["worker_id"] > (after if after is not None else -1) for r in reply["workers"])
        records += reply["workers"]
        pages += 1
        after = reply["next"]
        if after is None:
            ids = [r["worker_id"] for r in records]
            assert ids == sorted(set(ids))
            return records


# --- the happy path ---------------------------------------------------------------------


def test_hello_pull_push_ack_heartbeat_stats_bye(raw):
    welcome = hello(raw, "happy")
    wid = welcome["worker_id"]
    assert welcome["range"] == [0, N] and welcome["server_shard"] == 0 and welcome["num_server_shards"] == 1
    assert welcome["model"]["sizes"] == list(LAYERS) and welcome["model"]["dtype"] == "float32"
    assert welcome["update"] == {"lr": LR, "staleness_rule": "none", "dc_lambda": welcome["update"]["dc_lambda"],
                                 "momentum_rule": "fixed",  # plain SGD has no momentum to adapt
                                 "consistency": "async", "ssp_bound": welcome["update"]["ssp_bound"],
                                 "max_staleness": MAX_STALENESS}
    assert welcome["optimizer"]["name"] == "sgd" and welcome["num_data_shards"] == NUM_DATA_SHARDS
    assert len(welcome["data_shards"]) == 1 and 0 <= welcome["data_shards"][0] < NUM_DATA_SHARDS
    # the layout tiles the flat vector: W1 (784x8), b1, W2 (8x10), b2
    slots = welcome["layout"]
    assert [dims for _, dims, _ in slots] == [[784, 8], [8], [8, 10], [10]]
    assert [off for *_, off in slots] == [0, 6272, 6280, 6360]

    v0, w0 = pull(raw)
    rng = np.random.default_rng(1)
    g = (rng.standard_normal(N) * 0.01).astype("<f4")
    push_seq = next_seq()
    ack, arrays = raw.request(message("push", push_seq, [(g, 0)], worker_id=wid, base_version=v0, examples=32))
    assert ack["type"] == "ack" and ack["version"] == v0 + 1 and ack["staleness"] == 0 and not arrays
    assert isinstance(ack["data_generation"], int)
    v1, w1 = pull(raw)
    assert v1 == v0 + 1
    np.testing.assert_allclose(w1, w0 - np.float32(LR) * g, rtol=1e-6, atol=1e-7)  # sgd, rule none: w -= lr * g

    # the same push again (a retry after a lost ack: same seq): the same ack, applied once
    again, _ = raw.request(message("push", push_seq, [(g, 0)], worker_id=wid, base_version=v0, examples=32))
    assert (again["type"], again["version"], again["staleness"]) == ("ack", v0 + 1, 0)
    version, w = pull(raw)
    assert version == v1 and np.array_equal(w, w1)

    # a new push of the same frames (new seq) is a new push; stale by one; want_params
    ack, arrays = raw.call("push", [(g, 0)], worker_id=wid, base_version=v0, examples=32, want_params=True)
    assert ack["version"] == v0 + 2 and ack["staleness"] == 1 and len(arrays) == 1
    np.testing.assert_allclose(arrays[0], w1 - np.float32(LR) * g, rtol=1e-6, atol=1e-7)
    assert pull(raw)[0] == v0 + 2

    assignment, _ = raw.call("heartbeat", worker_id=wid)
    assert assignment == {**assignment, "type": "assignment", "data_shards": welcome["data_shards"]}
    pulled, arrays = raw.call("pull", worker_id=wid)
    assert pulled["type"] == "params" and pulled["version"] == v0 + 2

    stats = summary(raw)
    assert stats["version"] == v0 + 2 and stats["lr"] == LR and stats["staleness_rule"] == "none"
    assert stats["workers_connected"] >= 1 and stats["workers_known"] >= 1
    assert stats["staleness"]["counts"][0] >= 1 and stats["staleness"]["counts"][1] >= 1
    records = {r["worker_id"]: r for r in all_records(raw)}
    mine = records[wid]
    assert mine["name"] == "happy" and mine["pushes"] == 2 and mine["examples"] == 64 and mine["refused"] == 0
    assert mine["transport"] == "zmq" and mine["connected"] and not mine["expired"]
    assert mine["data_shards"] == welcome["data_shards"] and mine["examples_per_s"] > 0
    assert 0 <= mine["last_seen_s_ago"] < 60

    assert raw.call("bye", worker_id=wid)[0]["type"] == "ok"
    records = {r["worker_id"]: r for r in all_records(raw)}
    assert not records[wid]["connected"]


def test_describe_set_lr_pause_resume(raw):
    described, _ = raw.call("describe")
    assert described["type"] == "description" and isinstance(described["config"], dict)
    assert raw.call("set_lr", lr=LR)[0]["type"] == "ok"
    assert summary(raw)["lr"] == LR and summary(raw)["coordinated"]
    assert raw.call("pause")[0]["type"] == "ok" and summary(raw)["paused"]
    assert raw.call("resume")[0]["type"] == "ok" and not summary(raw)["paused"]


# --- every row of the error table, with a valid seq -----------------------------------


@pytest.fixture(scope="module")
def worker_id(server):
    raw = Raw(zmq.Context.instance(), server[1])
    try:
        return hello(raw, "target")["worker_id"]
    finally:
        raw.close()


GOOD = np.zeros(N, "<f4")


def push_frames(seq, wid, arrays=None, frames=None, **fields):
    header = {"v": 2, "type": "push", "sender": "conformance", "seq": seq, "worker_id": wid, "base_version": 0,
              "examples": 1, "arrays": [{"dtype": "<f4", "shape": [N], "offset": 0}]}
    if arrays is not None:
        header["arrays"] = arrays
    header.update(fields)
    header = {k: v for k, v in header.items() if v is not _ABSENT}
    return [pack(header)] + (frames if frames is not None else [GOOD.tobytes()])


_ABSENT = object()


def hello_frames(seq, **fields):
    return message("hello", seq, worker="intruder", transport="zmq", **fields)


# (row name, frames(seq, worker_id), code). Every row but bad_header carries a valid seq
# that the error reply must echo.
ROWS = [
    # bad_frames
    ("push without its array frame", lambda s, w: push_frames(s, w, frames=[]), "bad_frames"),
    ("push with an unlisted frame", lambda s, w: push_frames(s, w, frames=[GOOD.tobytes(), b"x"]), "bad_frames"),
    ("push split over two arrays", lambda s, w: push_frames(
        s, w, arrays=[{"dtype": "<f4", "shape": [N - 10], "offset": 0}, {"dtype": "<f4", "shape": [10], "offset": N - 10}],
        frames=[GOOD[:N - 10].tobytes(), GOOD[N - 10:].tobytes()]), "bad_frames"),
    ("pull with an extra array", lambda s, w: message("pull", s, [(GOOD, 0)]), "bad_frames"),
    ("stats with an extra array", lambda s, w: message("stats", s, [(GOOD[:4], 0)]), "bad_frames"),
    ("arrays not a list", lambda s, w: push_frames(s, w, arrays={"dtype": "<f4"}), "bad_frames"),
    # bad_version
    ("v 1", lambda s, w: push_frames(s, w, v=1), "bad_version"),
    ("v 2.0", lambda s, w: push_frames(s, w, v=2.0), "bad_version"),
    ("v true", lambda s, w: push_frames(s, w, v=True), "bad_version"),
    ("v '2'", lambda s, w: push_frames(s, w, v="2"), "bad_version"),
    ("v missing", lambda s, w: push_frames(s, w, v=_ABSENT), "bad_version"),
    # bad_type
    ("unknown type", lambda s, w: push_frames(s, w, type="drop_tables"), "bad_type"),
    ("type a server does not take", lambda s, w: message("ok", s), "bad_type"),
    ("type missing", lambda s, w: push_frames(s, w, type=_ABSENT), "bad_type"),
    # bad_field
    ("examples missing", lambda s, w: push_frames(s, w, examples=_ABSENT), "bad_field"),
    ("examples true", lambda s, w: push_frames(s, w, examples=True), "bad_field"),
    ("examples 2.0", lambda s, w: push_frames(s, w, examples=2.0), "bad_field"),
    ("examples 0", lambda s, w: push_frames(s, w, examples=0), "bad_field"),
    ("examples 2^20 + 1", lambda s, w: push_frames(s, w, examples=(1 << 20) + 1), "bad_field"),
    ("worker_id a string", lambda s, w: push_frames(s, w, worker_id=str(w)), "bad_field"),
    ("sender missing", lambda s, w: push_frames(s, w, sender=_ABSENT), "bad_field"),
    ("want_params 'yes'", lambda s, w: push_frames(s, w, want_params="yes"), "bad_field"),
    ("want_params 1", lambda s, w: push_frames(s, w, want_params=1), "bad_field"),
    ("want_params nil", lambda s, w: push_frames(s, w, want_params=None), "bad_field"),
    ("data_shards 'x'", lambda s, w: hello_frames(s, data_shards="x"), "bad_field"),
    ("data_shards [-1]", lambda s, w: hello_frames(s, data_shards=[-1]), "bad_field"),
    ("data_shards [99]", lambda s, w: hello_frames(s, data_shards=[99]), "bad_field"),
    ("data_shards [num_data_shards]", lambda s, w: hello_frames(s, data_shards=[NUM_DATA_SHARDS]), "bad_field"),
    ("data_shards [0, 0]", lambda s, w: hello_frames(s, data_shards=[0, 0]), "bad_field"),
    ("data_shards [1.5]", lambda s, w: hello_frames(s, data_shards=[1.5]), "bad_field"),
    ("data_shards [true]", lambda s, w: hello_frames(s, data_shards=[True]), "bad_field"),
    ("transport 'pigeon'", lambda s, w: message("hello", s, worker="intruder", transport="pigeon"), "bad_field"),
    ("hello without worker", lambda s, w: message("hello", s, transport="zmq"), "bad_field"),
    ("a welcome sent to the server", lambda s, w: message("welcome", s), "bad_type"),
    ("params sent to the server", lambda s, w: message("params", s, version=1), "bad_type"),
    ("pull worker_id 'me'", lambda s, w: message("pull", s, worker_id="me"), "bad_field"),
    ("bye worker_id 1.0", lambda s, w: message("bye", s, worker_id=1.0), "bad_field"),
    ("heartbeat without worker_id", lambda s, w: message("heartbeat", s), "bad_field"),
    ("stats workers 'yes'", lambda s, w: message("stats", s, workers="yes"), "bad_field"),
    ("stats after 'x'", lambda s, w: message("stats", s, workers=True, after="x"), "bad_field"),
    ("set_lr NaN", lambda s, w: message("set_lr", s, lr=float("nan")), "bad_field"),
    ("set_lr negative", lambda s, w: message("set_lr", s, lr=-1.0), "bad_field"),
    ("set_lr a string", lambda s, w: message("set_lr", s, lr="fast"), "bad_field"),
    # bad_array
    ("dtype <i4", lambda s, w: push_frames(s, w, arrays=[{"dtype": "<i4", "shape": [N], "offset": 0}]), "bad_array"),
    ("dtype <f8, not the model's", lambda s, w: push_frames(
        s, w, arrays=[{"dtype": "<f8", "shape": [N], "offset": 0}], frames=[np.zeros(N, "<f8").tobytes()]), "bad_array"),
    ("2-D shape", lambda s, w: push_frames(s, w, arrays=[{"dtype": "<f4", "shape": [2, N // 2], "offset": 0}]),
     "bad_array"),
    ("negative offset", lambda s, w: push_frames(s, w, arrays=[{"dtype": "<f4", "shape": [N], "offset": -1}]),
     "bad_array"),
    ("frame shorter than its shape", lambda s, w: push_frames(s, w, frames=[GOOD[:-1].tobytes()]), "bad_array"),
    ("array entry not a map", lambda s, w: push_frames(s, w, arrays=[7]), "bad_array"),
    # bad_range
    ("offset 1", lambda s, w: push_frames(s, w, arrays=[{"dtype": "<f4", "shape": [N], "offset": 1}]), "bad_range"),
    ("one short", lambda s, w: push_frames(s, w, arrays=[{"dtype": "<f4", "shape": [N - 1], "offset": 0}],
                                           frames=[GOOD[:-1].tobytes()]), "bad_range"),
    # unknown_worker
    ("push from a stranger", lambda s, w: push_frames(s, w + 99_999), "unknown_worker"),
    ("heartbeat from a stranger", lambda s, w: message("heartbeat", s, worker_id=w + 99_999), "unknown_worker"),
    ("pull from a stranger", lambda s, w: message("pull", s, worker_id=w + 99_999), "unknown_worker"),
    # future_version
    ("base_version from the future", lambda s, w: push_frames(s, w, base_version=10**9), "future_version"),
    ("negative base_version", lambda s, w: push_frames(s, w, base_version=-1), "future_version"),
    # not_finite
    ("NaN gradient", lambda s, w: push_frames(s, w, frames=[np.full(N, np.nan, "<f4").tobytes()]), "not_finite"),
    ("Inf gradient", lambda s, w: push_frames(s, w, frames=[np.where(np.arange(N) == 5, np.inf, 0).astype("<f4")
                                                             .tobytes()]), "not_finite"),
    ("overflowing norm", lambda s, w: push_frames(s, w, frames=[np.full(N, 3e38, "<f4").tobytes()]), "not_finite"),
]
# too_many_workers has its own test below (it needs 4,096 workers); too_stale too (it needs
# versions to go by).


def fingerprint(raw: Raw) -> tuple:
    version, w = pull(raw)
    stats = summary(raw)
    return version, hashlib.sha256(w.tobytes()).hexdigest(), stats["workers_known"], stats["workers_connected"]


@pytest.mark.parametrize("name,make,code", ROWS, ids=[r[0] for r in ROWS])
def test_every_error_echoes_its_seq_and_changes_nothing(raw, worker_id, name, make, code):
    before = fingerprint(raw)
    errors_before = summary(raw)["errors"].get(code, 0)
    seq = next_seq()
    raw.send(make(seq, worker_id))
    reply, arrays = raw.recv()
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert reply["seq"] == seq, f"{name}: the error came back with seq {reply['seq']}, not {seq}"
    assert isinstance(reply["message"], str) and not arrays
    assert fingerprint(raw) == before
    assert summary(raw)["errors"].get(code, 0) == errors_before + 1


UNREADABLE = [
    ("not msgpack", [b"\xc1\xff\x00garbage"]),
    ("truncated header", [pack({"v": 2, "type": "stats", "sender": "", "seq": 77, "arrays": []})[:-3]]),
    ("not a map", [pack([2, "stats", 77])]),
    ("header over 64 KiB", [pack({"v": 2, "type": "stats", "sender": "x" * HEADER_LIMIT, "seq": 77, "arrays": []})]),
]


def test_a_push_staler_than_the_bound_is_too_stale_and_changes_nothing(raw):
    wid = hello(raw, "laggard")["worker_id"]
    base, _ = pull(raw)
    g = np.full(N, 1e-4, "<f4")
    for _ in range(MAX_STALENESS + 1):  # others' updates go by
        version, _ = pull(raw)
        assert raw.call("push", [(g, 0)], worker_id=wid, base_version=version, examples=1)[0]["type"] == "ack"
    before = fingerprint(raw)
    seq = next_seq()
    reply, _ = raw.request(message("push", seq, [(g, 0)], worker_id=wid, base_version=base, examples=1))
    assert (reply["type"], reply["code"], reply["seq"]) == ("error", "too_stale", seq), reply
    assert fingerprint(raw) == before and summary(raw)["max_staleness"] == MAX_STALENESS
    raw.call("bye", worker_id=wid)


@pytest.mark.parametrize("name,frames", UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_an_unreadable_header_is_bad_header_with_seq_0(raw, name, frames):
    raw.send(frames)
    reply, _ = raw.recv()
    assert (reply["type"], reply["code"], reply["seq"]) == ("error", "bad_header", 0)


def test_a_seq_that_is_no_int_is_answered_with_seq_0(raw):
    raw.send(message("stats", "7"))
    reply, _ = raw.recv()
    assert (reply["type"], reply["code"], reply["seq"]) == ("error", "bad_field", 0)


# --- 4,096 workers: too_many_workers, and stats within the header limit ------------------


def test_4096_workers_stats_stay_within_the_header_limit_and_the_next_hello_is_refused(tmp_path, data_dir):
    procs = Processes(tmp_path, data_dir)
    try:
        server, endpoint = procs.start_server("--layers", "784,2,10", "--optimizer", "sgd", "--schedule", "constant",
                                         "--warmup", "0", "--lr", "0.001", "--data-shards", "64", "--epochs", "1000",
                                         "--lease", "600", "--no-shm")
        raw = Raw(zmq.Context.instance(), endpoint)
        n = 784 * 2 + 2 + 2 * 10 + 10
        g = np.full(n, 1e-3, "<f4")
        summary(raw)
        empty_bytes = raw.last_header_bytes
        ids, batch = [], 256  # in batches: the server's send queue per peer is bounded
        for start in range(0, 4096, batch):
            seqs = {}
            for i in range(start, start + batch):
                seqs[next_seq()] = i
                raw.send(message("hello", list(seqs)[-1], worker=f"w{i:05d}-" + "x" * 57, transport="zmq"))
            for _ in seqs:
                welcome, _ = raw.recv()
                assert welcome["type"] == "welcome" and welcome["seq"] in seqs
                ids.append(welcome["worker_id"])
            for wid in ids[start:]:  # every worker pushes once, so that its record holds counts
                raw.send(message("push", next_seq(), [(g, 0)], worker_id=wid, base_version=0, examples=128))
            for _ in seqs:
                assert raw.recv()[0]["type"] == "ack"
        seq = next_seq()
        reply, _ = raw.request(message("hello", seq, worker="one too many", transport="zmq"))
        assert (reply["type"], reply["code"], reply["seq"]) == ("error", "too_many_workers", seq)

        stats = summary(raw)
        summary_bytes = raw.last_header_bytes
        assert stats["workers_connected"] == 4096 and stats["workers_known"] == 4096 and stats["version"] == 4096
        # the summary does not grow with the workers (a few counters gain digits)
        assert summary_bytes < empty_bytes + 256, (empty_bytes, summary_bytes)
        records, after, biggest, pages = [], None, 0, 0
        while True:
            reply, _ = raw.call("stats", workers=True, after=after)
            biggest = max(biggest, raw.last_header_bytes)
            pages += 1
            records += reply["workers"]
            after = reply["next"]
            if after is None:
                break
        assert biggest <= HEADER_LIMIT and sorted(r["worker_id"] for r in records) == sorted(ids)
        assert all(r["pushes"] == 1 and r["examples"] == 128 for r in records)
        print(f"\n4,096 workers: summary {summary_bytes} bytes (at 0 workers {empty_bytes}), "
              f"{pages} pages of per-worker records, the largest {biggest} bytes")
        assert raw.call("shutdown")[0]["type"] == "ok"
        raw.close()
        assert server.wait(30) == 0, procs.log("server")
    finally:
        left = procs.cleanup()
    assert not left


# --- the shared-memory path, from the spec alone -----------------------------------------

DOORBELL = struct.Struct("<QII")


def seqlock_read(mm: mmap.mmap, n: int) -> tuple[int, np.ndarray]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seq0, = struct.unpack_from("<Q", mm, 0)
        if seq0 % 2 == 0:
            version, = struct.unpack_from("<Q", mm, 8)
            w = np.frombuffer(mm, "<f4", n, 64).copy()
            if struct.unpack_from("<Q", mm, 0)[0] == seq0:
                return version, w
        time.sleep(0.0005)
    raise AssertionError("no consistent read in 10 s")


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no /dev/shm")
def test_shared_memory_handshake_doorbell_ack_and_a_malformed_doorbell_closes(raw):
    welcome = hello(raw, "local", transport="shm")
    wid, local = welcome["worker_id"], welcome["local"]
    weights_path = os.path.join("/dev/shm", local["weights"])
    nbytes = 64 + N * 4
    with open(weights_path, "r+b") as f:
        assert os.fstat(f.fileno()).st_size == nbytes
        weights = mmap.mmap(f.fileno(), nbytes)
    grad_name = f"psgd-grad-{os.getpid()}-{secrets.token_hex(4)}"
    grad_path = os.path.join("/dev/shm", grad_name)
    fd = os.open(grad_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    bell = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bell.settimeout(10)
    try:
        assert struct.unpack_from("<Q", weights, 16)[0] == local["nonce"]
        os.ftruncate(fd, nbytes)
        grad = mmap.mmap(fd, nbytes)
        bell.connect(local["doorbell"])
        bell.send(pack({"v": 1, "worker_id": wid, "nonce": local["nonce"], "grad": grad_name}))
        version, staleness, word = DOORBELL.unpack(bell.recv(64))
        assert word & 0xFF == 0 and staleness == 0
        assert not os.path.exists(grad_path)  # the server mapped it and unlinked the name

        v0, w0 = seqlock_read(weights, N)
        g = (np.random.default_rng(2).standard_normal(N) * 0.01).astype("<f4")
        np.frombuffer(grad, "<f4", N, 64)[:] = g
        bell.send(DOORBELL.pack(v0, 16, 0))
        version, staleness, word = DOORBELL.unpack(bell.recv(64))
        assert (version, staleness, word & 0xFF) == (v0 + 1, 0, 0)
        v1, w1 = seqlock_read(weights, N)
        assert v1 == v0 + 1
        np.testing.assert_allclose(w1, w0 - np.float32(LR) * g, rtol=1e-6, atol=1e-7)

        np.frombuffer(grad, "<f4", N, 64)[:5] = np.nan  # refused: status 1, nothing applied
        bell.send(DOORBELL.pack(v1, 16, 0))
        version, staleness, word = DOORBELL.unpack(bell.recv(64))
        assert word & 0xFF == 1 and version == v1 and seqlock_read(weights, N)[0] == v1

        record = {r["worker_id"]: r for r in all_records(raw)}[wid]
        assert record["transport"] == "shm" and record["connected"] and record["pushes"] == 1
        doorbell_errors = summary(raw)["errors"].get("bad_doorbell", 0)
        bell.send(b"\x00" * 8)  # not 16 bytes: the server closes the connection
        assert bell.recv(64) == b""
        deadline = time.monotonic() + 10
        while {r["worker_id"]: r for r in all_records(raw)}[wid]["connected"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert summary(raw)["errors"].get("bad_doorbell", 0) == doorbell_errors + 1
        grad.close()
    finally:
        bell.close()
        os.close(fd)
        if os.path.exists(grad_path):
            os.unlink(grad_path)
        weights.close()


def _grad_segment(nbytes: int) -> tuple[str, int, mmap.mmap]:
    name = f"psgd-grad-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(os.path.join("/dev/shm", name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, nbytes)
    return name, fd, mmap.mmap(fd, nbytes)


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no /dev/shm")
def test_doorbell_version_2_takes_two_gradient_segments_named_by_the_ring_flags(raw):
    """A worker that overlaps its steps with its pushes computes into one segment while
    the server reads the other: each ring's flags bit 0 says which."""
    welcome = hello(raw, "two-segments", transport="shm")
    wid, local = welcome["worker_id"], welcome["local"]
    nbytes = 64 + N * 4
    with open(os.path.join("/dev/shm", local["weights"]), "r+b") as f:
        weights = mmap.mmap(f.fileno(), nbytes)
    segments = [_grad_segment(nbytes) for _ in range(2)]
    bell = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bell.settimeout(10)
    try:
        bell.connect(local["doorbell"])
        bell.send(pack({"v": 2, "worker_id": wid, "nonce": local["nonce"], "grad": segments[0][0],
                        "grad2": segments[1][0]}))
        assert DOORBELL.unpack(bell.recv(64))[2] & 0xFF == 0
        rng = np.random.default_rng(5)
        for slot in (1, 0, 1):
            v0, w0 = seqlock_read(weights, N)
            g = (rng.standard_normal(N) * 0.01).astype("<f4")
            np.frombuffer(segments[slot][2], "<f4", N, 64)[:] = g
            np.frombuffer(segments[1 - slot][2], "<f4", N, 64)[:] = np.nan  # the other one: must not be read
            bell.send(DOORBELL.pack(v0, 8, slot))
            version, _, word = DOORBELL.unpack(bell.recv(64))
            assert (version, word & 0xFF) == (v0 + 1, 0)
            np.testing.assert_allclose(seqlock_read(weights, N)[1], w0 - np.float32(LR) * g, rtol=1e-6, atol=1e-7)
        before = summary(raw)["errors"].get("bad_doorbell", 0)
        bell.send(DOORBELL.pack(version, 8, 2))  # a flags bit with no meaning: malformed
        assert bell.recv(64) == b""
        assert summary(raw)["errors"].get("bad_doorbell", 0) == before + 1
    finally:
        bell.close()
        for name, fd, segment in segments:
            segment.close()
            os.close(fd)
            if os.path.exists(os.path.join("/dev/shm", name)):
                os.unlink(os.path.join("/dev/shm", name))
        weights.close()


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no /dev/shm")
def test_a_ring_naming_a_second_segment_that_version_1_never_gave_closes_the_doorbell(raw):
    welcome = hello(raw, "one-segment", transport="shm")
    nbytes = 64 + N * 4
    name, fd, segment = _grad_segment(nbytes)
    bell = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bell.settimeout(10)
    try:
        bell.connect(welcome["local"]["doorbell"])
        bell.send(pack({"v": 1, "worker_id": welcome["worker_id"], "nonce": welcome["local"]["nonce"], "grad": name}))
        version = DOORBELL.unpack(bell.recv(64))[0]
        bell.send(DOORBELL.pack(version, 8, 1))
        assert bell.recv(64) == b""
    finally:
        bell.close()
        segment.close()
        os.close(fd)
        if os.path.exists(os.path.join("/dev/shm", name)):
            os.unlink(os.path.join("/dev/shm", name))


def test_a_malformed_handshake_closes_the_doorbell(raw):
    welcome = hello(raw, "bad-handshake", transport="shm")
    bell = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bell.settimeout(10)
    try:
        bell.connect(welcome["local"]["doorbell"])
        bell.send(pack({"v": 1, "worker_id": welcome["worker_id"], "nonce": welcome["local"]["nonce"] + 1,
                        "grad": "nope"}))  # a wrong nonce
        assert bell.recv(64) == b""
    finally:
        bell.close()


@pytest.mark.parametrize("handshake", [b"\x93\x01\x02\x03", pack({"worker_id": 1, "nonce": 2, "grad": "g"}),
                                       pack({"v": 1.0, "worker_id": 1, "nonce": 2, "grad": "g"}), b"\xc1"],
                         ids=["not a map", "no v", "float v", "not msgpack"])
def test_a_handshake_of_the_wrong_form_closes_the_doorbell(raw, handshake):
    welcome = hello(raw, "bad-form", transport="shm")
    before = summary(raw)["errors"].get("bad_doorbell", 0)
    bell = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bell.settimeout(10)
    try:
        bell.connect(welcome["local"]["doorbell"])
        bell.send(handshake)
        assert bell.recv(64) == b""
    finally:
        bell.close()
    assert summary(raw)["errors"].get("bad_doorbell", 0) == before + 1
