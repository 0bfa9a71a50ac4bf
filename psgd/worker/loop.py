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
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from .. import data as data_mod
from ..wire import shm
from ..config import validation_size
from ..wire.channels import ShmChannel, ZmqChannel, check_reply
from ..errors import ConfigError, ProtocolError, ShutdownRequested, TransportError
from ..model.layout import Layout
from ..model.network import MLP, ModelSpec
from ..wire.transport import SERVER_WAIT_S, Client, ClientKeys, connect_clients, max_reply_bytes


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
    keys: ClientKeys | None = None  # CURVE, for a server that demands it


@dataclass
class ServerLink:
    """One server shard as a worker sees it: its client, range and channel, and the
    version of the weights the worker last fetched from it."""

    client: Client
    lo: int = 0
    hi: int = 0
    worker_id: int | None = None
    channel: object = None
    version: int = 0
    window_base: int | None = None  # the version the gradient being summed was computed from
    copy_in: bool = False  # the channel has its own gradient buffer: copy our range into it


class Worker:
    def __init__(self, options: WorkerOptions):
        self.options = options
        self.name = options.name or f"worker-{platform.node()}-{os.getpid()}"
        self.links = [ServerLink(client) for client in
                      connect_clients(options.connect, self.name, server_wait=options.server_wait_s, keys=options.keys)]
        self.stop_requested = False
        self.stats = {"steps": 0, "pushes": 0, "examples": 0, "refused": 0, "reconnects": 0,
                      "staleness_sum": 0, "compute_s": 0.0, "comm_s": 0.0, "reassignments": 0}
        self.data_shards: list[int] | None = [options.shard] if options.shard is not None else None
        self.data_generation = 0
        self._data_key = None
        self._train_set = None
        self.net = None

    # --- joining ----------------------------------------------------------------------

    def join(self) -> None:
        """Say hello to every server shard (shard 0 first: it hands out the data shards),
        set up the model, data and channels (again, after a server loss)."""
        self._close_channels()
        said_hello = time.monotonic()
        welcomes = self._hello()
        first = welcomes[0]
        spec = ModelSpec.from_dict(first["model"])
        run = first["run"]
        if Layout.from_wire(first["layout"]) != MLP(spec).layout:
            raise ProtocolError("bad_field", "the server's parameter layout is not that of its model")
        self.lease_s = float(run.get("lease_s", 10.0))
        self._run, self._num_data_shards = run, first["num_data_shards"]
        self._setup_data(spec, run, self._num_data_shards)
        if time.monotonic() - said_hello > self.lease_s / 2:
            # Loading the data took most of the lease: the servers may drop us before the
            # first push. Say goodbye and hello again (the data is loaded now: this is quick).
            self._bye()
            welcomes = self._hello()
        self.data_generation = welcomes[0]["data_generation"]
        self._open_channels(welcomes)

    def _hello(self) -> list:
        """Hello to every server shard, shard 0 first: it hands out the data shards."""
        o = self.options
        welcomes = []
        for k, link in enumerate(self.links):
            hello = {"type": "hello", "worker": self.name, "transport": o.transport, "data_shards": self.data_shards}
            reply = link.client.request(hello)
            if reply.type == "shutdown":
                raise ShutdownRequested("the server ended the run")
            if reply.type != "welcome":
                raise ProtocolError(reply.get("code", "bad_type"),
                                    reply.get("message", f"expected welcome, got {reply.type}"))
            if (reply["server_shard"], reply["num_server_shards"]) != (k, len(self.links)):
                raise ConfigError(f"--connect must list all {reply['num_server_shards']} server shards in order: "
                                  f"{link.client.endpoint} is shard {reply['server_shard']}, listed as {k} "
                                  f"of {len(self.links)}")
            if k == 0:
                self.data_shards = list(reply["data_shards"])  # the others take shard 0's word
            link.worker_id = reply["worker_id"]
            welcomes.append(reply)
        return welcomes

    def _setup_data(self, spec, run, num_data_shards):
        """Model, settings and the minibatches of this worker's data shards; after a
        reassignment only the minibatches change."""
        o = self.options
        key = (tuple(spec.sizes), run["data"], run["seed"], run["validation"], tuple(self.data_shards), num_data_shards)
        if key == self._data_key:
            return
        if self._data_key is None or self._data_key[:4] != key[:4]:
            self.net = MLP(spec)
            self.batch_size = o.batch_size or int(run["batch_size"])
            self.n_fetch = o.n_fetch or int(run["n_fetch"])
            self.n_push = o.n_push or int(run["n_push"])
            self.dropout = float(run.get("dropout", 0.0))
            self.augment = bool(run.get("augment"))
            train, _ = data_mod.load(run["data"], o.data_dir, int(run["seed"]))
            held_out = validation_size(run["validation"], len(train))  # as the coordinator does
            if held_out:
                train, _ = data_mod.split(train, held_out, int(run["seed"]))
            if spec.sizes[0] != train.n_inputs:
                raise ConfigError(f"the server's model takes {spec.sizes[0]} inputs, the data has {train.n_inputs}")
            self._train_set = train
            self.params = np.empty(self.net.n_params, self.net.dtype)
            self.local_grad = np.empty(self.net.n_params, self.net.dtype) if self.n_push > 1 else None
        elif self._data_key is not None:
            print(f"psgd worker {self.name}: now training on data shards {self.data_shards}", file=sys.stderr, flush=True)
        seed = int(run["seed"])
        rows = np.concatenate([data_mod.shard_indices(len(self._train_set), s, num_data_shards, seed)
                               for s in self.data_shards])
        part = self._train_set.subset(np.sort(rows))
        batch_seed = seed * 1000 + self.data_shards[0] + 1 + 7919 * self.stats["reassignments"]
        self.batches = data_mod.Minibatches(part.X.astype(self.net.dtype, copy=False), part.targets_for(spec.loss),
                                            self.batch_size, batch_seed, part.image_shape if self.augment else None)
        self.rng = np.random.default_rng(batch_seed)
        self._data_key = key

    def _open_channels(self, welcomes):
        """One channel per server shard; the whole gradient is computed into one buffer,
        whose ranges go out as zero-copy views (zmq) or copied into shared memory."""
        o = self.options
        single = len(self.links) == 1
        self.grad = None if single else np.empty(self.net.n_params, self.net.dtype)
        for link, welcome in zip(self.links, welcomes):
            link.lo, link.hi = welcome["range"]
            link.worker_id = welcome["worker_id"]
            link.client.limit_messages(max_reply_bytes(link.hi - link.lo, self.net.dtype.itemsize))
            local = welcome.get("local")
            link.channel = None
            if o.transport in ("auto", "shm") and isinstance(local, dict) and shm.available():
                try:
                    link.channel = ShmChannel(local, link.worker_id, link.hi - link.lo, self.net.dtype, o.server_wait_s)
                except (TransportError, KeyError, ValueError, TypeError):
                    if o.transport == "shm":
                        raise
            elif o.transport == "shm":
                raise TransportError("the shared-memory path was asked for, but the server does not offer it here")
            if link.channel is None:
                view = np.empty(link.hi - link.lo, self.net.dtype) if single else self.grad[link.lo:link.hi]
                link.channel = ZmqChannel(link.client, link.worker_id, view, link.lo)
            link.copy_in = not single and link.channel.transport == "shm"
        if single:
            self.grad = self.links[0].channel.grad
        self._last_contact = time.monotonic()

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

    def _pull(self) -> None:
        for link in self.links:
            link.version = link.channel.pull(self.params[link.lo:link.hi])
        self._last_contact = time.monotonic()

    def _push(self, examples: int, fetch: bool) -> None:
        """Every shard its range of the gradient, all in flight at once; then the acks."""
        for link in self.links:
            if link.copy_in:
                link.channel.grad[...] = self.grad[link.lo:link.hi]
            link.channel.push_begin(link.window_base, examples, self.params[link.lo:link.hi] if fetch else None)
        refused, generation = False, self.data_generation
        for k, link in enumerate(self.links):
            try:
                _, staleness, fetched, link_generation = link.channel.push_end()
            except ProtocolError:
                refused = True
                fetched = link.channel.pull(self.params[link.lo:link.hi]) if fetch else None
            else:
                if k == 0:  # shard 0 hands out the data: its word counts
                    self.stats["staleness_sum"] += staleness
                    generation = link_generation
            if fetched is not None:
                link.version = fetched
            link.window_base = None
        self._last_contact = time.monotonic()
        if refused:
            self.stats["refused"] += 1
        else:
            self.stats["pushes"] += 1
            self.stats["examples"] += examples
        if generation != self.data_generation:
            self._heartbeat(self.links[:1])  # learn the new data shards

    def _heartbeat(self, links=None) -> None:
        """Tell the shards we are alive (a long n_push window would outlast the lease);
        the answer says which data shards to train on."""
        for link in links or self.links:
            reply = check_reply(link.client.request({"type": "heartbeat", "worker_id": link.worker_id}), "assignment")
            if link is self.links[0] and reply["data_generation"] != self.data_generation:
                self._apply_assignment(reply)
        self._last_contact = time.monotonic()

    def _apply_assignment(self, reply) -> None:
        """The server moved data shards (a worker left, or came back): train on the new set."""
        self.data_generation = reply["data_generation"]
        shards = sorted(int(s) for s in reply["data_shards"])
        if shards and shards != self.data_shards:
            self.data_shards = shards
            self.stats["reassignments"] += 1
            self._setup_data(self.net.spec, self._run, self._num_data_shards)

    def _train(self):
        o, st = self.options, self.stats
        self._pull()
        window_examples = 0
        heartbeat_every = self.lease_s / 3
        while not self.stop_requested and (o.max_steps is None or st["steps"] < o.max_steps):
            t0 = time.perf_counter()
            x, t = next(self.batches)
            first = self.links[0].window_base is None
            if self.local_grad is None:
                self.net.loss_and_grad(self.params, x, t, self.grad, self.dropout, self.rng)
            else:
                self.net.loss_and_grad(self.params, x, t, self.local_grad, self.dropout, self.rng)
                if first:
                    self.grad[...] = self.local_grad
                else:
                    self.grad += self.local_grad
            if first:
                for link in self.links:
                    link.window_base = link.version
            window_examples += x.shape[0]
            st["steps"] += 1
            t1 = time.perf_counter()
            st["compute_s"] += t1 - t0
            if o.slowdown > 1:  # a straggler on demand, to study one on a single machine
                time.sleep((o.slowdown - 1) * (t1 - t0))
                t1 = time.perf_counter()
            fetch = st["steps"] % self.n_fetch == 0
            if st["steps"] % self.n_push == 0:
                self._push(window_examples, fetch)
                window_examples = 0
            elif fetch:
                self._pull()
            elif time.monotonic() - self._last_contact > heartbeat_every:
                self._heartbeat()
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

    def _close_channels(self):
        for link in self.links:
            if link.channel is not None:
                link.channel.close()
                link.channel = None

    def _bye(self) -> None:
        for link in self.links:
            if link.worker_id is not None:
                client = link.client
                saved = client.server_wait, client.request_timeout
                client.server_wait, client.request_timeout = 1.0, 0.5
                try:
                    client.request({"type": "bye", "worker_id": link.worker_id})
                except TransportError:
                    pass
                finally:
                    client.server_wait, client.request_timeout = saved
                link.worker_id = None

    def close(self):
        self._close_channels()
        self._bye()
        for link in self.links:
            link.client.close()
