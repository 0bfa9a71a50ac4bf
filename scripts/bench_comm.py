"""Training over thin links: bytes and time to 97% and 98% MNIST test accuracy, per method.

    python scripts/bench_comm.py [--workers 2 4] [--networks loopback 10mbit] [--max-seconds 300]
                                 [--cells loopback:2 10mbit:4 ...] [--repeats K]
                                 [--layers 784,256,256,10] [--only PATTERN ...] [--keep-blas-env]

The whole grid (2 networks x 2 worker counts x 11 contenders, up to --max-seconds each) takes
hours; ``--cells`` picks (network, workers) pairs and ``--only`` contenders (Downpour, the
baseline of the ratios, always runs). ``--repeats`` runs a cell's contenders K times over,
interleaved, to show how much a ratio moves on a loaded machine.

Contenders: Downpour (plain float32), Downpour with float16 pushes and pulls, Downpour with
top-1% pushes (error feedback; pulls plain), local SGD (DiLoCo: AdamW inside at --inner-lr,
its rate following the run's step schedule as psgd's default --inner-schedule run does;
Nesterov outside) with H = 10, 50 and 200, sync and async, and local SGD with H = 200 and
int8 pushes and pulls, sync and async. Every run talks
ZeroMQ (no shared memory), trains on all 60,000 training images (``--validation 0``, as
scripts/bench_train.py: the coordinator then evaluates the 10,000 test images, so the
accuracy targets are test accuracy, as time-to-accuracy benchmarks such as DAWNBench count
them), evaluates 4 times per epoch and stops at 98% test accuracy, 14 epochs or
--max-seconds. Each row gives the ratios the targets are about: Downpour's bytes
and training seconds to the higher target over this contender's, in the same cell.

Networks: ``loopback`` (psgd train on this machine) and ``10mbit``: the server and the
coordinator in one network namespace, each worker in its own, its link shaped to 10 Mbit/s
each way with tbf (tests/netns_util.py; needs root, iproute2 and tc). Bytes are the
workers' array payload (pushes and the weights they pull; headers excluded: a few hundred
bytes a message) at the first evaluation that reached the target. Printed as one table.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from benchlib import blas_description, clean_blas_env, first_reaching, run_psgd_train  # noqa: E402

NETWORKS = ("loopback", "10mbit")
SERVER_START_S = 300
DOWNPOUR = [("downpour", []), ("downpour fp16", ["--push-codec", "float16", "--pull-codec", "float16"]),
            ("downpour top1%", ["--push-codec", "topk", "--topk-fraction", "0.01"])]


INT8 = ["--push-codec", "int8", "--pull-codec", "int8"]


def contenders(inner_lr: float | None) -> list[tuple[str, list[str]]]:
    """Each contender's name and options; local SGD with psgd's defaults for what is not named
    (AdamW's inner rate: psgd.cli.LOCAL_ADAM_DEFAULT_LR unless --inner-lr, following the run's
    schedule; outer lr 0.7, Nesterov 0.9 under sync and 0.5 under async)."""
    rate = ["--lr", str(inner_lr)] if inner_lr is not None else []

    def local(h: int, mode: str, extra: list[str] = ()) -> list[str]:
        return ["--algorithm", "local", "--local-steps", str(h), "--inner-optimizer", "adamw", *rate, *extra] + \
            (["--consistency", "sync"] if mode == "sync" else [])
    plain = [(f"local H={h} {mode}", local(h, mode)) for h in (10, 50, 200) for mode in ("sync", "async")]
    int8 = [(f"local H=200 {mode} int8", local(200, mode, INT8)) for mode in ("sync", "async")]
    return DOWNPOUR + plain + int8


def run_loopback(workers: int, args: list[str]) -> tuple[dict, list[dict]]:
    summary, records, _ = run_psgd_train(["--workers", str(workers), "--transport", "zmq", *args])
    return summary, records


def run_throttled(workers: int, args: list[str], mbit: float, data_dir: str | None) -> tuple[dict, list[dict]]:
    """A server and coordinator in one namespace, each worker in its own behind a shaped link."""
    import netns_util
    why = netns_util.available()
    if why:
        raise SystemExit(f"the 10mbit network needs namespaces: {why}")
    net = netns_util.Network()
    procs = []
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    if data_dir:
        env["PSGD_DATA_DIR"] = data_dir
    try:
        net.add_host("server")
        for i in range(workers):
            net.add_host(f"w{i}")
            net.shape(f"w{i}", mbit)
        endpoint = f"tcp://{net.address('server')}:5555"
        psgd = [sys.executable, "-m", "psgd"]
        with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as logs:
            ready, server_log = Path(logs, "server.ready.json"), Path(logs, "server.log")
            with server_log.open("w") as log:
                procs.append(subprocess.Popen([*net.exec_prefix("server"), *psgd, "server", "--bind", "tcp://*:5555",
                                               "--no-shm", "--insecure", "--data-shards", str(workers), "--ready-file", str(ready),
                                               *outer_every(args, workers), *args],
                                              env=env, stdout=log, stderr=subprocess.STDOUT))
            # --insecure: the namespaces' network reaches nothing else. A loaded machine can take
            # longer than the coordinator's 30 s wait to start a server: wait for its ready file.
            deadline = time.monotonic() + SERVER_START_S
            while not ready.exists():
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server_log.read_text()[-2000:]}")
                time.sleep(0.2)
            for i in range(workers):
                procs.append(subprocess.Popen([*net.exec_prefix(f"w{i}"), *psgd, "worker", "--connect", endpoint,
                                               "--transport", "zmq", "--server-wait", "60"],
                                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            coordinator = subprocess.run([*net.exec_prefix("server"), *psgd, "coordinator", "--connect",
                                          "tcp://127.0.0.1:5555", "--out", out, *coordinator_args(args)],
                                         env=env, capture_output=True, text=True)
            if coordinator.returncode != 0:
                raise SystemExit(f"the coordinator failed: {coordinator.stderr[-2000:]}")
            records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
            summary = json.loads(Path(out, "summary.json").read_text())
        for p in procs:  # the results are in: a worker still deep in a long round is killed below
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                pass
        return summary, records
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        net.close()
        left = netns_util.leftover_namespaces(net.tag)
        if left:
            raise SystemExit(f"namespaces left behind: {', '.join(left)} (remove them with ip netns del)")


def outer_every(args: list[str], workers: int) -> list[str]:
    """A standalone server does not know the worker count that delayed Nesterov defaults to."""
    if "local" in args and "sync" not in args:
        return ["--outer-every", str(workers)]
    return []


def coordinator_args(args: list[str]) -> list[str]:
    """The coordinator's own stop rules, taken from the run's arguments."""
    out = []
    for flag in ("--target-accuracy", "--max-seconds", "--evals-per-epoch", "--epochs"):
        if flag in args:
            out += [flag, args[args.index(flag) + 1]]
    return out


def parse_cells(specs: list[str]) -> list[tuple[str, int]]:
    """``NETWORK:WORKERS`` pairs, e.g. ``loopback:2 10mbit:4``."""
    cells = []
    for spec in specs:
        network, _, workers = spec.partition(":")
        if network not in NETWORKS or not workers.isdigit() or int(workers) < 1:
            raise SystemExit(f"--cells: {spec!r} is not NETWORK:WORKERS with NETWORK one of {', '.join(NETWORKS)}")
        cells.append((network, int(workers)))
    return cells


def ratio(base: dict | None, base_end: tuple[float, float], mine: dict | None, key: str, index: int) -> str:
    """How many times Downpour's figure (at the target, or at its end as a lower bound,
    marked '>') exceeds this contender's at the target."""
    if mine is None or not mine[key]:
        return "-"
    if base is not None:
        return f"{base[key] / mine[key]:.1f}"
    return f">{base_end[index] / mine[key]:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    ap.add_argument("--cells", nargs="+", default=None, metavar="NETWORK:WORKERS",
                    help="Run these (network, workers) cells instead of every --networks x --workers pair.")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--layers", default=None, help="Default: psgd's (784,256,256,10).")
    ap.add_argument("--inner-lr", type=float, default=None, help="Local SGD: AdamW's rate (default: psgd's).")
    ap.add_argument("--target", type=float, nargs=2, default=[0.97, 0.98])
    ap.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                    help="Run only the contenders whose name matches one of these shell patterns "
                         "('downpour', 'local H=50*'); Downpour, the baseline, always runs.")
    ap.add_argument("--repeats", type=int, default=1, help="Run the contenders this many times over, interleaved.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cells = parse_cells(args.cells) if args.cells else [(n, w) for n in args.networks for w in args.workers]
    print(blas_description())
    lo, hi = args.target
    print(f"{os.cpu_count()} CPUs; seed {args.seed}; MB = workers' payload (pushes and pulls) to the target; "
          f"s = training seconds (start-up and evaluation excluded); '-' = not reached in 14 epochs or "
          f"{args.max_seconds:g} s; x bytes, x time = Downpour's figure at {hi:.0%} over this one's in the "
          f"same cell and repeat ('>': Downpour did not reach it, its end figure is a lower bound); "
          f"load = 1-minute load average when the run started\n")
    print(f"{'network':<9} {'workers':>7} {'method':<20} {f'MB {lo:.0%}':>9} {f'MB {hi:.0%}':>9} "
          f"{f's {lo:.0%}':>8} {f's {hi:.0%}':>8} {'epochs':>6} {'final acc':>9} {'pushes':>7} "
          f"{'x bytes':>8} {'x time':>7} {'load':>5}")
    chosen = [(name, extra) for name, extra in contenders(args.inner_lr)
              if name == "downpour" or not args.only or any(fnmatch.fnmatch(name, o) for o in args.only)]
    for network, workers in cells:
        for _ in range(args.repeats):
            base, base_end = None, (0.0, 0.0)
            for name, extra in chosen:
                run_args = ["--seed", str(args.seed), "--validation", "0", "--evals-per-epoch", "4", "--target-accuracy", str(hi),
                            "--max-seconds", str(args.max_seconds), *extra]
                if args.layers:
                    run_args += ["--layers", args.layers]
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                if network == "loopback":
                    summary, records = run_loopback(workers, run_args)
                else:
                    summary, records = run_throttled(workers, run_args, 10.0, os.environ.get("PSGD_DATA_DIR"))
                cells_at = [first_reaching(records, target) for target in (lo, hi)]
                if name == "downpour":
                    base = cells_at[1]
                    end = records[-1] if records else {"payload_bytes": 0, "train_time": 0.0}
                    base_end = (end["payload_bytes"], end["train_time"])
                mb = [f"{r['payload_bytes'] / 1e6:.1f}" if r else "-" for r in cells_at]
                sec = [f"{r['train_time']:.1f}" if r else "-" for r in cells_at]
                epochs = cells_at[1]["epoch"] if cells_at[1] else summary["epochs"]
                x_bytes = ratio(base, base_end, cells_at[1], "payload_bytes", 0) if name != "downpour" else ""
                x_time = ratio(base, base_end, cells_at[1], "train_time", 1) if name != "downpour" else ""
                print(f"{network:<9} {workers:>7} {name:<20} {mb[0]:>9} {mb[1]:>9} {sec[0]:>8} {sec[1]:>8} "
                      f"{epochs:>6.1f} {summary['test_accuracy']:>9.2%} {summary['updates']:>7} "
                      f"{x_bytes:>8} {x_time:>7} {load:>5.1f}   ({time.perf_counter() - t0:.0f} s)", flush=True)
                if name == "downpour" and base is None:
                    print(f"{'':<9} {'':>7} {'  (downpour ended':<20} at {base_end[0] / 1e6:.1f} MB, "
                          f"{base_end[1]:.1f} s, {records[-1]['val_accuracy'] if records else 0:.2%} test)",
                          flush=True)


def _terminate(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")  # unwinds through run_throttled's clean-up


if __name__ == "__main__":
    clean_blas_env(sys.argv)  # here, not at import: a test imports run_throttled
    signal.signal(signal.SIGTERM, _terminate)
    main()
