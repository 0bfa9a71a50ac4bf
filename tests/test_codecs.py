"""Compression codecs (psgd.wire.codecs): round-trip error bounds, error feedback, and
hostile frames refused without touching the output."""

import numpy as np
import pytest

from psgd.errors import ProtocolError
from psgd.wire import codecs
from psgd.wire.codecs import INT8_BLOCK, PushEncoder, decode, encode

N = 3 * INT8_BLOCK + 17  # a short last block


def vector(seed=0, n=N):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * rng.uniform(0.001, 10, n)).astype(np.float32)


def roundtrip(codec, x, fraction=0.01):
    frames = encode(codec, x, fraction)
    return frames, decode(codec, frames, np.empty_like(x))


def test_none_and_float16_round_trips():
    x = vector()
    _, y = roundtrip("none", x)
    assert np.array_equal(x, y)
    frames, y = roundtrip("float16", x)
    assert frames[0].dtype.str == "<f2" and frames[0].nbytes == 2 * N
    np.testing.assert_allclose(y, x, rtol=2 ** -11, atol=2 ** -24)  # half precision: 11 bits of mantissa
    _, big = roundtrip("float16", np.array([1e6, -1e6], np.float32))
    assert list(big) == [65504.0, -65504.0]  # saturates rather than sending Inf


def test_int8_error_is_at_most_half_a_step_of_each_blocks_scale():
    x = vector(1)
    x[INT8_BLOCK:2 * INT8_BLOCK] = 0  # an all-zero block: scale 0, decodes to exact zeros
    (scales, codes), y = roundtrip("int8", x)
    assert scales.size == 4 and codes.dtype == np.int8 and codes.size == N
    bound = np.repeat(scales, INT8_BLOCK)[:N] / 2
    assert (np.abs(y - x) <= bound * (1 + 1e-6) + 1e-12).all()
    assert (y[INT8_BLOCK:2 * INT8_BLOCK] == 0).all()
    for b in range(4):  # each block's largest magnitude is carried exactly (to float32 rounding)
        block = x[b * INT8_BLOCK:(b + 1) * INT8_BLOCK]
        if block.any():
            i = np.argmax(np.abs(block))
            assert y[b * INT8_BLOCK + i] == pytest.approx(block[i], rel=1e-6)


def test_topk_sends_the_largest_magnitudes_exactly():
    x = vector(2)
    (idx, values), y = roundtrip("topk", x, 0.05)
    k = codecs.topk_count(N, 0.05)
    assert idx.dtype.str == "<u4" and values.dtype.str == "<f4" and idx.size == k == 40  # ceil(0.05 * 785)
    assert (np.diff(idx.astype(np.int64)) > 0).all()
    assert set(idx) == set(np.argsort(-np.abs(x))[:k])
    assert np.array_equal(y[idx], x[idx]) and np.count_nonzero(y) == k
    # the error is exactly what was left out: no larger than the k-th magnitude anywhere
    assert np.abs(x - y).max() <= np.sort(np.abs(x))[-k]


def test_topk_with_error_feedback_loses_no_mass_over_many_steps():
    enc = PushEncoder("topk", N, np.float32, fraction=0.01)
    rng = np.random.default_rng(3)
    given = np.zeros(N)
    sent = np.zeros(N)
    out = np.empty(N, np.float32)
    for _ in range(300):
        g = rng.standard_normal(N).astype(np.float32)
        given += g
        sent += decode("topk", enc.encode(g), out)
    # every element's sum of inputs is what was sent plus what is still held back
    np.testing.assert_allclose(sent + enc.residual, given, rtol=0, atol=1e-3)
    assert np.count_nonzero(sent) > 0.9 * N  # feedback reaches every element in time, not only the largest
    assert np.abs(enc.residual).max() < np.abs(given).max()  # and what waits stays bounded


@pytest.mark.parametrize("codec", ["float16", "int8"])
def test_error_feedback_of_the_quantising_codecs_too(codec):
    enc = PushEncoder(codec, N, np.float32)
    rng = np.random.default_rng(4)
    given, sent, out = np.zeros(N), np.zeros(N), np.empty(N, np.float32)
    for _ in range(50):
        g = vector(int(rng.integers(1 << 30)))
        given += g
        sent += decode(codec, enc.encode(g), out)
    np.testing.assert_allclose(sent + enc.residual, given, rtol=0, atol=1e-3)


