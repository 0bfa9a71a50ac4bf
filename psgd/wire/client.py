"""One client for the whole, possibly sharded, parameter vector, in the spirit of
ps-lite's KVWorker: every psgd process that speaks to a server (a worker, the
coordinator, ``psgd status``, the launcher) speaks through a :class:`ParameterClient`.

With K server shards each holds one contiguous range of the flat vector. Requests go to
every shard, all in flight at once; a pull is assembled from every shard's range;
statistics are shard 0's (every push reaches every shard, so its counts stand for all)
with the traffic and error counters summed over the shards; per-worker records come
only on request, paged.

A worker also *joins*: ``hello`` to every shard (shard 0 first: it hands out the data
shards), then one channel per shard (psgd.wire.channels: shared memory where the server
offers it on this machine, else ZeroMQ). Its gradient is computed into one buffer
(:attr:`ParameterClient.grad`); each shard's range goes out as a zero-copy view (ZeroMQ)
or is copied into that shard's shared segment. With one shard on this machine the
buffer *is* the shared segment: no copy. A joined client is the channel the worker core
(psgd.worker.core) runs on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, ProtocolError, PsgdError, ShutdownRequested, TransportError
from . import shm
from .channels import ShmChannel, ZmqChannel, check_reply
from .codecs import CODECS
from .protocol import Message
from .transport import Client, ClientKeys, connect_clients, max_reply_bytes

CONTROL_WAIT_S = 10.0  # how long a coordinator or psgd status waits for a server to answer
DESCRIBE_WAIT_S = 30.0  # a coordinator started before its server waits this long for the run's description
SHUTDOWN_WAIT_S = 5.0  # ending a run: a server that does not answer soon is gone already
BYE_WAIT_S = 1.0  # a goodbye is a courtesy: a server that does not answer soon is gone anyway
BYE_REQUEST_TIMEOUT_S = 0.5
TIMING_EVERY_S = 1.0  # how often a worker's time totals go to the server (a few dozen bytes)
# ... after the first ones, which go at 0.1, 0.3, 0.7 s of pushing (the gap doubling up to
# TIMING_EVERY_S): a run of under a second otherwise reported only its first push's
# totals (a "wall" of 0.004 s for a worker with 446 pushes)
TIMING_FIRST_S = 0.1


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
    local_steps: int | None = None  # local SGD with dynamic local steps: shard 0's word on the next H
    inner_lr: float | None = None  # local SGD with a scheduled inner rate: shard 0's word on the next round's


@dataclass
class Acks:
    """What :meth:`ParameterClient.await_acks` heard: the push's result, and the version of
    the weights each shard sent back (None: none were asked for)."""

    result: PushResult
    versions: list


class ParameterClient:
    """``endpoints``: one server's, or all K shards' in shard order (a list, or one
    comma-separated string). ``server_wait``: how long a request may go unanswered
    (resent meanwhile) before the server counts as gone. ``max_message``: the largest
    reply taken before a worker's welcome says the size of its range (a coordinator
    that pulls gives its model's size)."""

    def __init__(self, endpoints: str | list[str], name: str, keys: ClientKeys | None = None,
                 server_wait: float = CONTROL_WAIT_S, max_message: int | None = None, transport: str = "auto"):
        self.clients = connect_clients(endpoints, name, server_wait=server_wait, keys=keys, max_message=max_message)
        self.endpoints = [client.endpoint for client in self.clients]
        self.links = [ShardLink(client) for client in self.clients]
        self.name, self.transport, self.server_wait = name, transport, server_wait
        self.grads: list[np.ndarray] = []
        self.slot = 0  # which of grads the next gradient goes into
        self._in_flight: tuple | None = None  # (params or None,) of a push sent and not yet acked
        self.last_contact = time.monotonic()
        # A worker's time totals (psgd.worker.timing), sent with shard 0's push every
        # TIMING_EVERY_S (or by heartbeat where the push is a doorbell) and with every heartbeat.
        self.timing_source = None  # () -> dict, or None: send none
        self._timing_sent: float | None = None  # when the totals last went (None: the clock starts at the first push)
        self._timing_gap = TIMING_FIRST_S
        self._timing_by_heartbeat = False  # the push in flight could not carry them

    @property
    def joined(self) -> bool:
        return all(link.channel is not None for link in self.links)

    # --- any client -----------------------------------------------------------------------

    def request_all(self, header: dict, server_wait: float | None = None) -> list[Message]:
        for client in self.clients:
            client.send(header, server_wait=server_wait)
        return [client.receive() for client in self.clients]

    def control(self, header: dict, server_wait: float | None = None) -> None:
        """A message every shard must answer with ``ok``."""
        for endpoint, reply in zip(self.endpoints, self.request_all(header, server_wait)):
            if reply.type != "ok":
                raise PsgdError(f"{endpoint} answered {header['type']} with {reply.type}: {reply.get('message', '')}")

    def set_params(self, params: np.ndarray) -> None:
        """Every shard takes its range of ``params`` as its weights (a rollback)."""
        ranges = []
        for endpoint, reply in zip(self.endpoints, self.request_all({"type": "stats"})):
            _expect(endpoint, "stats", reply, "stats_reply")
            ranges.append(reply["stats"]["range"])
        for client, (lo, hi) in zip(self.clients, ranges):
            client.send({"type": "set_params"}, [params[lo:hi]], [lo])
        for endpoint, client in zip(self.endpoints, self.clients):
            _expect(endpoint, "set_params", client.receive(), "ok")

    def describe(self) -> dict:
        """The run's configuration, as the server (shard 0) holds it."""
        reply = self.clients[0].request({"type": "describe"}, server_wait=DESCRIBE_WAIT_S)
        if reply.type != "description":
            raise PsgdError(f"the server at {self.endpoints[0]} did not describe its run: "
                            f"{reply.get('message', reply.type)}")
        return reply["config"]

    def stats(self, workers: bool = False) -> dict:
        """The servers' statistics (a summary of constant size). With ``workers``, also
        every per-worker record, as ``stats["workers"]`` (worker id as a string -> record,
        in joining order), read from shard 0 page by page: each reply stays within the
        header limit however many workers there are."""
        replies = self.request_all({"type": "stats"})
        for endpoint, reply in zip(self.endpoints, replies):
            _expect(endpoint, "stats", reply, "stats_reply")
        merged = dict(replies[0]["stats"])
        merged["checkpoints"] = [r["stats"].get("checkpoint") for r in replies]  # each shard writes its own
        if len(replies) > 1:
            shards = [r["stats"] for r in replies]
            merged["bytes_in"] = sum(s["bytes_in"] for s in shards)
            merged["bytes_out"] = sum(s["bytes_out"] for s in shards)
            merged["cpu_s"] = sum(s.get("cpu_s", 0.0) for s in shards)
            merged["traffic"] = _sum_traffic(s.get("traffic") for s in shards)
            errors: dict[str, int] = {}
            for s in shards:
                for code, n in s["errors"].items():
                    errors[code] = errors.get(code, 0) + n
            merged["errors"] = errors
            merged["shard_versions"] = [s["version"] for s in shards]
        if workers:
            merged["workers"] = self.worker_records()
        return merged

    def worker_records(self) -> dict[str, dict]:
        """Every per-worker record of shard 0 (which hands out the data shards), paged."""
        client, records, after = self.clients[0], {}, None
        while True:
            reply = client.request({"type": "stats", "workers": True, "after": after})
            _expect(self.endpoints[0], "stats", reply, "stats_reply")
            for record in reply.get("workers") or []:
                records[str(record["worker_id"])] = record
            after = reply.get("next")
            if after is None:
                return records

    def pull(self, out: np.ndarray) -> int:
        """Fill ``out`` with the whole parameter vector; return the oldest shard's version.
        A joined worker pulls through its channels (shared memory where it can); anyone
        else asks every shard for its range."""
        if self.joined:
            for link in self.links:
                link.version = link.channel.pull(out[link.lo:link.hi])
            self.last_contact = time.monotonic()
            return min(link.version for link in self.links)
        versions, covered = [], 0
        for endpoint, reply in zip(self.endpoints, self.request_all({"type": "pull"})):
            if reply.type != "params" or len(reply.arrays) != 1:
                raise PsgdError(f"{endpoint} answered pull with {reply.type}: {reply.get('message', '')}")
            part, lo = reply.arrays[0], reply.offset(0)
            if lo + part.size > out.size:
                raise PsgdError(f"{endpoint} sent parameters [{lo}, {lo + part.size}) of a {out.size}-vector")
            out[lo:lo + part.size] = part
            covered += part.size
            versions.append(reply["version"])
        if covered != out.size:
            raise PsgdError(f"the server shards hold {covered} of {out.size} parameters: is one missing from the list?")
        return min(versions)

    # --- a worker ------------------------------------------------------------------------

    def hello(self, data_shards: list[int] | None, interrupted=None) -> list:
        """Hello to every shard, shard 0 first: it hands out the data shards, and the
        others are asked for the same. Returns the welcomes. ``interrupted()``: asked
        while a shard does not answer; once true, :class:`Interrupted` ends the wait."""
        welcomes = []
        for k, link in enumerate(self.links):
            reply = link.client.request({"type": "hello", "worker": self.name, "transport": self.transport,
                                         "data_shards": data_shards, "codecs": list(CODECS)},
                                        interrupted=interrupted)
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

    def open(self, welcomes: list, n_params: int, dtype, buffers: int = 1) -> None:
        """One channel per shard, after :meth:`hello`; sets :attr:`grad`. With two
        ``buffers`` the worker computes into one while the other's push is in flight
        (:meth:`push_begin`, :meth:`push_end`)."""
        self.close_channels()
        single = len(self.links) == 1
        self.grads = [] if single else [np.empty(n_params, dtype) for _ in range(buffers)]
        self.slot, self._in_flight = 0, None
        for link, welcome in zip(self.links, welcomes):
            link.lo, link.hi = welcome["range"]
            link.worker_id = welcome["worker_id"]
            link.client.limit_messages(max_reply_bytes(link.hi - link.lo, np.dtype(dtype).itemsize))
            local = welcome.get("local")
            if self.transport in ("auto", "shm") and isinstance(local, dict) and shm.available():
                try:
                    link.channel = ShmChannel(local, link.worker_id, link.hi - link.lo, dtype, self.server_wait, buffers)
                except (TransportError, KeyError, ValueError, TypeError):
                    if self.transport == "shm":
                        raise
            elif self.transport == "shm":
                raise TransportError("the shared-memory path was asked for, but the server does not offer it here")
            if link.channel is None:
                views = [np.empty(link.hi - link.lo, dtype) for _ in range(buffers)] if single else \
                    [grad[link.lo:link.hi] for grad in self.grads]
                link.channel = ZmqChannel(link.client, link.worker_id, views, link.lo, welcome.get("codecs"))
            link.copy_in = not single and link.channel.transport == "shm"
            link.window_base = None
        if single:
            self.grads = self.links[0].channel.grads
        self.last_contact = time.monotonic()

    @property
    def grad(self) -> np.ndarray:
        """The buffer the next gradient is computed into (not the one in flight)."""
        return self.grads[self.slot]

    @property
    def transports(self) -> list[str]:
        return [link.channel.transport for link in self.links if link.channel is not None]

    # --- training -----------------------------------------------------------------------

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
        self.push_begin(examples, params)
        return self.push_end()

    def push_begin(self, examples: int, params: np.ndarray | None) -> None:
        """Send :attr:`grad` to every shard and return at once; :attr:`grad` is then the
        other buffer (with two), free to compute into while this one travels. Leave
        ``params`` alone until :meth:`push_end`, which fetches the fresh weights into it."""
        timing = self._timing_due()
        carried = False
        for k, link in enumerate(self.links):
            if link.copy_in:
                link.channel.grads[self.slot][...] = self.grad[link.lo:link.hi]
            carried |= link.channel.push_begin(self.slot, link.window_base, examples,
                                               params[link.lo:link.hi] if params is not None else None,
                                               timing if k == 0 else None)
            link.window_base = None  # the next gradient's window opens on the weights it is computed from
        self._in_flight = (params,)
        self._timing_by_heartbeat = timing is not None and not carried
        self.slot = (self.slot + 1) % len(self.grads)

    def push_end(self) -> PushResult:
        """Wait for the acks of the push in flight."""
        return self.settle(self.await_acks())

    @property
    def acks_in_background(self) -> bool:
        """Whether a worker computing with overlap should wait for acks on a helper thread
        (:meth:`await_acks`): on shared memory only. There the wait is a doorbell and a read
        of the weights, and a helper took it off the loop (784-256-256-10, one worker: the
        loop's wait fell from 0.19-0.25 ms to 0.03-0.04 ms a step). Over ZeroMQ the helper's
        receive and decode ran beside the compute, which slowed each step from 3.3-3.5 ms to
        3.8-4.0 ms: 24.4-26.3k examples/s against 27.4-30.1k."""
        return all(link.channel is not None and link.channel.transport == "shm" for link in self.links)

    def catch_up(self, params: np.ndarray) -> None:
        """Read again each shard's range of ``params`` whose weights the server has moved
        on from since they were read. A helper thread reads them when the ack comes, a step
        before they are used; with other workers pushing meanwhile that made every gradient
        0.7 updates staler (2 workers with overlap: staleness 2.77 against 2.08, and no seed
        reached 98% in 14 epochs). Caught up, the weights are as fresh as a read on the
        loop's own thread gives, and the read is saved only where nothing moved (one
        worker). Shared memory only: there the newest version is one integer to look at."""
        for link in self.links:
            newest = getattr(link.channel, "newest_version", None)
            if newest is not None and link.version is not None and newest() > link.version:
                link.version = link.channel.pull(params[link.lo:link.hi])

    def await_acks(self) -> "Acks":
        """The waiting half of :meth:`push_end`: every shard's ack, and its fresh weights
        into the ``params`` given to :meth:`push_begin`. It touches nothing that the compute
        loop reads (not the versions :meth:`mark_window` takes), so it may run on another
        thread while the next gradient is computed; :meth:`settle` then, on the loop's."""
        if self._in_flight is None:
            raise RuntimeError("push_end without a push in flight")
        (params,), self._in_flight = self._in_flight, None
        refused, staleness, generation, versions = False, 0, None, []
        for k, link in enumerate(self.links):
            try:
                _, link_staleness, fetched, link_generation = link.channel.push_end()
            except ProtocolError:
                refused = True
                fetched = link.channel.pull(params[link.lo:link.hi]) if params is not None else None
            else:
                if k == 0:  # shard 0 hands out the data: its word counts
                    staleness, generation = link_staleness, link_generation
            versions.append(fetched)
        first = self.links[0].channel
        return Acks(PushResult(staleness, refused, generation, getattr(first, "local_steps", None),
                               getattr(first, "inner_lr", None)), versions)

    def settle(self, acks: "Acks") -> PushResult:
        """The rest of :meth:`push_end`, on the compute loop's thread: the weights just
        fetched are now the ones the next window is computed from."""
        for link, fetched in zip(self.links, acks.versions):
            if fetched is not None:
                link.version = fetched
        self.last_contact = time.monotonic()
        if self._timing_by_heartbeat:
            self._timing_by_heartbeat = False
            self.heartbeat(first_only=True)
        return acks.result

    def _timing_due(self) -> dict | None:
        if self.timing_source is None:
            return None
        now = time.monotonic()
        if self._timing_sent is None:
            self._timing_sent = now
        if now - self._timing_sent < self._timing_gap:
            return None
        self._timing_sent = now
        self._timing_gap = min(2 * self._timing_gap, TIMING_EVERY_S)
        return self.timing_source()

    def heartbeat(self, first_only: bool = False):
        """Tell the shards we are alive; returns shard 0's ``assignment`` reply."""
        first = None
        for k, link in enumerate(self.links[:1] if first_only else self.links):
            header = {"type": "heartbeat", "worker_id": link.worker_id}
            if k == 0 and self.timing_source is not None:
                header["timing"] = self.timing_source()
                if self._timing_sent is not None:  # (before the first push, the clock has not started)
                    self._timing_sent = time.monotonic()
            reply = check_reply(link.client.request(header), "assignment")
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
        """Close the channels, say goodbye if joined, close the sockets."""
        self.close_channels()
        self.bye()
        for client in self.clients:
            client.close()


def _expect(endpoint: str, asked: str, reply: Message, kind: str) -> None:
    if reply.type != kind:
        raise PsgdError(f"{endpoint} answered {asked} with {reply.type}: {reply.get('message', '')}")


def _sum_traffic(shards) -> dict:
    """Payload bytes by direction and codec, summed over the server shards."""
    total: dict[str, dict[str, int]] = {"pushed": {}, "pulled": {}}
    for traffic in shards:
        for way, by_codec in (traffic or {}).items():
            for codec, n in by_codec.items():
                total.setdefault(way, {})[codec] = total.get(way, {}).get(codec, 0) + n
    return total
