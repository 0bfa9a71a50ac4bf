"""The server's side of compression (psgd.wire.codecs): which codecs each worker agreed
to in its hello, decoding a compressed push into a dense gradient before it enters the
one door (ServerState.push, where it is checked like any other), encoding the weights a
worker pulls, and counting payload bytes (array frames, headers excluded) per worker and
per codec. Pure: no sockets.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..config import TrainConfig
from ..metrics import WorkerRecord
from ..wire import codecs


class Traffic:
    """``size``/``dtype``: this server's range of the vector."""

    def __init__(self, config: TrainConfig, size: int, dtype):
        self.config = config
        self.pushed: Counter = Counter()  # codec -> payload bytes received in pushes
        self.pulled: Counter = Counter()  # codec -> payload bytes of weights sent to workers
        self._dense = np.empty(size, dtype)  # a decoded push (the gates copy what they keep)

    def agree(self, record: WorkerRecord, offered) -> dict:
        """The codecs of a worker whose hello listed ``offered`` (None: a client that knows
        none, which gets "none" both ways): the run's, where the worker can speak them.
        Returns the welcome's ``codecs`` field."""
        c = self.config
        can = set(offered or ()) | {"none"}
        record.push_codec = c.push_codec if c.push_codec in can else "none"
        record.pull_codec = c.pull_codec if c.pull_codec in can else "none"
        return {"push": record.push_codec, "pull": record.pull_codec, "topk_fraction": c.topk_fraction,
                "int8_block": codecs.INT8_BLOCK}

    def decode_push(self, record: WorkerRecord | None, codec: str, arrays) -> np.ndarray:
        """The dense gradient a push carries (its own frame for "none"); raises
        ProtocolError for frames that do not fit this range (nothing is changed)."""
        n = codecs.payload_bytes(arrays)
        self.pushed[codec] += n
        if record is not None:
            record.bytes_pushed += n
        if codec == "none":
            return arrays[0]
        return codecs.decode(codec, arrays, self._dense)

    def encode_params(self, record: WorkerRecord | None, params: np.ndarray) -> tuple[str, list]:
        """``(codec, frames)`` of the weights for a worker (plain for anyone else)."""
        codec = record.pull_codec if record is not None else "none"
        frames = codecs.encode(codec, params)
        if record is not None:
            n = codecs.payload_bytes(frames)
            record.bytes_pulled += n
            self.pulled[codec] += n
        return codec, frames

    def stats(self) -> dict:
        return {"pushed": dict(self.pushed), "pulled": dict(self.pulled)}
