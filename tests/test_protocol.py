"""The wire protocol: round trips of every message type, and hostile frames refused."""

import msgpack
import numpy as np
import pytest

from psgd.errors import ProtocolError
from psgd.wire.protocol import MAX_HEADER_BYTES, MESSAGE_TYPES, PROTOCOL_VERSION, SCHEMAS, decode, encode

EXAMPLES = {
    "hello": {"worker": "w0", "transport": "auto", "data_shards": None},
    "welcome": {"worker_id": 3, "model": {"sizes": [4, 3]}, "optimizer": {"name": "sgd"}, "run": {"data": "mnist"},
                "version": 7, "data_shards": [1], "num_data_shards": 2, "data_generation": 0, "range": [0, 15],
                "server_shard": 0, "num_server_shards": 1, "layout": [["W1", [4, 3], 0]]},
    "pull": {"worker_id": 3},
    "params": {"version": 9},
    "push": {"worker_id": 3, "base_version": 8, "examples": 128, "want_params": True},
    "ack": {"version": 9, "staleness": 1, "data_generation": 0},
    "heartbeat": {"worker_id": 3},
    "assignment": {"data_shards": [0, 2], "data_generation": 1},
    "stats": {},
    "stats_reply": {"stats": {"version": 9}},
    "set_lr": {"lr": 0.02},
    "set_params": {},
    "describe": {},
    "description": {"config": {"epochs": 3}},
    "ok": {},
    "bye": {"worker_id": 3},
    "shutdown": {},
    "pause": {},
    "resume": {},
    "error": {"code": "not_finite", "message": "NaN"},
}
WITH_ARRAY = {"params", "push", "set_params"}


def test_every_message_type_has_an_example():
    assert set(EXAMPLES) == MESSAGE_TYPES == set(SCHEMAS)


@pytest.mark.parametrize("kind", sorted(MESSAGE_TYPES))
def test_round_trip(kind):
    arrays = [np.arange(15, dtype=np.float32)] if kind in WITH_ARRAY else []
    frames = encode({"type": kind, "sender": "t", "seq": 5, **EXAMPLES[kind]}, arrays, [4] * len(arrays))
    frames = [bytes(f) for f in frames]  # as they arrive from a socket
    msg = decode(frames)
    assert msg.type == kind and msg["seq"] == 5 and msg["v"] == PROTOCOL_VERSION
    for key, value in EXAMPLES[kind].items():
        assert msg[key] == value
    assert len(msg.arrays) == len(arrays)
    for got, sent in zip(msg.arrays, arrays):
        assert np.array_equal(got, sent) and got.dtype == sent.dtype and not got.flags.writeable
    if arrays:
        assert msg.offset(0) == 4


def test_array_frames_are_raw_bytes_not_copied_into_the_header():
    grad = np.ones(100_000, np.float32)
    frames = encode({"type": "push", **EXAMPLES["push"]}, [grad])
    assert len(frames[0]) < 300 and len(frames[1]) == grad.nbytes
    assert np.shares_memory(np.frombuffer(frames[1], np.float32), grad)  # no copy on the way out


def header(**fields):
    base = {"v": PROTOCOL_VERSION, "type": "push", "sender": "x", "seq": 1, **EXAMPLES["push"],
            "arrays": [{"dtype": "<f4", "shape": [4], "offset": 0}]}
    base.update(fields)
    return msgpack.packb(base)


GOOD_ARRAY = np.zeros(4, np.float32).tobytes()

HOSTILE = [
    ("empty", [], "bad_frames"),
    ("random bytes", [b"\xc1\xff\x00garbage"], "bad_header"),
    ("not a map", [msgpack.packb([1, 2, 3])], "bad_header"),
    ("truncated header", [header()[:-3], GOOD_ARRAY], "bad_header"),
    ("oversize header", [msgpack.packb({"v": 1, "pad": "x" * (MAX_HEADER_BYTES + 1)})], "bad_header"),
    ("wrong version", [header(v=99), GOOD_ARRAY], "bad_version"),
    ("no version", [msgpack.packb({"type": "stats", "sender": "", "seq": 0})], "bad_version"),
    ("unknown type", [header(type="rm -rf"), GOOD_ARRAY], "bad_type"),
    ("missing field", [header(base_version=None), GOOD_ARRAY], "bad_field"),
    ("bool for int", [header(examples=True), GOOD_ARRAY], "bad_field"),
    ("string seq", [header(seq="1"), GOOD_ARRAY], "bad_field"),
    ("missing array frame", [header()], "bad_frames"),
    ("extra frame", [header(), GOOD_ARRAY, GOOD_ARRAY], "bad_frames"),
    ("lying shape", [header(arrays=[{"dtype": "<f4", "shape": [5], "offset": 0}]), GOOD_ARRAY], "bad_array"),
    ("2-D shape", [header(arrays=[{"dtype": "<f4", "shape": [2, 2], "offset": 0}]), GOOD_ARRAY], "bad_array"),
    ("negative shape", [header(arrays=[{"dtype": "<f4", "shape": [-4], "offset": 0}]), GOOD_ARRAY], "bad_array"),
    ("object dtype", [header(arrays=[{"dtype": "|O", "shape": [4], "offset": 0}]), GOOD_ARRAY], "bad_array"),
    ("int dtype", [header(arrays=[{"dtype": "<i4", "shape": [4], "offset": 0}]), GOOD_ARRAY], "bad_array"),
    ("negative offset", [header(arrays=[{"dtype": "<f4", "shape": [4], "offset": -1}]), GOOD_ARRAY], "bad_array"),
    ("array desc not a map", [header(arrays=[7]), GOOD_ARRAY], "bad_array"),
    ("too many arrays", [header(arrays=[{}] * 17)] + [GOOD_ARRAY] * 17, "bad_frames"),
    ("push split over two arrays", [header(arrays=[{"dtype": "<f4", "shape": [2], "offset": 0}] * 2),
                                    GOOD_ARRAY[:8], GOOD_ARRAY[8:]], "bad_frames"),
    ("pull with an array", [msgpack.packb({"v": PROTOCOL_VERSION, "type": "pull", "sender": "", "seq": 1,
                                           "arrays": [{"dtype": "<f4", "shape": [4], "offset": 0}]}), GOOD_ARRAY],
     "bad_frames"),
    ("float version", [header(v=float(PROTOCOL_VERSION)), GOOD_ARRAY], "bad_version"),
    ("bool version", [header(v=True), GOOD_ARRAY], "bad_version"),
    ("want_params a string", [header(want_params="yes"), GOOD_ARRAY], "bad_field"),
    ("want_params nil", [header(want_params=None), GOOD_ARRAY], "bad_field"),
    ("float examples", [header(examples=2.0), GOOD_ARRAY], "bad_field"),
]


