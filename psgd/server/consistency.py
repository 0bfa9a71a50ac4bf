"""Consistency models: when a push is applied and when its worker may go on.

Each *gate* takes a validated push and decides. Acknowledgements that are ready go into
``state.outbox`` as ``(worker_id, version, staleness)``; the server loop delivers them by
whichever path each worker came (ZeroMQ or shared memory). A worker whose ack is held
simply waits: that is how a barrier or a staleness bound reaches it.

- async (Downpour): apply at once, answer at once.
- ssp, bound s (stale synchronous parallel, Ho et al. 2013, as in Petuum): apply at once;
  a worker's clock is the number of its pushes, and it may start step c only while
  c - (slowest live worker's clock) <= s, so its ack is held until the slowest catches up.
- sync (bulk synchronous): hold every gradient of a round until each live worker has sent
  one, apply their average once, then answer them all. Staleness is always 0.

A live worker is connected and was heard from within its lease (a held worker counts as
heard from). A worker that dies leaves barriers when its lease runs out, so it never
hangs the run.
"""

from __future__ import annotations

import numpy as np


class AsyncGate:
    def submit(self, state, worker_id, base_version, examples, grad) -> None:
        version, staleness = state.apply(worker_id, base_version, examples, grad)
        state.outbox.append((worker_id, version, staleness))

    def tick(self, state) -> None:
        """Called every loop turn and when workers leave; may release held acks."""

    def holding(self) -> set[int]:
        """Workers whose ack is held: they wait on the server and cannot speak."""
        return set()


class SSPGate:
    def __init__(self, bound: int):
        self.bound = bound
        self.held: dict[int, tuple[int, int]] = {}  # worker -> (version, staleness) of its held ack
        self.max_lead = 0  # the largest lead ever allowed: the test of the bound

    def holding(self) -> set[int]:
        return set(self.held)

    def submit(self, state, worker_id, base_version, examples, grad) -> None:
        if worker_id in self.held:
            return  # a resent push whose ack is held: applied once already
        version, staleness = state.apply(worker_id, base_version, examples, grad)
        self.held[worker_id] = (version, staleness)
        self.tick(state)

    def tick(self, state) -> None:
        if not self.held:
            return
        live = state.live_workers(also=self.held)
        slowest = min((state.workers[w].pushes for w in live), default=0)
        for worker_id in sorted(self.held):
            clock = state.workers[worker_id].pushes
            if worker_id not in live or clock - slowest <= self.bound:
                version, staleness = self.held.pop(worker_id)
                if worker_id in live:
                    self.max_lead = max(self.max_lead, clock - slowest)
                state.outbox.append((worker_id, version, staleness))


class SyncGate:
    def __init__(self):
        self.waiting: dict[int, int] = {}  # worker -> examples of its gradient in this round
        self.sum: np.ndarray | None = None

    def holding(self) -> set[int]:
        return set(self.waiting)

    def submit(self, state, worker_id, base_version, examples, grad) -> None:
        if worker_id in self.waiting:
            return  # a second gradient for one round (a resent push): already counted
        state.check_push(worker_id, base_version, examples, grad)
        if self.sum is None:
            self.sum = np.zeros(state.size, state.dtype)
        self.sum += grad
        self.waiting[worker_id] = examples
        self.tick(state)

    def tick(self, state) -> None:
        if not self.waiting:
            return
        live = state.live_workers(also=self.waiting)
        if not all(w in self.waiting for w in live):
            return
        self.sum *= 1.0 / len(self.waiting)
        state.apply_average(self.sum, self.waiting)
        for worker_id in sorted(self.waiting):
            state.outbox.append((worker_id, state.version, 0))
        self.waiting = {}
        self.sum[...] = 0


def make_gate(config):
    if config.consistency == "ssp":
        return SSPGate(config.ssp_bound)
    if config.consistency == "sync":
        return SyncGate()
    return AsyncGate()
