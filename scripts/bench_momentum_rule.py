"""The adaptive momentum rule against the fixed one: test accuracy after a short run as the
workers grow, in the simulator and in real local clusters, each set of runs with its own
2-worker baseline measured in the same invocation.

    python scripts/bench_momentum_rule.py --sim-workers 2 16 100 1000 --real-workers
    python scripts/bench_momentum_rule.py --sim-workers --real-workers 2 4 8 16 --seeds 0 1

"before" is the defaults until the momentum rule (--momentum-rule fixed --staleness-rule
divide), "after" today's (adaptive, dynsgd). Defaults otherwise (784-64-10, 2 epochs,
momentum 0.9, lr 0.1, the default warm-up and schedule). Simulated timings are the simulator's defaults (a step of
lognormal 2 ms, 100 us each way, no server time, a core per worker). A real run is
``psgd train --workers N`` on this machine: with more workers than cores the staleness
depends on how the OS shares them, so say the machine's load with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import blas_description, clean_blas_env  # noqa: E402

clean_blas_env(sys.argv)
REAL_ENV = dict(os.environ)  # a real run gets the environment a user's would
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the simulator's gradients are small and one at a time

from psgd.config import TrainConfig  # noqa: E402
from psgd.data.prepared import prepare_data  # noqa: E402
from psgd.model.network import ModelSpec, parse_sizes  # noqa: E402
from psgd.simulate import SimSpec, Simulator  # noqa: E402

# before: the defaults until the momentum rule (fixed momentum, staleness rule divide); after: today's
SETTINGS = {"before": {"momentum_rule": "fixed", "staleness_rule": "divide"}, "after": {}}


def simulated(n: int, rule: str, seed: int, a) -> dict:
    base = TrainConfig(model=ModelSpec(parse_sizes(a.layers)), epochs=a.epochs, seed=seed, workers=n,
                       **SETTINGS[rule])
    data = prepare_data(base)
    sim = Simulator(dataclasses.replace(data, config=data.config), SimSpec(memory_limit_mb=8192), say=lambda t: None)
    s = sim.run()
    return {"acc": s["test_accuracy"], "staleness": s["simulation"]["staleness_mean"], "rule": s["momentum_rule"],
            "wall": s["simulation"]["wall_s"]}


def real(n: int, rule: str, seed: int, a) -> dict:
    with tempfile.TemporaryDirectory(prefix="psgd-bench-mr-") as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "psgd", "-q", "train", "--workers", str(n), "--layers", a.layers,
                               "--epochs", str(a.epochs), "--seed", str(seed), "--out", str(out)]
                              + [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS[rule].items()],
                              env=REAL_ENV, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"acc": None, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        s = json.loads((out / "summary.json").read_text())
        return {"acc": s["test_accuracy"], "staleness": s["staleness"]["mean"], "rule": s.get("momentum_rule"),
                "wall": time.perf_counter() - t0, "max": s["staleness"]["max"]}


def line(kind: str, n: int, seed: int, rule: str, r: dict, baseline: float | None) -> str:
    if r["acc"] is None:
        return f"{kind:<5} {n:>5} {seed:>4} {rule:<8} failed: {r['error']}"
    chosen = r.get("rule") or {}
    delta = f"{(r['acc'] - baseline) * 100:+6.2f}" if baseline is not None else "     -"
    return (f"{kind:<5} {n:>5} {seed:>4} {rule:<8} {r['acc']:>8.2%} {delta:>9} {r['staleness']:>9.2f} "
            f"{chosen.get('momentum', float('nan')):>8.3f} {chosen.get('lr_factor', float('nan')):>7.2f} "
            f"{r['wall']:>7.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sim-workers", type=int, nargs="*", default=[2, 16, 100, 1000])
    p.add_argument("--real-workers", type=int, nargs="*", default=[2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rules", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--layers", default="784,64,10")
    a = p.parse_args()
    print(f"{a.layers}, {a.epochs:g} epochs, defaults otherwise; load average at start "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {blas_description()}")
    print(f"{'kind':<5} {'N':>5} {'seed':>4} {'rule':<8} {'test acc':>8} {'vs N=2 pt':>9} {'staleness':>9} "
          f"{'momentum':>8} {'lr x':>7} {'wall s':>7}", flush=True)
    for kind, workers, fn in (("sim", a.sim_workers, simulated), ("real", a.real_workers, real)):
        for seed in a.seeds:
            for rule in a.rules:
                baseline = None
                for n in sorted(workers):
                    r = fn(n, rule, seed, a)
                    if n == 2 and r["acc"] is not None:
                        baseline = r["acc"]
                    print(line(kind, n, seed, rule, r, baseline if n != 2 else None), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
