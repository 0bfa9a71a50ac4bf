"""Backpropagation checked against central finite differences (PRML section 5.3.3).

For every parameter w_i: (E(w + eps e_i) - E(w - eps e_i)) / (2 eps), in float64, on a
small random network. The error is ``|g_fd - g_bp| / (|g_fd| + |g_bp|)`` over the whole
vector (norms), which does not blow up for parameters whose gradient is near zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

from .functions import ACTIVATIONS, LOSSES
from .network import MLP, ModelSpec

TOLERANCE = 1e-6
EPSILON = 1e-5


@dataclass(frozen=True)
class GradCheckResult:
    hidden: str
    loss: str
    sizes: tuple[int, ...]
    relative_error: float

    @property
    def ok(self) -> bool:
        return self.relative_error < TOLERANCE


def random_problem(spec: ModelSpec, batch: int, rng: np.random.Generator):
    """Inputs and targets that fit ``spec``: labels, 0/1 values or reals."""
    X = rng.standard_normal((batch, spec.sizes[0]))
    k = spec.sizes[-1]
    if spec.loss == "softmax_ce":
        T = rng.integers(0, k, batch)
    elif spec.loss == "bce":
        T = (rng.random((batch, k)) < 0.5).astype(np.float64)
    else:
        T = rng.standard_normal((batch, k))
    return X, T


def check(hidden: str, loss: str, sizes=(5, 4, 3, 3), batch: int = 7, seed: int = 0) -> GradCheckResult:
    spec = ModelSpec(tuple(sizes), hidden, loss, "float64")
    return GradCheckResult(hidden, loss, tuple(sizes), relative_error(MLP(spec), spec, batch, seed))


# Small stacks that exercise every convolutional layer: both paddings, both poolings, and
# a whole little LeNet (conv, pool, conv, pool, dense, dense).
CONV_ARCHS = (
    "2x6x6,conv3x3x3,4",
    "2x6x6,conv3x3x3same,4",
    "1x6x6,conv3x3x2same,pool2,4",
    "1x6x6,conv3x3x2same,avgpool2,4",
    "1x12x12,conv3x3x3same,pool2,conv3x3x4,pool2,6,4",
)


@dataclass(frozen=True)
class ConvCheckResult:
    arch: str
    hidden: str
    relative_error: float

    @property
    def ok(self) -> bool:
        return self.relative_error < TOLERANCE


def check_conv(arch: str, hidden: str = "tanh", loss: str = "softmax_ce", batch: int = 3, seed: int = 0) -> ConvCheckResult:
    from .convnet import ConvNet

    spec = ModelSpec.from_arch(arch, hidden, loss, "float64")
    return ConvCheckResult(spec.arch, hidden, relative_error(ConvNet(spec), spec, batch, seed))


def check_all_conv(seed: int = 0) -> list[ConvCheckResult]:
    """Every conv stack of CONV_ARCHS with tanh and with ReLU."""
    return [check_conv(a, h, seed=seed) for a in CONV_ARCHS for h in ("tanh", "relu")]


def relative_error(net, spec: ModelSpec, batch: int, seed: int) -> float:
    """``|g_fd - g_bp| / (|g_fd| + |g_bp|)`` at a random point, for any psgd model."""
    rng = np.random.default_rng(seed)
    w = net.init_params(seed) + 0.1 * rng.standard_normal(net.n_params)  # non-zero biases too
    X, T = random_problem(spec, batch, rng)
    _, g_bp = net.loss_and_grad(w, X, T)
    g_bp = g_bp.copy()
    g_fd = np.empty_like(w)
    for i in range(w.size):
        saved = w[i]
        w[i] = saved + EPSILON
        e_plus = net.loss_fn.value(net.preactivations(w, X), T)
        w[i] = saved - EPSILON
        e_minus = net.loss_fn.value(net.preactivations(w, X), T)
        w[i] = saved
        g_fd[i] = (e_plus - e_minus) / (2 * EPSILON)
    denom = np.linalg.norm(g_fd) + np.linalg.norm(g_bp)
    err = float(np.linalg.norm(g_fd - g_bp) / denom) if denom > 0 else 0.0
    return err


def check_all(seed: int = 0) -> list[GradCheckResult]:
    """Every hidden activation with every output/error pair."""
    return [check(h, l, seed=seed) for h, l in product(ACTIVATIONS, LOSSES)]
