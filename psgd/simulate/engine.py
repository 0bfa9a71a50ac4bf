"""``psgd simulate``: N workers (1 to 10,000) in one process, on virtual time.

What is real and what is simulated:

- real: every gradient (the run's model, built as a worker builds it, on the worker's own
  data shard and minibatch stream, seeded as psgd.worker.loop seeds them), and everything
  the server does with it: each push enters :meth:`psgd.server.state.ServerState.push`,
  the one door of ``psgd server``, so the consistency gate (async, ssp, sync), the
  staleness rule, the optimizer, the staleness bound, leases and data-shard handover are
  the server's own code, run on the simulator's clock.
- simulated: time. A worker's step takes a compute time drawn from its distribution,
  each message a network delay, the server a service time per push (one queue, first
  come first served), or, fed a real run's timing traces (psgd.simulate.calibrate), each
  worker's measured compute windows and round trips replayed; workers may be a straggler
  class (k times slower compute) or die (after an exponential time with mean ``mtbf_s``)
  and come back (after ``downtime``), saying hello again for their data shards. The
  coordinator runs on virtual time too: it sets the schedule's rate after every update
  (a coordinator polling infinitely often) and evaluates at the same example counts a
  real one does; evaluation takes no virtual time.

A worker's cycle mirrors psgd.worker.core with the default shared-memory transport:
``n_push`` steps of compute on the weights it holds, the push travels to the server, is
applied (or held, or refused), the ack travels back and, every ``n_fetch`` steps, the
worker reads the server's weights as they are then (with ``transport="zmq"`` the weights
ride in the ack, so they are the server's at the moment it answered).

Memory: the gradient of a push is computed when the push reaches the server, from the
weights its worker fetched. Those weights are kept copy-on-write: a worker holds the
server's live vector until the server is about to change it, and only then are the
holders given one shared copy. Under sync every worker holds the same version (one
copy); under async each in-flight worker holds its own (N copies of the parameters at
most: 10,000 workers of a 784-64-10 model are 2 GB). ``memory_limit_mb`` refuses, up
front, a run whose worst case exceeds it.

Not modelled: server shards (one server), ``n_fetch`` that is not a multiple of
``n_push`` (the weights would change inside a push window), heartbeats (a worker's
pushes renew its lease), transfer time growing with the model (the delay is per message).
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config import TrainConfig
from ..errors import ConfigError
from ..metrics import StalenessHistogram
from ..model.interface import build_model
from ..data.minibatches import Minibatches
from ..data.prepared import PreparedData
from ..coordinator.loop import per_worker, stragglers
from ..coordinator.report import momentum_line
from ..coordinator.rundir import RunRecorder
from ..server.membership import LEASE_CHECK_S, MAX_DATA_SHARDS, MAX_WORKERS, Membership
from ..server.state import APPLIED, HELD, REFUSED, ServerState
from .events import Dist, EventQueue

MAX_SIM_WORKERS = 10_000
RATES_MAX_WORKERS = 256  # per-worker rates and straggler flags in each evaluation record up to this many workers
TIMING_STREAM = 7  # seeds each worker's timing generator apart from its data's
REPLAYS = ("ordered", "shuffled")


@dataclass(frozen=True)
class SimSpec:
    """How long things take, in virtual seconds, and how workers fail."""

    compute: Dist = field(default_factory=lambda: Dist("lognormal", 0.002, 0.3))  # one step (one minibatch)
    delay: Dist = field(default_factory=lambda: Dist("constant", 0.0001))  # one message to the server
    reply_delay: Dist | None = None  # one reply (an ack, weights) back to a worker; None: as delay
    server: Dist = field(default_factory=lambda: Dist("constant", 0.0))  # the server's work on one push
    stragglers: int = 0  # the last this many workers compute straggler_factor times slower
    straggler_factor: float = 4.0
    mtbf_s: float | None = None  # a worker dies after an exponential time of this mean, None: never
    downtime: Dist = field(default_factory=lambda: Dist("constant", 1.0))  # ... and comes back after this
    worker_compute: tuple[float, ...] = ()  # per-worker mean compute (s) measured elsewhere; overrides compute's mean
    worker_start: tuple[float, ...] = ()  # per-worker start (s; a real cluster's workers join over a second or so)
    # CPU cores the workers share (0: one each). A local cluster with more workers than
    # cores computes a few at a time, and a worker reads its weights (shared memory) only
    # once it has a core: fewer pushes land between its read and its push.
    cores: int = 0
    timing_seed: int = 0  # draws the timings (the run's seed draws the weights and the data)
    # Measured traces (psgd.simulate.calibrate), replayed in order and from the start again
    # when the run asks for more: per worker, the compute seconds of each push window (its
    # n_push steps), overriding compute; and each push's round trip (the gradient's way to
    # the server, the server's work on it, the ack and the reading of the weights),
    # overriding delay and reply_delay for pushes. Of a round trip, the way there is
    # worker_there_trace's time for that push where measured, else before_apply of it; the
    # server's mean work (``server``) is taken off the way there, since the queue adds it.
    worker_compute_trace: tuple[tuple[float, ...], ...] = ()
    worker_trip_trace: tuple[tuple[float, ...], ...] = ()
    worker_there_trace: tuple[tuple[float, ...], ...] = ()
    before_apply: float = 0.5
    # "ordered": the traces as measured, one after the other; "shuffled": each worker's
    # measured times in an order drawn with the timing seed (the same times, a different
    # timeline: how far the measured spread alone takes the simulation)
    replay: str = "ordered"
    # Each worker begins holding the server's weights at its worker_start (a trace's first
    # read), instead of saying hello and pulling then
    start_holding_weights: bool = False
    # The rate the real run's coordinator had set for each update (entry k: the push that
    # made version k + 1; NaN: not known), replayed instead of the schedule where known: the
    # real coordinator sets it when it polls, so during a warm-up it lags the schedule by up
    # to a poll (psgd.simulate.calibrate fills it from the server's push log)
    lr_trace: tuple[float, ...] = ()
    memory_limit_mb: float = 4096.0  # the weight copies in flight may not exceed this (worst case)

    def __post_init__(self):
        if self.stragglers < 0 or not self.straggler_factor >= 1:
            raise ConfigError("stragglers must be >= 0 and the straggler factor >= 1")
        if self.mtbf_s is not None and not self.mtbf_s > 0:
            raise ConfigError("the mean time between failures must be > 0 seconds")
        if any(not (c >= 0) for c in self.worker_compute + self.worker_start):
            raise ConfigError("per-worker compute and start times must be >= 0 seconds")
        if self.cores < 0:
            raise ConfigError("cores must be >= 0 (0: one per worker)")
        if not self.memory_limit_mb > 0:
            raise ConfigError("the memory limit must be > 0 MB")
        for what, traces in (("compute", self.worker_compute_trace), ("round-trip", self.worker_trip_trace),
                             ("way-there", self.worker_there_trace)):
            if any(not trace or not all(t >= 0 for t in trace) for trace in traces):
                raise ConfigError(f"a worker's {what} trace needs at least one time, each >= 0 seconds")
        if self.worker_there_trace and [len(t) for t in self.worker_there_trace] != \
                [len(t) for t in self.worker_trip_trace]:
            raise ConfigError("way-there traces need a round-trip trace of the same length each")
        if self.replay not in REPLAYS:
            raise ConfigError(f"replay is one of {', '.join(REPLAYS)}, not {self.replay!r}")
        if not 0 <= self.before_apply <= 1:
            raise ConfigError(f"before_apply is a fraction of the round trip in [0, 1], not {self.before_apply}")
        if any(not (math.isnan(lr) or 0 <= lr < math.inf) for lr in self.lr_trace):
            raise ConfigError("a rate trace holds rates >= 0 (or NaN: not known)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["worker_compute"], d["worker_start"] = list(self.worker_compute), list(self.worker_start)
        d["reply_delay"] = self.reply_delay.to_dict() if self.reply_delay is not None else None
        for key in ("worker_compute_trace", "worker_trip_trace", "worker_there_trace"):  # a summary, not every time
            d[key] = {"lengths": [len(t) for t in d[key]], "means": [sum(t) / len(t) for t in d[key]]} \
                if d[key] else None
        known = [lr for lr in self.lr_trace if not math.isnan(lr)]
        d["lr_trace"] = {"updates": len(self.lr_trace), "known": len(known),
                         "first": known[0], "last": known[-1]} if known else None
        return d


class _SimMembership(Membership):
    """The server's membership rules with its limits on workers and data shards raised:
    those bound what a reply header must carry over the wire, and nothing here is sent.
    (A real server refuses more than MAX_WORKERS workers: the simulator says so.)"""

    max_workers = max_data_shards = MAX_SIM_WORKERS


class _Worker:
    """One simulated worker process: its data, its timing, what it holds."""

    __slots__ = ("index", "name", "shards", "worker_id", "batches", "rng", "timing", "compute", "generation",
                 "alive", "snap", "snap_version", "steps", "data_generation", "reassignments", "done", "on_cpu",
                 "compute_trace", "there_trace", "back_trace", "way_back")

    def __init__(self, index: int, compute: Dist, timing_rng, compute_trace=None, there_trace=None, back_trace=None):
        self.index, self.name, self.shards = index, f"worker-{index}", [index]
        self.compute, self.timing = compute, timing_rng
        self.compute_trace = compute_trace  # Replay objects, or None
        self.there_trace, self.back_trace = there_trace, back_trace  # a push's way there and back, replayed together
        self.way_back: float | None = None  # the replayed round trip's way back of the push in flight
        self.worker_id = -1
        self.batches = self.rng = None
        self.generation = 0  # an incarnation: events of an earlier one are ignored
        self.alive, self.done = True, False
        self.snap, self.snap_version = None, -1  # None: the server's live weights (if snap_version is current)
        self.steps = 0
        self.data_generation = self.reassignments = 0
        self.on_cpu = False


class Replay:
    """A measured sequence of durations, in order, from the start again at its end;
    each ``factor`` times as long plus ``shift`` seconds, never below 0."""

    __slots__ = ("times", "at")

    def __init__(self, times, factor: float = 1.0, shift: float = 0.0):
        self.times = [max(float(t) * factor + shift, 0.0) for t in times]
        self.at = 0

    def next(self) -> float:
        t = self.times[self.at]
        self.at = (self.at + 1) % len(self.times)
        return t


def shards_of(n: int, num_shards: int, seed: int) -> list[np.ndarray]:
    """Every data shard's rows at once, equal to psgd.data.shard_indices(n, s, num_shards, seed)
    for each s (one permutation, not one per shard: 10,000 shards would take seconds)."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_shards)]


