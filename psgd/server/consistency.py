"""Consistency models: when a push is applied and when its worker may go on.

A *gate* decides; it never touches the weights or the workers' records. For each checked
push the server asks :meth:`admit`, which answers one of

- ``APPLY``: apply it now and answer now (async);
- ``APPLY_HOLD``: apply it now, but hold its ack (ssp: the worker leads by too much);
  the server then tells the gate :meth:`hold` with the ack;
- ``COLLECT``: the gate keeps the gradient for a round (sync);
- ``DUPLICATE``: the same worker's ack is already held: this is a resent push, counted
  once already; the worker keeps waiting for the ack it is owed.

After anything that may unblock a worker (a push, a departure, time) the server calls
:meth:`release` with its membership (psgd.server.membership: who is connected, the
slowest clock) and gets back what to do: acks to send now, and for sync, a round to apply
as one update. Nothing here looks at every worker on every push: a push costs the same
with 4 workers or 4,000 (SSP keeps its held acks in a heap by clock; sync counts).

- async (Downpour): apply at once, answer at once.
- ssp, bound s (stale synchronous parallel, Ho et al. 2013, as in Petuum): apply at once;
  a worker's clock is the number of its pushes, and it may start step c only while
  c - (slowest live worker's clock) <= s, so its ack is held until the slowest catches up.
- sync (bulk synchronous): hold every gradient of a round until each live worker has sent
  one, apply their average once, then answer them all. Staleness is always 0.

A live worker is connected (a held worker counts too: it cannot speak). A worker that
dies leaves barriers when its lease runs out (the server's lease check drops it, within
5% of a lease), so it never hangs the run.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

APPLY, APPLY_HOLD, COLLECT, DUPLICATE = "apply", "apply_hold", "collect", "duplicate"


@dataclass
class Round:
    """A completed synchronous round: the mean gradient and each worker's examples."""

    mean_grad: np.ndarray
    contributions: dict[int, int]


@dataclass
class Release:
    """What the server does after :meth:`release`: send these acks ``(worker, version,
    staleness)``, and (sync) first apply ``round``, whose workers are then answered."""

    acks: list[tuple[int, int, int]] = field(default_factory=list)
    round: Round | None = None


class AsyncGate:
    def admit(self, worker_id: int, examples: int, grad: np.ndarray) -> str:
        return APPLY

    def hold(self, worker_id: int, version: int, staleness: int, clock: int) -> None:
        raise AssertionError("async never holds an ack")

    def release(self, members) -> Release:
        return Release()

    def holding(self):
        """Workers whose ack is held (a read-only view): they wait on the server and cannot speak."""
        return frozenset()

    def drop_all(self) -> list[int]:
        """The run ends: forget what is held; returns the workers that were waiting."""
        return []


class SSPGate(AsyncGate):
    def __init__(self, bound: int):
        self.bound = bound
        self.held: dict[int, tuple[int, int]] = {}  # worker -> (version, staleness) of its held ack
        self._by_clock: list[tuple[int, int]] = []  # (clock, worker) of each held ack: a heap
        self.max_lead = 0  # the largest lead ever allowed: the test of the bound

    def holding(self):
        return self.held.keys()

    def admit(self, worker_id, examples, grad) -> str:
        return DUPLICATE if worker_id in self.held else APPLY_HOLD

    def hold(self, worker_id, version, staleness, clock) -> None:
        self.held[worker_id] = (version, staleness)
        heapq.heappush(self._by_clock, (clock, worker_id))  # a held worker's clock stands still

    def release(self, members) -> Release:
        out = Release()
        if not self.held:
            return out
        # the slowest of the connected and the held (a held worker that hung up still has its place)
        slowest = min(c for c in (members.slowest_clock(), self._by_clock[0][0]) if c is not None)
        while self._by_clock and self._by_clock[0][0] - slowest <= self.bound:
            clock, worker_id = heapq.heappop(self._by_clock)
            version, staleness = self.held.pop(worker_id)
            self.max_lead = max(self.max_lead, clock - slowest)
            out.acks.append((worker_id, version, staleness))
        return out

    def drop_all(self) -> list[int]:
        dropped, self.held, self._by_clock = sorted(self.held), {}, []
        return dropped


class SyncGate(AsyncGate):
    def __init__(self, size: int, dtype):
        self.waiting: dict[int, int] = {}  # worker -> examples of its gradient in this round
        self.sum = np.zeros(size, dtype)  # of this round's gradients (their mean, once released)

    def holding(self):
        return self.waiting.keys()

    def admit(self, worker_id, examples, grad) -> str:
        if worker_id in self.waiting:
            return DUPLICATE  # a second gradient for one round (a resent push): already counted
        if self.waiting:
            self.sum += grad
        else:  # the first of a round: no pass to zero the sum
            np.copyto(self.sum, grad)
        self.waiting[worker_id] = examples
        return COLLECT

    def release(self, members) -> Release:
        # complete when every connected worker has sent its gradient: counted, not scanned,
        # until there are as many gradients as connected workers (once a round)
        if not self.waiting or len(self.waiting) < members.connected:
            return Release()
        workers = members.workers
        if sum(1 for w in self.waiting if w in workers and workers[w].connected) < members.connected:
            return Release()
        self.sum *= 1.0 / len(self.waiting)
        done = Round(self.sum, self.waiting)  # applied before the next round's first push
        self.waiting = {}
        return Release(round=done)

    def drop_all(self) -> list[int]:
        dropped, self.waiting = sorted(self.waiting), {}
        return dropped


def make_gate(config, size: int, dtype):
    if config.consistency == "ssp":
        return SSPGate(config.ssp_bound)
    if config.consistency == "sync":
        return SyncGate(size, dtype)
    return AsyncGate()
