"""The configuration of a training run, frozen, with documented defaults.

One :class:`TrainConfig` describes a run whether it is trained by one process
(``workers == 0``) or by a local cluster, so the two can be compared flag for flag.
The CLI builds it from options (each also readable from a ``PSGD_*`` variable).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace

from .data.augment import DistortionSpec
from .errors import ConfigError
from .model.network import ModelSpec
from .model.optim import OptimizerSpec
from .model.schedules import ScheduleSpec

TRANSPORTS = ("auto", "zmq", "shm")
# How the server scales the learning rate of a push by its staleness s:
# none: lr; divide: lr / max(s, 1) (Zhang et al., IJCAI 2016); dynsgd: lr / (s + 1);
# dcasgd: delay compensation g + lambda g*g*(w_now - w_then) (Zheng et al., ICML 2017), plain SGD only.
STALENESS_RULES = ("none", "divide", "dynsgd", "dcasgd")
# async: apply every push at once (Downpour); ssp: a worker more than ssp_bound clocks ahead
# of the slowest live worker waits; sync: one gradient from every live worker, averaged.
CONSISTENCY = ("async", "ssp", "sync")


def default_workers() -> int:
    """What ``psgd train`` runs without --workers: one worker per CPU, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    data: str = "mnist"  # "mnist" or the path of an .npz with X and y
    data_dir: str | None = None  # where MNIST lives; None: $PSGD_DATA_DIR or the user cache
    batch_size: int = 128
    epochs: float = 14.0  # passes over the training set (all workers together)
    seed: int = 0
    validation: int = 5000  # examples held out of the training set for validation
    dropout: float = 0.0
    augment: bool = False  # random shifts of up to 2 pixels, for image data
    distort: DistortionSpec = field(default_factory=DistortionSpec)  # random affine warps and noise, per minibatch
    target_accuracy: float | None = None  # stop once validation accuracy reaches this
    out_dir: str | None = None  # where weights and metrics go; None: write nothing
    evals_per_epoch: int = 1
    # the distributed run (ignored when workers == 0)
    workers: int = 0
    servers: int = 1  # server shards, each holding one range of the parameter vector
    curve: bool = False  # a local cluster encrypts and authenticates its traffic (fresh keys per run)
    n_fetch: int = 1  # pull fresh weights every n_fetch steps (Downpour)
    n_push: int = 1  # push the accumulated gradient every n_push steps (Downpour)
    transport: str = "auto"  # auto: shared memory for workers on the server's machine
    staleness_rule: str = "divide"  # see STALENESS_RULES; changes nothing when pushes are fresh
    dc_lambda: float = 0.04  # dcasgd: the variance-control constant lambda
    consistency: str = "async"  # see CONSISTENCY
    ssp_bound: int = 3  # ssp: how many clocks a worker may run ahead of the slowest
    lease_s: float = 10.0  # a worker silent this long is dropped from barriers and statistics
    slow_worker: float = 1.0  # the last worker of a local cluster runs this many times slower
    # stop conditions besides epochs and target accuracy
    max_updates: int | None = None
    max_seconds: float | None = None

    def __post_init__(self):
        checks = [
            (self.batch_size > 0, "batch size must be > 0"),
            (self.epochs > 0, "epochs must be > 0"),
            (self.validation >= 0, "validation size must be >= 0"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.servers >= 1, "servers must be >= 1"),
            (self.n_fetch >= 1 and self.n_push >= 1, "n_fetch and n_push must be >= 1"),
            (self.transport in TRANSPORTS, f"transport must be one of {', '.join(TRANSPORTS)}"),
            (self.staleness_rule in STALENESS_RULES, f"staleness rule must be one of {', '.join(STALENESS_RULES)}"),
            (self.consistency in CONSISTENCY, f"consistency must be one of {', '.join(CONSISTENCY)}"),
            (self.staleness_rule != "dcasgd" or self.optimizer.name == "sgd",
             "the dcasgd staleness rule compensates plain SGD: use --optimizer sgd"),
            (self.dc_lambda >= 0, "dc-lambda must be >= 0"),
            (self.ssp_bound >= 0, "the ssp bound must be >= 0"),
            (self.lease_s > 0, "the lease must be > 0 seconds"),
            (self.slow_worker >= 1.0, "the slow worker factor must be >= 1"),
            (self.evals_per_epoch >= 1, "evals per epoch must be >= 1"),
            (self.target_accuracy is None or 0 < self.target_accuracy <= 1, "target accuracy must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        try:
            model = ModelSpec.from_dict(d.pop("model", ModelSpec().to_dict()))
            optimizer = OptimizerSpec(**d.pop("optimizer", {}))
            schedule = ScheduleSpec(**d.pop("schedule", {}))
            distort = DistortionSpec.from_dict(d.pop("distort", {}))
            return cls(model=model, optimizer=optimizer, schedule=schedule, distort=distort, **d)
        except TypeError as exc:
            raise ConfigError(f"bad configuration: {exc}") from None

    def with_(self, **changes) -> "TrainConfig":
        return replace(self, **changes)