class Simulator:
    """One simulated run of ``config.workers`` workers. ``data`` from psgd.data.prepared
    (its config, fitted to the data, is the run's)."""

    def __init__(self, data: PreparedData, spec: SimSpec = SimSpec(), on_event=None, say=None):
        config = data.config
        self.config, self.spec, self.data = config, spec, data
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        n = config.workers
        if not 1 <= n <= MAX_SIM_WORKERS:
            raise ConfigError(f"simulate 1 to {MAX_SIM_WORKERS} workers, not {n}")
        if config.servers != 1:
            raise ConfigError("the simulator models one server (no --servers)")
        if config.n_fetch % config.n_push:
            raise ConfigError(f"the simulator needs n_fetch a multiple of n_push (here {config.n_fetch} and "
                              f"{config.n_push}): a fetch inside a push window is not modelled")
        for what, values in (("compute", spec.worker_compute), ("start", spec.worker_start),
                             ("compute trace", spec.worker_compute_trace), ("round-trip trace", spec.worker_trip_trace)):
            if values and len(values) != n:
                raise ConfigError(f"{len(values)} per-worker {what}s for {n} workers")
        if n > len(data.train):
            raise ConfigError(f"{n} workers for {len(data.train)} training examples: every worker's data shard "
                              "needs at least one example")
        self.net = build_model(config.model)  # the workers' model (they share it: one computes at a time)
        copies = 1 if config.consistency == "sync" else n
        need_mb = copies * self.net.n_params * self.net.dtype.itemsize / 2**20
        if need_mb > spec.memory_limit_mb:
            raise ConfigError(f"{n} {config.consistency} workers may each hold their own copy of the "
                              f"{self.net.n_params} weights: {need_mb:.0f} MB, over the limit of "
                              f"{spec.memory_limit_mb:.0f} MB; use a smaller model, fewer workers or a higher limit")
        self.now = 0.0
        # The server's own state, on the simulator's clock; the launcher gives each worker a data shard.
        self.state = ServerState(config, num_data_shards=1, clock=lambda: self.now, max_updates=config.max_updates,
                                 wait_for_workers=config.workers)
        self.state.members = _SimMembership(config.lease_s, n, lambda: self.now)  # N data shards, limits lifted
        self.store = self.state.store
        self.recorder = RunRecorder(config, on_event, say=self.say)
        self.schedule = config.schedule.build()
        self.queue = EventQueue()
        self.grad = np.empty(self.net.n_params, self.net.dtype)
        self.local = np.empty(self.net.n_params, self.net.dtype) if config.n_push > 1 else None
        self._shards = shards_of(len(data.train), n, config.seed)
        self._T_train = data.train.targets_for(config.model.loss)
        self._X_train = data.train.X.astype(self.net.dtype, copy=False)
        self.workers: list[_Worker] = []
        self.by_id: dict[int, _Worker] = {}
        self.live_holders: list[_Worker] = []
        self.server_free = 0.0
        self.reply_delay = spec.reply_delay if spec.reply_delay is not None else spec.delay
        self.cpu_free = spec.cores  # idle cores (with spec.cores), and workers waiting for one, in order
        self.cpu_queue: deque = deque()
        self.counts = {"events": 0, "pushes": 0, "refused": 0, "held": 0, "deaths": 0, "returns": 0,
                       "weight_copies": 0, "fetches": 0, "staleness_sum": 0, "staleness_max": 0}
        self.timers = {"gradient_s": 0.0, "server_s": 0.0, "eval_s": 0.0, "setup_s": 0.0, "data_s": 0.0}
        self.params = np.empty(self.net.n_params, self.net.dtype)  # the last evaluated weights
        self._rates_at: tuple[float, dict] | None = None
        self.stop_reason: str | None = None

    # --- the run ------------------------------------------------------------------------

    def run(self) -> dict:
        """Simulate until a stop rule holds; return the summary (written with :meth:`finish`)."""
        c, spec = self.config, self.spec
        wall0 = time.perf_counter()
        n_train = len(self.data.train)
        self.total = int(c.epochs * n_train)
        self.eval_every = max(1, n_train // c.evals_per_epoch)
        self.next_eval = self.eval_every
        self.recorder.on_event("start", {"total_examples": self.total})
        self._set_lr()
        setup0 = time.perf_counter()
        for i in range(c.workers):
            slow = spec.straggler_factor if i >= c.workers - spec.stragglers else 1.0
            mean = (spec.worker_compute[i] if spec.worker_compute else spec.compute.mean) * slow
            w = _Worker(i, Dist(spec.compute.kind, mean, spec.compute.sigma),
                        np.random.default_rng([c.seed, TIMING_STREAM, spec.timing_seed, i]),
                        self._compute_replay(i, slow), *self._trip_replays(i))
            self.workers.append(w)
            self.now = spec.worker_start[i] if spec.worker_start else 0.0
            self._join(w)
            if spec.start_holding_weights:
                self.queue.schedule(self.now, "read", i, w.generation)  # it has read them: it computes
            else:
                self.queue.schedule(self._after(w, spec.delay, 2), "pull", i, w.generation)  # hello, then the pull
            self._schedule_death(w)
        self.now = 0.0
        self.timers["setup_s"] = time.perf_counter() - setup0  # the workers' hellos: not the loop's overhead
        handlers = {"ready": self._ready, "arrive": self._arrive, "apply": self._apply, "pull": self._pull,
                    "read": self._read, "computed": self._computed, "die": self._die, "return": self._return,
                    "tick": self._tick}
        while self.stop_reason is None:
            if not self.queue:
                self.stop_reason = "stalled"  # nobody left to push (cannot happen while workers come back)
                self._evaluate()
                break
            t, kind, index, generation = self.queue.pop()
            self.now = t
            self.counts["events"] += 1
            if index >= 0 and (generation != self.workers[index].generation or self.workers[index].done):
                continue  # an event of an incarnation that died meanwhile
            handlers[kind](self.workers[index] if index >= 0 else None)
        wall = time.perf_counter() - wall0
        return self._summary(wall)

    def finish(self, summary: dict) -> dict:
        """Write the run directory (weights, metrics, summary, config) as a real run does."""
        return self.recorder.finish(self.params, summary)

    # --- workers ------------------------------------------------------------------------

    def _after(self, w: _Worker, dist: Dist, times: int = 1) -> float:
        return self.now + sum(dist.sample(w.timing) for _ in range(times))

    def _join(self, w: _Worker) -> None:
        """Hello: the server registers the worker for the data shards it asks for (as
        ``psgd worker --data-shard i`` does), and it loads their minibatches (a new process)."""
        record = self.state.members.register(w.name, "sim", w.shards)
        w.worker_id, w.shards, w.data_generation = record.worker_id, list(record.data_shards), record.data_generation
        self.by_id[w.worker_id] = w
        w.reassignments = 0
        w.batches = None  # made at its first gradient (10,000 workers' minibatch streams take seconds)

    def _batches_for(self, w: _Worker) -> None:
        """As psgd.worker.loop.Worker._batches_for: the shards' rows, seeded the same way."""
        c = self.config
        rows = np.sort(np.concatenate([self._shards[s] for s in w.shards]))
        seed = c.seed * 1000 + w.shards[0] + 1 + 7919 * w.reassignments
        image_shape = self.data.train.image_shape
        w.batches = Minibatches(self._X_train[rows], self._T_train[rows], c.batch_size, seed,
                                image_shape if c.augment else None, c.distort, image_shape)
        w.rng = np.random.default_rng(seed)

    def _schedule_death(self, w: _Worker) -> None:
        if self.spec.mtbf_s is not None:
            self.queue.schedule(self.now + float(w.timing.exponential(self.spec.mtbf_s)), "die", w.index, w.generation)

    def _fetch(self, w: _Worker) -> None:
        """The worker takes the server's weights as they are now (copied only when they change)."""
        w.snap, w.snap_version = None, self.store.version
        self.live_holders.append(w)
        self.counts["fetches"] += 1

    def _freeze(self) -> None:
        """The server's weights are about to change: whoever holds them gets one shared copy."""
        if not self.live_holders:
            return
        version, copy = self.store.version, None
        for w in self.live_holders:
            if w.snap is None and w.snap_version == version:
                if copy is None:
                    copy = self.store.params.copy()
                    self.counts["weight_copies"] += 1
                w.snap = copy
        self.live_holders.clear()

    def _pull(self, w: _Worker, way_back: float | None = None) -> None:
        """A pull reaches the server: its weights go back with the reply."""
        self._fetch(w)
        back = way_back if way_back is not None else self.reply_delay.sample(w.timing)
        self.queue.schedule(self.now + back, "ready", w.index, w.generation)

    def _read(self, w: _Worker) -> None:
        """Shared memory: the worker reads the server's weights itself, then computes."""
        self._want_cpu(w, True)

    def _ready(self, w: _Worker) -> None:
        self._want_cpu(w, False)

    def _want_cpu(self, w: _Worker, read: bool) -> None:
        if not self.spec.cores:
            self._compute(w, read)
        elif self.cpu_free:
            self.cpu_free -= 1
            self._compute(w, read)
        else:
            self.cpu_queue.append((w, w.generation, read))

    def _compute(self, w: _Worker, read: bool) -> None:
        """(Read the weights,) n_push steps of compute; then the push travels to the server."""
        if read:
            self._fetch(w)
        if w.compute_trace is not None:
            t = self.now + w.compute_trace.next()
        else:
            t = self.now + sum(w.compute.sample(w.timing) for _ in range(self.config.n_push))
        if self.spec.cores:
            w.on_cpu = True
            self.queue.schedule(t, "computed", w.index, w.generation)
        else:
            self.queue.schedule(t + self._way_there(w), "arrive", w.index, w.generation)

    def _computed(self, w: _Worker) -> None:
        self._release_cpu(w)
        self.queue.schedule(self.now + self._way_there(w), "arrive", w.index, w.generation)

    def _way_there(self, w: _Worker) -> float:
        """A push's delay to the server: drawn, or its part of a replayed round trip (the
        rest is kept for the ack's way back)."""
        if w.there_trace is None:
            return self.spec.delay.sample(w.timing)
        w.way_back = w.back_trace.next()
        return w.there_trace.next()

    def _replay_order(self, i: int, stream: int, n: int) -> np.ndarray:
        if self.spec.replay == "ordered":
            return np.arange(n)
        return np.random.default_rng([self.config.seed, TIMING_STREAM, self.spec.timing_seed, i, stream]).permutation(n)

    def _compute_replay(self, i: int, slow: float):
        """Worker i's replayed compute windows (None: drawn)."""
        if not self.spec.worker_compute_trace:
            return None
        times = self.spec.worker_compute_trace[i]
        return Replay([times[k] for k in self._replay_order(i, 1, len(times))], slow)

    def _trip_replays(self, i: int) -> tuple:
        """Worker i's replayed ways there and back, one push's pair at a time (None, None: drawn)."""
        spec = self.spec
        if not spec.worker_trip_trace:
            return None, None
        trips = spec.worker_trip_trace[i]
        there = spec.worker_there_trace[i] if spec.worker_there_trace else [t * spec.before_apply for t in trips]
        order = self._replay_order(i, 2, len(trips))
        return Replay([there[k] for k in order], 1.0, -spec.server.mean), Replay([trips[k] - there[k] for k in order])

    def _way_back(self, w: _Worker) -> float:
        back, w.way_back = w.way_back, None
        return back if back is not None else self.reply_delay.sample(w.timing)

    def _release_cpu(self, w: _Worker) -> None:
        """The worker's core goes to the next worker waiting (of one still alive)."""
        w.on_cpu = False
        while self.cpu_queue:
            nxt, generation, read = self.cpu_queue.popleft()
            if generation == nxt.generation and not nxt.done:
                self._compute(nxt, read)
                return
        self.cpu_free += 1

    def _arrive(self, w: _Worker) -> None:
        service = self.spec.server.sample(w.timing)
        if service == 0:
            self._apply(w)
            return
        self.server_free = max(self.server_free, self.now) + service  # one queue, first come first served
        self.queue.schedule(self.server_free, "apply", w.index, w.generation)

    def _gradient(self, w: _Worker) -> int:
        """The worker's n_push steps, from the weights it fetched: summed into self.grad."""
        c = self.config
        if w.batches is None:
            t0 = time.perf_counter()
            self._batches_for(w)
            self.timers["data_s"] += time.perf_counter() - t0
        params = w.snap if w.snap is not None else self.store.params
        if w.snap is None and w.snap_version != self.store.version:
            raise RuntimeError(f"simulator bug: {w.name} holds version {w.snap_version} uncopied at {self.store.version}")
        t0 = time.perf_counter()
        examples = 0
        for k in range(c.n_push):
            x, t = next(w.batches)
            if self.local is None:
                self.net.loss_and_grad(params, x, t, self.grad, c.dropout, w.rng)
            else:
                self.net.loss_and_grad(params, x, t, self.local, c.dropout, w.rng)
                if k == 0:
                    self.grad[...] = self.local
                else:
                    self.grad += self.local
            examples += x.shape[0]
        self.timers["gradient_s"] += time.perf_counter() - t0
        return examples

    def _apply(self, w: _Worker) -> None:
        """The push enters the server's one door."""
        c = self.config
        examples = self._gradient(w)
        w.steps += c.n_push
        base = w.snap_version
        t0 = time.perf_counter()
        self._freeze()
        decision = self.state.push(w.worker_id, base, examples, self.grad)
        released = self.state.take_released()
        self.timers["server_s"] += time.perf_counter() - t0
        if decision.outcome == APPLIED:
            self._count(decision.staleness)
            self._answer(w)
        elif decision.outcome == HELD:
            self.counts["held"] += 1
        elif decision.outcome == REFUSED:
            self.counts["refused"] += 1
            if decision.code == "unknown_worker":  # its lease ran out (a slow straggler): hello again
                self._join(w)
            if w.way_back is not None and decision.code != "unknown_worker":
                # replayed: the measured round trip holds the refusal and the fresh weights' read
                self._holds_weights_after(w, self._way_back(w))
            else:  # the error travels back, the worker pulls fresh weights (psgd.worker.core)
                self.queue.schedule(self._after(w, self.spec.delay, 2), "pull", w.index, w.generation)
        else:  # shutdown: the run is over for this worker
            w.done = True
        self._released(released)
        if decision.outcome != REFUSED or released:
            self._coordinate()

    def _released(self, acks) -> None:
        """Acks of held pushes that the gate let go (ssp, sync): each goes to its worker,
        unless that incarnation is gone (it died while held)."""
        for worker_id, _, staleness in acks:
            self._count(staleness)
            w = self.by_id.get(worker_id)
            if w is not None and w.alive and not w.done and w.worker_id == worker_id:
                self._answer(w)

    def _count(self, staleness: int) -> None:
        """An acknowledged push (exact staleness: the histogram lumps 64 and beyond together)."""
        c = self.counts
        c["pushes"] += 1
        c["staleness_sum"] += staleness
        c["staleness_max"] = max(c["staleness_max"], staleness)

    def _answer(self, ack_worker: _Worker) -> None:
        """The ack leaves the server now; with it, every n_fetch steps, the weights."""
        w, c = ack_worker, self.config
        record = self.state.members.workers.get(w.worker_id)
        if record is not None and record.data_generation != w.data_generation:  # shards moved
            w.data_generation = record.data_generation
            if record.data_shards and record.data_shards != w.shards:
                w.shards, w.reassignments = list(record.data_shards), w.reassignments + 1
                w.batches = None
        if w.steps % c.n_fetch:
            self.queue.schedule(self.now + self._way_back(w), "ready", w.index, w.generation)
        else:
            self._holds_weights_after(w, self._way_back(w))

    def _holds_weights_after(self, w: _Worker, way_back: float) -> None:
        """Fresh weights reach the worker ``way_back`` from now: with ZeroMQ they ride in
        the reply (the server's as they are now), over shared memory it reads them then."""
        if self.config.transport == "zmq":
            self._pull(w, way_back)
        else:
            self.queue.schedule(self.now + way_back, "read", w.index, w.generation)

    def _die(self, w: _Worker) -> None:
        """The process dies: its pending messages are lost. Over shared memory its doorbell
        closes and the server lets it go at once; over ZeroMQ its lease runs out."""
        self.counts["deaths"] += 1
        if w.on_cpu:
            self._release_cpu(w)
        w.generation += 1
        w.alive, w.snap, w.snap_version, w.way_back = False, None, -1, None
        if self.config.transport == "zmq":
            for k in (1, 2):  # the lease check is rate-limited: look twice
                self.queue.schedule(self.now + self.config.lease_s + k * LEASE_CHECK_S, "tick")
        else:
            self._freeze()  # a barrier it leaves may apply a round
            version = self.store.version
            self.state.disconnect(w.worker_id)
            self._released(self.state.take_released())
            if self.store.version != version:
                self._coordinate()
        self.queue.schedule(self.now + self.spec.downtime.sample(w.timing), "return", w.index, w.generation)

    def _return(self, w: _Worker) -> None:
        """A new process for the same data shards: hello, pull, compute."""
        self.counts["returns"] += 1
        w.alive, w.steps = True, 0
        self._join(w)
        self.queue.schedule(self._after(w, self.spec.delay, 2), "pull", w.index, w.generation)
        self._schedule_death(w)

    def _tick(self, _=None) -> None:
        """Leases run out; a barrier may let its waiting workers go."""
        self._freeze()
        version = self.store.version
        self.state.tick()
        self._released(self.state.take_released())
        if self.store.version != version or self.state.phase.stopping:
            self._coordinate()

    # --- the coordinator, on virtual time -----------------------------------------------

    def _set_lr(self) -> None:
        version, trace = self.store.version, self.spec.lr_trace
        if version < len(trace) and math.isfinite(trace[version]):
            self.store.lr_override = float(trace[version])  # what the real coordinator had set then
        else:
            self.store.lr_override = float(self.schedule(version))

    def _coordinate(self) -> None:
        """After an update: the schedule's rate, an evaluation when due, the stop rules."""
        c, s = self.config, self.store
        self._set_lr()
        if self.stop_reason is not None:
            return
        budget = s.examples >= self.total or (c.max_updates is not None and s.version >= c.max_updates) \
            or (c.max_seconds is not None and self.now >= c.max_seconds) or self.state.phase.stopping
        if s.examples < self.next_eval and not budget:
            return
        while self.next_eval <= s.examples:
            self.next_eval += self.eval_every
        rec = self._evaluate()
        if c.target_accuracy and (rec["val_accuracy"] or 0) >= c.target_accuracy:
            self.stop_reason = "target accuracy"
        elif budget:
            self.stop_reason = "epochs" if s.examples >= self.total else (
                "updates" if c.max_updates is not None and s.version >= c.max_updates else
                "server stop" if self.state.phase.stopping else "time limit")

    def _evaluate(self) -> dict:
        t0 = time.perf_counter()
        s, n_train = self.store, len(self.data.train)
        self.params[...] = s.params
        val_loss, val_acc = self.net.evaluate(self.params, *self.data.eval_set)
        self.schedule.observe(val_loss if val_acc is None else 1.0 - val_acc)
        self._set_lr()
        hist = s.staleness.summary()
        rates = self._worker_rates()
        rec = {"time": self.now, "train_time": self.now, "epoch": s.examples / n_train, "examples": s.examples,
               "updates": s.version, "lr": s.lr(), "train_loss": None, "val_loss": val_loss, "val_accuracy": val_acc,
               # the exact mean, as the summary's (the histogram lumps 64 and beyond together)
               "staleness_mean": self.counts["staleness_sum"] / max(self.counts["pushes"], 1),
               "staleness_p99": hist["p99"], "staleness_max": hist["max"],
               "examples_per_s": s.examples / self.now if self.now else 0.0,
               "worker_examples_per_s": rates, "stragglers": stragglers(rates), "virtual_time": True,
               "momentum": s.adaptation.momentum, "lr_factor": s.adaptation.lr_factor}
        self.recorder.record(rec)
        self.timers["eval_s"] += time.perf_counter() - t0
        return rec

    def _worker_rates(self) -> dict[str, float]:
        """Examples per virtual second of each connected worker since the last evaluation
        (up to RATES_MAX_WORKERS workers: beyond, the records would outgrow the run)."""
        if self.config.workers > RATES_MAX_WORKERS:
            return {}
        live = [r for r in self.state.members.workers.values() if r.connected]
        current = {r.name: r.examples for r in live}
        previous, self._rates_at = self._rates_at, (self.now, current)
        if previous is None:
            return {r.name: r.to_dict(self.now)["examples_per_s"] for r in live}
        dt = max(self.now - previous[0], 1e-12)
        return {name: (n - previous[1].get(name, 0)) / dt for name, n in current.items()}

    def _summary(self, wall: float) -> dict:
        c, s = self.config, self.store
        n_train = len(self.data.train)
        test_loss, test_acc = self.net.evaluate(self.params, self.data.test.X, self.data.T_test)
        hist = s.staleness.summary()
        records = [r.to_dict(self.now) for r in self.state.members.workers.values()]
        workers = per_worker(records)
        vt = self.now
        pushes = max(self.counts["pushes"], 1)
        overhead = wall - sum(self.timers.values())
        sim = {"spec": self.spec.to_dict(), **self.counts, "wall_s": wall,
               "staleness_mean": self.counts["staleness_sum"] / pushes, **self.timers, "overhead_s": overhead,
               "overhead_per_10k_pushes_s": overhead * 1e4 / pushes}
        summary = {
            "simulated": True, "virtual_time": True, "time_unit": "virtual seconds",
            "workers": c.workers, "transport": c.transport, "consistency": c.consistency,
            "staleness_rule": c.staleness_rule, "stop_reason": self.stop_reason,
            "updates": s.version, "examples": s.examples, "epochs": s.examples / n_train,
            "test_loss": test_loss, "test_accuracy": test_acc,
            "setup_time": 0.0, "train_time": vt, "eval_time": 0.0, "wall_time": vt,
            "examples_per_s": s.examples / vt if vt else 0.0, "pushes_per_s": s.version / vt if vt else 0.0,
            "staleness": hist, "staleness_histogram": s.staleness.to_dict(),
            "bytes_in": 0, "bytes_out": 0, "errors": dict(self.state.errors),
            "per_worker": workers, "failures": [], "rollbacks": [], "ssp_max_lead": getattr(self.state.gate, "max_lead", None),
            "checkpoint_failures": 0,
            "stragglers": stragglers({n: w["examples_per_s"] for n, w in workers.items() if w["connected"]})
            if c.workers <= RATES_MAX_WORKERS else [],
            "worker_transports": ["sim"], "simulation": sim, "momentum_rule": s.adaptation.to_dict(),
        }
        summary["first_reaching"] = {str(a): r["train_time"] for a in (0.97, 0.98)
                                     if (r := self.recorder.first_reaching(a))}
        summary["report"] = [
            f"simulated {c.workers} workers: {s.version} updates in {vt:.3f} virtual seconds; staleness mean "
            f"{sim['staleness_mean']:.2f}, {StalenessHistogram.text(hist)}; stopped on {self.stop_reason}",
            f"simulator: {wall:.2f} s wall, of which gradients {self.timers['gradient_s']:.2f} s, server rules "
            f"{self.timers['server_s']:.2f} s, evaluation {self.timers['eval_s']:.2f} s, workers' hellos and data "
            f"{self.timers['setup_s'] + self.timers['data_s']:.2f} s, its own overhead "
            f"{overhead:.2f} s ({sim['overhead_per_10k_pushes_s']:.2f} s per 10,000 pushes)",
            momentum_line(summary["momentum_rule"]),
        ]
        if c.workers > min(MAX_WORKERS, MAX_DATA_SHARDS):
            summary["report"].append(f"note: a real psgd server takes at most {MAX_WORKERS} workers and "
                                     f"{MAX_DATA_SHARDS} data shards (header limits); the simulator lifts them")
        return summary


def simulate(config: TrainConfig, spec: SimSpec = SimSpec(), on_event=None, say=None) -> dict:
    """Load the data, simulate the run, write its directory; return the summary."""
    from ..data.prepared import prepare_data
    sim = Simulator(prepare_data(config), spec, on_event, say)
    return sim.finish(sim.run())


def staleness_tv(a: StalenessHistogram, b: StalenessHistogram) -> float:
    """Total-variation distance between two staleness distributions (0: the same, 1: disjoint)."""
    cap = max(a.cap, b.cap)
    pa, pb = np.zeros(cap + 1), np.zeros(cap + 1)
    for h, p in ((a, pa), (b, pb)):
        for v, count in enumerate(h.counts):
            p[min(v, cap)] += count
        if h.total:
            p /= h.total
    return 0.5 * float(np.abs(pa - pb).sum())
