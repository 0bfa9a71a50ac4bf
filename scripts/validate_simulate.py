"""Does the simulator reproduce a real run? Real local clusters of 2, 4 and 8 workers,
then ``psgd simulate`` fed with the compute, delay and start times each one measured
(psgd.simulate.calibrate); prints the total-variation distance between their staleness
histograms and the gap between their test accuracies.

    python scripts/validate_simulate.py                 # 2, 4, 8 workers, MNIST 784-64-10, 2 epochs
    python scripts/validate_simulate.py --workers 2 --epochs 1

The issue's bar: TV <= 0.15 and accuracy within 1 point. Real runs on a loaded machine vary
from run to run (how the OS shares the cores decides who is stale), so a single figure is
one sample: --repeats runs each size several times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the simulator's gradients are small, one at a time

from psgd.config import TrainConfig  # noqa: E402
from psgd.simulate import simulate  # noqa: E402
from psgd.simulate.calibrate import compare, measured_spec  # noqa: E402


def real_run(out: Path, workers: int, epochs: float, layers: str, data: str, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "psgd", "train", "--workers", str(workers), "--layers", layers, "--epochs", str(epochs),
           "--data", data, "--out", str(out)] + extra
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def simulated_run(real: Path, out: Path, sigma: float, seed: int | None = None) -> dict:
    config = TrainConfig.from_dict(json.loads((real / "config.json").read_text()))
    config = config.with_(out_dir=str(out), seed=config.seed if seed is None else seed)
    simulate(config, measured_spec(real, sigma), say=lambda text: None)
    return compare(real, out)


def validate(workers: int, epochs: float, layers: str = "784,64,10", data: str = "mnist", sigma: float = 0.6,
             folder: Path | None = None, extra: list[str] = ()) -> dict:
    folder = Path(folder or tempfile.mkdtemp(prefix="psgd-validate-"))
    real = folder / f"real-{workers}"
    real_run(real, workers, epochs, layers, data, list(extra))
    result = simulated_run(real, folder / f"sim-{workers}", sigma)
    result["workers"] = workers
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--layers", default="784,64,10")
    p.add_argument("--data", default="mnist")
    p.add_argument("--sigma", type=float, default=0.6, help="Deviation of log(time): the logs give means only.")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=None, help="Keep the run directories here.")
    a = p.parse_args()
    print(f"{'workers':>7} {'TV':>6} {'real acc':>9} {'sim acc':>8} {'gap':>6} {'real staleness':>15} {'sim staleness':>14}")
    for n in a.workers:
        for k in range(a.repeats):
            folder = Path(a.out) / f"{n}-{k}" if a.out else None
            r = validate(n, a.epochs, a.layers, a.data, a.sigma, folder)
            print(f"{n:>7} {r['tv']:>6.3f} {r['real_accuracy']:>9.2%} {r['sim_accuracy']:>8.2%} "
                  f"{r['accuracy_gap'] * 100:>5.2f}p {r['real_staleness']['mean']:>15.2f} "
                  f"{r['sim_staleness']['mean']:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
