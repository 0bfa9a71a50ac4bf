"""Shared helpers for the benchmarks: a clean BLAS environment, the kernel in use, timing.

This machine family sets OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which make a current
numpy pick a slower kernel. A user's machine would not, so every benchmark re-executes
itself once with both removed (``--keep-blas-env`` keeps them) and prints the kernel.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def clean_blas_env(argv: list[str]) -> None:
    """Re-exec this script without the OpenBLAS overrides, unless asked to keep them."""
    if "--keep-blas-env" in argv:
        argv.remove("--keep-blas-env")
        return
    if any(v in os.environ for v in BLAS_VARS):
        env = {k: v for k, v in os.environ.items() if k not in BLAS_VARS}
        os.execve(sys.executable, [sys.executable] + argv, env)


def blas_description() -> str:
    import numpy  # noqa: F401  (loads the BLAS library so that threadpoolctl can see it)
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS: unknown (pip install threadpoolctl to see the kernel)"
    rows = []
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            rows.append(f"{info.get('internal_api')} {info.get('version')} kernel={info.get('architecture')} "
                        f"threads={info.get('num_threads')} ({os.path.basename(info.get('filepath', ''))})")
    overrides = ", ".join(f"{v}={os.environ[v]}" for v in BLAS_VARS if v in os.environ) or "none"
    return "BLAS: " + ("; ".join(rows) or "none found") + f"; OpenBLAS overrides: {overrides}"


def median_time(fn, repeats: int, warmup: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def torch_mlp(sizes):
    """The same ReLU network as psgd's MLP, in PyTorch (Linear layers, ReLU between)."""
    import torch
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def run_psgd_train(args: list[str]) -> tuple[dict, list[dict], float]:
    """Run ``psgd train ARGS`` in a fresh process with a temporary run directory; return its
    summary, its metrics records and the wall time. Raises SystemExit if it fails."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "psgd", "train", *args, "--out", out],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"psgd train {' '.join(args)} failed: {proc.stderr[-2000:]}")
        records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
        summary = json.loads(Path(out, "summary.json").read_text())
    return summary, records, wall


def first_reaching(records: list[dict], accuracy: float) -> dict | None:
    """The first evaluation record at or above ``accuracy``. A run with ``--validation 0``
    (as the benchmarks run) evaluates the test set: its records' ``val_accuracy`` is then
    test accuracy."""
    return next((r for r in records if (r.get("val_accuracy") or 0) >= accuracy), None)


def time_to(records: list[dict], accuracy: float) -> float | None:
    """Training seconds to the first evaluation at or above ``accuracy``."""
    r = first_reaching(records, accuracy)
    return r["train_time"] if r is not None else None
