"""``psgd train --workers N``: a whole cluster on this machine, and its clean teardown.

The launcher starts one ``psgd server`` (or K server shards) and N ``psgd worker``
processes (each worker on one BLAS thread: N workers share the cores) and runs the
coordinator in this very process, telling it of any child that dies. Whatever happens (a crash, Ctrl-C), no process is left
behind: the ``finally`` clause reaps them all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .wire import shm
from .config import TrainConfig
from .coordinator.dashboard import RunBoard
from .coordinator.loop import Coordinator
from .errors import ColdStop, Interrupted, PsgdError
from .data.prepared import prepare_data

READY_TIMEOUT_S = 30.0  # for the server to start listening
TERMINATE_GRACE_S = 5.0  # after SIGTERM, before SIGKILL
SERVER_EXIT_S = 10.0  # for server and workers to wind down after the run ends ...
EXIT_PER_WORKER_S = 0.25  # ... and this much more per worker (64 on a busy 2-core machine outlasted 10 s)
WORKERS_AFTER_SERVERS_S = 2.0  # then the workers still running have this long before they are stopped
# With more workers than cores, workers run at a lower priority than the server and the
# coordinator, which must still answer pushes at once and evaluate on cadence (64 workers on
# 2 cores made the first evaluation come at epoch 1.7, not 1). Not otherwise: niced workers
# would lose their cores to any other program on the machine. See worker_nice.
WORKER_NICE_MIN, WORKER_NICE_MAX = 5, 19
PARENT_DEATH_SIGNAL = signal.SIGHUP  # what a child gets when the launcher dies (see _child_setup)
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def worker_nice(workers: int, cores: int | None = None) -> int:
    """The nice level of an oversubscribed local cluster's workers: all of them together
    weigh about as much as one process per core in the kernel's fair scheduler (each nice
    step is 1.25x less weight), so the server and coordinator, at nice 0, still get about
    half the machine when they need it. A fixed nice 5 did not hold at 256 workers on 2
    cores: 256 x 335 of weight against the server's 1024 left it about 2% of the CPU, 13
    workers waited 60 s for answers and gave up, and `psgd status` took 37 s."""
    cores = cores or os.cpu_count() or 1
    level = math.ceil(math.log(max(workers / cores, 1.0)) / math.log(1.25))
    return max(WORKER_NICE_MIN, min(WORKER_NICE_MAX, level))


@dataclass
class Child:
    name: str  # server, server-1, worker-0, ...
    role: str  # server or worker
    proc: subprocess.Popen
    log: Path
    reported: bool = False

    def describe_exit(self) -> str:
        code = self.proc.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        tail = ""
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
            if lines:
                tail = f": {lines[-1][:300]}"
        except OSError:
            pass
        return f"{self.name} (pid {self.proc.pid}) {how}{tail} (log: {self.log})"


@dataclass
class Cluster:
    """The processes of a local run. ``stop()`` reaps them all, whatever state they are in."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], extra_env: dict | None = None, role: str = "worker",
              nice: int = 0) -> Child:
        log = self.workdir / f"{name}.log"
        env = dict(os.environ, **(extra_env or {}))

        def setup():
            _child_setup()
            if nice:
                os.nice(nice)

        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "psgd", *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, preexec_fn=setup)
        child = Child(name, role, proc, log)
        self.children.append(child)
        return child

    def newly_dead(self) -> list[Child]:
        dead = []
        for c in self.children:
            if not c.reported and c.proc.poll() is not None:
                c.reported = True
                dead.append(c)
        return dead

    def wait(self, timeout: float, role: str | None = None) -> bool:
        """Wait for every child (of ``role``, if given) to exit; False if time ran out."""
        end = time.monotonic() + timeout
        for c in self.children:
            if role is not None and c.role != role:
                continue
            try:
                c.proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def terminate_running(self, role: str) -> set[str]:
        """SIGTERM every running child of ``role``; returns their names."""
        running = {c.name for c in self.children if c.role == role and c.proc.poll() is None}
        for c in self.children:
            if c.name in running:
                c.proc.terminate()
        return running

    def stop(self) -> None:
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.terminate()
        if not self.wait(TERMINATE_GRACE_S):
            for c in self.children:
                if c.proc.poll() is None:
                    c.proc.kill()
            for c in self.children:
                c.proc.wait()
        for c in self.children:  # a server that died hard cannot unlink its weights itself
            if c.role == "server":
                for seg in Path(shm.SHM_DIR).glob(f"psgd-weights-{c.proc.pid}-*"):
                    seg.unlink(missing_ok=True)