def _hello(**fields):
    return [msgpack.packb({"v": PROTOCOL_VERSION, "type": "hello", "sender": "", "seq": 5, "worker": "w",
                           "transport": "zmq", **fields})]


@pytest.mark.parametrize("shards", ["x", [-1], [0, 0], [1.5], [True], 3, {"0": 1}])
def test_malformed_data_shards_are_bad_field(shards):
    with pytest.raises(ProtocolError) as err:
        decode(_hello(data_shards=shards))
    assert err.value.code == "bad_field" and err.value.seq == 5


@pytest.mark.parametrize("shards", [None, [], [0], [3, 1]])
def test_wellformed_data_shards_pass(shards):
    assert decode(_hello(data_shards=shards))["data_shards"] == shards


@pytest.mark.parametrize("name,frames,code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_readable_header_gives_its_seq_to_the_error(name, frames, code):
    with pytest.raises(ProtocolError) as err:
        decode(frames)
    readable = code != "bad_header" and name not in ("empty", "string seq")
    assert err.value.seq == ((0 if name == "no version" else 1) if readable else None)


@pytest.mark.parametrize("name,frames,code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_frames_are_refused_with_the_right_code(name, frames, code):
    with pytest.raises(ProtocolError) as err:
        decode(frames)
    assert err.value.code == code


def test_fuzzed_frames_only_ever_raise_protocol_errors():
    rng = np.random.default_rng(0)
    good = encode({"type": "push", **EXAMPLES["push"]}, [np.ones(8, np.float32)])
    good = [bytes(f) for f in good]
    for _ in range(3000):
        frames = [bytearray(f) for f in good]
        i = rng.integers(len(frames))
        if len(frames[i]):
            for _ in range(rng.integers(1, 4)):
                frames[i][rng.integers(len(frames[i]))] = rng.integers(256)
        if rng.random() < 0.2:
            frames[i] = frames[i][: rng.integers(len(frames[i]) + 1)]
        try:
            decode([bytes(f) for f in frames])
        except ProtocolError:
            pass


def test_worker_records_come_in_pages_within_the_header_limit():
    from psgd.wire.protocol import STATS_PAGE_RECORDS, page_records

    def record(i):
        return {"worker_id": i, "name": "x" * 64, "staleness": {"cap": 64, "counts": [2**31] * 65, "max": 10**6}}

    records = [(i, lambda i=i: record(i)) for i in range(10, 4106)]
    seen, after, pages = [], None, 0
    while True:
        page, after = page_records(records, after)
        assert len(msgpack.packb({"stats": {}, "workers": page, "next": after})) < MAX_HEADER_BYTES
        assert 0 < len(page) <= STATS_PAGE_RECORDS
        seen += [r["worker_id"] for r in page]
        pages += 1
        if after is None:
            break
    assert seen == list(range(10, 4106)) and pages > 4096 // STATS_PAGE_RECORDS
    assert page_records([], None) == ([], None)


def test_a_client_taking_large_replies_waits_for_them_instead_of_resending():
    """A reply that takes longer than one try (a large model's weights on a loaded host):
    a client sized for large replies gets more time per try and takes it on the first
    socket; one sized for small replies gives up on each try and resends."""
    import threading
    import time

    import zmq

    from psgd.wire.transport import SLOW_TRANSFER_BYTES_PER_S, Client, max_reply_bytes
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def slow_server():  # answers every request 0.8 s after it came
        while not stop.is_set():
            if router.poll(50):
                identity, *frames = router.recv_multipart()
                request = decode(frames)
                time.sleep(0.8)
                router.send_multipart([identity, *encode({"type": "ok", "seq": request["seq"], "sender": "s"})])

    thread = threading.Thread(target=slow_server, daemon=True)
    thread.start()
    big = Client(f"tcp://127.0.0.1:{port}", "big", request_timeout=0.3, server_wait=0.5,
                 max_message=max_reply_bytes() + int(2 * SLOW_TRANSFER_BYTES_PER_S))
    small = Client(f"tcp://127.0.0.1:{port}", "small", request_timeout=0.3, server_wait=0.5)
    try:
        assert big.transfer_allowance() == pytest.approx(2.0) and small.transfer_allowance() == 0
        assert big.request({"type": "stats"}).type == "ok" and big.reconnects == 0
        from psgd.errors import TransportError
        with pytest.raises(TransportError, match="no answer"):
            small.request({"type": "stats"})
        assert small.reconnects >= 1
    finally:
        stop.set()
        thread.join(5)
        big.close()
        small.close()
        router.close(0)
        ctx.term()
