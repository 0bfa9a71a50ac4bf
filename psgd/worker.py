"""``psgd worker``: fetch weights, compute minibatch gradients on a data shard, push them.

Downpour's loop: pull fresh weights every ``n_fetch`` steps, push the gradient summed
over ``n_push`` steps, never wait for another worker. The push goes one of two ways
behind one interface (a *channel*): over ZeroMQ, or, on the server's own machine, through
shared memory with a 16-byte doorbell. If the server goes away the worker says hello
again (with backoff, for a bounded time) and carries on from the server's weights.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass

import msgpack
import numpy as np

from . import data as data_mod
from . import shm
from .errors import ConfigError, ProtocolError, ShutdownRequested, TransportError
from .layout import Layout
from .network import MLP, ModelSpec
from .transport import SERVER_WAIT_S, Client


@dataclass(frozen=True)
class WorkerOptions:
    connect: str = "tcp://127.0.0.1:5555"
    name: str = ""
    transport: str = "auto"  # auto: shared memory when the server is on this machine, else zmq
    shard: int | None = None  # None: the server assigns one
    data_dir: str | None = None
    batch_size: int | None = None  # None: the run's (from the server's welcome)
    n_fetch: int | None = None
    n_push: int | None = None
    max_steps: int | None = None
    server_wait_s: float = SERVER_WAIT_S
    slowdown: float = 1.0  # > 1: sleep so that each step takes this many times its compute time


class ZmqChannel:
    """Pushes and pulls as protocol messages over the worker's Client."""

    transport = "zmq"

    def __init__(self, client: Client, worker_id: int, n_params: int, dtype):
        self.client, self.worker_id = client, worker_id
        self.grad = np.empty(n_params, dtype)

    def pull(self, params: np.ndarray) -> int:
        reply = self._check(self.client.request({"type": "pull", "worker_id": self.worker_id}), "params")
        params[...] = reply.arrays[0]
        return reply["version"]

    def push(self, base_version: int, examples: int, params: np.ndarray | None) -> tuple[int, int, int | None]:
        """Send ``self.grad``; returns (server version, staleness, version of refreshed params or None)."""
        header = {"type": "push", "worker_id": self.worker_id, "base_version": base_version,
                  "examples": examples, "want_params": params is not None}
        reply = self._check(self.client.request(header, [self.grad]), "ack")
        if params is not None:
            params[...] = reply.arrays[0]
            return reply["version"], reply["staleness"], reply["version"]
        return reply["version"], reply["staleness"], None

    def _check(self, reply, expected):
        if reply.type == "shutdown":
            raise ShutdownRequested("the server ended the run")
        if reply.type == "error":
            if reply["code"] == "unknown_worker":  # the server restarted: say hello again
                raise TransportError(f"the server no longer knows this worker: {reply['message']}")
            raise ProtocolError(reply["code"], reply["message"])
        if reply.type != expected:
            raise ProtocolError("bad_type", f"expected {expected}, got {reply.type}")
        return reply

    def close(self):
        pass


class ShmChannel:
    """Gradients and weights in shared memory; a Unix-socket doorbell to the server."""

    transport = "shm"

    def __init__(self, local: dict, worker_id: int, n_params: int, dtype, timeout: float):
        self.weights = shm.Segment.attach(str(local["weights"]), n_params, dtype)
        if int(self.weights.header[shm.NONCE]) != int(local["nonce"]):
            self.weights.close()
            raise TransportError("shared memory is not the server's (another machine?)")
        self.grad_seg = shm.Segment.create("psgd-grad", n_params, dtype)
        self.grad = self.grad_seg.array
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(local["doorbell"]))
            self.sock.send(msgpack.packb({"worker_id": worker_id, "nonce": int(local["nonce"]), "grad": self.grad_seg.name}))
            self._ack()
        except OSError as exc:
            self.close()
            raise TransportError(f"shared-memory doorbell: {exc}") from None
        finally:
            self.grad_seg.unlink()  # the server has mapped it (or never will): drop the name

    def _ack(self) -> tuple[int, int]:
        try:
            data = self.sock.recv(64)
        except (OSError, socket.timeout) as exc:
            raise TransportError(f"server doorbell: {exc}") from None
        if len(data) != shm.ACK.size:
            raise TransportError("the server closed the doorbell")
        version, staleness, status = shm.ACK.unpack(data)
        if status == shm.ACK_SHUTDOWN:
            raise ShutdownRequested("the server ended the run")
        if status == shm.ACK_REFUSED:
            raise ProtocolError("refused", "the server refused the gradient")
        return version, staleness

    def pull(self, params: np.ndarray) -> int:
        return shm.read_consistent(self.weights, params)

    def push(self, base_version: int, examples: int, params: np.ndarray | None):
        try:
            self.sock.send(shm.DOORBELL.pack(base_version, examples, 0))
        except OSError as exc:
            raise TransportError(f"server doorbell: {exc}") from None
        version, staleness = self._ack()
        fetched = self.pull(params) if params is not None else None
        return version, staleness, fetched

    def close(self):
        self.sock.close()
        self.weights.close()
        self.grad_seg.close()


