"""Many real workers on one server: server CPU per push, memory and descriptors against N.

    python scripts/bench_workers.py [--workers 1 16 64 256] [--steps 40] [--keep-blas-env]

For each N: a ``psgd server`` (784-64-10, batch 32, plain async) and ``psgd worker --count N
--max-steps S`` on this machine (the cores are oversubscribed beyond their count, which is
the point). Reported per N, all from one run:

- server CPU per push: the server process's CPU microseconds per applied update while the
  workers push (from its ``cpu_s`` statistic, sampled once every worker has joined and at
  the end), and the same for a monitor polling ``stats`` every 50 ms meanwhile;
- the server's peak resident memory and open file descriptors;
- per worker: mean proportional set size (PSS: shared pages, such as the memory-mapped
  MNIST and the libraries, divided among the processes that share them) and mean RSS;
- wall time from the command to the last worker's exit.

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


def one(n: int, steps: int, workdir: Path) -> dict:
    ready = workdir / f"ready-{n}"
    env = dict(os.environ)
    server = subprocess.Popen([sys.executable, "-m", "psgd", "-q", "server", "--bind", "tcp://127.0.0.1:0",
                               "--ready-file", str(ready), "--data-shards", str(n), "--layers", "784,64,10",
                               "--batch-size", "32", "--epochs", "1000", "--lease", "300"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while not ready.exists():
            if server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        endpoint = json.loads(ready.read_text())["endpoint"]
        client = ParameterClient(endpoint, "bench")
        t0 = time.perf_counter()
        group = subprocess.Popen([sys.executable, "-m", "psgd", "-q", "worker", "--connect", endpoint, "--count", str(n),
                                  "--max-steps", str(steps)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        start = None
        peak_rss = peak_fds = 0
        pss, rss = [], []
        polls = 0
        while group.poll() is None:
            stats = client.stats()
            polls += 1
            peak_rss = max(peak_rss, _status(server.pid, "VmRSS"))
            peak_fds = max(peak_fds, len(os.listdir(f"/proc/{server.pid}/fd")))
            if start is None and stats["workers_connected"] == n:
                start = (stats["cpu_s"], stats["version"], polls)
                kids = _children(group.pid) if n > 1 else [group.pid]  # --count 1 is the worker itself
                pss = [_pss_kb(p) for p in kids]
                rss = [_status(p, "VmRSS") for p in kids]
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        end = client.stats()
        client.control({"type": "shutdown"})
        client.close()
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    if start is None or end["version"] <= start[1]:
        return {"n": n, "wall": wall, "cpu_us": None, "rss": peak_rss, "fds": peak_fds,
                "pss": sum(pss) / max(len(pss), 1), "wrss": sum(rss) / max(len(rss), 1), "group": group.returncode}
    return {"n": n, "wall": wall, "cpu_us": (end["cpu_s"] - start[0]) / (end["version"] - start[1]) * 1e6,
            "rss": peak_rss, "fds": peak_fds, "pss": sum(pss) / max(len(pss), 1),
            "wrss": sum(rss) / max(len(rss), 1), "updates": end["version"], "group": group.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(blas_description())
    print(f"784-64-10, batch 32, {args.steps} steps per worker, {os.cpu_count()} CPUs\n")
    print(f"{'workers':>8}{'wall s':>9}{'updates':>9}{'server CPU/push':>17}{'server RSS':>12}{'server fds':>12}"
          f"{'worker PSS':>12}{'worker RSS':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.workers:
            r = one(n, args.steps, Path(tmp))
            cpu = f"{r['cpu_us']:,.0f} us" if r["cpu_us"] is not None else "-"
            print(f"{r['n']:>8}{r['wall']:>9.1f}{r.get('updates', 0):>9}{cpu:>17}{r['rss'] / 1024:>9.0f} MB"
                  f"{r['fds']:>12}{r['pss'] / 1024:>9.0f} MB{r['wrss'] / 1024:>9.0f} MB"
                  + ("" if r["group"] == 0 else f"  (workers exited {r['group']})"), flush=True)


if __name__ == "__main__":
    main()
