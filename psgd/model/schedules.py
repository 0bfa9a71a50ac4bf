"""Learning-rate schedules: the rate as a function of the update count k.

A schedule is called as ``schedule(k) -> lr``. Plateau also listens to the validation
error through ``observe(error)``; the others ignore it. Every schedule's mutable state
is a small dict (``state()`` / ``load_state()``) so a run can be checkpointed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError

SCHEDULES = ("constant", "diminishing", "step", "plateau")
WARMUP_MAX = 500  # updates: the warm-up of a run long enough (MNIST's default run is 6,000 updates)


class Schedule:
    def __call__(self, k: int) -> float:
        raise NotImplementedError

    def observe(self, validation_error: float) -> None:
        """Told after every evaluation; only plateau acts on it."""

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


class Constant(Schedule):
    def __init__(self, lr: float):
        self.lr = lr

    def __call__(self, k):
        return self.lr


class Diminishing(Schedule):
    """a0 / (1 + k / tau): the Robbins-Monro rate, sum infinite, sum of squares finite."""

    def __init__(self, lr: float, tau: float):
        if tau <= 0:
            raise ConfigError(f"tau must be > 0, got {tau}")
        self.lr, self.tau = lr, tau

    def __call__(self, k):
        return self.lr / (1.0 + k / self.tau)


class StepDecay(Schedule):
    """lr * factor ** floor(k / every)."""

    def __init__(self, lr: float, every: int, factor: float):
        if every <= 0 or not 0 < factor <= 1:
            raise ConfigError("step decay needs every > 0 and 0 < factor <= 1")
        self.lr, self.every, self.factor = lr, every, factor

    def __call__(self, k):
        return self.lr * self.factor ** (k // self.every)


class Plateau(Schedule):
    """Multiply the rate by ``factor`` when the validation error has not improved by more
    than ``threshold`` (relative) for ``patience`` evaluations in a row; never below ``min_lr``."""

    def __init__(self, lr: float, factor: float = 0.1, patience: int = 3, threshold: float = 1e-3, min_lr: float = 0.0):
        if not 0 < factor < 1 or patience < 1:
            raise ConfigError("plateau needs 0 < factor < 1 and patience >= 1")
        self.lr, self.factor, self.patience = lr, factor, patience
        self.threshold, self.min_lr = threshold, min_lr
        self.best = float("inf")
        self.bad_evaluations = 0

    def __call__(self, k):
        return self.lr

    def observe(self, validation_error):
        if validation_error < self.best * (1.0 - self.threshold):
            self.best = validation_error
            self.bad_evaluations = 0
            return
        self.bad_evaluations += 1
        if self.bad_evaluations >= self.patience:
            self.lr = max(self.lr * self.factor, self.min_lr)
            self.bad_evaluations = 0

    def state(self):
        return {"lr": self.lr, "best": self.best, "bad_evaluations": self.bad_evaluations}

    def load_state(self, state):
        self.lr, self.best, self.bad_evaluations = float(state["lr"]), float(state["best"]), int(state["bad_evaluations"])


class Warmup(Schedule):
    """Linear warm-up over the first ``steps`` updates in front of any schedule."""

    def __init__(self, inner: Schedule, steps: int):
        self.inner, self.steps = inner, steps

    def __call__(self, k):
        factor = min(1.0, (k + 1) / self.steps) if self.steps > 0 else 1.0
        return factor * self.inner(k)

    def observe(self, validation_error):
        self.inner.observe(validation_error)

    def state(self):
        return self.inner.state()

    def load_state(self, state):
        self.inner.load_state(state)


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule as options: ``name`` picks which constants matter (see each class)."""

    name: str = "step"
    lr: float = 0.1
    tau: float = 5000.0  # diminishing
    every: int = 2000  # step: updates between drops (about 4.7 epochs of MNIST at batch 128)
    factor: float = 0.2  # step and plateau
    patience: int = 2  # plateau
    # updates of linear warm-up, 0 for none: keeps asynchronous runs stable. None: fitted to
    # the run (psgd.config.TrainConfig.fitted_to: a tenth of it, at most WARMUP_MAX)
    warmup: int | None = None

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)

    def build(self) -> Schedule:
        if self.name == "constant":
            s: Schedule = Constant(self.lr)
        elif self.name == "diminishing":
            s = Diminishing(self.lr, self.tau)
        elif self.name == "step":
            s = StepDecay(self.lr, self.every, self.factor)
        else:
            s = Plateau(self.lr, self.factor, self.patience)
        warmup = WARMUP_MAX if self.warmup is None else self.warmup  # not fitted to a run: the most
        return Warmup(s, warmup) if warmup else s
