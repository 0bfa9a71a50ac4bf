"""``psgd worker``: join the server, load this worker's data shards, run the compute loop.

The compute loop itself (psgd.worker.core) knows no sockets; this module joins the
server shards through one :class:`ParameterClient` (psgd.wire.client), sets up the model
and the data the server's welcome describes, and keeps going: if the server goes away
the worker says hello again (with backoff, for a bounded time) and carries on from the
server's weights; if the server moves its data shards it trains on the new ones.
"""

from __future__ import annotations

import logging
import os
import signal
import platform
import time
from dataclasses import dataclass

import numpy as np

from .. import data as data_mod
from ..config import validation_size
from ..errors import ConfigError, Interrupted, ShutdownRequested, TransportError
from ..data.augment import DistortionSpec
from ..model.interface import build_model, check_welcome
from ..model.network import ModelSpec
from ..wire.client import ParameterClient
from ..wire.transport import SERVER_WAIT_S, ClientKeys
from ..model.optim import OptimizerSpec
from .core import StepSettings, WorkerCore, new_stats
from .threads import ThreadShare
from .local import LocalCore
from .timing import TimingTrace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    connect: str = "tcp://127.0.0.1:5555"
    name: str = ""
    transport: str = "auto"  # auto: shared memory when the server is on this machine, else zmq
    shard: int | None = None  # None: the server assigns one
    data_dir: str | None = None
    batch_size: int | None = None  # None: the run's (from the server's welcome)
    n_fetch: int | None = None
    n_push: int | None = None
    max_steps: int | None = None
    server_wait_s: float = SERVER_WAIT_S
    slowdown: float = 1.0  # > 1: sleep so that each step takes this many times its compute time
    keys: ClientKeys | None = None  # CURVE, for a server that demands it
    model: str | None = None  # package.module:factory of a user's model (the server never names it)
    overlap: bool | None = None  # None: the run's (from the server's welcome)
    threads: int | None = None  # BLAS threads; None: this host's cores shared by its workers (worker.threads)
    timing_trace: str | None = None  # a folder: write every lap's timing to FOLDER/NAME.npz at the end (worker.timing)


def make_core(net, settings: StepSettings, run: dict, stats: dict) -> WorkerCore:
    """Downpour's compute loop, or local SGD's when the welcome's ``run`` says so."""
    if run.get("algorithm", "downpour") == "local":
        return LocalCore(net, None, settings, None, OptimizerSpec.from_dict(run["inner_optimizer"]),
                         float(run["inner_lr"]), int(run["local_steps"]), stats)
    return WorkerCore(net, None, settings, None, stats)


