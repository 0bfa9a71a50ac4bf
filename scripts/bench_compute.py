"""Forward+backward time per minibatch and training samples/s, psgd against PyTorch CPU.

    python scripts/bench_compute.py [--repeats 200] [--keep-blas-env]

For a 784-256-256-10 ReLU/softmax network: the median time of one forward+backward pass
at batch 64, 128 and 256, and samples/s of a whole training step (gradient plus a
momentum update) at batch 128, on 1 and on 2 threads. PyTorch runs the same model with
the same thread count where it is installed (``pip install torch==2.13.0``); the ratio
column is psgd / PyTorch time (below 1.0: psgd is faster).

Then LeNet-5 (conv5x5x6same, maxpool, conv5x5x16, maxpool, 120, 84, 10; ReLU): forward+
backward at batch 64 and 128 on 1 and 2 threads against the same PyTorch model, and where
psgd's time goes (cProfile, one thread, batch 128).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import blas_description, clean_blas_env, have_torch, median_time, torch_mlp  # noqa: E402

clean_blas_env(sys.argv)

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from psgd.model import arch  # noqa: E402
from psgd.model.convnet import ConvNet  # noqa: E402
from psgd.model.network import MLP, ModelSpec  # noqa: E402
from psgd.model.optim import OptimizerSpec, make_optimizer  # noqa: E402

SIZES = (784, 256, 256, 10)


def psgd_case(batch):
    net = MLP(ModelSpec(SIZES))
    params = net.init_params(0)
    grad = np.empty_like(params)
    rng = np.random.default_rng(0)
    X = rng.random((batch, SIZES[0]), dtype=np.float32)
    y = rng.integers(0, SIZES[-1], batch)
    opt = make_optimizer(OptimizerSpec("momentum", 0.9), net.n_params)

    def fwd_bwd():
        net.loss_and_grad(params, X, y, grad)

    def step():
        net.loss_and_grad(params, X, y, grad)
        opt.step(params, grad, 0.01)

    return fwd_bwd, step


def torch_case(batch):
    import torch
    model = torch_mlp(SIZES)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    X = torch.rand((batch, SIZES[0]), generator=g)
    y = torch.randint(0, SIZES[-1], (batch,), generator=g)

    def fwd_bwd():
        for p in model.parameters():
            p.grad = None
        loss_fn(model(X), y).backward()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()
        opt.step()

    return fwd_bwd, step


def lenet_case(batch):
    net = ConvNet(ModelSpec.from_arch(arch.named("lenet5")))
    params = net.init_params(0)
    grad = np.empty_like(params)
    rng = np.random.default_rng(0)
    X = rng.random((batch, 784), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    return lambda: net.loss_and_grad(params, X, y, grad)


def torch_lenet_case(batch):
    import torch
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    X = torch.rand((batch, 1, 28, 28), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def fwd_bwd():
        for p in model.parameters():
            p.grad = None
        loss_fn(model(X), y).backward()

    return fwd_bwd


def lenet_profile(batch=128, steps=30):
    """psgd's LeNet-5 time by function (cProfile's own time, one thread)."""
    import cProfile
    import pstats
    fn = lenet_case(batch)
    fn()
    prof = cProfile.Profile()
    with threadpool_limits(1):
        prof.runcall(lambda: [fn() for _ in range(steps)])
    stats = pstats.Stats(prof).stats
    rows = sorted(((tt, f"{os.path.basename(k[0])}:{k[1]}({k[2]})") for k, (_, _, tt, _, _) in stats.items()), reverse=True)
    total = sum(tt for tt, _ in rows)
    print(f"\nwhere psgd's LeNet-5 time goes (batch {batch}, 1 thread, {total / steps * 1e3:.1f} ms per step):")
    for tt, name in rows[:8]:
        print(f"  {tt / total:6.1%}  {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--lenet-repeats", type=int, default=50)
    ap.add_argument("--lenet-only", action="store_true", help="Skip the MLP figures.")
    args = ap.parse_args()
    torch_ok = have_torch()
    if torch_ok:
        import torch
        torch_info = f"PyTorch {torch.__version__}"
    else:
        torch_info = "PyTorch not installed: psgd figures only"
    print(f"model {'-'.join(map(str, SIZES))} relu/softmax_ce float32; {torch_info}")
    print(blas_description())
    print()
    print(f"{'threads':>7} {'what':<26} {'psgd':>10} {'pytorch':>10} {'ratio':>7}")
    for threads in (1, 2) if not args.lenet_only else ():
        with threadpool_limits(threads):
            if torch_ok:
                torch.set_num_threads(threads)
            for batch in (64, 128, 256):
                ours = median_time(psgd_case(batch)[0], args.repeats)
                theirs = median_time(torch_case(batch)[0], args.repeats) if torch_ok else None
                ratio = f"{ours / theirs:7.2f}" if theirs else "      -"
                th = f"{theirs * 1e3:8.3f}ms" if theirs else "         -"
                print(f"{threads:>7} {'fwd+bwd batch ' + str(batch):<26} {ours * 1e3:8.3f}ms {th} {ratio}")
            batch = 128
            ours = batch / median_time(psgd_case(batch)[1], args.repeats)
            theirs = batch / median_time(torch_case(batch)[1], args.repeats) if torch_ok else None
            ratio = f"{theirs / ours:7.2f}" if theirs else "      -"  # time ratio = inverse of rate ratio
            th = f"{theirs / 1e3:7.1f}k/s" if theirs else "         -"
            print(f"{threads:>7} {'train step samples/s b128':<26} {ours / 1e3:7.1f}k/s {th} {ratio}")
    print(f"\nLeNet-5 (61,706 parameters), forward+backward; {torch_info}")
    print(f"{'threads':>7} {'what':<26} {'psgd':>10} {'pytorch':>10} {'ratio':>7}")
    for threads in (1, 2):
        with threadpool_limits(threads):
            if torch_ok:
                torch.set_num_threads(threads)
            for batch in (64, 128):
                ours = median_time(lenet_case(batch), args.lenet_repeats)
                theirs = median_time(torch_lenet_case(batch), args.lenet_repeats) if torch_ok else None
                ratio = f"{ours / theirs:7.2f}" if theirs else "      -"
                th = f"{theirs * 1e3:8.3f}ms" if theirs else "         -"
                print(f"{threads:>7} {'lenet5 fwd+bwd batch ' + str(batch):<26} {ours * 1e3:8.3f}ms {th} {ratio}")
    lenet_profile()
    print("\nratio = psgd time / PyTorch time: <= 1.0 means psgd is at least as fast")


if __name__ == "__main__":
    main()
