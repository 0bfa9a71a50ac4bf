"""Training over thin links: bytes and time to 97% and 98% MNIST accuracy, per method.

    python scripts/bench_comm.py [--workers 2 4] [--networks loopback 10mbit] [--max-seconds 300]
                                 [--layers 784,256,256,10] [--only NAME ...] [--keep-blas-env]

Contenders: Downpour (plain float32), Downpour with float16 pushes and pulls, Downpour with
top-1% pushes (error feedback; pulls plain), and local SGD (DiLoCo: AdamW inside at
--inner-lr, Nesterov outside) with H = 10, 50 and 200, sync and async. Every run talks
ZeroMQ (no shared memory), evaluates 4 times per epoch and stops at 98% validation accuracy,
14 epochs or --max-seconds.

Networks: ``loopback`` (psgd train on this machine) and ``10mbit``: the server and the
coordinator in one network namespace, each worker in its own, its link shaped to 10 Mbit/s
each way with tbf (tests/netns_util.py; needs root, iproute2 and tc). Bytes are the
workers' array payload (pushes and the weights they pull; headers excluded: a few hundred
bytes a message) at the first evaluation that reached the target. Printed as one table.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from benchlib import blas_description, clean_blas_env, run_psgd_train  # noqa: E402

clean_blas_env(sys.argv)

DOWNPOUR = [("downpour", []), ("downpour fp16", ["--push-codec", "float16", "--pull-codec", "float16"]),
            ("downpour top1%", ["--push-codec", "topk", "--topk-fraction", "0.01"])]


def contenders(inner_lr: float) -> list[tuple[str, list[str]]]:
    local = [(f"local H={h} {mode}", ["--algorithm", "local", "--local-steps", str(h), "--inner-optimizer", "adamw",
                                      "--lr", str(inner_lr)] + (["--consistency", "sync"] if mode == "sync" else []))
             for h in (10, 50, 200) for mode in ("sync", "async")]
    return DOWNPOUR + local


def first(records, accuracy):
    return next((r for r in records if (r.get("val_accuracy") or 0) >= accuracy), None)


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
        with tempfile.TemporaryDirectory() as out:
            procs.append(subprocess.Popen([*net.exec_prefix("server"), *psgd, "server", "--bind", "tcp://*:5555",
                                           "--no-shm", "--data-shards", str(workers), *outer_every(args, workers),
                                           *args],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
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
        for p in procs:
            p.wait(60)
        return summary, records
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        net.close()


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--networks", nargs="+", default=["loopback", "10mbit"], choices=["loopback", "10mbit"])
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--layers", default=None, help="Default: psgd's (784,256,256,10).")
    ap.add_argument("--inner-lr", type=float, default=0.002, help="Local SGD: AdamW's rate.")
    ap.add_argument("--target", type=float, nargs=2, default=[0.97, 0.98])
    ap.add_argument("--only", nargs="+", default=None, help="Run only the contenders whose name starts with these.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(blas_description())
    lo, hi = args.target
    print(f"{os.cpu_count()} CPUs; seed {args.seed}; MB = workers' payload to the target; s = training seconds "
          f"(start-up and evaluation excluded); '-' = not reached in 14 epochs or {args.max_seconds:g} s\n")
    print(f"{'network':<9} {'workers':>7} {'method':<20} {f'MB {lo:.0%}':>9} {f'MB {hi:.0%}':>9} "
          f"{f's {lo:.0%}':>8} {f's {hi:.0%}':>8} {'epochs':>6} {'final acc':>9} {'pushes':>7}")
    for network in args.networks:
        for workers in args.workers:
            for name, extra in contenders(args.inner_lr):
                if args.only and not any(name.startswith(o) for o in args.only):
                    continue
                run_args = ["--seed", str(args.seed), "--evals-per-epoch", "4", "--target-accuracy", str(hi),
                            "--max-seconds", str(args.max_seconds), *extra]
                if args.layers:
                    run_args += ["--layers", args.layers]
                t0 = time.perf_counter()
                if network == "loopback":
                    summary, records = run_loopback(workers, run_args)
                else:
                    summary, records = run_throttled(workers, run_args, 10.0, os.environ.get("PSGD_DATA_DIR"))
                cells = []
                for target in (lo, hi):
                    r = first(records, target)
                    cells.append(r)
                mb = [f"{r['payload_bytes'] / 1e6:.1f}" if r else "-" for r in cells]
                sec = [f"{r['train_time']:.1f}" if r else "-" for r in cells]
                epochs = cells[1]["epoch"] if cells[1] else summary["epochs"]
                print(f"{network:<9} {workers:>7} {name:<20} {mb[0]:>9} {mb[1]:>9} {sec[0]:>8} {sec[1]:>8} "
                      f"{epochs:>6.1f} {summary['test_accuracy']:>9.2%} {summary['updates']:>7}"
                      f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
