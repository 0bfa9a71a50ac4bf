"""The simulator's headline table: MNIST accuracy and virtual time to 97% for N workers
under each consistency model and staleness rule, with and without a straggler class;
and what the simulator itself costs per 10,000 pushes beyond the gradients.

    python scripts/bench_simulate.py                       # the whole table (hours at 10,000 workers)
    python scripts/bench_simulate.py --workers 1 10 100 --consistency async --rules none divide
    python scripts/bench_simulate.py --quick               # 1, 10, 100 workers, async, 1 epoch

Timings (virtual): one step's compute is lognormal (sigma 0.3) around this machine's
measured time for one minibatch gradient; the network delay is --delay each way; the
server's time per push is its measured ServerState.push for this model (one queue, so at
thousands of workers the server is the bottleneck, as it would be). A straggler class is
a tenth of the workers (at least one) computing --straggler-factor times slower.
dcasgd compensates plain SGD, so its rows use --optimizer sgd; the others keep the
default momentum 0.9. A worker's minibatch is at most its data shard: at 10,000 workers
an MNIST shard holds 5 or 6 examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small gradients one at a time: threads only cost

import numpy as np  # noqa: E402

from psgd.config import TrainConfig  # noqa: E402
from psgd.data.prepared import prepare_data  # noqa: E402
from psgd.model.interface import build_model  # noqa: E402
from psgd.model.network import ModelSpec, parse_sizes  # noqa: E402
from psgd.model.optim import OptimizerSpec  # noqa: E402
from psgd.server.state import ServerState  # noqa: E402
from psgd.simulate import Dist, SimSpec, Simulator  # noqa: E402


def measure(config: TrainConfig, data) -> tuple[float, float]:
    """Seconds for one minibatch gradient, and for one ServerState.push, on this machine."""
    net = build_model(config.model)
    params = net.init_params(0)
    grad = np.empty_like(params)
    X, T = data.train.X[:config.batch_size], data.T_train[:config.batch_size]

    def median(fn, n=50):
        for _ in range(5):
            fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    compute = median(lambda: net.loss_and_grad(params, X, T, grad))
    state = ServerState(config, 1)
    worker = state.members.register("w", "sim", [0]).worker_id
    server = median(lambda: state.push(worker, state.store.version, config.batch_size, grad))
    return compute, server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 10, 100, 1000, 10000])
    p.add_argument("--consistency", nargs="+", default=["async", "ssp", "sync"])
    p.add_argument("--rules", nargs="+", default=["none", "divide", "dynsgd", "dcasgd"])
    p.add_argument("--stragglers", choices=["both", "no", "yes"], default="both")
    p.add_argument("--straggler-factor", type=float, default=4.0)
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--evals-per-epoch", type=int, default=4)
    p.add_argument("--layers", default="784,64,10")
    p.add_argument("--delay", default="100us")
    p.add_argument("--step-time", default=None,
                   help="One batch-128 gradient's time (e.g. 0.6ms) instead of measuring it: fixes the virtual "
                        "time scale, so tables from separate runs compare.")
    p.add_argument("--server-time", default=None, help="The server's time per push (e.g. 85us) instead of measuring it.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sgd", action="store_true", help="Plain SGD for every rule (default: momentum 0.9 but for dcasgd).")
    p.add_argument("--quick", action="store_true", help="1, 10, 100 workers, async, 1 epoch")
    p.add_argument("--out", default=None, help="Keep each run's directory under this folder.")
    a = p.parse_args()
    if a.quick:
        a.workers, a.consistency, a.epochs = [w for w in a.workers if w <= 100], ["async"], 1.0
    base = TrainConfig(model=ModelSpec(parse_sizes(a.layers)), epochs=a.epochs, evals_per_epoch=a.evals_per_epoch,
                       seed=a.seed, workers=1)
    data = prepare_data(base)
    n_all = len(data.train) + (len(data.validation) if data.validation is not None else 0)
    compute, server = measure(data.config, data)
    if a.step_time:
        compute = Dist.parse(a.step_time).mean
    if a.server_time:
        server = Dist.parse(a.server_time).mean
    print(f"timings (measured here unless given): one gradient of batch {base.batch_size} {compute * 1e3:.3f} ms, one server push "
          f"{server * 1e6:.0f} us; delay {a.delay} each way; {a.epochs:g} epochs, {a.layers}")
    print(f"{'N':>6} {'mode':<6} {'rule':<7} {'strag':>5} {'test acc':>8} {'to 97%':>10} {'staleness':>9} "
          f"{'updates':>8} {'wall s':>7} {'grad s':>7} {'server s':>8} {'sim s/10k':>9}", flush=True)
    overheads = []
    straggle = {"both": [False, True], "no": [False], "yes": [True]}[a.stragglers]
    for n in a.workers:
        for consistency in a.consistency:
            for rule in a.rules:
                for slow in straggle:
                    optimizer = OptimizerSpec("sgd") if rule == "dcasgd" or a.sgd else OptimizerSpec()
                    out = os.path.join(a.out, f"n{n}-{consistency}-{rule}-{'s' if slow else 'p'}") if a.out else None
                    cfg = base.with_(workers=n, consistency=consistency, staleness_rule=rule, optimizer=optimizer,
                                     out_dir=out).fitted_to(n_all)
                    # the batch a worker sees: its shard's size at most (as a real worker's Minibatches)
                    shard = len(data.train) // n
                    step = compute * min(cfg.batch_size, shard) / cfg.batch_size
                    spec = SimSpec(compute=Dist("lognormal", step, 0.3), delay=Dist.parse(a.delay),
                                   server=Dist("constant", server),
                                   stragglers=max(1, math.ceil(n / 10)) if slow else 0,
                                   straggler_factor=a.straggler_factor, memory_limit_mb=8192)
                    sim = Simulator(dataclasses.replace(data, config=cfg), spec, say=lambda text: None)
                    s = sim.run()
                    if out:
                        sim.finish(s)
                    t97 = s["first_reaching"].get("0.97")
                    m = s["simulation"]
                    overheads.append(m["overhead_per_10k_pushes_s"])
                    print(f"{n:>6} {consistency:<6} {rule:<7} {'yes' if slow else 'no':>5} {s['test_accuracy']:>8.2%} "
                          f"{(f'{t97:.3f} s' if t97 is not None else '-'):>10} {m['staleness_mean']:>9.1f} "
                          f"{s['updates']:>8} {m['wall_s']:>7.1f} {m['gradient_s']:>7.1f} {m['server_s']:>8.1f} "
                          f"{m['overhead_per_10k_pushes_s']:>9.2f}", flush=True)
    if overheads:
        print(f"simulator overhead beyond gradients and the server's own push: median "
              f"{statistics.median(overheads):.2f} s, max {max(overheads):.2f} s per 10,000 pushes")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
