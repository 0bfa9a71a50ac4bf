"""The psgd wire protocol as pure functions: ``encode(header, arrays) -> frames`` and
``decode(frames) -> Message``. docs/protocol.md is its specification.

A message is one msgpack header frame followed by one raw frame per array. The header
names each array's dtype, shape and offset in the flat parameter vector, so array bytes
never pass through msgpack (an array in a msgpack bin costs ~100x a raw frame) and are
never pickled. Anything malformed raises :class:`ProtocolError` with a stable code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import msgpack
import numpy as np

from ..errors import ProtocolError
from .codecs import CODECS, FRAME_DTYPES

PROTOCOL_VERSION = 2  # 2: server shards (range), elastic data shards, heartbeats; optional codecs
MAX_HEADER_BYTES = 64 * 1024  # every header, either way (a server's replies stay within it too)
MAX_REPLY_HEADER_BYTES = MAX_HEADER_BYTES  # what a client reads from its server
DTYPES = {"<f4": np.dtype("<f4"), "<f8": np.dtype("<f8")}

# Fields every message of a type must carry, with their types. ``arrays`` is implied by
# the frames.
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
SCHEMAS: dict[str, dict[str, tuple]] = {
    "hello": {"worker": _STR, "transport": _STR},
    "welcome": {"worker_id": _INT, "model": (dict,), "optimizer": (dict,), "run": (dict,), "version": _INT,
                "data_shards": (list,), "num_data_shards": _INT, "data_generation": _INT, "range": (list,),
                "server_shard": _INT, "num_server_shards": _INT, "layout": (list,)},
    "pull": {},
    "params": {"version": _INT},
    "push": {"worker_id": _INT, "base_version": _INT, "examples": _INT},
    "ack": {"version": _INT, "staleness": _INT, "data_generation": _INT},
    "heartbeat": {"worker_id": _INT},
    "assignment": {"data_shards": (list,), "data_generation": _INT},
    "stats": {},
    "stats_reply": {"stats": (dict,)},
    "set_lr": {"lr": _NUM},
    "set_params": {},
    "describe": {},
    "description": {"config": (dict,)},
    "ok": {},
    "bye": {},
    "shutdown": {},
    "pause": {},
    "resume": {},
    "error": {"code": _STR, "message": _STR},
}
MESSAGE_TYPES = frozenset(SCHEMAS)
# What a server takes; the rest are its replies.
SERVER_TAKES = frozenset({"hello", "heartbeat", "pull", "push", "stats", "set_lr", "set_params", "describe",
                          "pause", "resume", "bye", "shutdown"})

# Who may send what, with CURVE keys (docs/protocol.md, "Roles"): a key in the server's
# allowed folder is a worker's; one in its control/ subfolder may also steer the run. A
# worker key that sends a control message is answered ``forbidden`` and nothing changes.
# Without CURVE there are no keys, hence no roles: whoever reaches the port is control
# (which is why a plaintext server listens on loopback unless told --insecure).
WORKER_MESSAGES = frozenset({"hello", "heartbeat", "pull", "push", "bye", "stats"})
CONTROL_MESSAGES = SERVER_TAKES - WORKER_MESSAGES  # set_lr, set_params, pause, resume, shutdown, describe
WORKER, CONTROL = "worker", "control"

# Optional fields a server takes, checked here as strictly as the required ones: absent
# (or nil where the spec allows nil) means the default; anything else of the wrong type
# is ``bad_field``. "int?" is an int or nil, "shards?" nil or a list of distinct ints >= 0.
OPTIONAL: dict[str, dict[str, str]] = {
    "hello": {"data_shards": "shards?", "codecs": "codecs"},
    "push": {"want_params": "bool", "codec": "codec", "timing": "timing"},
    "heartbeat": {"timing": "timing"},
    "params": {"codec": "codec"},
    "ack": {"codec": "codec", "local_steps": "int?", "inner_lr": "rate"},
    "pull": {"worker_id": "int?"},
    "bye": {"worker_id": "int?"},
    "stats": {"workers": "bool", "after": "int?"},
    "shutdown": {"finish": "bool"},
}

# How many array frames each type carries: (least, most). Every other type carries none.
# A vector in a codec (psgd.wire.codecs) other than "none" takes that codec's frames instead
# of the one, in the dtypes FRAME_DTYPES names.
ARRAY_COUNTS = {"push": (1, 1), "params": (1, 1), "ack": (0, 1), "set_params": (1, 1)}
CODEC_DTYPES = {d: np.dtype(d) for frames in FRAME_DTYPES.values() for d in frames}
MAX_CODECS = 16  # names a hello may list

# Error codes carried by ``error`` replies (docs/protocol.md lists their meaning).
ERROR_CODES = ("bad_frames", "bad_header", "bad_version", "bad_type", "bad_field", "bad_array",
               "bad_range", "not_finite", "future_version", "too_stale", "unknown_worker", "too_many_workers",
               "forbidden", "outlier")


def is_int(value) -> bool:
    """An integer on the wire: msgpack's int, never a bool (True == 1 in Python) or a float."""
    return isinstance(value, int) and not isinstance(value, bool)


