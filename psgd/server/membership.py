"""Membership: the workers a server knows, their leases, and which data shards each
trains on. Pure bookkeeping, no sockets, no weights; time comes from a clock passed in.

A worker joins with hello and gets an id and data shards; every message from it renews
its lease; a worker silent past its lease (or gone: bye, hang-up) is dropped, and its data
shards go to the live worker with the fewest, so no part of the data goes untrained. A
worker that comes back asks for the shards it had and gets them back.
"""

from __future__ import annotations

import heapq
import secrets
import time
from collections import Counter

from ..errors import ConfigError, ProtocolError
from ..metrics import WorkerRecord

MAX_WORKERS = 4096  # connected at once; a hello beyond is refused (a flood of hellos is bounded)
MAX_DATA_SHARDS = 4096  # so that any worker's list of data shards fits a header (welcome, stats page)
LEASE_CHECK_S = 0.05  # the shortest interval between looks for expired leases
LEASE_CHECK_FRACTION = 0.05  # ... else every this fraction of a lease: a scan of every worker
# costs O(workers), so it must not run every turn of a busy loop; a lease then ends within 5% of its length


class Membership:
    # None: MAX_WORKERS and MAX_DATA_SHARDS; class attributes, so that an in-process
    # simulator (psgd.simulate) may lift those wire limits
    max_workers: int | None = None
    max_data_shards: int | None = None

    def __init__(self, lease_s: float, num_data_shards: int = 1, clock=time.monotonic):
        self.lease_s = lease_s
        limit = self.max_data_shards or MAX_DATA_SHARDS
        if num_data_shards > limit:
            raise ConfigError(f"at most {limit} data shards, not {num_data_shards}")
        self.num_data_shards = max(1, num_data_shards)
        self.clock = clock
        self.workers: dict[int, WorkerRecord] = {}  # by ascending id (ids only grow): stats pages rely on it
        self.connected = 0  # how many are connected: kept, not counted (stats are polled often)
        self.joined = 0  # hellos taken since the server started (rejoins too): the start barrier's count
        self.lost_shards: set[int] = set()  # data shards of departed workers, not yet adopted
        # shard -> ids of the connected workers training on it: a hello or a departure looks
        # only at the workers of its shards, never at every worker (10,000 hellos were quadratic)
        self._holders: dict[int, set[int]] = {}
        # SSP's slowest clock among connected workers, without a scan: how many connected
        # workers stand at each clock, and a heap of those clocks (emptied ones dropped lazily)
        self._at_clock: Counter = Counter()
        self._clock_heap: list[int] = []
        self._leases_checked = float("-inf")
        # Worker ids start at a random point, so that an id from before a restart is not taken
        # for a new worker's: a worker of the old server must hear "unknown worker" and rejoin.
        self._next_worker_id = secrets.randbelow(1 << 24) << 16

    def register(self, name: str, transport: str, wanted: list[int] | None = None) -> WorkerRecord:
        """A new worker, and the data shards it trains on: the ones it asks for (a worker
        coming back asks for those it had), else a shard nobody trains on, else the least
        used one. A shard it takes back from a worker that adopted it leaves that worker.
        ``wanted`` must already be valid (distinct shard numbers in range)."""
        limit = self.max_workers or MAX_WORKERS
        if self.connected >= limit:
            raise ProtocolError("too_many_workers", f"{limit} workers are connected already")
        worker_id = self._next_worker_id
        self._next_worker_id += 1
        if wanted:
            shards = sorted(set(wanted))
            for other_id in sorted(set().union(*(self._holders.get(s, ()) for s in shards))):
                other = self.workers[other_id]
                kept = [s for s in other.data_shards if s not in shards]
                if kept and kept != other.data_shards:
                    self._hold(other, kept)
                    other.data_generation += 1
        else:
            shards = [min(range(self.num_data_shards), key=lambda s: (len(self._holders.get(s, ())), s))]
        self.lost_shards.difference_update(shards)
        now = self.clock()
        record = WorkerRecord(worker_id, name, [], transport, joined=now, last_seen=now)
        self._hold(record, shards)
        self.workers[worker_id] = record
        self.connected += 1
        self.joined += 1
        self._enter_clock(0)
        self._adopt_lost_shards()
        return record

    def touch(self, worker_id) -> WorkerRecord:
        """A sign of life from a worker; raises for one the server does not (or no longer) know."""
        record = self.workers.get(worker_id) if isinstance(worker_id, int) else None
        if record is None:
            raise ProtocolError("unknown_worker", f"worker {worker_id} has not said hello (server restarted?)")
        if record.expired:
            raise ProtocolError("unknown_worker", f"worker {worker_id} was silent past its lease; say hello again")
        record.last_seen = self.clock()
        return record

    def count(self, worker_id: int, examples: int, staleness: int) -> None:
        """One applied push of this worker's."""
        record = self.workers[worker_id]
        if record.connected:
            self._leave_clock(record.pushes)
            self._enter_clock(record.pushes + 1)
        record.pushes += 1
        record.examples += examples
        record.last_seen = self.clock()
        record.staleness.add(staleness)

    def disconnect(self, worker_id: int) -> bool:
        """The worker is gone (bye, hang-up, lease); True if it was connected."""
        record = self.workers.get(worker_id)
        if record is None or not record.connected:
            return False
        record.connected = False
        self.connected -= 1
        self._leave_clock(record.pushes)
        for s in record.data_shards:
            self._holders[s].discard(worker_id)
        if record.pushes == 0 and record.refused == 0:
            del self.workers[worker_id]  # it did nothing: keeping it would let hellos grow the stats
        self.lost_shards.update(record.data_shards)
        self._adopt_lost_shards()
        return True

    def expire_leases(self, held: set[int] = frozenset()) -> list[int]:
        """Drop connected workers silent past their lease (looked for at most every
        LEASE_CHECK_S, or LEASE_CHECK_FRACTION of the lease if longer);
        ``held`` are workers the server itself keeps waiting, whose silence is its doing.
        Returns the dropped ids."""
        now = self.clock()
        if now - self._leases_checked < max(LEASE_CHECK_S, LEASE_CHECK_FRACTION * self.lease_s):
            return []
        self._leases_checked = now
        dropped = []
        for record in list(self.workers.values()):
            if record.connected and record.worker_id not in held and now - record.last_seen >= self.lease_s:
                record.expired = True
                self.disconnect(record.worker_id)
                dropped.append(record.worker_id)
        return dropped

    def extend_leases(self, seconds: float) -> None:
        """Stop every lease's clock for ``seconds``: the time of a pause in which the server
        held the workers. (Restarting the leases instead would keep a dead worker alive
        for good in a run whose coordinator pauses more often than a lease lasts.)"""
        for record in self.workers.values():
            record.last_seen += seconds

    def live(self, also=()) -> set[int]:
        """Workers that count for barriers: connected and heard from within the lease,
        plus ``also`` (workers the gate is holding, which cannot speak)."""
        now = self.clock()
        return {w for w, r in self.workers.items()
                if w in also or (r.connected and now - r.last_seen < self.lease_s)}

    def any_connected(self) -> bool:
        return self.connected > 0

    def clocks(self) -> dict[int, int]:
        """Each worker's clock for SSP: the number of its applied pushes."""
        return {w: r.pushes for w, r in self.workers.items()}

    def slowest_clock(self) -> int | None:
        """The smallest clock of a connected worker (None: none is connected), in O(1)
        amortized: SSP asks on every push, and a scan of every worker would make a push's
        cost grow with their number. A worker silent past its lease counts until the next
        lease check drops it (expire_leases), at most LEASE_CHECK_FRACTION of a lease."""
        heap = self._clock_heap
        while heap and not self._at_clock[heap[0]]:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _enter_clock(self, clock: int) -> None:
        self._at_clock[clock] += 1
        if self._at_clock[clock] == 1:
            heapq.heappush(self._clock_heap, clock)
            if len(self._clock_heap) > 2 * len(self._at_clock) + 64:  # emptied clocks below a slow worker's
                self._clock_heap = list(self._at_clock)
                heapq.heapify(self._clock_heap)

    def _leave_clock(self, clock: int) -> None:
        self._at_clock[clock] -= 1
        if not self._at_clock[clock]:
            del self._at_clock[clock]  # and from the heap when it reaches the top (or at a compaction)

    def _adopt_lost_shards(self) -> None:
        """Hand each data shard that its worker took away to the live worker with the fewest,
        so that no part of the data goes untrained while workers come and go."""
        if not self.lost_shards:
            return
        live = [r for r in self.workers.values() if r.connected]
        for s in sorted(self.lost_shards):
            if not live:
                return  # the next worker to say hello adopts them
            if not self._holders.get(s):
                adopter = min(live, key=lambda r: (len(r.data_shards), r.worker_id))
                self._hold(adopter, sorted(adopter.data_shards + [s]))
                adopter.data_generation += 1
            self.lost_shards.discard(s)

    def _hold(self, record: WorkerRecord, shards: list[int]) -> None:
        """``record`` (connected) trains on ``shards`` from now on; the index follows."""
        for s in record.data_shards:
            self._holders[s].discard(record.worker_id)
        record.data_shards = shards
        for s in shards:
            self._holders.setdefault(s, set()).add(record.worker_id)
