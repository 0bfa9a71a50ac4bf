"""Wall-clock time to 97% and 98% MNIST test accuracy: psgd --workers 2 (with and without --overlap), --workers 0, PyTorch.

--overlap runs twice: with the run's momentum, and with Nesterov momentum (same mu), whose
weights are its look-ahead point: a gradient one update older is then taken nearer where
it lands (see README, "Overlap").

    python scripts/bench_train.py [--seeds 0 1 2] [--epochs 14] [--keep-blas-env]

Same model (784-256-256-10 ReLU), batch, momentum SGD and step schedule for every
contender; test accuracy evaluated 4 times per epoch. Runs are interleaved (seed by
seed) so that machine noise hits them alike. Reported per contender: the median over
seeds of the training time to each target (process start-up and evaluation reported
apart), and ratios against PyTorch and against --workers 0 from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import blas_description, clean_blas_env, have_torch, run_psgd_train, time_to, torch_mlp  # noqa: E402

clean_blas_env(sys.argv)

from psgd.config import TrainConfig  # noqa: E402
from psgd.model.schedules import WARMUP_MAX  # noqa: E402

DEFAULT = TrainConfig()
TARGETS = (0.97, 0.98)


def psgd_run(workers, seed, args, extra=()):
    summary, records, wall = run_psgd_train([*extra,
        "--workers", str(workers), "--seed", str(seed), "--epochs", str(args.epochs), "--validation", "0",
        "--evals-per-epoch", "4", "--lr", str(args.lr), "--momentum", str(args.momentum),
        "--lr-every", str(args.lr_every), "--warmup", str(args.warmup), "--target-accuracy", "0.98"])
    return {"reach": {a: time_to(records, a) for a in TARGETS}, "startup": summary["setup_time"],
            "eval": summary["eval_time"], "wall": wall, "rate": summary["examples_per_s"],
            "staleness": summary.get("staleness", {}).get("mean")}


def torch_run(seed, args, data):
    import numpy as np
    import torch
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = torch_mlp((784, 256, 256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(  # psgd's schedule: linear warm-up, then x0.2 every lr_every
        opt, lambda k: min(1.0, (k + 1) / args.warmup if args.warmup else 1.0) * 0.2 ** (k // args.lr_every))
    loss_fn = torch.nn.CrossEntropyLoss()
    (Xtr, ytr), (Xte, yte) = data
    Xtr, ytr, Xte, yte = map(torch.from_numpy, (Xtr, ytr, Xte, yte))
    n, bs = len(Xtr), 128
    eval_every = n // 4
    rng = np.random.default_rng(seed)
    startup = time.perf_counter() - t0
    train_time = eval_time = 0.0
    reach = {a: None for a in TARGETS}
    seen, next_eval = 0, eval_every
    for _ in range(args.epochs):
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, bs):
            t = time.perf_counter()
            idx = order[start:start + bs]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
            sched.step()
            seen += len(idx)
            train_time += time.perf_counter() - t
            if seen >= next_eval:
                next_eval += eval_every
                t = time.perf_counter()
                with torch.no_grad():
                    acc = (model(Xte).argmax(1) == yte).float().mean().item()
                eval_time += time.perf_counter() - t
                for a in TARGETS:
                    if reach[a] is None and acc >= a:
                        reach[a] = train_time
                if reach[0.98] is not None:
                    return {"reach": reach, "startup": startup, "eval": eval_time, "rate": seen / train_time}
    return {"reach": reach, "startup": startup, "eval": eval_time, "rate": seen / train_time}


def fmt(x):
    return f"{x:6.2f}s" if x is not None else "    - "


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=int(DEFAULT.epochs))
    ap.add_argument("--lr", type=float, default=DEFAULT.schedule.lr)
    ap.add_argument("--momentum", type=float, default=DEFAULT.optimizer.momentum)
    ap.add_argument("--lr-every", type=int, default=DEFAULT.schedule.every, help="updates between 5x drops")
    ap.add_argument("--warmup", type=int, default=WARMUP_MAX, help="updates of linear warm-up")
    ap.add_argument("--only", nargs="+", default=None, help="contenders to run: workers2 overlap overlap-nesterov workers0 pytorch")
    args = ap.parse_args()
    print(f"784-256-256-10 relu, batch 128, momentum {args.momentum}, lr {args.lr} (warm-up {args.warmup}) "
          f"x0.2 every {args.lr_every} updates; "
          f"seeds {args.seeds}")
    print(blas_description())
    contenders = {"psgd --workers 2": lambda s: psgd_run(2, s, args),
                  "psgd -w 2 --overlap": lambda s: psgd_run(2, s, args, ["--overlap"]),
                  "psgd -w 2 --overlap nesterov": lambda s: psgd_run(2, s, args, ["--overlap", "--optimizer", "nesterov"]),
                  "psgd --workers 0": lambda s: psgd_run(0, s, args)}
    if have_torch():
        from psgd.data import load_mnist
        train, test = load_mnist()
        data = ((train.X, train.y), (test.X, test.y))
        contenders["pytorch 2 threads"] = lambda s: torch_run(s, args, data)
    else:
        print("PyTorch not installed: no PyTorch column (pip install torch==2.13.0)")
    if args.only:
        keys = {"workers2": "psgd --workers 2", "overlap": "psgd -w 2 --overlap",
                "overlap-nesterov": "psgd -w 2 --overlap nesterov", "workers0": "psgd --workers 0",
                "pytorch": "pytorch 2 threads"}
        contenders = {keys[k]: contenders[keys[k]] for k in args.only if keys[k] in contenders}
    results = {name: [] for name in contenders}
    for seed in args.seeds:
        for name, run in contenders.items():
            r = run(seed)
            results[name].append(r)
            print(f"  seed {seed} {name:<28} to 97% {fmt(r['reach'][0.97])} to 98% {fmt(r['reach'][0.98])} "
                  f"{r['rate'] / 1e3:6.1f}k ex/s" + (f" staleness {r['staleness']:.2f}" if r.get("staleness") else ""),
                  flush=True)

    def med(name, key):
        vals = [r["reach"][key] for r in results[name]]
        return statistics.median(vals) if all(v is not None for v in vals) else None

    print(f"\n{'contender':<28} {'to 97%':>8} {'to 98%':>8} {'startup':>8} {'eval':>7} {'ex/s':>8}")
    for name, rs in results.items():
        print(f"{name:<28} {fmt(med(name, 0.97)):>8} {fmt(med(name, 0.98)):>8} "
              f"{statistics.median(r['startup'] for r in rs):7.2f}s {statistics.median(r['eval'] for r in rs):6.2f}s "
              f"{statistics.median(r['rate'] for r in rs) / 1e3:7.1f}k")
    for target in TARGETS:
        for name in ("psgd --workers 2", "psgd -w 2 --overlap", "psgd -w 2 --overlap nesterov"):
            ours = med(name, target) if name in results else None
            for base in ("pytorch 2 threads", "psgd --workers 0"):
                theirs = med(base, target) if base in results else None
                if ours and theirs:
                    print(f"to {target:.0%}: {name} / {base} = {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