# A worker's running time totals (psgd.worker.timing): "wall" and its phases, each a finite
# number of seconds in [0, TIMING_MAX_S]; no other key, so the field stays a few dozen bytes.
TIMING_KEYS = ("wall", "batch", "compute", "sleep", "push", "pull", "other")
TIMING_MAX_S = 1e9


def timing_ok(value) -> bool:
    if not isinstance(value, dict) or len(value) > len(TIMING_KEYS):
        return False
    return all(key in TIMING_KEYS and not isinstance(s, bool) and isinstance(s, (int, float))
               and math.isfinite(s) and 0 <= s <= TIMING_MAX_S for key, s in value.items())


_RULES = {"bool": "a bool", "int?": "an int or nil", "shards?": "nil or a list of distinct ints >= 0",
          "codec": f"one of {', '.join(CODECS)}", "codecs": f"a list of at most {MAX_CODECS} strings",
          "timing": f"a map of {', '.join(TIMING_KEYS)} to seconds in [0, 1e9]",
          "rate": "a finite number >= 0"}


def _optional_ok(kind: str, value) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "codec":
        return isinstance(value, str) and value in CODECS
    if kind == "codecs":  # names this end cannot decode are the other end's to ignore
        return isinstance(value, list) and len(value) <= MAX_CODECS and all(isinstance(c, str) for c in value)
    if kind == "timing":
        return timing_ok(value)
    if kind == "rate":
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    if value is None:
        return True
    if kind == "int?":
        return is_int(value)
    # "shards?": a list of distinct non-negative ints (their range is the server's to check)
    return (isinstance(value, list) and all(is_int(s) and s >= 0 for s in value)
            and len(set(value)) == len(value))


@dataclass
class Message:
    """A decoded message: its header dict and its arrays (read-only views on the frames)."""

    header: dict
    arrays: list[np.ndarray] = field(default_factory=list)

    @property
    def type(self) -> str:
        return self.header["type"]

    def __getitem__(self, key):
        return self.header[key]

    def get(self, key, default=None):
        return self.header.get(key, default)

    def offset(self, i: int) -> int:
        """Where array ``i`` starts in the flat parameter vector."""
        return self.header["arrays"][i]["offset"]


def encode(header: dict, arrays: tuple | list = (), offsets: tuple | list | None = None) -> list:
    """Frames for one message. ``header`` holds ``type`` and its fields (``v``, ``sender``
    and ``seq`` are the caller's to set or default here). Arrays are 1-D, C-contiguous;
    ``offsets`` gives each one's start in the flat parameter vector (default 0).

    The returned frames reference the arrays' memory: send them before changing the arrays,
    or send with copy=True.
    """
    meta = []
    offsets = offsets if offsets is not None else [0] * len(arrays)
    for arr, off in zip(arrays, offsets):
        meta.append({"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": int(off)})
    full = {"v": PROTOCOL_VERSION, "sender": "", "seq": 0, **header, "arrays": meta}
    return [msgpack.packb(full, use_bin_type=True)] + [memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays]