class Worker:
    def __init__(self, options: WorkerOptions):
        self.options = options
        self.name = options.name or f"worker-{socket.gethostname()}-{os.getpid()}"
        self.client = Client(options.connect, self.name, server_wait=options.server_wait_s)
        self.stop_requested = False
        self.stats = {"steps": 0, "pushes": 0, "examples": 0, "refused": 0, "reconnects": 0,
                      "staleness_sum": 0, "compute_s": 0.0, "comm_s": 0.0}
        self.channel = None
        self._data_key = None

    # --- joining ----------------------------------------------------------------------

    def join(self) -> None:
        """Say hello, set up the model, data shard and channel (again, after a server loss)."""
        o = self.options
        hello = {"type": "hello", "worker": self.name, "transport": o.transport,
                 "shard": self.shard if self._data_key else o.shard}
        reply = self.client.request(hello)
        if reply.type == "shutdown":
            raise ShutdownRequested("the server ended the run")
        if reply.type != "welcome":
            raise ProtocolError(reply.get("code", "bad_type"), reply.get("message", f"expected welcome, got {reply.type}"))
        self.worker_id = reply["worker_id"]
        run = reply["run"]
        spec = ModelSpec.from_dict(reply["model"])
        if Layout.from_wire(reply["layout"]) != MLP(spec).layout:
            raise ProtocolError("bad_field", "the server's parameter layout is not that of its model")
        key = (tuple(spec.sizes), run["data"], run["seed"], run["validation"], reply["shard"], reply["num_shards"])
        if key != self._data_key:
            self._setup_data(spec, run, reply["shard"], reply["num_shards"])
            self._data_key = key
        if self.channel is not None:
            self.channel.close()
        self.channel = self._open_channel(reply)
        self.params = np.empty(self.net.n_params, self.net.dtype)

    def _setup_data(self, spec, run, shard, num_shards):
        o = self.options
        self.net = MLP(spec)
        self.shard = shard
        self.batch_size = o.batch_size or int(run["batch_size"])
        self.n_fetch = o.n_fetch or int(run["n_fetch"])
        self.n_push = o.n_push or int(run["n_push"])
        self.dropout = float(run.get("dropout", 0.0))
        train, _ = data_mod.load(run["data"], o.data_dir, int(run["seed"]))
        if int(run["validation"]):
            train, _ = data_mod.split(train, int(run["validation"]), int(run["seed"]))
        part = data_mod.shard(train, shard, num_shards, int(run["seed"]))
        if spec.sizes[0] != part.n_inputs:
            raise ConfigError(f"the server's model takes {spec.sizes[0]} inputs, the data has {part.n_inputs}")
        seed = int(run["seed"]) * 1000 + shard + 1
        self.batches = data_mod.Minibatches(part.X.astype(self.net.dtype, copy=False), part.targets_for(spec.loss),
                                            self.batch_size, seed, part.image_shape if run.get("augment") else None)
        self.rng = np.random.default_rng(seed)
        self.local_grad = np.empty(self.net.n_params, self.net.dtype) if self.n_push > 1 else None

    def _open_channel(self, welcome):
        o = self.options
        local = welcome.get("local")
        if o.transport in ("auto", "shm") and isinstance(local, dict) and shm.available():
            try:
                return ShmChannel(local, self.worker_id, self.net.n_params, self.net.dtype, o.server_wait_s)
            except (TransportError, KeyError, ValueError, TypeError):
                if o.transport == "shm":
                    raise
        elif o.transport == "shm":
            raise TransportError("the shared-memory path was asked for, but the server does not offer it here")
        return ZmqChannel(self.client, self.worker_id, self.net.n_params, self.net.dtype)

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> dict:
        """Train until the server ends the run, ``max_steps`` is reached or a signal arrives."""
        self._install_signals()
        try:
            self.join()
            while not self.stop_requested:
                try:
                    self._train()
                    break
                except TransportError:
                    self.stats["reconnects"] += 1
                    self.join()  # Client.request retries with backoff, then gives up with a clear error
        except ShutdownRequested:
            pass
        finally:
            self.close()
        return self.stats

    def _train(self):
        o, st = self.options, self.stats
        version = self.channel.pull(self.params)
        window_base, window_examples = None, 0
        while not self.stop_requested and (o.max_steps is None or st["steps"] < o.max_steps):
            t0 = time.perf_counter()
            x, t = next(self.batches)
            first = window_base is None
            if self.local_grad is None:
                self.net.loss_and_grad(self.params, x, t, self.channel.grad, self.dropout, self.rng)
            else:
                self.net.loss_and_grad(self.params, x, t, self.local_grad, self.dropout, self.rng)
                if first:
                    self.channel.grad[...] = self.local_grad
                else:
                    self.channel.grad += self.local_grad
            if first:
                window_base = version
            window_examples += x.shape[0]
            st["steps"] += 1
            t1 = time.perf_counter()
            st["compute_s"] += t1 - t0
            if o.slowdown > 1:  # a straggler on demand, to study one on a single machine
                time.sleep((o.slowdown - 1) * (t1 - t0))
                t1 = time.perf_counter()
            fetch = st["steps"] % self.n_fetch == 0
            if st["steps"] % self.n_push == 0:
                try:
                    _, staleness, fetched = self.channel.push(window_base, window_examples, self.params if fetch else None)
                    st["pushes"] += 1
                    st["examples"] += window_examples
                    st["staleness_sum"] += staleness
                except ProtocolError:
                    st["refused"] += 1
                    fetched = self.channel.pull(self.params) if fetch else None
                window_base, window_examples = None, 0
                if fetched is not None:
                    version = fetched
            elif fetch:
                version = self.channel.pull(self.params)
            st["comm_s"] += time.perf_counter() - t1

    def _install_signals(self):
        def handler(signum, frame):
            if self.stop_requested:
                os._exit(128 + signum)
            self.stop_requested = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, handler)
            except ValueError:
                pass  # not the main thread

    def close(self):
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if getattr(self, "worker_id", None) is not None:
            try:
                self.client.server_wait = 1.0
                self.client.request_timeout = 0.5
                self.client.request({"type": "bye", "worker_id": self.worker_id})
            except TransportError:
                pass
        self.client.close()