class Worker:
    def __init__(self, options: WorkerOptions):
        self.options = options
        self.name = options.name or f"worker-{platform.node()}-{os.getpid()}"
        self.channel = ParameterClient(options.connect, self.name, options.keys, options.server_wait_s,
                                       transport=options.transport)
        self.stop_requested = False
        self.stop_signal: int | None = None  # the signal that stopped this worker, if one did
        self.joined_once = False  # whether it ever trained: a stop before that has nothing to say
        self.threads = ThreadShare(options.threads)
        self.stats = new_stats()
        self.data_shards: list[int] | None = [options.shard] if options.shard is not None else None
        self.core: WorkerCore | None = None
        self._model_key = None
        self._train_set = None

    # --- joining ----------------------------------------------------------------------

    def join(self) -> None:
        """Say hello to every server shard (shard 0 first: it hands out the data shards),
        set up the model, data and channels (again, after a server loss)."""
        self.channel.close_channels()
        said_hello = time.monotonic()
        welcomes = self._hello()
        if self.stop_requested:  # a signal while the server answered: do not load the data first
            raise Interrupted("stopped before joining")
        first = welcomes[0]
        spec = ModelSpec.from_dict({k: v for k, v in first["model"].items() if k != "factory"})
        if first["model"].get("user"):  # the server names no module: this worker brings its own
            if not self.options.model:
                raise ConfigError("the server trains a user's model: start this worker with --model package.module:factory")
            spec = ModelSpec(spec.sizes, spec.hidden, spec.loss, spec.dtype, factory=self.options.model)
        run = first["run"]
        self._num_data_shards = first["num_data_shards"]
        self._setup(spec, run, first)
        if time.monotonic() - said_hello > float(run.get("lease_s", 10.0)) / 2:
            # Loading the data took most of the lease: the servers may drop us before the
            # first push. Say goodbye and hello again (the data is loaded now: this is quick).
            self.channel.bye()
            welcomes = self._hello()
        self.core.data_generation = welcomes[0]["data_generation"]
        self.channel.open(welcomes, self.core.net.n_params, self.core.net.dtype, self.core.settings.buffers)
        self.joined_once = True
        log.info(f"{self.name} joined {len(welcomes)} server shard(s) at version {welcomes[0]['version']}: "
                 f"data shards {self.data_shards} of {self._num_data_shards}, pushing via "
                 f"{', '.join(self.channel.transports)}")

    def _hello(self) -> list:
        # A signal ends the wait for an absent server (a minute, by default) at once.
        welcomes = self.channel.hello(self.data_shards, interrupted=lambda: self.stop_requested)
        self.data_shards = list(welcomes[0]["data_shards"])  # the other shards take shard 0's word
        return welcomes

    def _setup(self, spec, run, welcome) -> None:
        """The model, the settings and the training set, once per run (a rejoin to the
        same run keeps them); then the minibatches of this worker's data shards."""
        o = self.options
        key = (spec, run["data"], run["seed"], run["validation"])
        if key != self._model_key:
            net = build_model(spec)
            check_welcome(net, spec, welcome["model"], welcome["layout"])  # before loading any data
            # MNIST stays a uint8 memory map shared by every worker of this machine; only
            # this worker's rows become float32 (see _batches_for)
            train, _ = data_mod.load(run["data"], o.data_dir, int(run["seed"]), shared=True)
            held_out = validation_size(run["validation"], len(train))  # as the coordinator does
            self._train_rows = data_mod.split_rows(len(train), held_out, int(run["seed"]))[0] if held_out \
                else np.arange(len(train))
            if not spec.factory and spec.sizes[0] != train.n_inputs:
                raise ConfigError(f"the server's model takes {spec.sizes[0]} inputs, the data has {train.n_inputs}")
            self._train_set, self._run, self._spec = train, run, spec
            settings = StepSettings(n_fetch=o.n_fetch or int(run["n_fetch"]), n_push=o.n_push or int(run["n_push"]),
                                    dropout=float(run.get("dropout", 0.0)), slowdown=o.slowdown,
                                    max_steps=o.max_steps, heartbeat_every_s=float(run.get("lease_s", 10.0)) / 3,
                                    overlap=o.overlap if o.overlap is not None else run.get("overlap") is True)
            self.core = make_core(net, settings, run, self.stats)
            if o.timing_trace:
                self.core.timer.trace = TimingTrace()
            self.channel.timing_source = self.core.timer.snapshot
            self._model_key = key
        else:
            check_welcome(self.core.net, spec, welcome["model"], welcome["layout"])
        self._batches_for(self.data_shards)

    def _batches_for(self, data_shards: list[int]) -> None:
        """Minibatches of these data shards (seeded by the shards and how often they moved)."""
        run, net, o = self._run, self.core.net, self.options
        seed = int(run["seed"])
        rows = np.concatenate([data_mod.shard_indices(len(self._train_rows), s, self._num_data_shards, seed)
                               for s in data_shards])  # of the training rows left after the validation split
        part = self._train_set.subset(self._train_rows[np.sort(rows)])
        batch_seed = seed * 1000 + data_shards[0] + 1 + 7919 * self.stats["reassignments"]
        self.core.batches = data_mod.Minibatches(
            part.X.astype(net.dtype, copy=False), part.targets_for(self._spec.loss), o.batch_size or int(run["batch_size"]),
            batch_seed, part.image_shape if run.get("augment") else None,
            DistortionSpec.from_dict(run.get("distort")), part.image_shape)
        self.core.rng = np.random.default_rng(batch_seed)

    def _on_assignment(self, reply) -> None:
        """The server moved data shards (a worker left, or came back): train on the new set."""
        shards = sorted(int(s) for s in reply["data_shards"])
        if shards and shards != self.data_shards:
            self.data_shards = shards
            self.stats["reassignments"] += 1
            log.info(f"{self.name}: now training on data shards {shards}")
            self._batches_for(shards)

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> dict:
        """Train until the server ends the run, ``max_steps`` is reached or a signal arrives."""
        self._install_signals()
        try:
            self.join()  # loading the data takes a while: workers started together have all registered by then
            self._share_cores(force=True)
            while not self.stop_requested:
                try:
                    self.core.run(self.channel, self._should_stop, self._on_assignment)
                    break
                except TransportError as exc:
                    log.warning(f"{self.name} lost the server ({exc}); saying hello again")
                    self.stats["reconnects"] += 1
                    self.join()  # Client.request retries with backoff, then gives up with a clear error
        except (ShutdownRequested, Interrupted):
            pass  # Interrupted: a signal while (re)joining; stop_signal says which
        finally:
            self.channel.close()
            self.threads.close()
            self._save_trace()
        return self.stats

    def _save_trace(self) -> None:
        trace = self.core.timer.trace if self.core is not None else None
        if trace is None or trace.wall_start is None:
            return
        path = os.path.join(self.options.timing_trace, f"{self.name}.npz")
        try:
            trace.save(path)
        except OSError as exc:  # the training happened: a full disk costs the trace, not the run's exit
            log.warning(f"{self.name}: cannot write its timing trace {path}: {exc.strerror or exc}")

    def _should_stop(self) -> bool:
        """Asked every step: a signal ends the run; now and then the cores are shared again."""
        self._share_cores()
        return self.stop_requested

    def _share_cores(self, force: bool = False) -> None:
        change = self.threads.rebalance(force)
        if change is not None:
            log.info(f"{self.name}: {change}")

    def _install_signals(self):
        def handler(signum, frame):
            if self.stop_requested and signum != signal.SIGHUP:  # SIGHUP: a dying launcher's, maybe repeated
                os._exit(128 + signum)
            if not self.stop_requested:
                self.stop_signal = signum
            self.stop_requested = True

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                signal.signal(sig, handler)
            except ValueError:
                pass  # not the main thread