def decode(frames: list, max_header: int = MAX_HEADER_BYTES, accept: frozenset | None = None) -> Message:
    """The message in ``frames`` (bytes, memoryviews or zmq Frames), fully checked.

    Checks: header size and msgpack form, protocol version, message type, its required
    and optional fields, its array count, each array's dtype, shape and byte length
    against its frame. A refusal after the header was read carries the header's seq.
    Range and value checks against the model are the receiver's (they need the layout).
    ``accept``: the types this end takes (a server: SERVER_TAKES); any other is
    ``bad_type`` before its fields are looked at.
    """
    if not frames:
        raise ProtocolError("bad_frames", "empty message")
    raw = _buffer(frames[0])
    if len(raw) > max_header:
        raise ProtocolError("bad_header", f"header of {len(raw)} bytes exceeds {max_header}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage; all mean the same here
        raise ProtocolError("bad_header", f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header is not a map")
    # From here on the header is readable: every refusal carries its seq (when it has a
    # valid one), so that the client can match the error to its request.
    seq = header.get("seq")
    seq = seq if is_int(seq) else None
    version = header.get("v")
    if not is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {version!r}, this end speaks the integer "
                                           f"{PROTOCOL_VERSION}", seq)
    kind = header.get("type")
    if kind not in MESSAGE_TYPES:
        raise ProtocolError("bad_type", f"unknown message type {kind!r}", seq)
    if accept is not None and kind not in accept:
        raise ProtocolError("bad_type", f"this end does not take {kind!r} messages", seq)
    for name, types in [("sender", _STR), ("seq", _INT), *SCHEMAS[kind].items()]:
        value = header.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolError("bad_field", f"{kind}: field {name!r} missing or of the wrong type", seq)
    for name, rule in OPTIONAL.get(kind, {}).items():
        if name in header and not _optional_ok(rule, header[name]):
            raise ProtocolError("bad_field", f"{kind}: optional field {name!r} is {header[name]!r:.80}, "
                                             f"not {_RULES[rule]}", seq)
    meta = header.get("arrays", [])
    least, most = ARRAY_COUNTS.get(kind, (0, 0))
    codec = header.get("codec", "none") if "codec" in OPTIONAL.get(kind, {}) else "none"
    frame_dtypes = FRAME_DTYPES.get(codec)
    if frame_dtypes is not None:  # a compressed vector: exactly its codec's frames (an ack: or none)
        least, most = (0 if least == 0 else len(frame_dtypes)), len(frame_dtypes)
    if not isinstance(meta, list) or len(meta) != len(frames) - 1:
        raise ProtocolError("bad_frames", f"header lists {len(meta) if isinstance(meta, list) else '?'} arrays, "
                                          f"message has {len(frames) - 1} array frames", seq)
    if not least <= len(meta) <= most:
        raise ProtocolError("bad_frames", f"a {kind} carries {least if least == most else f'{least} to {most}'} "
                                          f"array frames, not {len(meta)}", seq)
    try:
        arrays = [_array(m, frames[i + 1], frame_dtypes[i] if frame_dtypes else None) for i, m in enumerate(meta)]
    except ProtocolError as exc:
        exc.seq = seq
        raise
    return Message(header, arrays)


def _array(meta, frame, codec_dtype: str | None = None) -> np.ndarray:
    """One array frame; ``codec_dtype``: the one dtype a compressed vector's frame must have."""
    if not isinstance(meta, dict):
        raise ProtocolError("bad_array", "array description is not a map")
    dtype = DTYPES.get(meta.get("dtype")) if codec_dtype is None else \
        (CODEC_DTYPES[codec_dtype] if meta.get("dtype") == codec_dtype else None)
    shape, offset = meta.get("shape"), meta.get("offset")
    if dtype is None:
        allowed = codec_dtype or ", ".join(DTYPES)
        raise ProtocolError("bad_array", f"dtype {meta.get('dtype')!r} is not {'one of ' if codec_dtype is None else ''}{allowed}")
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 0):
        raise ProtocolError("bad_array", f"shape {shape!r} is not a 1-D length")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ProtocolError("bad_array", f"offset {offset!r} is not a non-negative integer")
    buf = _buffer(frame)
    if len(buf) != shape[0] * dtype.itemsize:
        raise ProtocolError("bad_array", f"frame of {len(buf)} bytes does not hold {shape[0]} x {dtype}")
    arr = np.frombuffer(buf, dtype)
    arr.flags.writeable = False
    return arr


def _buffer(frame) -> memoryview:
    if hasattr(frame, "buffer"):  # a zmq.Frame received with copy=False
        frame = frame.buffer
    return memoryview(frame).cast("B")


# Per-worker statistics travel in pages, so that a stats reply stays within the header
# limit however many workers there are: at most this many records, and this many bytes
# of them (the rest of the header is the summary, whose size does not grow with workers).
STATS_PAGE_RECORDS = 128
STATS_PAGE_BYTES = MAX_HEADER_BYTES - 16 * 1024


def page_records(records, after: int | None) -> tuple[list[dict], int | None]:
    """One page of per-worker records: ``records`` yields ``(worker_id, make_record)`` by
    ascending id; the page holds those with an id above ``after`` (None: from the first),
    as many as fit. Returns the page and the ``after`` of the next one (None: no more).
    Only the records on the page (and one more, to know there is a next) are made."""
    page: list[dict] = []
    used = 0
    for worker_id, make in records:
        if after is not None and worker_id <= after:
            continue
        record = make()
        size = len(msgpack.packb(record, use_bin_type=True))
        if page and (len(page) >= STATS_PAGE_RECORDS or used + size > STATS_PAGE_BYTES):
            return page, page[-1]["worker_id"]
        page.append(record)
        used += size
    return page, None


def error(code: str, message: str) -> dict:
    return {"type": "error", "code": code, "message": message}
