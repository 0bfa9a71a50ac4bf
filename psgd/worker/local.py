"""Local SGD / DiLoCo on the worker, without sockets (Douillard et al. 2023, "DiLoCo:
Distributed Low-Communication Training of Language Models").

A round: start from the server's weights ``w0``, take ``local_steps`` steps of the inner
optimizer (its state, e.g. AdamW's moments, carries over from round to round) on this
worker's minibatches, then push the *outer gradient* ``w0 - w`` through the same channel
a Downpour worker pushes gradients through (so codecs, shards and the server's one door
all apply), and go on from the weights the ack brings back. The server applies it with
its outer optimizer (psgd.config.server_update). With one local step of plain SGD, an
outer rate of 1 and no momentum this is Downpour's plain SGD, to float32 rounding: the
pushed vector is ``w0 - (w0 - lr g)``, not ``lr g``.

Kept apart from psgd.worker.core's Downpour loop on purpose: it only borrows the core's
bookkeeping (``_count_push``, ``_check_assignment``, ``stats``).
"""

from __future__ import annotations

import time

import numpy as np

from ..model.optim import OptimizerSpec, make_optimizer
from .core import StepSettings, WorkerCore


MAX_LOCAL_STEPS_FACTOR = 4


class LocalCore(WorkerCore):
    """``inner``: the inner optimizer's spec, ``inner_lr`` its rate (constant, unless the
    server's acks tell another: ``--inner-schedule run``), ``local_steps`` H; the rest as
    :class:`WorkerCore` (``settings.n_push``/``n_fetch`` do not apply)."""

    def __init__(self, net, batches, settings: StepSettings, rng, inner: OptimizerSpec, inner_lr: float,
                 local_steps: int, stats: dict | None = None):
        super().__init__(net, batches, StepSettings(1, 1, settings.dropout, settings.slowdown, settings.max_steps,
                                                    settings.heartbeat_every_s), rng, stats)
        self.inner = make_optimizer(inner, net.n_params, net.dtype, net.weight_mask())
        self.inner_lr, self.local_steps = inner_lr, local_steps
        self.run_local_steps = local_steps  # the run's H; local_steps may change with dynamic local updates
        self.start = np.empty(net.n_params, net.dtype)
        self.step_grad = np.empty(net.n_params, net.dtype)

    def run(self, channel, should_stop=lambda: False, on_assignment=None) -> None:
        s, st = self.settings, self.stats
        channel.pull(self.params)
        while not should_stop() and (s.max_steps is None or st["steps"] < s.max_steps):
            t0 = time.perf_counter()
            self.start[...] = self.params
            channel.mark_window()  # the outer gradient is computed from the weights last pulled
            examples = self._local_round(channel, should_stop, on_assignment)
            np.subtract(self.start, self.params, out=channel.grad)
            t1 = time.perf_counter()
            st["compute_s"] += t1 - t0
            result = channel.push(examples, self.params)  # the ack brings the server's new weights
            self._count_push(result, examples)
            self._take_local_steps(getattr(result, "local_steps", None))
            self._take_inner_lr(getattr(result, "inner_lr", None))
            if result.data_generation is not None and result.data_generation != self.data_generation:
                self._check_assignment(channel, on_assignment)
            st["comm_s"] += time.perf_counter() - t1

    def _take_local_steps(self, told) -> None:
        """Dynamic local updates: the server sizes H to this worker's speed (at most
        MAX_LOCAL_STEPS_FACTOR x the run's, so a confused server cannot stall a worker)."""
        if isinstance(told, int) and told >= 1:
            self.local_steps = min(told, MAX_LOCAL_STEPS_FACTOR * self.run_local_steps)

    def _take_inner_lr(self, told) -> None:
        """A scheduled inner rate (``--inner-schedule run``): the server's word, from the
        run's progress, on the rate of the next round; none told: the rate stays."""
        if told is not None:
            self.inner_lr = float(told)

    def _local_round(self, channel, should_stop, on_assignment) -> int:
        """H inner steps on ``self.params``; returns the examples seen. A long round still
        heartbeats, so the lease never runs out mid-round."""
        s, st = self.settings, self.stats
        examples = 0
        for _ in range(self.local_steps):
            x, t = next(self.batches)
            t0 = time.perf_counter()
            self.net.loss_and_grad(self.params, x, t, self.step_grad, s.dropout, self.rng)
            self.inner.step(self.params, self.step_grad, self.inner_lr)
            examples += x.shape[0]
            st["steps"] += 1
            if s.slowdown > 1:
                time.sleep((s.slowdown - 1) * (time.perf_counter() - t0))
            if time.monotonic() - channel.last_contact > s.heartbeat_every_s:
                self._check_assignment(channel, on_assignment, first_only=False)
            if should_stop() or (s.max_steps is not None and st["steps"] >= s.max_steps):
                break
        return examples