BAD = [
    ("topk", lambda: [np.array([3, 1], "<u4"), np.ones(2, "<f4")], "bad_range"),  # unsorted
    ("topk", lambda: [np.array([1, 1], "<u4"), np.ones(2, "<f4")], "bad_range"),  # duplicate
    ("topk", lambda: [np.array([1, N], "<u4"), np.ones(2, "<f4")], "bad_range"),  # out of range
    ("topk", lambda: [np.array([1, 2], "<u4"), np.ones(3, "<f4")], "bad_array"),  # lengths differ
    ("topk", lambda: [np.arange(N + 1, dtype="<u4"), np.ones(N + 1, "<f4")], "bad_array"),  # more than size
    ("topk", lambda: [np.array([1], "<i4"), np.ones(1, "<f4")], "bad_array"),  # signed indices
    ("topk", lambda: [np.array([1], "<u4")], "bad_frames"),
    ("int8", lambda: [np.ones(3, "<f4"), np.ones(N, np.int8)], "bad_array"),  # too few scales
    ("int8", lambda: [np.ones(4, "<f4"), np.ones(N - 1, np.int8)], "bad_array"),
    ("int8", lambda: [np.array([1, np.nan, 1, 1], "<f4"), np.ones(N, np.int8)], "not_finite"),
    ("int8", lambda: [np.array([1, np.inf, 1, 1], "<f4"), np.ones(N, np.int8)], "not_finite"),
    ("int8", lambda: [np.array([1, -1, 1, 1], "<f4"), np.ones(N, np.int8)], "bad_array"),
    ("float16", lambda: [np.ones(N - 1, "<f2")], "bad_array"),
    ("float16", lambda: [np.ones(N, "<f4")], "bad_array"),
    ("zstd", lambda: [np.ones(N, "<f4")], "bad_field"),
]


@pytest.mark.parametrize("codec,frames,code", BAD)
def test_malformed_frames_are_refused_and_write_nothing(codec, frames, code):
    out = np.full(N, 7.0, np.float32)
    with pytest.raises(ProtocolError) as info:
        decode(codec, frames(), out)
    assert info.value.code == code
    assert (out == 7.0).all()


# --- the server's side, in-process: hello agrees, a compressed push enters the one door ---

from psgd.config import TrainConfig  # noqa: E402
from psgd.errors import ConfigError  # noqa: E402
from psgd.model.network import ModelSpec  # noqa: E402
from psgd.model.optim import OptimizerSpec  # noqa: E402
from psgd.model.schedules import ScheduleSpec  # noqa: E402
from psgd.server.state import ServerState  # noqa: E402
from psgd.wire.protocol import decode as decode_message, encode as encode_message  # noqa: E402

SERVER_CONFIG = TrainConfig(model=ModelSpec((30, 20, 3)), optimizer=OptimizerSpec("sgd"),
                            schedule=ScheduleSpec("constant", 0.5, warmup=0), push_codec="topk", pull_codec="int8",
                            topk_fraction=0.05)


def request(state, kind, arrays=(), **fields):
    frames = [bytes(f) for f in encode_message({"type": kind, **fields}, arrays)]
    return state.handle(decode_message(frames))


def test_hello_agrees_the_runs_codecs_only_with_a_worker_that_speaks_them():
    state = ServerState(SERVER_CONFIG)
    welcome, _ = request(state, "hello", worker="new", transport="zmq", codecs=list(codecs.CODECS))
    assert welcome["codecs"] == {"push": "topk", "pull": "int8", "topk_fraction": 0.05, "int8_block": INT8_BLOCK}
    old, _ = request(state, "hello", worker="old", transport="zmq")  # a client that knows no codecs
    assert old["codecs"]["push"] == old["codecs"]["pull"] == "none"
    reply, frames = request(state, "pull", worker_id=old["worker_id"])
    assert "codec" not in reply and frames[0].dtype == np.float32  # plain, as before codecs existed
    reply, frames = request(state, "pull", worker_id=welcome["worker_id"])
    assert reply["codec"] == "int8" and [f.dtype.str for f in frames] == ["<f4", "|i1"]
    got = decode("int8", frames, np.empty(state.store.size, np.float32))
    assert np.abs(got - state.store.params).max() <= np.abs(state.store.params).max() / 254 + 1e-7
    reply, frames = request(state, "pull")  # a monitor (no worker id) always gets plain weights
    assert "codec" not in reply and np.array_equal(frames[0], state.store.params)


