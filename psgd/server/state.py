"""The parameter server's state and rules, without sockets.

:class:`ServerState` joins four pure parts, each tested on its own:

- ``store`` (psgd.server.store): weights, optimizer, version, staleness rule;
- ``members`` (psgd.server.membership): workers, leases, data shards;
- ``gate`` (psgd.server.consistency): when a push is applied and its worker answered;
- ``phase`` (psgd.server.phase): running, paused, draining, stopped;
- ``guard`` (psgd.server.guard): refuses a push whose gradient is an outlier.

**One door.** Every push, whichever way it came (ZeroMQ, shared memory, a test),
enters through :meth:`ServerState.push`: it is checked once and gets a :class:`Decision`
back (applied, held, refused with a code, shutdown). Acks of held pushes that a later
event releases are collected by :meth:`take_released`. The stop and refusal rules live
here and nowhere else; the loops in psgd.server.loop only move bytes and time.

Every other message (ZeroMQ only) goes through :meth:`handle`, ``message -> reply``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..config import TrainConfig, inner_optimizer, inner_schedule_spec
from ..errors import ProtocolError
from ..metrics import FLAG_AFTER_OUTLIERS, WorkerRecord
from ..model.interface import fingerprint
from ..wire.protocol import CONTROL, CONTROL_MESSAGES, Message, error, page_records
from .consistency import APPLY, APPLY_HOLD, make_gate
from .guard import OutlierGuard
from .membership import Membership
from .phase import RunPhase
from .store import ParameterStore
from .traffic import Traffic

log = logging.getLogger(__name__)

APPLIED, HELD, REFUSED, SHUTDOWN = "applied", "held", "refused", "shutdown"


@dataclass(frozen=True)
class Decision:
    """What became of one push: ``applied`` (``version``, ``staleness``), ``held`` (the
    ack comes later, from :meth:`ServerState.take_released`), ``refused`` (``code``,
    ``message``: nothing changed), or ``shutdown`` (the run is over)."""

    outcome: str
    version: int = 0
    staleness: int = 0
    code: str = ""
    message: str = ""


class ServerState:
    """One parameter server, or one server shard (``shard`` of ``num_server_shards``).

    ``params``/``write_lock``: see :class:`ParameterStore`; ``num_data_shards``: how many
    data shards workers are given; ``wait_for_workers``: ssp and sync hold every ack until
    that many workers have said hello (0: no start barrier); ``max_updates``: the update that reaches it ends the
    run there and then (a push already on its way is told to stop, not applied).
    """

    def __init__(self, config: TrainConfig, num_data_shards: int = 1, params: np.ndarray | None = None,
                 write_lock=None, clock=time.monotonic, shard: int = 0, num_server_shards: int = 1,
                 max_updates: int | None = None, wait_for_workers: int = 0):
        self.config = config
        self.clock = clock
        self.wait_for_workers = wait_for_workers  # ssp/sync: the start barrier (see _release)
        self.store = ParameterStore(config, params, write_lock, shard, num_server_shards, max_updates)
        self.members = Membership(config.lease_s, num_data_shards, clock)
        self.push_times = None  # a psgd.server.pushtimes.PushTimes: when each push was applied, if kept
        self.phase = RunPhase(clock)
        self.gate = make_gate(config, self.store.size, self.store.dtype)
        self.guard = OutlierGuard(config.outlier_k, config.outlier_window)
        self.errors: Counter = Counter()
        self.bytes_in = self.bytes_out = 0
        self.traffic = Traffic(config, self.store.size, self.store.dtype)  # codecs, and bytes by codec
        # kept by the loop: the newest checkpoint written, and writes that failed (a full disk)
        self.checkpoint_status = {"version": None, "failures": 0, "error": None, "failed_version": None}
        self.started = clock()
        self._released: list[tuple[int, int, int]] = []  # (worker, version, staleness) of held pushes, now free
        # local SGD with --inner-schedule run: the run's schedule, told to workers as their inner rate
        self.inner_schedule = inner_schedule_spec(config).build() if config.schedules_inner_lr else None

    # --- the one door -------------------------------------------------------------------

    def push(self, worker_id, base_version: int, examples: int, grad: np.ndarray,
             offset: int | None = None, seq: int | None = None) -> Decision:
        """One push, from any transport: checked once, then applied, held or refused.
        ``seq`` (ZeroMQ: the request's, 0 or None: none): the same seq as the worker's last
        push taken is a retry after a lost ack: answered with that push's ack, not applied."""
        if self.phase.stopping:
            if isinstance(worker_id, int):
                self._disconnect(worker_id)  # it will hear shutdown and go
            return Decision(SHUTDOWN)
        try:
            record = self.members.touch(worker_id)
            if seq and record.last_push == seq and record.last_ack is not None:
                return Decision(APPLIED, *record.last_ack)
            try:
                norm2 = self.store.check(base_version, examples, grad, offset)
                self._check_staleness(base_version)
                restarts = self.guard.restarts
                self.guard.admit(norm2, worker_id, self.members.connected)
                if self.guard.restarts != restarts:
                    log.warning("outlier guard: every connected worker's pushes were refused, again and again: "
                                "the run's gradients grew; warming up again")
            except ProtocolError as exc:
                record.refused += 1
                if self.push_times is not None:
                    self.push_times.add(record.name, self.store.version, base_version, refused=True)
                if exc.code == "outlier":
                    record.outliers += 1
                    if record.outliers == FLAG_AFTER_OUTLIERS:
                        log.warning(f"worker {record.worker_id} ({record.name}) flagged: {record.outliers} pushes "
                                    f"refused as outliers ({exc.detail})")
                raise
        except ProtocolError as exc:
            self.errors[exc.code] += 1
            return Decision(REFUSED, self.store.version, code=exc.code, message=exc.detail)
        action = self.gate.admit(worker_id, examples, grad)
        record.last_push, record.last_ack = seq, None
        decision = Decision(HELD)
        if action in (APPLY, APPLY_HOLD):
            # the coordinator's rate this push is applied at, for the push log (kept only then)
            lr = self.store.lr() if self.push_times is not None else None
            version, staleness = self.store.apply(base_version, examples, grad)
            self.members.count(worker_id, examples, staleness)
            if self.push_times is not None:
                self.push_times.add(record.name, version, base_version, lr=lr)
            if action == APPLY:
                decision = Decision(APPLIED, version, staleness)
            else:
                self.gate.hold(worker_id, version, staleness, self.members.workers[worker_id].pushes)
        for ack in self._release():
            if ack[0] == worker_id:  # its own ack, free at once (within the ssp bound)
                decision = Decision(APPLIED, ack[1], ack[2])
            else:
                self._released.append(ack)
        if decision.outcome == APPLIED:
            record.last_ack = (decision.version, decision.staleness)
        if self.store.budget_spent:
            self._stop("budget")
        return decision

    def staleness_bound(self) -> int:
        """The largest staleness a push may have (0: none); see TrainConfig.max_staleness."""
        bound = self.config.max_staleness
        return 4 * self.members.connected + 16 if bound is None else bound

    def _check_staleness(self, base_version: int) -> None:
        bound, staleness = self.staleness_bound(), self.store.version - base_version
        if bound and staleness > bound:
            raise ProtocolError("too_stale", f"the gradient is {staleness} versions old, the bound is {bound}: "
                                             "pull fresh weights")

    def take_released(self) -> list[tuple[int, int, int]]:
        """Acks ``(worker, version, staleness)`` of held pushes that are now free to go."""
        released, self._released = self._released, []
        return released

    def _release(self) -> list[tuple[int, int, int]]:
        """Ask the gate what the latest event freed; apply a completed sync round.
        A start barrier first: a server told its run's worker count (``wait_for_workers``,
        as psgd train's and the simulator's are) frees nothing until that many have said
        hello, so that ssp's first clocks and sync's first rounds are not the first worker's alone."""
        if not self.gate.holding() or self.members.joined < self.wait_for_workers:
            return []
        release = self.gate.release(self.members)
        acks = release.acks
        if release.round is not None:
            contributions = release.round.contributions
            version = self.store.apply_average(release.round.mean_grad, sum(contributions.values()), len(contributions))
            for worker_id, examples in contributions.items():
                self.members.count(worker_id, examples, 0)
            acks = acks + [(w, version, 0) for w in sorted(contributions)]
        for worker_id, version, staleness in acks:
            record = self.members.workers.get(worker_id)
            if record is not None:
                record.last_ack = (version, staleness)  # what a retry of its held push hears
        return acks

    # --- time and departures ------------------------------------------------------------

    def tick(self) -> None:
        """Drop workers whose lease ran out, and let the gate release what it can.
        Called every turn of the loop: leases run out even when nothing arrives."""
        if self.phase.paused:
            return  # the server holds the workers' requests: their silence is its own doing
        self.members.expire_leases(self.gate.holding())
        self._released.extend(self._release())
        if self.store.budget_spent:
            self._stop("budget")

    def disconnect(self, worker_id: int) -> None:
        """The worker is gone (bye, a closed doorbell); a barrier may have waited for it."""
        self._disconnect(worker_id)

    def _disconnect(self, worker_id: int) -> None:
        if self.members.disconnect(worker_id):
            self._released.extend(self._release())

    def stop(self, reason: str) -> bool:
        """End the run (see psgd.server.phase); True if this began the drain."""
        return self._stop(reason)

    def _stop(self, reason: str) -> bool:
        began = self.phase.stop(reason)
        if began:
            self.gate.drop_all()  # a held worker hears shutdown instead of its ack
            self._released.clear()
        return began

    # --- messages -----------------------------------------------------------------------

    def handle(self, msg: Message, role: str = CONTROL) -> tuple[dict, list] | None:
        """The reply (header, arrays) to a decoded message, or None for a push whose ack
        the consistency model holds. Never raises for bad input: a refusal is an
        ``error`` reply, counted by its code. ``role``: the sender's key's (psgd.wire.
        protocol: WORKER or CONTROL; a plaintext server has no keys, and no roles)."""
        try:
            if role != CONTROL and msg.type in CONTROL_MESSAGES:
                raise ProtocolError("forbidden", f"a {role} key may not send {msg.type!r}: only a control key "
                                                 "(one in the server's allowed control/ folder) may")
            return self._dispatch(msg)
        except ProtocolError as exc:
            return self.refuse(exc)

    def refuse(self, exc: ProtocolError) -> tuple[dict, list]:
        self.errors[exc.code] += 1
        return error(exc.code, exc.detail), []

    def _dispatch(self, msg: Message) -> tuple[dict, list] | None:
        kind = msg.type
        if kind == "push":
            if len(msg.arrays) != 1 and msg.get("codec", "none") == "none":  # a codec's frames: its decoder checks
                raise ProtocolError("bad_frames", f"push carries {len(msg.arrays)} arrays, expected 1")
            worker_id = msg["worker_id"]
            # a compressed push is decoded here, then enters the one door as any other
            grad = self.traffic.decode_push(self.members.workers.get(worker_id), msg.get("codec", "none"), msg.arrays)
            decision = self.push(worker_id, msg["base_version"], msg["examples"], grad, msg.offset(0), msg["seq"])
            self._take_timing(worker_id, msg.get("timing"))
            return self.push_reply(worker_id, decision, msg.get("want_params") is True)
        if kind in ("pull", "heartbeat", "hello") and self.phase.stopping:
            if kind != "pull" or msg.get("worker_id") is not None:  # a monitor may still pull
                return {"type": "shutdown"}, []
        if kind == "pull":
            record = self.members.touch(msg["worker_id"]) if msg.get("worker_id") is not None else None
            codec, frames = self.traffic.encode_params(record, self.store.params)
            return {"type": "params", "version": self.store.version, **_codec_field(codec)}, frames
        if kind == "heartbeat":
            record = self.members.touch(msg["worker_id"])
            self._take_timing(record.worker_id, msg.get("timing"))
            return {"type": "assignment", "data_shards": list(record.data_shards),
                    "data_generation": record.data_generation}, []
        if kind == "hello":
            if msg["transport"] not in ("zmq", "shm", "auto"):
                raise ProtocolError("bad_field", f"unknown transport {msg['transport']!r}")
            wanted = msg.get("data_shards")  # decode checked it: nil, or distinct ints >= 0
            if wanted and max(wanted) >= self.members.num_data_shards:
                raise ProtocolError("bad_field", f"data shards {wanted} are not all in "
                                                 f"0..{self.members.num_data_shards - 1}")
            record = self.members.register(msg["worker"][:64], "zmq", wanted)
            return {**self.welcome(record), "codecs": self.traffic.agree(record, msg.get("codecs"))}, []
        if kind == "stats":
            reply = {"type": "stats_reply", "stats": self.stats()}
            if msg.get("workers") is True:  # per-worker records: one page, after the id asked for
                now = self.clock()
                reply["workers"], reply["next"] = page_records(
                    ((w, lambda r=r: r.to_dict(now)) for w, r in self.members.workers.items()), msg.get("after"))
            return reply, []
        if kind == "set_lr":
            lr = float(msg["lr"])
            if not (np.isfinite(lr) and lr >= 0):
                raise ProtocolError("bad_field", f"learning rate {lr} is not a finite number >= 0")
            self.store.lr_override = lr
            self.phase.coordinated = True
            return {"type": "ok"}, []
        if kind == "set_params":
            self.store.replace(msg.arrays[0], msg.offset(0))
            self.guard.restart()  # the norms seen belong to the weights just replaced
            self.phase.coordinated = True
            return {"type": "ok"}, []
        if kind == "describe":
            c = self.config  # a user's model is described by fingerprint, never by module name
            model = {**c.model.wire_dict(), "fingerprint": fingerprint(self.store.net, c.model)}
            return {"type": "description", "config": {**c.to_dict(), "model": model}}, []
        if kind == "bye":
            worker_id = msg.get("worker_id")
            if isinstance(worker_id, int):
                self._disconnect(worker_id)
            return {"type": "ok"}, []
        if kind == "shutdown":  # finish: an operator's; a watching coordinator still writes the run
            self._stop("requested" if msg.get("finish") is True else "shutdown")
            return {"type": "ok"}, []
        if kind == "pause":
            self.phase.pause()
            return {"type": "ok"}, []
        if kind == "resume":
            self.members.extend_leases(self.phase.resume())
            return {"type": "ok"}, []
        raise ProtocolError("bad_type", f"a server does not take {kind!r} messages")

    def _take_timing(self, worker_id, timing: dict | None) -> None:
        """A worker's time totals (decode checked their form): kept for its statistics."""
        record = self.members.workers.get(worker_id) if timing is not None else None
        if record is not None:
            record.timing = dict(timing)

    def push_reply(self, worker_id, decision: Decision, want_params: bool) -> tuple[dict, list] | None:
        """The ZeroMQ reply to a push's decision (None: held, answered later)."""
        if decision.outcome == APPLIED:
            return self.ack_reply((worker_id, decision.version, decision.staleness), want_params)
        if decision.outcome == HELD:
            return None
        if decision.outcome == SHUTDOWN:
            return {"type": "shutdown"}, []
        return error(decision.code, decision.message), []

    def ack_reply(self, ack, want_params: bool) -> tuple[dict, list]:
        worker_id, version, staleness = ack
        record = self.members.workers.get(worker_id)
        generation = record.data_generation if record is not None else 0
        header = {"type": "ack", "version": version, "staleness": staleness, "data_generation": generation,
                  **self._local_steps_field(record), **self._inner_lr_field()}
        if not want_params:
            return header, []
        codec, frames = self.traffic.encode_params(record, self.store.params)
        return {**header, **_codec_field(codec)}, frames

    def _local_steps_field(self, record: WorkerRecord | None) -> dict:
        """Dynamic local updates (local SGD): the worker's next H, ``local_steps`` scaled by
        its speed against the fastest connected worker's (examples per second since each
        said hello), so that all push at a similar cadence; at least 1."""
        c = self.config
        if c.algorithm != "local" or not c.dynamic_local_steps or record is None:
            return {}
        now = self.clock()

        def rate(r):
            return r.examples / max(now - r.joined, 1e-9)
        fastest = max((rate(r) for r in self.members.workers.values() if r.connected), default=0.0)
        if fastest <= 0:
            return {"local_steps": c.local_steps}
        return {"local_steps": max(1, round(c.local_steps * rate(record) / fastest))}

    def inner_lr(self) -> float:
        """Local SGD's inner rate now: the run's schedule at the run's progress in Downpour's
        updates (examples applied / batch size), so that a local-SGD run's rate decays where
        a Downpour run's would after as many examples; the configured rate when not scheduled."""
        if self.inner_schedule is None:
            return self.config.schedule.lr
        return float(self.inner_schedule(self.store.examples // self.config.batch_size))

    def _inner_lr_field(self) -> dict:
        return {"inner_lr": self.inner_lr()} if self.inner_schedule is not None else {}

    def welcome(self, record: WorkerRecord) -> dict:
        c, s = self.config, self.store
        return {
            "type": "welcome", "worker_id": record.worker_id, "model": {**c.model.wire_dict(), "fingerprint": fingerprint(s.net, c.model)},
            "optimizer": s.optimizer_spec.to_dict(), "version": s.version, "data_shards": list(record.data_shards),
            "num_data_shards": self.members.num_data_shards, "data_generation": record.data_generation,
            "range": [s.lo, s.hi], "server_shard": s.shard, "num_server_shards": s.num_server_shards,
            "layout": s.net.layout.to_wire(),
            "run": {"data": c.data, "seed": c.seed, "validation": c.validation, "batch_size": c.batch_size,
                    "n_fetch": c.n_fetch, "n_push": c.n_push, "overlap": c.overlap, "dropout": c.dropout, "augment": c.augment, "distort": c.distort.to_dict(),
                    "lease_s": c.lease_s, **local_sgd(c, self.inner_lr())},
            "update": self.update_rule(),
        }

    def update_rule(self) -> dict:
        """What a push does besides the optimizer step (docs/protocol.md, "The update rule")."""
        c = self.config
        return {"lr": self.store.lr(), "staleness_rule": c.staleness_rule, "dc_lambda": c.dc_lambda,
                "momentum_rule": self.store.adaptation.to_dict()["rule"],
                "consistency": c.consistency, "ssp_bound": c.ssp_bound, "max_staleness": self.staleness_bound()}

    # --- checkpoints and statistics -----------------------------------------------------

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict]:
        return self.store.checkpoint()

    def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.store.restore(arrays, meta)
        if self.store.budget_spent:
            self._stop("budget")  # resumed at or past the budget: nothing more to do

    def stats(self) -> dict:
        """The summary: nothing in it grows with the workers (per-worker records come in
        pages, on request: see "stats" in _dispatch)."""
        now, s, p = self.clock(), self.store, self.phase
        return {
            "version": s.version, "examples": s.examples, "range": [s.lo, s.hi],
            "server_shard": s.shard, "num_server_shards": s.num_server_shards, "lr": s.lr(),
            "uptime": now - self.started, "staleness": s.staleness.to_dict(), "errors": dict(self.errors),
            "phase": p.phase.value, "stop_reason": p.reason,
            "stopping": p.stopping, "paused": p.paused, "coordinated": p.coordinated,
            "consistency": self.config.consistency, "ssp_max_lead": getattr(self.gate, "max_lead", None),
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "staleness_rule": self.config.staleness_rule,
            "max_staleness": self.staleness_bound(), "workers_connected": self.members.connected, "workers_known": len(self.members.workers),
            "checkpoint": dict(self.checkpoint_status), "traffic": self.traffic.stats(),
            "outlier_guard": self.guard.to_dict(), "momentum_rule": s.adaptation.to_dict(),
            "cpu_s": time.process_time(),  # this server process's CPU time: its cost per push, measured
        }


def local_sgd(c: TrainConfig, inner_lr: float) -> dict:
    """What a worker of a local-SGD run needs in the welcome's ``run`` (Downpour: nothing new);
    ``inner_lr``: the inner rate now (each ack tells the next when it is scheduled)."""
    if c.algorithm != "local":
        return {}
    return {"algorithm": "local", "local_steps": c.local_steps, "inner_optimizer": inner_optimizer(c).to_dict(),
            "inner_lr": inner_lr}


def _codec_field(codec: str) -> dict:
    """A plain vector says nothing of codecs: a client that knows none reads it as before."""
    return {} if codec == "none" else {"codec": codec}
