"""All the shards of a parameter server, spoken to as one (by a coordinator or a tool).

With K server shards each holds one contiguous range of the flat parameter vector.
Control messages (pause, resume, set_lr, shutdown) go to every shard, all in flight at
once; a pull is assembled from every shard's range; statistics are shard 0's (every
push reaches every shard, so its counts stand for all) with the traffic and error
counters summed over the shards. Per-worker records come only on request, paged.
"""

from __future__ import annotations

import numpy as np

from ..errors import PsgdError
from .protocol import Message
from .transport import ClientKeys, connect_clients


class ServerGroup:
    def __init__(self, endpoints: str | list[str], name: str, server_wait: float = 10.0, keys: ClientKeys | None = None,
                 max_message: int | None = None):
        """``max_message``: the largest reply taken (default: no weights; a coordinator
        that pulls gives its model's size)."""
        self.clients = connect_clients(endpoints, name, server_wait=server_wait, keys=keys, max_message=max_message)
        self.endpoints = [client.endpoint for client in self.clients]

    def request_all(self, header: dict) -> list[Message]:
        for client in self.clients:
            client.send(header)
        return [client.receive() for client in self.clients]

    def control(self, header: dict) -> None:
        """A message every shard must answer with ``ok``."""
        for endpoint, reply in zip(self.endpoints, self.request_all(header)):
            if reply.type != "ok":
                raise PsgdError(f"{endpoint} answered {header['type']} with {reply.type}: {reply.get('message', '')}")

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
        """Fill ``out`` with the whole parameter vector; return the oldest shard's version."""
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

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _expect(endpoint: str, asked: str, reply: Message, kind: str) -> None:
    if reply.type != kind:
        raise PsgdError(f"{endpoint} answered {asked} with {reply.type}: {reply.get('message', '')}")
