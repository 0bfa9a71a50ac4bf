"""Time to 98% MNIST test accuracy under each consistency model, with and without a straggler.

    python scripts/bench_consistency.py [--workers 2 4] [--max-seconds 90] [--keep-blas-env]

async, ssp (s = 2 and 8) and sync, each with 2 and 4 workers, each as is and with the last
worker slowed 4x (--slow-worker 4): one psgd train run per cell, psgd's default model and
hyper-parameters (14 epochs), test accuracy evaluated 4 times per epoch, at most 14 epochs or
--max-seconds. Printed as one table from one run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import blas_description, clean_blas_env, run_psgd_train, time_to  # noqa: E402

clean_blas_env(sys.argv)

MODES = [("async", []), ("ssp s=2", ["--consistency", "ssp", "--ssp-bound", "2"]),
         ("ssp s=8", ["--consistency", "ssp", "--ssp-bound", "8"]), ("sync", ["--consistency", "sync"])]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--max-seconds", type=float, default=90.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(blas_description())
    print(f"{os.cpu_count()} CPUs; seed {args.seed}; time = training seconds to 98% test accuracy "
          f"(start-up and evaluation excluded), '-' = not reached in 14 epochs or {args.max_seconds:g} s\n")
    print(f"{'mode':<9} {'workers':>7} {'slow':>5} {'to 98%':>8} {'final acc':>9} {'epochs':>6} "
          f"{'staleness':>9} {'max':>4} {'ex/s':>7}")
    for workers in args.workers:
        for name, extra in MODES:
            for slow in (1, 4):
                summary, records, _ = run_psgd_train([
                    "--workers", str(workers), "--seed", str(args.seed), "--validation", "0",
                    "--evals-per-epoch", "4", "--target-accuracy", "0.98", "--max-seconds", str(args.max_seconds),
                    "--slow-worker", str(slow), *extra])
                t98 = time_to(records, 0.98)
                st = summary["staleness"]
                print(f"{name:<9} {workers:>7} {'4x' if slow > 1 else '-':>5} "
                      f"{(f'{t98:.2f}s' if t98 is not None else '-'):>8} {summary['test_accuracy']:>9.2%} "
                      f"{summary['epochs']:>6.1f} {st['mean']:>9.2f} {st['max']:>4} "
                      f"{summary['examples_per_s'] / 1e3:>6.1f}k", flush=True)


if __name__ == "__main__":
    main()
