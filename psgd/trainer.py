"""The single-process trainer (``psgd train --workers 0``): the baseline every cluster run
is compared with, flag for flag.

Events go to a callback ``on_event(kind, info)`` so the CLI can draw a progress bar
without this module knowing about terminals:

- ``"start"``: ``{"total_examples": int}``
- ``"progress"``: ``{"examples": int, "loss": float}`` (running training loss)
- ``"eval"``: one metrics record (see :class:`RunRecorder`)
"""

from __future__ import annotations

import time

import numpy as np

from . import data as data_mod
from .config import TrainConfig
from .errors import ConfigError
from .coordinator.rundir import RunRecorder
from .data.prepared import prepare_data
from .model.interface import build_model
from .model.optim import make_optimizer

PROGRESS_EVERY = 50  # steps between progress events


def train_single(config: TrainConfig, on_event=None, stop_requested=None) -> dict:
    """Train in this process; returns the summary (test loss and accuracy, timings).
    ``stop_requested()``, asked every step, ends the run early as a budget would (a first
    Ctrl-C): a final evaluation, then the summary, with stop_reason "interrupted"."""
    stop_requested = stop_requested or (lambda: False)
    if config.algorithm == "local":
        raise ConfigError("local SGD pushes to a server: give --workers 1 or more (with --workers 0 "
                          "train with --inner-optimizer's rule as --optimizer instead)")
    t0 = time.perf_counter()
    d = prepare_data(config)
    config = d.config
    net = build_model(config.model)
    params = net.init_params(config.seed)
    optimizer = make_optimizer(config.optimizer, net.n_params, net.dtype, net.weight_mask())
    schedule = config.schedule.build()
    X = d.train.X.astype(net.dtype, copy=False)
    batches = data_mod.Minibatches(X, d.T_train, config.batch_size, config.seed,
                                   d.train.image_shape if config.augment else None,
                                   config.distort, d.train.image_shape)
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
    stop_reason = "epochs"
    while examples < total_examples:
        interrupted = stop_requested()
        if interrupted and not running:  # just evaluated: nothing new to evaluate
            stop_reason = "interrupted"
            break
        x, t = next(batches)
        loss, _ = net.loss_and_grad(params, x, t, grad, config.dropout, rng)
        optimizer.step(params, grad, schedule(updates))
        updates += 1
        examples += x.shape[0]
        running.append(loss)
        if updates % PROGRESS_EVERY == 0:
            recorder.on_event("progress", {"examples": examples, "loss": float(np.mean(running[-PROGRESS_EVERY:]))})
        if examples >= next_eval or examples >= total_examples or interrupted:
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
                stop_reason = "target accuracy"
                break
            if interrupted:
                stop_reason = "interrupted"
                break

    test_loss, test_acc = net.evaluate(params, d.test.X, d.T_test)
    summary = {
        "workers": 0, "stop_reason": stop_reason, "updates": updates, "examples": examples, "epochs": examples / n_train,
        "test_loss": test_loss, "test_accuracy": test_acc,
        "setup_time": setup_time, "train_time": train_time, "eval_time": eval_time,
        "wall_time": time.perf_counter() - t0, "examples_per_s": examples / train_time if train_time else 0.0,
    }
    return recorder.finish(params, summary)
