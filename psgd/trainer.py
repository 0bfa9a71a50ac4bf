"""The single-process trainer (``psgd train --workers 0``) and what every run shares:
preparing the data, recording metrics, writing the run directory.

Events go to a callback ``on_event(kind, info)`` so the CLI can draw a progress bar
without this module knowing about terminals:

- ``"start"``: ``{"total_examples": int}``
- ``"progress"``: ``{"examples": int, "loss": float}`` (running training loss)
- ``"eval"``: one metrics record (see :class:`RunRecorder`)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data as data_mod
from .config import TrainConfig
from .errors import ConfigError
from .modelio import save_model
from .network import MLP
from .optim import make_optimizer

PROGRESS_EVERY = 50  # steps between progress events


@dataclass
class PreparedData:
    train: data_mod.Dataset
    validation: data_mod.Dataset | None
    test: data_mod.Dataset
    T_train: np.ndarray
    T_val: np.ndarray | None
    T_test: np.ndarray

    @property
    def eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X, T)`` evaluated during training: the validation split, or the test set without one."""
        if self.validation is not None:
            return self.validation.X, self.T_val
        return self.test.X, self.T_test


def prepare_data(config: TrainConfig) -> PreparedData:
    """Load the data set, hold out the validation split, check the model fits it."""
    train, test = data_mod.load(config.data, config.data_dir, config.seed)
    sizes = config.model.sizes
    n_out = train.n_outputs_for(config.model.loss)
    if sizes[0] != train.n_inputs or sizes[-1] != n_out:
        raise ConfigError(
            f"layers {','.join(map(str, sizes))} do not fit {train.name}: it has {train.n_inputs} inputs "
            f"and {n_out} outputs, so the list must start with {train.n_inputs} and end with {n_out}"
        )
    if config.model.loss == "softmax_ce" and not train.n_classes:
        raise ConfigError(f"{train.name} has real-valued targets: use --loss sse")
    val = None
    if config.validation:
        train, val = data_mod.split(train, config.validation, config.seed)
    loss = config.model.loss
    return PreparedData(
        train, val, test, train.targets_for(loss),
        val.targets_for(loss) if val is not None else None, test.targets_for(loss),
    )


class RunRecorder:
    """Collects evaluation records and writes the run directory (if there is one).

    Each record: ``time`` (s since start), ``train_time`` (s, evaluation excluded),
    ``epoch``, ``examples``, ``updates``, ``lr``, ``train_loss``, ``val_loss``,
    ``val_accuracy``, plus whatever the caller adds (staleness, throughput).
    """

    def __init__(self, config: TrainConfig, on_event=None, append: bool = False):
        self.config = config
        self.on_event = on_event or (lambda kind, info: None)
        self.records: list[dict] = []
        self.out = Path(config.out_dir) if config.out_dir else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(config.to_json() + "\n")
            metrics = self.out / "metrics.jsonl"
            if append and metrics.exists():  # a resumed run goes on where the old one stopped
                self.records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            self._metrics = open(metrics, "a" if append else "w")

    def record(self, rec: dict) -> None:
        self.records.append(rec)
        if self.out:
            self._metrics.write(json.dumps(rec) + "\n")
            self._metrics.flush()
        self.on_event("eval", rec)

    def first_reaching(self, accuracy: float) -> dict | None:
        return next((r for r in self.records if (r.get("val_accuracy") or 0) >= accuracy), None)

    def finish(self, params: np.ndarray, summary: dict) -> dict:
        if self.out:
            self._metrics.close()
            save_model(self.out / "weights.npz", self.config.model, params)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train_single(config: TrainConfig, on_event=None) -> dict:
    """Train in this process; returns the summary (test loss and accuracy, timings)."""
    t0 = time.perf_counter()
    d = prepare_data(config)
    net = MLP(config.model)
    params = net.init_params(config.seed)
    optimizer = make_optimizer(config.optimizer, net.n_params, net.dtype, net.weight_mask())
    schedule = config.schedule.build()
    X = d.train.X.astype(net.dtype, copy=False)
    batches = data_mod.Minibatches(X, d.T_train, config.batch_size, config.seed,
                                   d.train.image_shape if config.augment else None)
    rng = np.random.default_rng(config.seed + 1)
    grad = np.empty(net.n_params, net.dtype)
    recorder = RunRecorder(config, on_event)

    n_train = len(d.train)
    total_examples = int(config.epochs * n_train)
    eval_every = max(1, n_train // config.evals_per_epoch)
    recorder.on_event("start", {"total_examples": total_examples})
    setup_time = time.perf_counter() - t0

    examples = updates = 0
    next_eval = eval_every
    train_time = eval_time = 0.0
    running = []
    t_train = time.perf_counter()
    while examples < total_examples:
        x, t = next(batches)
        loss, _ = net.loss_and_grad(params, x, t, grad, config.dropout, rng)
        optimizer.step(params, grad, schedule(updates))
        updates += 1
        examples += x.shape[0]
        running.append(loss)
        if updates % PROGRESS_EVERY == 0:
            recorder.on_event("progress", {"examples": examples, "loss": float(np.mean(running[-PROGRESS_EVERY:]))})
        if examples >= next_eval or examples >= total_examples:
            next_eval += eval_every
            train_time += time.perf_counter() - t_train
            t_eval = time.perf_counter()
            val_loss, val_acc = net.evaluate(params, *d.eval_set)
            schedule.observe(val_loss if val_acc is None else 1.0 - val_acc)
            eval_time += time.perf_counter() - t_eval
            recorder.record({
                "time": time.perf_counter() - t0, "train_time": train_time, "epoch": examples / n_train,
                "examples": examples, "updates": updates, "lr": schedule(updates),
                "train_loss": float(np.mean(running)), "val_loss": val_loss, "val_accuracy": val_acc,
            })
            running = []
            t_train = time.perf_counter()
            if config.target_accuracy and val_acc is not None and val_acc >= config.target_accuracy:
                break

    test_loss, test_acc = net.evaluate(params, d.test.X, d.T_test)
    summary = {
        "workers": 0, "updates": updates, "examples": examples, "epochs": examples / n_train,
        "test_loss": test_loss, "test_accuracy": test_acc,
        "setup_time": setup_time, "train_time": train_time, "eval_time": eval_time,
        "wall_time": time.perf_counter() - t0, "examples_per_s": examples / train_time if train_time else 0.0,
    }
    return recorder.finish(params, summary)
