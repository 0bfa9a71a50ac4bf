"""The parameter server's state and rules, without sockets: ``handle(message) -> reply``.

It holds the flat weights (possibly in a shared segment), the optimizer state, a version
counter that goes up with every applied push, and per-worker records. Every push, from
the network or from shared memory, goes through :meth:`ServerState.apply`, which refuses
anything that does not fit before touching the weights.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter

import numpy as np

from ..config import TrainConfig
from .consistency import make_gate
from ..errors import ConfigError, ProtocolError
from ..model.layout import shard_range
from ..metrics import StalenessHistogram, WorkerRecord
from ..model.interface import build_model, fingerprint
from ..model.optim import make_optimizer
from ..wire.protocol import Message, error

MAX_EXAMPLES_PER_PUSH = 1 << 20
MAX_WORKERS = 4096  # connected at once; a hello beyond is refused (a flood of hellos is bounded)
LEASE_CHECK_S = 0.05  # how often the loop looks for expired leases
DC_HISTORY = 16  # dcasgd: weight versions kept; an older push is applied uncompensated


class _NoLock:
    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


class ServerState:
    """Weights, optimizer, versioning and statistics of one parameter server, or of one
    server shard: the contiguous range ``[lo, hi)`` of the flat vector given by ``shard``
    of ``num_server_shards``, with its own optimizer state, version and counters.

    ``params`` is the vector (or range) to update in place (a shared-memory view, or None
    for a fresh one from the config's seed); ``write_lock`` wraps each update (the seqlock
    of the shared segment). ``num_data_shards`` is how many data shards workers are given.
    """

    def __init__(self, config: TrainConfig, num_data_shards: int = 1, params: np.ndarray | None = None,
                 write_lock=None, clock=time.monotonic, shard: int = 0, num_server_shards: int = 1,
                 max_updates: int | None = None):
        self.config = config
        # The update that reaches this count stops the run there and then: a push that was
        # already on its way (another worker's, in the same poll) is told to stop, not applied.
        self.max_updates = max_updates
        self.net = build_model(config.model)
        self.dtype = self.net.dtype
        self.shard, self.num_server_shards = shard, num_server_shards
        self.lo, self.hi = shard_range(self.net.n_params, shard, num_server_shards)
        self.size = self.hi - self.lo
        fresh = self.net.init_params(config.seed)[self.lo:self.hi]
        if params is None:
            params = fresh.copy()
        else:
            params[...] = fresh
        self.params = params
        mask = self.net.weight_mask()[self.lo:self.hi]
        self.optimizer = make_optimizer(config.optimizer, self.size, self.dtype, mask)
        self.schedule = config.schedule.build()
        self.write_lock = write_lock or _NoLock()
        self.clock = clock
        self.num_data_shards = max(1, num_data_shards)
        self.lost_shards: set[int] = set()  # data shards of departed workers, not yet adopted
        self._leases_checked = float("-inf")
        self.version = 0
        self.examples = 0
        self.workers: dict[int, WorkerRecord] = {}
        self.staleness = StalenessHistogram()
        self.errors: Counter = Counter()
        self.bytes_in = self.bytes_out = 0
        self.stopping = False
        self.shutdown_requested = False  # a client (coordinator, psgd status) ended the run
        self.budget_spent = False  # the server's own --max-updates or --max-seconds ended it
        self.coordinated = False  # a coordinator set the rate or paused: it will want the final weights
        self.paused = False  # while True the server loop holds workers' pushes and pulls
        self.lr_override: float | None = None  # set by a coordinator, which then owns the schedule
        self.gate = make_gate(config)
        self._history = None  # dcasgd: the last DC_HISTORY weight vectors, by version
        if config.staleness_rule == "dcasgd":
            self._history = np.empty((DC_HISTORY, self.size), self.dtype)
            self._history[0] = self.params
            self._compensated = np.empty(self.size, self.dtype)
        self.outbox: list[tuple[int, int, int]] = []  # (worker, version, staleness) acks ready to go
        self.started = clock()
        # Worker ids start at a random point, so that an id from before a restart is not taken
        # for a new worker's: a worker of the old server must hear "unknown worker" and rejoin.
        self._next_worker_id = secrets.randbelow(1 << 24) << 16

    # --- the update rule ----------------------------------------------------------------

    def lr(self) -> float:
        """The rate the coordinator set, else the schedule's at the current version
        (before any staleness scaling)."""
        return self.lr_override if self.lr_override is not None else self.schedule(self.version)

    def push_lr(self, staleness: int) -> float:
        """The rate for one push of the given staleness, by the run's staleness rule."""
        rule = self.config.staleness_rule
        if rule == "dynsgd":  # dcasgd corrects the gradient instead (see _compensate)
            return self.lr() / (staleness + 1)
        if rule == "divide":
            return self.lr() / max(staleness, 1)
        return self.lr()

    def submit(self, worker_id: int, base_version: int, examples: int, grad: np.ndarray, offset: int | None = None) -> None:
        """A push, by the run's consistency model: applied now or held (see psgd.consistency).
        Ready acknowledgements go to ``outbox``. Raises ProtocolError for a push that does
        not fit, leaving the weights untouched."""
        self.check_push(worker_id, base_version, examples, grad, offset)
        self.gate.submit(self, worker_id, base_version, examples, grad)

    def tick(self) -> None:
        """Drop workers whose lease ran out, and let the consistency model release what it can."""
        self._expire_leases()
        self.gate.tick(self)

    def _expire_leases(self) -> None:
        now = self.clock()
        if self.paused or now - self._leases_checked < LEASE_CHECK_S:
            return  # paused: the server holds the workers' requests, their silence is its own doing
        self._leases_checked = now
        held = self.gate.holding()
        for record in list(self.workers.values()):
            if record.connected and record.worker_id not in held and now - record.last_seen >= self.config.lease_s:
                record.expired = True
                self.disconnect(record.worker_id)

    def touch(self, worker_id) -> WorkerRecord:
        """A sign of life from a worker; raises for one the server does not (or no longer) know."""
        record = self.workers.get(worker_id) if isinstance(worker_id, int) else None
        if record is None:
            raise ProtocolError("unknown_worker", f"worker {worker_id} has not said hello (server restarted?)")
        if record.expired:
            raise ProtocolError("unknown_worker", f"worker {worker_id} was silent past its lease; say hello again")
        record.last_seen = self.clock()
        return record

    def apply(self, worker_id: int, base_version: int, examples: int, grad: np.ndarray, offset: int | None = None) -> tuple[int, int]:
        """Apply one gradient now; return ``(new version, staleness)``. Raises ProtocolError,
        leaving the weights untouched, for an unknown worker or a gradient that does not fit."""
        self.check_push(worker_id, base_version, examples, grad, offset)
        staleness = self.version - base_version
        if self._history is not None:
            grad = self._compensate(grad, base_version, staleness)
        with self.write_lock:
            self.optimizer.step(self.params, grad, self.push_lr(staleness))
        self._advance()
        if self._history is not None:
            self._history[self.version % DC_HISTORY] = self.params
        self._count(worker_id, examples, staleness)
        return self.version, staleness

    def _compensate(self, grad, base_version, staleness):
        """DC-ASGD: g + lambda * g * g * (w_now - w_then), w_then the weights g was computed from."""
        if staleness == 0 or staleness >= DC_HISTORY:
            return grad
        out = self._compensated
        np.subtract(self.params, self._history[base_version % DC_HISTORY], out=out)
        out *= grad
        out *= grad
        out *= self.config.dc_lambda
        out += grad
        return out

    def apply_average(self, mean_grad: np.ndarray, contributions: dict[int, int]) -> int:
        """Apply the average of one synchronous round (``{worker: examples}``) as one update."""
        with self.write_lock:
            self.optimizer.step(self.params, mean_grad, self.lr())
        self._advance()
        for worker_id, examples in contributions.items():
            self._count(worker_id, examples, 0)
        return self.version

    def _advance(self) -> None:
        self.version += 1
        self._check_budget()

    def _check_budget(self) -> None:
        if self.max_updates is not None and self.version >= self.max_updates:
            self.stopping = self.budget_spent = True

    def _count(self, worker_id, examples, staleness):
        record = self.workers[worker_id]
        self.examples += examples
        record.pushes += 1
        record.examples += examples
        record.last_seen = self.clock()
        record.staleness.add(staleness)
        self.staleness.add(staleness)

    def check_push(self, worker_id, base_version, examples, grad, offset=None) -> None:
        record = self.workers.get(worker_id)
        if record is None or record.expired:
            self.touch(worker_id)  # raises the reason
        try:
            self._check_push(base_version, examples, grad, offset)
        except ProtocolError:
            record.refused += 1
            raise

    def live_workers(self, also=()) -> set[int]:
        """Workers that count for barriers: connected and heard from within the lease,
        plus ``also`` (workers the gate is holding, which cannot speak)."""
        now, lease = self.clock(), self.config.lease_s
        return {w for w, r in self.workers.items()
                if w in also or (r.connected and now - r.last_seen < lease)}

    def _check_push(self, base_version, examples, grad, offset):
        if grad.dtype != self.dtype:
            raise ProtocolError("bad_array", f"gradient is {grad.dtype}, the model is {self.dtype}")
        offset = self.lo if offset is None else offset
        if offset != self.lo or grad.shape != (self.size,):
            raise ProtocolError("bad_range", f"gradient covers [{offset}, {offset + grad.size}), "
                                             f"this server holds [{self.lo}, {self.hi})")
        if base_version > self.version or base_version < 0:
            raise ProtocolError("future_version", f"gradient claims version {base_version}, the server is at {self.version}")
        if not 0 < examples <= MAX_EXAMPLES_PER_PUSH:
            raise ProtocolError("bad_field", f"examples {examples} not in 1..{MAX_EXAMPLES_PER_PUSH}")
        with np.errstate(over="ignore", invalid="ignore"):
            norm2 = float(np.dot(grad, grad))  # NaN or Inf anywhere (or an overflowing norm) makes this non-finite
        if not np.isfinite(norm2):
            raise ProtocolError("not_finite", "gradient has NaN or Inf values (or a norm beyond float range)")

    # --- workers ------------------------------------------------------------------------

    def register(self, name: str, transport: str, wanted: list[int] | None = None) -> WorkerRecord:
        """A new worker, and the data shards it trains on: the ones it asks for (a worker
        coming back asks for those it had), else a shard nobody trains on, else the least
        used one. A shard it takes back from a worker that adopted it leaves that worker."""
        live = [r for r in self.workers.values() if r.connected]
        if len(live) >= MAX_WORKERS:
            raise ProtocolError("too_many_workers", f"{MAX_WORKERS} workers are connected already")
        worker_id = self._next_worker_id
        self._next_worker_id += 1
        if wanted and all(isinstance(s, int) and 0 <= s < self.num_data_shards for s in wanted):
            shards = sorted(set(wanted))
            for other in live:
                kept = [s for s in other.data_shards if s not in shards]
                if kept and kept != other.data_shards:
                    other.data_shards = kept
                    other.data_generation += 1
        else:
            used = Counter(s for r in live for s in r.data_shards)
            shards = [min(range(self.num_data_shards), key=lambda s: (used[s], s))]
        self.lost_shards.difference_update(shards)
        record = WorkerRecord(worker_id, name, shards, transport, joined=self.clock(), last_seen=self.clock())
        self.workers[worker_id] = record
        self._adopt_lost_shards()
        return record

    def _adopt_lost_shards(self) -> None:
        """Hand each data shard that its worker took away to the live worker with the fewest,
        so that no part of the data goes untrained while workers come and go."""
        live = [r for r in self.workers.values() if r.connected]
        for s in sorted(self.lost_shards):
            if not live:
                return  # the next worker to say hello adopts them
            if not any(s in r.data_shards for r in live):
                adopter = min(live, key=lambda r: (len(r.data_shards), r.worker_id))
                adopter.data_shards = sorted(adopter.data_shards + [s])
                adopter.data_generation += 1
            self.lost_shards.discard(s)

    def disconnect(self, worker_id: int) -> None:
        record = self.workers.get(worker_id)
        if record is not None and record.connected:
            record.connected = False
            if record.pushes == 0 and record.refused == 0:
                del self.workers[worker_id]  # it did nothing: keeping it would let hellos grow the stats
            self.lost_shards.update(record.data_shards)
            self._adopt_lost_shards()
            self.gate.tick(self)  # a barrier may have been waiting for it

    def welcome(self, record: WorkerRecord) -> dict:
        c = self.config
        return {
            "type": "welcome", "worker_id": record.worker_id, "model": {**c.model.wire_dict(), "fingerprint": fingerprint(self.net, c.model)},
            "optimizer": c.optimizer.to_dict(), "version": self.version, "data_shards": list(record.data_shards),
            "num_data_shards": self.num_data_shards, "data_generation": record.data_generation,
            "range": [self.lo, self.hi], "server_shard": self.shard, "num_server_shards": self.num_server_shards,
            "layout": self.net.layout.to_wire(),
            "run": {"data": c.data, "seed": c.seed, "validation": c.validation, "batch_size": c.batch_size,
                    "n_fetch": c.n_fetch, "n_push": c.n_push, "dropout": c.dropout, "augment": c.augment, "distort": c.distort.to_dict(),
                    "lease_s": c.lease_s},
        }

    # --- messages -----------------------------------------------------------------------

    def handle(self, msg: Message) -> tuple[dict, list] | None:
        """The reply (header, arrays) to a decoded message, or None for a push whose ack
        the consistency model holds. Never raises for bad input: a refusal is an
        ``error`` reply, counted by its code."""
        try:
            return self._dispatch(msg)
        except ProtocolError as exc:
            return self.refuse(exc)

    def refuse(self, exc: ProtocolError) -> tuple[dict, list]:
        self.errors[exc.code] += 1
        return error(exc.code, exc.detail), []

    def _dispatch(self, msg: Message) -> tuple[dict, list]:
        kind = msg.type
        if kind == "push":
            if self.stopping:
                self.disconnect(msg["worker_id"])
                return {"type": "shutdown"}, []
            if len(msg.arrays) != 1:
                raise ProtocolError("bad_frames", f"push carries {len(msg.arrays)} arrays, expected 1")
            worker_id = msg["worker_id"]
            self.submit(worker_id, msg["base_version"], msg["examples"], msg.arrays[0], msg.offset(0))
            ack = self.take_ack(worker_id)
            if ack is None:
                return None  # held by the consistency model; the server loop answers later
            return self.ack_reply(ack, msg.get("want_params") is True)
        if kind == "pull":
            if msg.get("worker_id") is not None:
                if self.stopping:
                    return {"type": "shutdown"}, []
                self.touch(msg["worker_id"])
            return {"type": "params", "version": self.version}, [self.params]
        if kind == "heartbeat":
            if self.stopping:
                return {"type": "shutdown"}, []
            record = self.touch(msg["worker_id"])
            return {"type": "assignment", "data_shards": list(record.data_shards),
                    "data_generation": record.data_generation}, []
        if kind == "hello":
            if self.stopping:
                return {"type": "shutdown"}, []
            if msg["transport"] not in ("zmq", "shm", "auto"):
                raise ProtocolError("bad_field", f"unknown transport {msg['transport']!r}")
            wanted = msg.get("data_shards")
            record = self.register(msg["worker"][:64], "zmq", wanted if isinstance(wanted, list) else None)
            return self.welcome(record), []
        if kind == "stats":
            return {"type": "stats_reply", "stats": self.stats()}, []
        if kind == "set_lr":
            lr = float(msg["lr"])
            if not (np.isfinite(lr) and lr >= 0):
                raise ProtocolError("bad_field", f"learning rate {lr} is not a finite number >= 0")
            self.lr_override = lr
            self.coordinated = True
            return {"type": "ok"}, []
        if kind == "describe":
            return {"type": "description", "config": self.config.to_dict()}, []
        if kind == "bye":
            worker_id = msg.get("worker_id")
            if isinstance(worker_id, int):
                self.disconnect(worker_id)
            return {"type": "ok"}, []
        if kind == "shutdown":
            self.stopping = self.shutdown_requested = True
            return {"type": "ok"}, []
        if kind in ("pause", "resume"):
            self.paused = kind == "pause"
            self.coordinated = True  # (also after a restart, when the rate is not sent again)
            if not self.paused:  # the pause held them silent: their leases start afresh
                for record in self.workers.values():
                    record.last_seen = self.clock()
            return {"type": "ok"}, []
        raise ProtocolError("bad_type", f"a server does not take {kind!r} messages")

    def take_ack(self, worker_id: int):
        """Remove and return this worker's ready ack from the outbox, if there is one."""
        for i, ack in enumerate(self.outbox):
            if ack[0] == worker_id:
                return self.outbox.pop(i)
        return None

    def ack_reply(self, ack, want_params: bool) -> tuple[dict, list]:
        worker_id, version, staleness = ack
        record = self.workers.get(worker_id)
        generation = record.data_generation if record is not None else 0
        return ({"type": "ack", "version": version, "staleness": staleness, "data_generation": generation},
                [self.params] if want_params else [])

    # --- checkpoints --------------------------------------------------------------------

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict]:
        """What a checkpoint holds: arrays (weights, optimizer state) and counters."""
        arrays = {"params": self.params.copy(), **{f"opt_{k}": v for k, v in self.optimizer.state().items()}}
        meta = {"model": self.config.model.to_dict(), "optimizer": self.config.optimizer.to_dict(),
                "range": [self.lo, self.hi],
                "examples": self.examples, "lr_override": self.lr_override, "schedule": self.schedule.state(),
                "staleness": self.staleness.to_dict()}
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Continue from a checkpoint of the same model and optimizer."""
        if meta.get("model") != self.config.model.to_dict() or meta.get("optimizer") != self.config.optimizer.to_dict():
            raise ConfigError("the checkpoint is of another model or optimizer than this server's")
        if list(meta.get("range", [0, self.net.n_params])) != [self.lo, self.hi]:
            raise ConfigError(f"the checkpoint holds parameters {meta['range']}, this server shard [{self.lo}, {self.hi})")
        with self.write_lock:
            self.params[...] = arrays["params"]
        self.optimizer.load_state({k[4:]: v for k, v in arrays.items() if k.startswith("opt_")})
        self.version = int(meta["version"])
        self._check_budget()  # resumed at or past the budget: nothing more to do
        if hasattr(self.write_lock, "set_version"):
            self.write_lock.set_version(self.version)
        self.examples = int(meta["examples"])
        self.lr_override = meta.get("lr_override")
        self.schedule.load_state(meta.get("schedule") or {})
        self.staleness = StalenessHistogram.from_dict(meta["staleness"])
        if self._history is not None:
            self._history[self.version % DC_HISTORY] = self.params

    def stats(self) -> dict:
        now = self.clock()
        return {
            "version": self.version, "examples": self.examples, "range": [self.lo, self.hi],
            "server_shard": self.shard, "num_server_shards": self.num_server_shards, "lr": self.lr(), "uptime": now - self.started,
            "staleness": self.staleness.to_dict(), "errors": dict(self.errors), "stopping": self.stopping,
            "paused": self.paused, "coordinated": self.coordinated, "consistency": self.config.consistency,
            "ssp_max_lead": getattr(self.gate, "max_lead", None),
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "workers": {str(w): r.to_dict(now) for w, r in self.workers.items()},
        }
