"""A chaos run: a local cluster trained to a target while a seeded schedule breaks it.

Two server shards (checkpointing every half second, restarted with --resume on the same
address), several workers and a standalone coordinator with a target accuracy run as real
processes on 127.0.0.1. Meanwhile faults drawn from a seeded schedule hit them:

- kill-worker:  SIGKILL a worker, start it again (same name) a moment later;
- kill-server:  SIGKILL a server shard, start it again with --resume on its address;
- stop-worker / stop-server: SIGSTOP a process for a second or three, then SIGCONT.

A fault is survived when, within SURVIVE_S, every server shard has applied updates again
and every process the fault touched is running. The run prints faults injected and
survived, the updates each server restart lost (the version seen just before the kill
minus the version its checkpoint restored: a lower bound, pushes may land between the
two), the time to target against a fault-free run of the same seed, and anything left
behind: processes, shared-memory segments, doorbell folders, listening ports. Its exit
status is non-zero if the run missed its target, a fault was not survived, or anything
leaked.

    python scripts/chaos.py                      # about 3 minutes: a fault-free run, then up to 20 faults
    python scripts/chaos.py --short --no-baseline  # about a minute, a handful of faults (the test suite's)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from psgd.errors import PsgdError  # noqa: E402
from psgd.wire.transport import SERVER_WAIT_S, Client  # noqa: E402

SURVIVE_S = 30.0  # after a fault, for every shard to apply updates again
MONITOR_WAIT_S = 10.0  # for a server to answer the monitor's statistics request (a restart takes ~2 s)
PROGRESS_UPDATES = 5  # updates each shard must apply after a fault to count it survived
RESTART_DELAY_S = (0.2, 1.5)  # a killed process is started again after this long
STOP_S = (1.0, 3.0)  # how long a SIGSTOP lasts
# After the coordinator ends, for servers and workers to end by themselves: a worker waiting
# on a shard that was restarted just as the run ended hears no shutdown from it and gives up
# only after SERVER_WAIT_S (see "slow to exit" in the report).
EXIT_WAIT_S = SERVER_WAIT_S + 15.0
SLOW_EXIT_S = 10.0
FAULT_KINDS = {"kill-worker": 3, "kill-server": 2, "stop-worker": 2, "stop-server": 1}
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SHM_DIR = Path("/dev/shm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return False
        except OSError:
            return True


@dataclass
class Fault:
    at: float  # seconds into the run
    kind: str
    target: str  # process name
    lost: int | None = None  # kill-server: updates lost
    survived: bool = False
    note: str = ""


@dataclass
class Cluster:
    """The processes of one run, started and restarted by name, every one marked in its
    environment so that anything left behind can be found."""

    folder: Path
    args: argparse.Namespace
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: dict = field(default_factory=dict)  # name -> Popen (the current incarnation)
    pids: set = field(default_factory=set)  # every pid ever started
    ports: list = field(default_factory=list)
    logs: Path = None

    def __post_init__(self):
        self.logs = self.folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ports = [free_port() for _ in range(2)]
        self.endpoints = [f"tcp://127.0.0.1:{p}" for p in self.ports]

    def start(self, name: str, *args: str, extra_env: dict | None = None) -> subprocess.Popen:
        env = dict(os.environ, PSGD_CHAOS_MARKER=self.marker, **(extra_env or {}))
        with open(self.logs / f"{name}.log", "a") as out:
            proc = subprocess.Popen([sys.executable, "-m", "psgd", *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs[name] = proc
        self.pids.add(proc.pid)
        return proc

    def start_server(self, k: int) -> subprocess.Popen:
        a = self.args
        return self.start(f"server-{k}", "server", "--bind", self.endpoints[k], "--shard", str(k), "--num-shards", "2",
                          "--data-shards", str(a.workers), "--layers", a.layers, "--schedule", a.schedule, "--lr", str(a.lr),
                          "--epochs", "1000",
                          "--seed", str(a.seed),
                          "--checkpoint-dir", str(self.folder / "checkpoints" / f"shard-{k}"),
                          "--checkpoint-every", "0.5", "--resume")

    def start_worker(self, i: int) -> subprocess.Popen:
        return self.start(f"worker-{i}", "worker", "--connect", ",".join(self.endpoints), "--name", f"worker-{i}",
                          extra_env=WORKER_ENV)

    def start_all(self):
        for k in range(2):
            self.start_server(k)
        clients = self.monitor()
        try:
            for c in clients:  # both listening before anyone else starts
                c.request({"type": "stats"})
        finally:
            for c in clients:
                c.close()
        for i in range(self.args.workers):
            self.start_worker(i)
        a = self.args
        self.start("coordinator", "coordinator", "--connect", ",".join(self.endpoints), "--out", str(self.folder / "run"),
                   "--target-accuracy", str(a.target), "--evals-per-epoch", "4", "--max-seconds", str(a.max_seconds))

    def monitor(self) -> list[Client]:
        return [Client(e, "chaos", request_timeout=1.0, server_wait=MONITOR_WAIT_S) for e in self.endpoints]

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def live_marked(self) -> list[int]:
        needle = f"PSGD_CHAOS_MARKER={self.marker}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if needle in (entry / "environ").read_bytes() and \
                            (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def leftovers(self) -> dict:
        """Anything of this run still around once it is over."""
        ours = {str(p) for p in self.pids}
        segments = [p.name for p in SHM_DIR.glob("psgd-*") if p.name.split("-")[2:3] and p.name.split("-")[2] in ours] \
            if SHM_DIR.is_dir() else []
        doorbells = [p.name for p in Path(tempfile.gettempdir()).glob("psgd-doorbell-*") if p.name.split("-")[2] in ours]
        return {"processes": self.live_marked(), "segments": segments, "doorbells": doorbells,
                "ports": [p for p in self.ports if port_in_use(p)]}

    def kill_everything(self):
        for pid in self.live_marked():
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def versions(clients: list[Client]) -> list[int]:
    return [c.request({"type": "stats"})["stats"]["version"] for c in clients]


def run(args, folder: Path, faults_wanted: int, rng: random.Random | None, say) -> dict:
    """One run; faults only if ``rng`` is given. Returns what happened."""
    cluster = Cluster(folder, args)
    faults: list[Fault] = []
    t0 = time.monotonic()
    clients = []
    try:
        cluster.start_all()
        clients = cluster.monitor()
        coordinator = cluster.procs["coordinator"]
        # faults begin once training has: the first evaluation is a quarter epoch in
        while min(versions(clients)) < args.first_fault_after and coordinator.poll() is None:
            time.sleep(0.1)
        next_at = time.monotonic() + (rng.uniform(*args.gap) if rng else 0)
        while coordinator.poll() is None and time.monotonic() - t0 < args.max_seconds + 30:
            if rng and len(faults) < faults_wanted and time.monotonic() >= next_at:
                fault = inject(cluster, clients, rng, time.monotonic() - t0, args)
                if fault is None:  # the run ended as the fault began
                    break
                faults.append(fault)
                say(f"  {fault.at:6.1f} s  {fault.kind:<11} {fault.target:<9} "
                    + ("survived" if fault.survived else "NOT SURVIVED") + (f"  {fault.note}" if fault.note else ""))
                next_at = time.monotonic() + rng.uniform(*args.gap)
            time.sleep(0.05)
        try:
            coordinator.wait(max(1.0, args.max_seconds + 60 - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - t0
        for c in clients:
            c.close()
        clients = []
        ended = time.monotonic()
        exited_after = {}  # name -> seconds after the coordinator's end
        while len(exited_after) < len(cluster.procs) and time.monotonic() - ended < EXIT_WAIT_S:
            for name, proc in cluster.procs.items():
                if name not in exited_after and proc.poll() is not None:
                    exited_after[name] = round(time.monotonic() - ended, 1)
            time.sleep(0.1)
        slow = sorted((n, t) for n, t in exited_after.items() if t > SLOW_EXIT_S)
        time.sleep(0.5)
        leftovers = cluster.leftovers()
        summary_file = folder / "run" / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        return {"seconds": took, "coordinator_status": coordinator.returncode, "summary": summary,
                "reached": coordinator.returncode == 0 and summary.get("stop_reason") == "target accuracy",
                "faults": faults, "leftovers": leftovers, "slow_exits": slow,
                "exits": {n: p.returncode for n, p in cluster.procs.items()}}
    finally:
        for c in clients:
            c.close()
        cluster.kill_everything()


def inject(cluster: Cluster, clients: list[Client], rng: random.Random, at: float, args) -> Fault | None:
    """One fault, and whether the cluster recovered from it; None if the run ended (its
    coordinator exited) before the fault struck: a server started again after the end would
    wait for a coordinator that never comes."""
    coordinator = cluster.procs["coordinator"]
    kind = rng.choices(list(FAULT_KINDS), weights=list(FAULT_KINDS.values()))[0]
    is_server = kind.endswith("server")
    index = rng.randrange(2 if is_server else args.workers)
    name = f"server-{index}" if is_server else f"worker-{index}"
    fault = Fault(at, kind, name)
    proc = cluster.procs[name]
    if coordinator.poll() is not None:
        return None
    if proc.poll() is not None:  # it ended by itself since: start it again first
        (cluster.start_server if is_server else cluster.start_worker)(index)
        proc = cluster.procs[name]
    try:
        before = versions(clients)
    except PsgdError:
        before = [0, 0]
    if coordinator.poll() is not None:
        return None
    if kind.startswith("kill"):
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        time.sleep(rng.uniform(*RESTART_DELAY_S))
        if coordinator.poll() is not None:  # the run ended meanwhile: nothing to restart for
            fault.survived, fault.note = coordinator.returncode == 0, "the run ended before the restart"
            return fault
        if is_server:
            starts = re.compile(r"resumed from .* at version (\d+)|no valid checkpoint")
            resumed_before = len(starts.findall(cluster.log(name)))
            cluster.start_server(index)
            deadline = time.monotonic() + SURVIVE_S
            while True:
                found = starts.findall(cluster.log(name))
                if len(found) > resumed_before or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            restored = int(found[-1]) if len(found) > resumed_before and found[-1] else 0
            fault.lost = max(0, before[index] - restored)
            fault.note = f"{fault.lost} updates lost (version {before[index]} -> restored {restored})"
        else:
            cluster.start_worker(index)
    else:
        pause = rng.uniform(*STOP_S)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(pause)
        proc.send_signal(signal.SIGCONT)
        fault.note = f"stopped {pause:.1f} s"
    fault.survived = recovered(cluster, clients, name)
    if not fault.survived and cluster.procs[name].poll() is None:
        cluster.procs[name].send_signal(signal.SIGUSR1)  # psgd prints every thread's stack to its log
    return fault


def recovered(cluster: Cluster, clients: list[Client], name: str) -> bool:
    """Every shard applies PROGRESS_UPDATES more updates within SURVIVE_S, the process the
    fault hit runs, and a worker it hit pushes again (its connected record's count grows);
    or the run reached its target meanwhile."""
    deadline = time.monotonic() + SURVIVE_S

    def pushes() -> int:  # shard 0's records (a first page holds a handful of workers)
        workers = clients[0].request({"type": "stats", "workers": True}).get("workers") or []
        return sum(w["pushes"] for w in workers if w["name"] == name and w["connected"])

    try:
        base, base_pushes = versions(clients), pushes()
        while time.monotonic() < deadline:
            if cluster.procs["coordinator"].poll() is not None:
                return cluster.procs["coordinator"].returncode == 0
            now = versions(clients)
            if all(n >= b + PROGRESS_UPDATES for n, b in zip(now, base)) and cluster.procs[name].poll() is None \
                    and (name.startswith("server") or pushes() > base_pushes):
                return True
            time.sleep(0.1)
    except PsgdError:  # a server stopped answering: fine if that is the run's end
        try:
            return cluster.procs["coordinator"].wait(SURVIVE_S) == 0
        except subprocess.TimeoutExpired:
            pass
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="the fault schedule's (and the run's) seed")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--layers", default="784,256,256,10")
    # A constant rate: a run that faults slow down still reaches the target (a step schedule
    # counts updates, and may decay the rate before a battered run gets there).
    ap.add_argument("--schedule", default="constant", help="the learning-rate schedule")
    ap.add_argument("--lr", type=float, default=0.02, help="the learning rate (lower: a longer run)")
    ap.add_argument("--target", type=float, default=0.98, help="validation accuracy to reach")
    ap.add_argument("--faults", type=int, default=20, help="faults to inject (fewer if the target comes first)")
    ap.add_argument("--gap", type=float, nargs=2, default=(1.0, 3.0), help="seconds between faults: min max")
    ap.add_argument("--first-fault-after", type=int, default=100, help="updates before the first fault")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="the coordinator gives up after this long")
    ap.add_argument("--short", action="store_true", help="a handful of faults, about a minute: the test suite's")
    ap.add_argument("--no-baseline", action="store_true", help="skip the fault-free run")
    ap.add_argument("--keep", type=Path, default=None, help="keep logs and runs in this folder")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.short:
        args.faults, args.gap, args.first_fault_after, args.max_seconds = 5, (0.5, 1.5), 20, 150.0
        args.schedule, args.lr, args.target = "step", 0.1, 0.975  # psgd's defaults: 97.5% in ~1,500 updates
    args.gap = tuple(args.gap)

    def say(text):
        print(text, flush=True)

    folder = args.keep or Path(tempfile.mkdtemp(prefix="psgd-chaos-"))
    folder.mkdir(parents=True, exist_ok=True)
    say(f"chaos: seed {args.seed}, {args.workers} workers, 2 server shards, {args.layers}, "
        f"target {args.target:.1%} validation accuracy, {args.faults} faults every {args.gap[0]:g}-{args.gap[1]:g} s")
    try:
        baseline = None
        if not args.no_baseline:
            baseline = run(args, folder / "fault-free", 0, None, say)
            say(f"fault-free: {'reached' if baseline['reached'] else 'MISSED'} the target in {baseline['seconds']:.1f} s "
                f"({baseline['summary'].get('updates', '?')} updates)")
        chaos = run(args, folder / "chaos", args.faults, random.Random(args.seed), say)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    return report(args, baseline, chaos, say)


def report(args, baseline, chaos, say) -> int:
    faults = chaos["faults"]
    kinds = {}
    for f in faults:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    survived = sum(f.survived for f in faults)
    lost = [f.lost for f in faults if f.lost is not None]
    runs = [r for r in (baseline, chaos) if r]
    leaked = {k: sorted({x for r in runs for x in r["leftovers"][k]}) for k in ("processes", "segments", "doorbells", "ports")}
    compare = f", {chaos['seconds'] / baseline['seconds']:.2f}x the fault-free {baseline['seconds']:.1f} s" \
        if baseline and baseline["reached"] else ""
    say(f"chaos run: {'reached' if chaos['reached'] else 'MISSED'} the target in {chaos['seconds']:.1f} s"
        f"{compare} ({chaos['summary'].get('updates', '?')} updates, "
        f"test accuracy {chaos['summary'].get('test_accuracy') or 0:.2%})")
    say(f"faults injected: {len(faults)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items())) or 'none'}); "
        f"survived: {survived}")
    if lost:
        say(f"updates lost per server restart: {', '.join(map(str, lost))} (mean {sum(lost) / len(lost):.0f}, max {max(lost)})")
    if chaos["slow_exits"]:
        say("slow to exit after the run ended: " + ", ".join(f"{n} ({t} s)" for n, t in chaos["slow_exits"]))
    say("left behind: " + ("; ".join(f"{k} {v}" for k, v in leaked.items() if v) or "nothing (processes, shared memory, "
                                                                                      "doorbell folders, ports)"))
    ok = chaos["reached"] and survived == len(faults) and not any(leaked.values()) and (not baseline or baseline["reached"])
    if args.json:
        args.json.write_text(json.dumps({
            "seed": args.seed, "faults": [vars(f) for f in faults], "survived": survived,
            "updates_lost": lost, "seconds": chaos["seconds"], "baseline_seconds": baseline["seconds"] if baseline else None,
            "reached": chaos["reached"], "leftovers": leaked, "slow_exits": chaos["slow_exits"], "ok": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
