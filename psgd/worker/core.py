"""The worker's compute loop, without sockets: Downpour's inner loop.

Pull fresh weights every ``n_fetch`` steps, push the gradient summed over ``n_push``
steps, never wait for another worker. Everything it needs is fixed at construction (the
model, the minibatches, the settings); the channel it talks through is passed to
:meth:`WorkerCore.run`, so a test can drive it against a server state in-process.

**Overlap** (``StepSettings.overlap``, as in Downpour, whose workers never wait): the
worker sends push k and computes step k+1 while it travels and the server applies it;
only then does it wait for push k's ack (and the fresh weights it brings). The channel
has two gradient buffers for this: one in flight, one being computed into. A gradient is
then computed from weights one update older than without overlap, so staleness grows
by about one; the time the worker spent waiting on the server goes into compute instead.
The weights are double-buffered too, where the channel says that pays
(``acks_in_background``) and splits its push_end in two (``await_acks() -> acks``,
thread-safe against the compute, and ``settle(acks) -> PushResult``): a helper thread
waits for the ack and reads the fresh weights into the spare buffer while the step
computes; the loop swaps the buffers after it, and ``catch_up(params)`` reads again what
the server has moved on from since (an early read would make every gradient staler). On
the shared-memory path that read (1 MB that the server's core has just written) took
0.2-0.3 ms of a 3.7 ms step on the loop's own time; on the ZeroMQ path the same helper
made each step slower (see ParameterClient.acks_in_background).

A channel (a joined psgd.wire.client.ParameterClient, or any object with the same methods):
``grad`` (the buffer the next gradient is computed into), ``pull(params) -> version``,
``mark_window()``, ``window_open``, ``push(examples, params_or_None) -> PushResult``,
``push_begin(examples, params_or_None)`` and ``push_end() -> PushResult`` (the same push in
two halves; optionally ``acks_in_background``, ``await_acks``, ``settle`` and
``catch_up``, above), ``heartbeat(first_only) -> assignment reply`` and ``last_contact``
(time.monotonic of the last exchange).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .timing import StepTimer


@dataclass(frozen=True)
class StepSettings:
    n_fetch: int = 1  # pull fresh weights every n_fetch steps
    n_push: int = 1  # push the gradient summed over n_push steps
    dropout: float = 0.0
    slowdown: float = 1.0  # > 1: sleep so that each step takes this many times its compute time
    max_steps: int | None = None
    heartbeat_every_s: float = 10.0 / 3  # a third of the lease: no silence outlasts it
    overlap: bool = False  # compute the next step while a push is in flight (two gradient buffers)

    @property
    def buffers(self) -> int:
        """Gradient buffers the channel needs."""
        return 2 if self.overlap else 1


def new_stats() -> dict:
    return {"steps": 0, "pushes": 0, "examples": 0, "refused": 0, "reconnects": 0,
            "staleness_sum": 0, "compute_s": 0.0, "comm_s": 0.0, "reassignments": 0}


class WorkerCore:
    """``net``: the model; ``batches``: an endless iterator of ``(X, T)`` minibatches;
    ``rng``: for dropout. ``stats`` is shared with the caller (it outlives reconnects)."""

    def __init__(self, net, batches, settings: StepSettings, rng: np.random.Generator, stats: dict | None = None):
        self.net, self.batches, self.settings, self.rng = net, batches, settings, rng
        self.params = np.empty(net.n_params, net.dtype)
        self.local_grad = np.empty(net.n_params, net.dtype) if settings.n_push > 1 else None
        self.stats = stats if stats is not None else new_stats()
        self.data_generation = 0
        self.timer = StepTimer()  # where the time goes, across reconnects like stats
        # overlap: the weights the helper thread reads an ack's fresh weights into
        self.spare_params = np.empty_like(self.params) if settings.overlap else None

    def run(self, channel, should_stop=lambda: False, on_assignment=None) -> None:
        """Train through ``channel`` until ``should_stop()``, ``max_steps``, or an exception
        from the channel (ShutdownRequested, TransportError) ends it. ``on_assignment(reply)``
        is called when the server moved this worker's data shards."""
        background = self.settings.overlap and getattr(channel, "acks_in_background", False)
        acks = ThreadPoolExecutor(1, thread_name_prefix="psgd-acks") if background else None
        try:
            self._run(channel, should_stop, on_assignment, acks)
        finally:
            if acks is not None:
                acks.shutdown(wait=True)  # an ack still awaited (the loop raised) ends within the channel's timeout

    def _run(self, channel, should_stop, on_assignment, acks: ThreadPoolExecutor | None) -> None:
        s, st, lap = self.settings, self.stats, self.timer.lap
        self.timer.start()
        channel.pull(self.params)
        lap("pull")
        window_examples = 0
        # the push travelling while this step computes: (examples, fetch, the helper's
        # future of its acks, or None where push_end waits on the loop)
        in_flight = None
        while not should_stop() and (s.max_steps is None or st["steps"] < s.max_steps):
            t0 = time.perf_counter()
            x, t = next(self.batches)
            lap("batch")
            first = not channel.window_open
            if self.local_grad is None:
                self.net.loss_and_grad(self.params, x, t, channel.grad, s.dropout, self.rng)
            else:
                self.net.loss_and_grad(self.params, x, t, self.local_grad, s.dropout, self.rng)
                grad = channel.grad  # a property: add into the buffer, never assign the attribute
                if first:
                    grad[...] = self.local_grad
                else:
                    grad += self.local_grad
            if first:
                channel.mark_window()
            window_examples += x.shape[0]
            st["steps"] += 1
            t1 = time.perf_counter()
            st["compute_s"] += t1 - t0
            lap("compute")
            if s.slowdown > 1:  # a straggler on demand, to study one on a single machine
                time.sleep((s.slowdown - 1) * (t1 - t0))
                t1 = time.perf_counter()
                lap("sleep")
            if in_flight is not None:  # this step's compute hid its flight: now its ack
                self._land(channel, in_flight, on_assignment)
                in_flight = None
                lap("push")
            fetch = st["steps"] % s.n_fetch == 0
            if st["steps"] % s.n_push == 0:
                params = self.params if fetch else None
                if s.overlap and acks is not None:  # the ack, and the weights into the spare buffer, meanwhile
                    channel.push_begin(window_examples, self.spare_params if fetch else None)
                    in_flight = (window_examples, fetch, acks.submit(channel.await_acks))
                elif s.overlap:
                    channel.push_begin(window_examples, params)
                    in_flight = (window_examples, fetch, None)
                else:
                    self._after_push(channel, channel.push(window_examples, params), window_examples, fetch,
                                     on_assignment)
                lap("push")
                window_examples = 0
            elif fetch:
                channel.pull(self.params)
                lap("pull")
            elif time.monotonic() - channel.last_contact > s.heartbeat_every_s:
                self._check_assignment(channel, on_assignment, first_only=False)
            st["comm_s"] += time.perf_counter() - t1
            lap("other")
        if in_flight is not None:  # the last push's ack: counted, and nothing left in flight
            self._land(channel, in_flight, on_assignment)
            lap("push")
        self.timer.stop()

    def _land(self, channel, in_flight, on_assignment) -> None:
        """The ack of the push in flight (waited for here, or by the helper thread), and
        its fresh weights in use from the next step on."""
        examples, fetched, future = in_flight
        if future is None:
            result = channel.push_end()
        else:
            result = channel.settle(future.result())  # the helper's exception, if any, is raised here
            if fetched:
                self.params, self.spare_params = self.spare_params, self.params
                channel.catch_up(self.params)  # where the server moved on since the helper read: read again
        self._after_push(channel, result, examples, fetched, on_assignment)

    def _after_push(self, channel, result, examples: int, fetched: bool, on_assignment) -> None:
        self._count_push(result, examples)
        if result.refused and not fetched:  # too stale, say: go on from the server's weights
            channel.pull(self.params)
        if result.data_generation is not None and result.data_generation != self.data_generation:
            self._check_assignment(channel, on_assignment)

    def _count_push(self, result, examples: int) -> None:
        st = self.stats
        if result.refused:
            st["refused"] += 1
        else:
            st["pushes"] += 1
            st["examples"] += examples
            st["staleness_sum"] += result.staleness

    def _check_assignment(self, channel, on_assignment, first_only: bool = True) -> None:
        """A heartbeat (a long n_push window would outlast the lease); its answer says
        which data shards to train on."""
        reply = channel.heartbeat(first_only)
        if reply["data_generation"] != self.data_generation:
            self.data_generation = reply["data_generation"]
            if on_assignment is not None:
                on_assignment(reply)
