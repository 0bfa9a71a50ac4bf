"""The parameter store: the weights (or one server shard's range of them), the optimizer,
the version counter and the staleness rule. Pure numpy, no sockets, no workers.

``check`` decides whether a gradient fits; ``apply`` applies one that did. The server
calls ``check`` exactly once per push, before anything else touches the push, and
``apply`` never checks again: validation is the one door's job (psgd.server.state).
"""

from __future__ import annotations

import numpy as np

from ..config import TrainConfig, adapts_momentum, server_update
from ..errors import ConfigError, ProtocolError
from ..metrics import StalenessHistogram
from ..model.layout import shard_range
from ..model.interface import build_model, init_range, weight_mask_range
from ..model.momentum_rule import MomentumAdaptation
from ..model.optim import OptimizerSpec, make_optimizer

MAX_EXAMPLES_PER_PUSH = 1 << 20
DC_HISTORY = 16  # dcasgd: weight versions kept; an older push is applied uncompensated


class _NoLock:
    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


class ParameterStore:
    """Weights, optimizer state and version of one server, or of one server shard: the
    contiguous range ``[lo, hi)`` given by ``shard`` of ``num_server_shards``.

    ``params`` is the vector (or range) to update in place (a shared-memory view, or None
    for a fresh one from the config's seed); ``write_lock`` wraps each update (the seqlock
    of the shared segment). ``max_updates``: the update that reaches this version spends
    the budget (:attr:`budget_spent`).
    """

    def __init__(self, config: TrainConfig, params: np.ndarray | None = None, write_lock=None,
                 shard: int = 0, num_server_shards: int = 1, max_updates: int | None = None):
        self.config = config
        self.net = build_model(config.model)
        self.dtype = self.net.dtype
        self.shard, self.num_server_shards = shard, num_server_shards
        self.lo, self.hi = shard_range(self.net.n_params, shard, num_server_shards)
        self.size = self.hi - self.lo
        # only this range is ever built: a shard of a 100M-parameter model holds its share
        self.params = init_range(self.net, config.seed, self.lo, self.hi, params)
        # Downpour: the run's optimizer and schedule; local SGD: its outer ones (psgd.config.server_update)
        self.optimizer_spec, schedule_spec = server_update(config)
        self.optimizer = self._new_optimizer()
        self.schedule = schedule_spec.build()
        # the momentum rule: the momentum and rate factor in force follow the pushes' staleness
        self.adaptation = MomentumAdaptation(self.optimizer_spec.momentum, adapts_momentum(config))
        self.write_lock = write_lock or _NoLock()
        self.max_updates = max_updates
        self.version = 0
        self.examples = 0
        self.staleness = StalenessHistogram()
        self.lr_override: float | None = None  # set by a coordinator, which then owns the schedule
        self.replaced_at = 0  # the version of the last rollback: a gradient from before it is refused
        self._history = None  # dcasgd: the last DC_HISTORY weight vectors, by version
        if config.staleness_rule == "dcasgd":
            self._history = np.empty((DC_HISTORY, self.size), self.dtype)
            self._history[0] = self.params
            self._compensated = np.empty(self.size, self.dtype)

    def _new_optimizer(self):
        """The optimizer in its initial state (the decay mask only where decay is on)."""
        spec = self.optimizer_spec
        mask = weight_mask_range(self.net, self.lo, self.hi) if spec.weight_decay else None
        return make_optimizer(spec, self.size, self.dtype, mask)

    @property
    def budget_spent(self) -> bool:
        return self.max_updates is not None and self.version >= self.max_updates

    # --- the update rule ----------------------------------------------------------------

    def lr(self) -> float:
        """The rate the coordinator set, else the schedule's at the current version
        (before any staleness scaling)."""
        return self.lr_override if self.lr_override is not None else self.schedule(self.version)

    def push_lr(self, staleness: int) -> float:
        """The rate for one push of the given staleness, by the run's staleness rule, times
        the momentum rule's factor (1 unless the rule is adaptive and pushes are stale)."""
        rule, lr = self.config.staleness_rule, self.lr() * self.adaptation.lr_factor
        if rule == "dynsgd":  # dcasgd corrects the gradient instead (see _compensate)
            return lr / (staleness + 1)
        if rule == "divide":
            return lr / max(staleness, 1)
        return lr

    def check(self, base_version, examples, grad: np.ndarray, offset: int | None = None) -> float:
        """Raise ProtocolError unless ``grad`` is a finite gradient of this range computed
        from a version the store has reached, for 1..MAX_EXAMPLES_PER_PUSH examples.
        Returns its squared norm (computed for the finiteness test; the outlier guard
        reuses it rather than pass over the gradient again)."""
        if grad.dtype != self.dtype:
            raise ProtocolError("bad_array", f"gradient is {grad.dtype}, the model is {self.dtype}")
        offset = self.lo if offset is None else offset
        if offset != self.lo or grad.shape != (self.size,):
            raise ProtocolError("bad_range", f"gradient covers [{offset}, {offset + grad.size}), "
                                             f"this server holds [{self.lo}, {self.hi})")
        if base_version > self.version or base_version < 0:
            raise ProtocolError("future_version", f"gradient claims version {base_version}, the server is at {self.version}")
        if base_version < self.replaced_at:
            raise ProtocolError("too_stale", f"the gradient was computed from weights that a rollback replaced "
                                             f"at version {self.replaced_at}: pull fresh weights")
        if not 0 < examples <= MAX_EXAMPLES_PER_PUSH:
            raise ProtocolError("bad_field", f"examples {examples} not in 1..{MAX_EXAMPLES_PER_PUSH}")
        with np.errstate(over="ignore", invalid="ignore"):
            norm2 = float(np.dot(grad, grad))  # NaN or Inf anywhere (or an overflowing norm) makes this non-finite
        if not np.isfinite(norm2):
            raise ProtocolError("not_finite", "gradient has NaN or Inf values (or a norm beyond float range)")
        return norm2

    def apply(self, base_version: int, examples: int, grad: np.ndarray) -> tuple[int, int]:
        """Apply one checked gradient now; return ``(new version, staleness)``."""
        staleness = self.version - base_version
        if self._history is not None:
            grad = self._compensate(grad, base_version, staleness)
        self.adaptation.observe(staleness)
        self.optimizer.momentum = self.adaptation.momentum
        with self.write_lock:
            self.optimizer.step(self.params, grad, self.push_lr(staleness))
        self._advance(examples)
        self.staleness.add(staleness)
        return self.version, staleness

    def apply_average(self, mean_grad: np.ndarray, examples: int, pushes: int) -> int:
        """Apply the average of one synchronous round of ``pushes`` checked gradients as
        one update (staleness 0 each); return the new version."""
        with self.write_lock:
            self.optimizer.step(self.params, mean_grad, self.lr())
        self._advance(examples)
        for _ in range(pushes):
            self.staleness.add(0)
        return self.version

    def _advance(self, examples: int) -> None:
        self.version += 1
        self.examples += examples
        if self._history is not None:
            self._history[self.version % DC_HISTORY] = self.params

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

    def replace(self, params: np.ndarray, offset: int) -> int:
        """A coordinator's rollback: these weights (this store's range, finite) replace the
        current ones, the optimizer's state starts afresh (momentum would carry the
        divergence on), and the version goes up by one, so that every push computed
        before counts as stale. Returns the new version; raises ProtocolError, changing
        nothing, for weights that do not fit."""
        if params.dtype != self.dtype:
            raise ProtocolError("bad_array", f"weights are {params.dtype}, the model is {self.dtype}")
        if offset != self.lo or params.shape != (self.size,):
            raise ProtocolError("bad_range", f"weights cover [{offset}, {offset + params.size}), "
                                             f"this server holds [{self.lo}, {self.hi})")
        if not np.isfinite(params).all():
            raise ProtocolError("not_finite", "weights hold NaN or Inf")
        fresh = self._new_optimizer()
        with self.write_lock:
            self.params[...] = params
        fresh.momentum = self.optimizer.momentum  # the staleness, and so the rule's choice, is the same
        self.optimizer = fresh
        self._advance(0)
        self.replaced_at = self.version
        return self.version

    # --- checkpoints --------------------------------------------------------------------

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict]:
        """What a checkpoint holds: arrays (weights, optimizer state) and counters. The
        arrays are the live vectors, not copies (a copy of a large range would double the
        server's memory at every checkpoint): write them before the next update."""
        arrays = {"params": self.params, **{f"opt_{k}": v for k, v in self.optimizer.state(copy=False).items()}}
        meta = {"model": self.config.model.to_dict(), "optimizer": self.optimizer_spec.to_dict(),
                "range": [self.lo, self.hi],
                "examples": self.examples, "lr_override": self.lr_override, "schedule": self.schedule.state(),
                "staleness": self.staleness.to_dict(), "momentum_rule": self.adaptation.state()}
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Continue from a checkpoint of the same model and optimizer."""
        optimizer = OptimizerSpec.from_dict(meta["optimizer"]) if isinstance(meta.get("optimizer"), dict) else None
        if meta.get("model") != self.config.model.to_dict() or optimizer != self.optimizer_spec:
            raise ConfigError("the checkpoint is of another model or optimizer than this server's")
        if list(meta.get("range", [0, self.net.n_params])) != [self.lo, self.hi]:
            raise ConfigError(f"the checkpoint holds parameters {meta['range']}, this server shard [{self.lo}, {self.hi})")
        with self.write_lock:
            self.params[...] = arrays["params"]
        self.optimizer.load_state({k[4:]: v for k, v in arrays.items() if k.startswith("opt_")})
        self.version = int(meta["version"])
        if hasattr(self.write_lock, "set_version"):
            self.write_lock.set_version(self.version)
        self.examples = int(meta["examples"])
        self.lr_override = meta.get("lr_override")
        self.schedule.load_state(meta.get("schedule") or {})
        self.staleness = StalenessHistogram.from_dict(meta["staleness"])
        self.adaptation.load_state(meta.get("momentum_rule") or {})
        self.optimizer.momentum = self.adaptation.momentum
        if self._history is not None:
            self._history[self.version % DC_HISTORY] = self.params
