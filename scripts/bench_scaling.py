"""Scaling with cores: time to 97% and examples/s for 1, 2, 4, ... local workers, against one
process using all cores for BLAS, in one run.

    python scripts/bench_scaling.py [--workers 1 2 4 8] [--seeds 0 1] [--epochs 14]

By default the worker counts are the powers of two up to this machine's core count
(os.cpu_count()), so a 32-core node prints the rows 1, 2, 4, 8, 16 and 32 from this one
command. Every row is ``psgd train --workers N`` (a server and N worker processes, one
BLAS thread each, shared memory), and the baseline is ``psgd train --workers 0``: the same
training in one process with every core for BLAS. Same model (784-256-256-10 ReLU),
batch, momentum SGD and schedule as scripts/bench_train.py; accuracy is the one the
coordinator evaluates 4 times an epoch (``--validation 0``: the test set), and times are
training time (start-up and evaluations apart). Runs are interleaved seed by seed so
machine noise hits every row alike; the table gives medians over seeds, examples/s
against 1 worker and time to 97% against the one-process baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import blas_description, clean_blas_env, run_psgd_train, time_to  # noqa: E402

clean_blas_env(sys.argv)

from psgd.config import TrainConfig  # noqa: E402
from psgd.model.schedules import WARMUP_MAX  # noqa: E402

DEFAULT = TrainConfig()
TARGETS = (0.97, 0.98)


def powers_of_two(limit: int) -> list[int]:
    counts, n = [], 1
    while n <= limit:
        counts.append(n)
        n *= 2
    return counts


def run(workers: int, seed: int, args) -> dict:
    summary, records, wall = run_psgd_train([
        "--workers", str(workers), "--seed", str(seed), "--epochs", str(args.epochs), "--validation", "0",
        "--evals-per-epoch", "4", "--lr", str(args.lr), "--momentum", str(args.momentum),
        "--lr-every", str(args.lr_every), "--warmup", str(args.warmup), "--target-accuracy", str(max(TARGETS))])
    return {"reach": {a: time_to(records, a) for a in TARGETS}, "rate": summary["examples_per_s"],
            "staleness": (summary.get("staleness") or {}).get("mean"), "wall": wall}


def fmt(x, unit="s"):
    return f"{x:.2f}{unit}" if x is not None else "-"


def main():
    cores = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=powers_of_two(cores),
                    help=f"worker counts (default: powers of two up to {cores}, this machine's cores)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=int(DEFAULT.epochs))
    ap.add_argument("--lr", type=float, default=DEFAULT.schedule.lr)
    ap.add_argument("--momentum", type=float, default=DEFAULT.optimizer.momentum)
    ap.add_argument("--lr-every", type=int, default=DEFAULT.schedule.every)
    ap.add_argument("--warmup", type=int, default=WARMUP_MAX)
    args = ap.parse_args()
    print(f"784-256-256-10 relu, batch 128, momentum {args.momentum}, lr {args.lr} (warm-up {args.warmup}) "
          f"x0.2 every {args.lr_every} updates; seeds {args.seeds}; {cores} cores")
    print(blas_description())
    rows = {0: []} | {n: [] for n in args.workers}
    for seed in args.seeds:
        for n in rows:
            r = run(n, seed, args)
            rows[n].append(r)
            print(f"  seed {seed} workers {n:>3}: to 97% {fmt(r['reach'][0.97])}, to 98% {fmt(r['reach'][0.98])}, "
                  f"{r['rate'] / 1e3:.1f}k ex/s" + (f", staleness {r['staleness']:.2f}" if r["staleness"] else ""),
                  flush=True)

    def med(n, target):
        vals = [r["reach"][target] for r in rows[n]]
        return statistics.median(vals) if all(v is not None for v in vals) else None

    rate = {n: statistics.median(r["rate"] for r in rs) for n, rs in rows.items()}
    one = rate.get(1)
    base97 = med(0, 0.97)
    print(f"\n{'contender':<24} {'to 97%':>8} {'to 98%':>8} {'ex/s':>8} {'ex/s vs 1 worker':>17} "
          f"{'to 97% vs --workers 0':>22} {'staleness':>10}")
    for n, rs in rows.items():
        name = f"--workers 0 ({cores} BLAS threads)" if n == 0 else f"--workers {n}"
        stale = [r["staleness"] for r in rs if r["staleness"] is not None]
        t97 = med(n, 0.97)
        print(f"{name:<24} {fmt(t97):>8} {fmt(med(n, 0.98)):>8} {rate[n] / 1e3:7.1f}k "
              f"{fmt(rate[n] / one if one and n else None, 'x'):>17} "
              f"{fmt(t97 / base97 if t97 and base97 and n else None, 'x'):>22} "
              f"{fmt(statistics.median(stale) if stale else None, ''):>10}")


if __name__ == "__main__":
    main()