def _child_setup() -> None:
    """In the child, before exec. Its own process group: a Ctrl-C at the terminal goes to the
    terminal's foreground group, and the launcher alone must get it, to stop the run in order
    (final evaluation, then shutdown, which checkpoints); a server that got it too would stop
    at once and take the launcher's SIGTERM for a second signal. And SIGHUP when the
    launcher dies, however it dies (even SIGKILL, which runs no cleanup), so that no server
    or worker is orphaned. SIGHUP, not SIGTERM: Linux sends the parent-death signal once for
    every thread of the dying launcher the child is handed to (zmq's threads among them),
    and servers and workers take repeated SIGHUPs as one warm stop, where a second SIGTERM
    means stop cold (no final checkpoint)."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL, 0, 0, 0)


class WarmThenCold:
    """SIGINT (Ctrl-C) handling of a process that runs a coordinator: the first asks for a
    warm stop (``requested`` turns true: final evaluation, checkpoint, summary and weights);
    a second raises ColdStop (a KeyboardInterrupt), a cold stop (the children get SIGTERM at once)."""

    def __init__(self, say=None):
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.count = 0
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread (a test): nothing to install
            self.previous = None

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def requested(self) -> bool:
        return self.count > 0

    def _handler(self, signum, frame):
        self.count += 1
        if self.count > 1:
            raise ColdStop
        self.say("\npsgd: interrupted: stopping after a final evaluation (and checkpoint), Ctrl-C again to stop at once")


def terminate_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit, so that the launcher's clean-up runs
    (Python's default for them is to die on the spot)."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _wait_ready(server: Child, ready_file: Path, interrupted=lambda: False) -> str:
    """The endpoint ``server`` wrote to ``ready_file`` once listening. A ready file of another
    process (a dead run's: a SIGKILLed launcher cleans nothing up) is not this server's."""
    end = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < end:
        if interrupted():
            raise Interrupted("interrupted before the run started: nothing was trained")
        if ready_file.exists():
            ready = json.loads(ready_file.read_text())
            if ready.get("pid") == server.proc.pid:
                return ready["endpoint"]
        if server.proc.poll() is not None:
            raise PsgdError(f"the server did not start: {server.describe_exit()}")
        time.sleep(0.01)
    raise PsgdError(f"the server did not start listening within {READY_TIMEOUT_S:.0f} s")


def _make_keys(keydir: Path):
    """CURVE keys for one local run (psgd.wire.transport.write_cluster_keys): the workers
    share the worker key, and the coordinator has the control key, the only one that may
    steer the run. Returns the server's options, the workers' options and the
    coordinator's keys."""
    from .wire.transport import client_keys, write_cluster_keys
    k = write_cluster_keys(keydir)
    return (["--curve-secret-key", str(k["server_secret"]), "--curve-allow", str(k["allowed"])],
            ["--curve-key", str(k["worker_secret"]), "--curve-server-key", str(k["server_public"])],
            client_keys(k["control_secret"], k["server_public"]))


CHECKPOINT_EVERY_S = 5.0  # the local server's checkpoints, when the run has a directory


def train_cluster(config: TrainConfig, on_event=None, say=None, resume: bool = False,
                  dashboard: str | None = None, dashboard_hold: float = 0.0, keep_timings: bool = False) -> dict:
    """Run a local cluster of ``config.workers`` workers with an in-process coordinator;
    returns the run summary (also written to the run directory). With a run directory the
    server checkpoints into RUN_DIR/checkpoints; ``resume`` starts it from the newest one.
    ``dashboard``: [HOST:]PORT to serve the live page and /metrics on, and, once the run
    is written, for ``dashboard_hold`` seconds more. ``keep_timings``: the workers and servers
    keep their timing traces in RUN_DIR/timing (opt-in: on a small disk they would take
    room the run's own outputs need)."""
    if resume and not config.out_dir:
        raise PsgdError("resuming needs the run directory")
    terminate_on_signals()
    interrupt = WarmThenCold(say)
    try:
        return _run_cluster(config, on_event, say, resume, interrupt, dashboard, dashboard_hold, keep_timings)
    except Interrupted as exc:  # a Ctrl-C before the first update: no run to write, nor to resume
        where = f"; {config.out_dir} holds the run up to its newest checkpoint: resume with: " \
                f"psgd train --resume {config.out_dir}" if resume else ""
        raise Interrupted(f"{exc}{where}") from None
    finally:
        interrupt.restore()


def _run_cluster(config: TrainConfig, on_event, say, resume: bool, interrupt: WarmThenCold,
                 dashboard: str | None = None, dashboard_hold: float = 0.0, keep_timings: bool = False) -> dict:
    data = prepare_data(config)  # first: a bad option fails here, before any process starts
    if interrupt.requested():
        raise Interrupted("interrupted before the run started: nothing was trained")
    config = data.config  # fitted to the data: every process gets the same concrete settings
    board = RunBoard(dashboard, config.to_dict(), Path(config.out_dir).name if config.out_dir else "live",
                     say or _say)
    try:
        summary = _run_cluster_served(config, data, on_event, say, resume, interrupt, board.live, keep_timings)
        board.hold(dashboard_hold, interrupt.requested)
        return summary
    finally:
        board.close()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run_cluster_served(config, data, on_event, say, resume: bool, interrupt: WarmThenCold, live,
                        keep_timings: bool = False) -> dict:
    # Each process's output goes to RUN_DIR/logs (kept: it says why a process failed).
    keep_logs = config.out_dir is not None
    if keep_logs:
        workdir = Path(config.out_dir) / "logs"
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="psgd-run-"))
    cluster = Cluster(workdir)
    keydir = Path(tempfile.mkdtemp(prefix="psgd-keys-")) if config.curve else None
    try:
        server_curve, client_curve, client_keys = _make_keys(keydir) if keydir else ([], [], None)
        cfg_file = workdir / "config.json"
        # The coordinator decides when the run ends by time: a server's own deadline would
        # run from its own start. --max-updates is the servers' too, so that each stops at
        # that very update (the coordinator, polling every 20 ms, overshot by as many
        # updates as a poll lasted); a server so stopped waits for the coordinator to
        # evaluate its final weights (psgd.server.phase).
        try:
            cfg_file.write_text(config.with_(max_seconds=None).to_json())
        except OSError as exc:  # nothing has started yet: say so, rather than run with no record
            raise PsgdError(f"cannot write {cfg_file}: {exc.strerror or exc}") from None
        servers = []
        for k in range(config.servers):  # one server, or K shards each with one range of the weights
            name = "server" if config.servers == 1 else f"server-{k}"
            ready = workdir / f"{name}.ready.json"
            ready.unlink(missing_ok=True)  # left by a run whose launcher was SIGKILLed
            server_args = ["server", "--config", str(cfg_file), "--bind", "tcp://127.0.0.1:0",
                           "--shard", str(k), "--num-shards", str(config.servers),
                           "--data-shards", str(config.workers), "--wait-for-workers", str(config.workers),
                           "--ready-file", str(ready)] + server_curve
            if config.out_dir:
                ckpt = Path(config.out_dir) / "checkpoints" / ("" if config.servers == 1 else f"shard-{k}")
                server_args += ["--checkpoint-dir", str(ckpt),
                                "--checkpoint-every", str(CHECKPOINT_EVERY_S)] + (["--resume"] if resume else [])
                if keep_timings:  # when each push was applied: psgd.simulate.calibrate lines it up with the workers'
                    server_args += ["--timing-trace", str(Path(config.out_dir) / "timing")]
            servers.append((cluster.spawn(name, server_args, role="server"), ready))
        endpoint = ",".join(_wait_ready(server, ready, interrupt.requested) for server, ready in servers)
        oversubscribed = config.workers + config.servers > (os.cpu_count() or 1)
        for i in range(config.workers):
            args = ["worker", "--connect", endpoint, "--name", f"worker-{i}", "--data-shard", str(i),
                    "--transport", config.transport] + client_curve
            if config.data_dir:
                args += ["--data-dir", str(config.data_dir)]
            if i == config.workers - 1 and config.slow_worker > 1:
                args += ["--slowdown", str(config.slow_worker)]
            if config.model.factory:  # each worker loads the user's model itself
                args += ["--model", config.model.factory]
            if keep_logs and keep_timings:  # what each step took, in order: psgd.simulate.calibrate replays it
                args += ["--timing-trace", str(Path(config.out_dir) / "timing")]
            cluster.spawn(f"worker-{i}", args, WORKER_ENV, nice=worker_nice(config.workers) if oversubscribed else 0)

        def watch() -> list[str]:
            failed = []
            for child in cluster.newly_dead():
                if child.role == "server":
                    raise PsgdError(f"the server failed: {child.describe_exit()}")
                failed.append(child.describe_exit())
            if all(c.reported for c in cluster.children if c.role != "server"):
                raise PsgdError("every worker has failed: " + "; ".join(failed))
            return failed

        coordinator = Coordinator(config, endpoint, data, on_event, say, watch, append=resume, keys=client_keys,
                                  stop_requested=interrupt.requested, live=live)
        try:
            summary = coordinator.run()
        except KeyboardInterrupt:  # a cold stop: no time for shutdown messages; SIGTERM below
            raise
        except BaseException:
            coordinator.end_run()
            raise
        coordinator.end_run()
        grace = SERVER_EXIT_S + EXIT_PER_WORKER_S * config.workers
        # Once the servers are gone (their workers heard shutdown first), a worker still
        # running has no run to join: one still starting would wait its whole server wait
        # for a server that is not coming and report that as a failure (55 of 256 workers
        # did, in a 5-epoch run shorter than their start-up). Stop them now; not failures.
        servers_gone = cluster.wait(grace, role="server")
        workers_left = servers_gone and not cluster.wait(WORKERS_AFTER_SERVERS_S, role="worker")
        late = cluster.terminate_running(role="worker") if workers_left else set()
        if not cluster.wait(grace):
            (say or print)("psgd: some processes did not stop in time and were terminated")
        for child in cluster.newly_dead():
            if child.proc.returncode not in (0, None) and child.name not in late:
                summary["failures"].append(child.describe_exit())
        never_joined = sorted(late - set(summary.get("per_worker") or {}))
        if never_joined:
            summary["report"].append(f"{len(never_joined)} workers had not joined when the run ended (still "
                                     "starting) and were stopped")
        summary["report"] += [f"failed: {f}" for f in summary["failures"]]
        return coordinator.finish(summary)
    finally:
        cluster.stop()
        if keydir:
            shutil.rmtree(keydir, ignore_errors=True)
        for f in workdir.iterdir():
            if not (keep_logs and f.suffix == ".log"):
                f.unlink()
        if not keep_logs:
            workdir.rmdir()
