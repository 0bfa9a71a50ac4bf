"""Many real workers on one server: server CPU per push, memory and descriptors against N.

    python scripts/bench_workers.py [--workers 1 16 64 256] [--seconds 5] [--keep-blas-env]

For each N: a ``psgd server`` (784-64-10, batch 32, plain async) and ``psgd worker --count N``
on this machine (the cores are oversubscribed beyond their count, which is the point), the
workers at the nice level ``psgd train`` would give them (``--nice none``: at the server's). Once
all N have joined, a window of --seconds is measured with all of them pushing and a monitor
polling ``stats`` every 50 ms (as a coordinator would); then the server shuts down and the
workers exit. Reported per N, all from one run:

- seconds until all N had joined, and pushes/s applied in the window;
- server CPU per push: the server process's CPU microseconds per applied update in the
  window (its ``cpu_s`` statistic), the monitor's stats requests included;
- the server's peak resident memory and open file descriptors;
- per worker: mean proportional set size (PSS: shared pages, such as the memory-mapped
  MNIST and the libraries, divided among the processes that share them) and mean RSS;

The target: server CPU per push flat in N (nothing per push grows with the workers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import blas_description, clean_blas_env  # noqa: E402

clean_blas_env(sys.argv)

from psgd.launch import worker_nice  # noqa: E402
from psgd.wire.client import ParameterClient  # noqa: E402


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def one(n: int, seconds: float, workdir: Path, nice: int) -> dict:
    ready = workdir / f"ready-{n}"
    env = dict(os.environ)
    server = subprocess.Popen([sys.executable, "-m", "psgd", "-q", "server", "--bind", "tcp://127.0.0.1:0",
                               "--ready-file", str(ready), "--data-shards", str(n), "--layers", "784,64,10",
                               "--batch-size", "32", "--epochs", "1000", "--lease", "300"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    group = None
    try:
        while not ready.exists():
            if server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        endpoint = json.loads(ready.read_text())["endpoint"]
        client = ParameterClient(endpoint, "bench")
        t0 = time.perf_counter()
        # the workers train until the server shuts down: the window below has all N pushing
        group = subprocess.Popen([sys.executable, "-m", "psgd", "-q", "worker", "--connect", endpoint, "--count", str(n)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                 preexec_fn=(lambda: os.nice(nice)) if nice else None)
        peak_rss = peak_fds = 0

        def sample():
            nonlocal peak_rss, peak_fds
            peak_rss = max(peak_rss, _status(server.pid, "VmRSS"))
            peak_fds = max(peak_fds, len(os.listdir(f"/proc/{server.pid}/fd")))
            return client.stats()

        while sample()["workers_connected"] < n:
            if group.poll() is not None:
                raise SystemExit(f"the workers exited ({group.returncode}) before all {n} joined")
            time.sleep(0.05)
        joined = time.perf_counter() - t0
        kids = _children(group.pid) if n > 1 else [group.pid]  # --count 1 is the worker itself
        pss = [_pss_kb(p) for p in kids]
        rss = [_status(p, "VmRSS") for p in kids]
        first = sample()
        polls, t1 = 0, time.perf_counter()
        while time.perf_counter() - t1 < seconds:  # a monitor polling stats as the coordinator would
            last = sample()
            polls += 1
            time.sleep(0.05)
        window = time.perf_counter() - t1
        client.control({"type": "shutdown"})
        client.close()
        group.wait(120)
        server.wait(30)
    finally:
        for proc in (group, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    updates = last["version"] - first["version"]
    return {"n": n, "joined": joined, "updates": updates, "rate": updates / window,
            "cpu_us": (last["cpu_s"] - first["cpu_s"]) / updates * 1e6 if updates else None,
            "connected": last["workers_connected"], "rss": peak_rss, "fds": peak_fds,
            "pss": sum(pss) / max(len(pss), 1), "wrss": sum(rss) / max(len(rss), 1), "group": group.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--seconds", type=float, default=5.0, help="the window measured once all N have joined")
    parser.add_argument("--nice", choices=["train", "none"], default="train",
                        help="train: the workers run at the nice level psgd train gives N workers on this "
                             "machine (psgd.launch.worker_nice, when they outnumber the cores); none: at the server's")
    args = parser.parse_args()
    print(blas_description())
    print(f"784-64-10, batch 32, a {args.seconds:g} s window with all N workers connected, {os.cpu_count()} CPUs\n")
    print(f"{'workers':>8}{'join s':>8}{'pushes/s':>10}{'server CPU/push':>17}{'server RSS':>12}{'server fds':>12}"
          f"{'worker PSS':>12}{'worker RSS':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.workers:
            oversubscribed = n + 1 > (os.cpu_count() or 1)
            nice = worker_nice(n) if args.nice == "train" and oversubscribed else 0
            r = one(n, args.seconds, Path(tmp), nice)
            cpu = f"{r['cpu_us']:,.0f} us" if r["cpu_us"] is not None else "-"
            print(f"{r['n']:>8}{r['joined']:>8.1f}{r['rate']:>10.0f}{cpu:>17}{r['rss'] / 1024:>9.0f} MB"
                  f"{r['fds']:>12}{r['pss'] / 1024:>9.0f} MB{r['wrss'] / 1024:>9.0f} MB"
                  + (f"  (workers at nice {nice})" if nice else "")
                  + ("" if r["connected"] == r["n"] else f"  ({r['connected']} connected at the end)")
                  + ("" if r["group"] == 0 else f"  (workers exited {r['group']})"), flush=True)


if __name__ == "__main__":
    main()
