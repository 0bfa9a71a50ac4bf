"""A worker's view of all K server shards as one parameter vector, in the spirit of
ps-lite's KVWorker: ``hello``, ``pull``, ``push``, ``heartbeat`` and ``bye`` over the
whole flat vector, each shard reached by its own channel (shared memory where the
server offers it on this machine, else ZeroMQ).

The gradient is computed into one buffer (:attr:`ShardedChannel.grad`); each shard's
range goes out as a zero-copy view (ZeroMQ) or is copied into that shard's shared
segment. With one shard on this machine the buffer *is* the shared segment: no copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, ProtocolError, ShutdownRequested, TransportError
from . import shm
from .channels import ShmChannel, ZmqChannel, check_reply
from .transport import Client, max_reply_bytes

BYE_WAIT_S = 1.0  # a goodbye is a courtesy: a server that does not answer soon is gone anyway
BYE_REQUEST_TIMEOUT_S = 0.5


@dataclass
class ShardLink:
    """One server shard: its client and channel, its range, and the version of the
    weights last fetched from it."""

    client: Client
    lo: int = 0
    hi: int = 0
    worker_id: int | None = None
    channel: object = None
    version: int = 0
    window_base: int | None = None  # the version the gradient being summed was computed from
    copy_in: bool = False  # the channel has its own gradient buffer: copy our range into it


@dataclass(frozen=True)
class PushResult:
    staleness: int  # shard 0's word (every push reaches every shard)
    refused: bool  # some shard refused it (its weights were pulled afresh instead)
    data_generation: int  # shard 0's: a change means the data shards moved


class ShardedChannel:
    def __init__(self, clients: list[Client], name: str, transport: str = "auto"):
        self.links = [ShardLink(client) for client in clients]
        self.name, self.transport = name, transport
        self.grad: np.ndarray | None = None
        self.last_contact = time.monotonic()

    # --- joining ------------------------------------------------------------------------

    def hello(self, data_shards: list[int] | None) -> list:
        """Hello to every shard, shard 0 first: it hands out the data shards, and the
        others are asked for the same. Returns the welcomes."""
        welcomes = []
        for k, link in enumerate(self.links):
            reply = link.client.request({"type": "hello", "worker": self.name, "transport": self.transport,
                                         "data_shards": data_shards})
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
                data_shards = list(reply["data_shards"])
            link.worker_id = reply["worker_id"]
            welcomes.append(reply)
        return welcomes

    def open(self, welcomes: list, n_params: int, dtype, server_wait_s: float) -> None:
        """One channel per shard, after :meth:`hello`; sets :attr:`grad`."""
        self.close_channels()
        single = len(self.links) == 1
        self.grad = None if single else np.empty(n_params, dtype)
        for link, welcome in zip(self.links, welcomes):
            link.lo, link.hi = welcome["range"]
            link.worker_id = welcome["worker_id"]
            link.client.limit_messages(max_reply_bytes(link.hi - link.lo, np.dtype(dtype).itemsize))
            local = welcome.get("local")
            if self.transport in ("auto", "shm") and isinstance(local, dict) and shm.available():
                try:
                    link.channel = ShmChannel(local, link.worker_id, link.hi - link.lo, dtype, server_wait_s)
                except (TransportError, KeyError, ValueError, TypeError):
                    if self.transport == "shm":
                        raise
            elif self.transport == "shm":
                raise TransportError("the shared-memory path was asked for, but the server does not offer it here")
            if link.channel is None:
                view = np.empty(link.hi - link.lo, dtype) if single else self.grad[link.lo:link.hi]
                link.channel = ZmqChannel(link.client, link.worker_id, view, link.lo)
            link.copy_in = not single and link.channel.transport == "shm"
            link.window_base = None
        if single:
            self.grad = self.links[0].channel.grad
        self.last_contact = time.monotonic()

    @property
    def transports(self) -> list[str]:
        return [link.channel.transport for link in self.links if link.channel is not None]

    # --- training -----------------------------------------------------------------------

    def pull(self, params: np.ndarray) -> None:
        for link in self.links:
            link.version = link.channel.pull(params[link.lo:link.hi])
        self.last_contact = time.monotonic()

    def mark_window(self) -> None:
        """The gradient summed from now on is computed from the weights last pulled."""
        for link in self.links:
            link.window_base = link.version

    @property
    def window_open(self) -> bool:
        return self.links[0].window_base is not None

    def push(self, examples: int, params: np.ndarray | None) -> PushResult:
        """Every shard its range of :attr:`grad`, all in flight at once; then the acks.
        With ``params``, each shard's fresh weights are fetched into it as well."""
        for link in self.links:
            if link.copy_in:
                link.channel.grad[...] = self.grad[link.lo:link.hi]
            link.channel.push_begin(link.window_base, examples, params[link.lo:link.hi] if params is not None else None)
        refused, staleness, generation = False, 0, None
        for k, link in enumerate(self.links):
            try:
                _, link_staleness, fetched, link_generation = link.channel.push_end()
            except ProtocolError:
                refused = True
                fetched = link.channel.pull(params[link.lo:link.hi]) if params is not None else None
            else:
                if k == 0:  # shard 0 hands out the data: its word counts
                    staleness, generation = link_staleness, link_generation
            if fetched is not None:
                link.version = fetched
            link.window_base = None
        self.last_contact = time.monotonic()
        return PushResult(staleness, refused, generation)

    def heartbeat(self, first_only: bool = False):
        """Tell the shards we are alive; returns shard 0's ``assignment`` reply."""
        first = None
        for link in self.links[:1] if first_only else self.links:
            reply = check_reply(link.client.request({"type": "heartbeat", "worker_id": link.worker_id}), "assignment")
            first = first or reply
        self.last_contact = time.monotonic()
        return first

    # --- leaving ------------------------------------------------------------------------

    def bye(self) -> None:
        """Say goodbye to every shard, briefly: a server that does not answer is gone."""
        for link in self.links:
            if link.worker_id is not None:
                try:
                    link.client.request({"type": "bye", "worker_id": link.worker_id},
                                        server_wait=BYE_WAIT_S, request_timeout=BYE_REQUEST_TIMEOUT_S)
                except TransportError:
                    pass
                link.worker_id = None

    def close_channels(self) -> None:
        for link in self.links:
            if link.channel is not None:
                link.channel.close()
                link.channel = None

    def close(self) -> None:
        self.close_channels()
        self.bye()
        for link in self.links:
            link.client.close()