def test_a_compressed_push_is_applied_as_its_dense_gradient_and_counted():
    state = ServerState(SERVER_CONFIG)
    wid = request(state, "hello", worker="w", transport="zmq", codecs=list(codecs.CODECS))[0]["worker_id"]
    before = state.store.params.copy()
    g = vector(5, state.store.size)
    frames = encode("topk", g, 0.05)
    reply, _ = request(state, "push", frames, worker_id=wid, base_version=0, examples=8, codec="topk", seq=1)
    assert reply["type"] == "ack" and reply["version"] == 1
    dense = decode("topk", frames, np.empty_like(g))
    np.testing.assert_allclose(state.store.params, before - 0.5 * dense, rtol=1e-6)
    n = payload = frames[0].nbytes + frames[1].nbytes
    assert state.stats()["traffic"]["pushed"] == {"topk": payload}
    record = state.members.workers[wid].to_dict(0.0)
    assert record["bytes_pushed"] == n and record["push_codec"] == "topk"
    assert n < 0.11 * g.nbytes  # 5% of the elements at 8 bytes each (index and value)


@pytest.mark.parametrize("frames,codec,code", [
    (lambda n: [np.array([2, 1], "<u4"), np.ones(2, "<f4")], "topk", "bad_range"),
    (lambda n: [np.array([0, n], "<u4"), np.ones(2, "<f4")], "topk", "bad_range"),
    (lambda n: [np.array([0], "<u4"), np.ones(2, "<f4")], "topk", "bad_array"),
    (lambda n: [np.array([0], "<u4"), np.array([np.nan], "<f4")], "topk", "not_finite"),  # the one door's check
    (lambda n: [np.full(-(-n // INT8_BLOCK), np.nan, "<f4"), np.zeros(n, np.int8)], "int8", "not_finite"),
    (lambda n: [np.ones(n - 1, "<f2")], "float16", "bad_array"),
    (lambda n: [np.full(n, np.inf, "<f2")], "float16", "not_finite"),
])
def test_a_malformed_compressed_push_is_refused_with_a_code_and_changes_nothing(frames, codec, code):
    state = ServerState(SERVER_CONFIG)
    wid = request(state, "hello", worker="w", transport="zmq", codecs=list(codecs.CODECS))[0]["worker_id"]
    before = state.store.params.copy()
    reply, _ = request(state, "push", frames(state.store.size), worker_id=wid, base_version=0, examples=8,
                       codec=codec, seq=1)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert np.array_equal(state.store.params, before) and state.store.version == 0
    assert state.stats()["errors"] == {code: 1}


def test_frames_that_do_not_match_their_codec_are_refused_by_the_protocol():
    ok = encode("topk", vector(6), 0.1)
    for header, arrays in [({"codec": "topk"}, ok[:1]), ({"codec": "topk"}, [ok[1], ok[0]]),
                           ({"codec": "gzip"}, ok), ({}, ok)]:
        frames = [bytes(f) for f in encode_message({"type": "push", "worker_id": 0, "base_version": 0,
                                                    "examples": 1, **header}, arrays)]
        with pytest.raises(ProtocolError):
            decode_message(frames)


def test_codec_settings_are_checked():
    with pytest.raises(ConfigError, match="shared memory"):
        TrainConfig(push_codec="topk", transport="shm")
    with pytest.raises(ConfigError, match="not top-k"):
        TrainConfig(pull_codec="topk")
    with pytest.raises(ConfigError, match="fraction"):
        TrainConfig(topk_fraction=0)


@pytest.mark.slow
def test_a_cluster_trains_with_top_1_percent_pushes_over_zeromq(procs, tmp_path):
    """psgd train, 2 worker processes, top-1% pushes with error feedback and int8 pulls: a
    codec keeps the run off shared memory (transport auto), every push is top-k, and
    MNIST still trains (measured under load: 93.8% after 2 epochs; chance is 10%)."""
    import json
    out = tmp_path / "run"
    proc = procs.start("train", "--workers", "2", "--epochs", "2", "--layers", "784,64,10", "--push-codec", "topk",
                       "--topk-fraction", "0.01", "--pull-codec", "int8", "--out", str(out), log="train")
    assert proc.wait(240) == 0, procs.log("train")
    s = json.loads((out / "summary.json").read_text())
    assert s["test_accuracy"] >= 0.9, s["test_accuracy"]
    assert s["worker_transports"] == ["zmq"] and set(s["traffic"]["pushed"]) == {"topk"}
    k = codecs.topk_count(784 * 64 + 64 + 64 * 10 + 10, 0.01)
    # a uint32 index and a float32 value per element sent (a refused or resent push counts too)
    assert 8 * k * s["updates"] <= s["traffic"]["pushed"]["topk"] <= 8 * k * (s["updates"] + 20)
    assert sum(w["bytes_pushed"] for w in s["per_worker"].values()) == s["traffic"]["pushed"]["topk"]
    assert "payload pushed: topk" in procs.log("train")
