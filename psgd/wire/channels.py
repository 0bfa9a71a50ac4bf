"""A worker's two ways to push and pull, behind one interface (a *channel*):

- :class:`ZmqChannel`: protocol messages over a :class:`psgd.wire.transport.Client`, to
  any host;
- :class:`ShmChannel`: on the server's own machine, the gradient is computed straight
  into a shared-memory segment and announced with a 16-byte doorbell; the weights are
  read back from the server's segment under its sequence lock.

Both have ``grads`` (one or two buffers the worker computes into: with two, it computes
into one while the other's push is in flight), ``pull(params) -> version``,
``push_begin(slot, base_version, examples, params_or_None, timing=None) -> carried`` (send
``grads[slot]``, with the worker's time totals where the path can carry them) and
``push_end() -> (version, staleness, version of refreshed params or None, data
generation)``. A buffer must stay untouched from its push_begin to its push_end.
"""

from __future__ import annotations

import numpy as np

from ..errors import ProtocolError, ShutdownRequested, TransportError
from . import codecs, shm
from .doorbell import DoorbellClient
from .transport import Client


class ZmqChannel:
    """Pushes and pulls as protocol messages over the worker's Client to one server shard."""

    transport = "zmq"

    def __init__(self, client: Client, worker_id: int, grads: list[np.ndarray], offset: int,
                 agreed: dict | None = None):
        self.client, self.worker_id = client, worker_id
        self.grads, self.offset = grads, offset  # views into the worker's whole gradients, maybe
        self._params = None
        self.local_steps = None
        self.inner_lr = None  # local SGD with a scheduled inner rate: the server's word on it
        # the codecs the server's welcome agreed (none: plain frames); error feedback lives in the encoder
        agreed = agreed if isinstance(agreed, dict) else {}
        self.push_codec = str(agreed.get("push", "none"))
        self.encoder = codecs.PushEncoder(self.push_codec, grads[0].size, grads[0].dtype,
                                          float(agreed.get("topk_fraction", codecs.DEFAULT_TOPK_FRACTION)))
        self.bytes_pushed = self.bytes_pulled = 0  # payload bytes, as the server counts them

    def pull(self, params: np.ndarray) -> int:
        reply = check_reply(self.client.request({"type": "pull", "worker_id": self.worker_id}), "params")
        self._take_params(reply, params)
        return reply["version"]

    def _take_params(self, reply, params: np.ndarray) -> None:
        """The weights of a params or ack reply, in whatever codec it says, into ``params``."""
        codecs.decode(reply.get("codec", "none"), reply.arrays, params)
        self.bytes_pulled += codecs.payload_bytes(reply.arrays)

    def push_begin(self, slot: int, base_version: int, examples: int, params: np.ndarray | None,
                   timing: dict | None = None) -> bool:
        """Send ``grads[slot]`` (uncompressed: without copying it) and ``timing``, the worker's
        time totals, when given (True: it went); :meth:`push_end` waits for the ack (and
        refreshed ``params``)."""
        header = {"type": "push", "worker_id": self.worker_id, "base_version": base_version,
                  "examples": examples, "want_params": params is not None}
        if timing is not None:
            header["timing"] = timing
        frames = self.encoder.encode(self.grads[slot])
        if self.push_codec != "none":
            header["codec"] = self.push_codec
        self._params = params
        self.bytes_pushed += codecs.payload_bytes(frames)
        self.client.send(header, frames, [self.offset] * len(frames))
        return timing is not None

    def push_end(self) -> tuple[int, int, int | None, int]:
        """(server version, staleness, version of refreshed params or None, data generation)."""
        reply = check_reply(self.client.receive(), "ack")
        self.local_steps = reply.get("local_steps")  # local SGD, dynamic: the server's word on our next H
        self.inner_lr = reply.get("inner_lr")  # local SGD, scheduled: the inner rate for our next round
        params, self._params = self._params, None
        if params is not None:
            self._take_params(reply, params)
        return reply["version"], reply["staleness"], reply["version"] if params is not None else None, \
            reply["data_generation"]

    def close(self):
        pass


def check_reply(reply, expected: str):
    """The reply if it is of the expected type; else the right exception for the worker loop."""
    if reply.type == "shutdown":
        raise ShutdownRequested("the server ended the run")
    if reply.type == "error":
        if reply["code"] == "unknown_worker":  # the server restarted, or our lease ran out: say hello again
            raise TransportError(f"the server no longer knows this worker: {reply['message']}")
        raise ProtocolError(reply["code"], reply["message"])
    if reply.type != expected:
        raise ProtocolError("bad_type", f"expected {expected}, got {reply.type}")
    return reply


class ShmChannel:
    """Gradients and weights in shared memory; a doorbell (psgd.wire.doorbell) to the server."""

    transport = "shm"

    def __init__(self, local: dict, worker_id: int, n_params: int, dtype, timeout: float, buffers: int = 1):
        self.weights = shm.Segment.attach(str(local["weights"]), n_params, dtype)
        if int(self.weights.header[shm.NONCE]) != int(local["nonce"]):
            self.weights.close()
            raise TransportError("shared memory is not the server's (another machine?)")
        self.grad_segs = [shm.Segment.create("psgd-grad", n_params, dtype) for _ in range(buffers)]
        self.grads = [seg.array for seg in self.grad_segs]
        self._params = None
        self.timeout = timeout  # for an ack, and for a consistent read of the weights
        self.doorbell = None
        try:
            self.doorbell = DoorbellClient(str(local["doorbell"]), worker_id, int(local["nonce"]),
                                           [seg.name for seg in self.grad_segs], timeout)
            self.doorbell.wait_ack()
        except (TransportError, ProtocolError, ShutdownRequested):
            self.close()
            raise
        finally:
            for seg in self.grad_segs:
                seg.unlink()  # the server has mapped it (or never will): drop the name

    def pull(self, params: np.ndarray) -> int:
        return shm.read_consistent(self.weights, params, self.timeout, self.doorbell.alive)

    def newest_version(self) -> int:
        """The version of the weights in the server's segment now (one integer, no copy)."""
        return int(self.weights.header[shm.VERSION])

    def push_begin(self, slot: int, base_version: int, examples: int, params: np.ndarray | None,
                   timing: dict | None = None) -> bool:
        """The doorbell's 16 bytes carry no timing: False (the client sends it by heartbeat)."""
        self._params = params
        self.doorbell.ring(base_version, examples, slot)
        return False

    def push_end(self):
        version, staleness, generation = self.doorbell.wait_ack()
        params, self._params = self._params, None
        fetched = self.pull(params) if params is not None else None
        return version, staleness, fetched, generation

    def close(self):
        if self.doorbell is not None:
            self.doorbell.close()
        self.weights.close()
        for seg in self.grad_segs:
            seg.close()
