"""Activation functions and error functions, numerically stable, in place where it pays.

Hidden activations h(a) come with the derivative h'(a) applied to a backpropagated
error. Output/error pairs are the canonical ones of PRML section 5.2, for which the
error's derivative with respect to the output pre-activation is simply ``y - t``:

===============  ==================  ===========================
error            output activation   targets
===============  ==================  ===========================
``sse``          identity            real values, shape (B, K)
``bce``          logistic sigmoid    0/1 values, shape (B, K)
``softmax_ce``   softmax             class labels, shape (B,)
===============  ==================  ===========================

Everything here is written to stay finite for pre-activations of magnitude 1e4 and
beyond: exponentials only ever see non-positive arguments.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


# --- hidden activations -------------------------------------------------------------
# Each takes the pre-activation ``a`` and writes h(a) into ``out``. ``scale_by_derivative``
# multiplies ``delta`` in place by h'(a), given ``a`` and ``h = h(a)``.


def _sigmoid(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Logistic sigmoid without overflow: exp() only of -|a|."""
    negative = a < 0  # taken first: ``out`` may be ``a`` itself
    z = np.exp(-np.abs(a))
    np.divide(1.0, 1.0 + z, out=out)
    np.multiply(out, z, out=out, where=negative)  # for a < 0: z / (1 + z)
    return out


class Activation:
    name = ""

    def forward(self, a: np.ndarray, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def scale_by_derivative(self, delta: np.ndarray, a: np.ndarray, h: np.ndarray) -> None:
        raise NotImplementedError


class ReLU(Activation):
    name = "relu"

    def forward(self, a, out):
        return np.maximum(a, 0, out=out)

    def scale_by_derivative(self, delta, a, h):
        np.multiply(delta, h > 0, out=delta)


class Sigmoid(Activation):
    name = "sigmoid"

    def forward(self, a, out):
        return _sigmoid(a, out)

    def scale_by_derivative(self, delta, a, h):
        delta *= h * (1.0 - h)


class Tanh(Activation):
    name = "tanh"

    def forward(self, a, out):
        return np.tanh(a, out=out)

    def scale_by_derivative(self, delta, a, h):
        delta *= 1.0 - h * h


class Softplus(Activation):
    name = "softplus"

    def forward(self, a, out):
        return np.logaddexp(0.0, a, out=out)  # log(1 + e^a), stable both ways

    def scale_by_derivative(self, delta, a, h):
        delta *= _sigmoid(a, np.empty_like(a))


class Identity(Activation):
    name = "identity"

    def forward(self, a, out):
        if out is not a:
            np.copyto(out, a)
        return out

    def scale_by_derivative(self, delta, a, h):
        pass


ACTIVATIONS: dict[str, type[Activation]] = {
    cls.name: cls for cls in (ReLU, Sigmoid, Tanh, Softplus, Identity)
}


def activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None


# --- output activation + error pairs ------------------------------------------------


class Loss:
    """An output activation together with its canonical error function.

    ``value_and_delta(a, t)`` returns the mean error over the batch and writes
    ``(y - t) / B`` (dE/da for the mean error) into ``a`` in place.
    """

    name = ""
    classification = True

    def output(self, a: np.ndarray) -> np.ndarray:
        """The network's output y for output pre-activations ``a`` (B, K)."""
        raise NotImplementedError

    def value(self, a: np.ndarray, t: np.ndarray) -> float:
        """Mean error over the batch, from pre-activations (no overwrite)."""
        raise NotImplementedError

    def value_and_delta(self, a: np.ndarray, t: np.ndarray) -> float:
        raise NotImplementedError


class SumOfSquares(Loss):
    """E = 1/2 sum_k (y_k - t_k)^2 per example, identity output (regression)."""

    name = "sse"
    classification = False

    def output(self, a):
        return a

    def value(self, a, t):
        d = a - t.reshape(a.shape)
        return float(0.5 * np.einsum("ij,ij->", d, d) / a.shape[0])

    def value_and_delta(self, a, t):
        a -= t.reshape(a.shape)
        loss = float(0.5 * np.einsum("ij,ij->", a, a) / a.shape[0])
        a *= 1.0 / a.shape[0]
        return loss


class BinaryCrossEntropy(Loss):
    """E = -sum_k t ln y + (1-t) ln(1-y), sigmoid output, from logits: softplus(a) - t a."""

    name = "bce"

    def output(self, a):
        return _sigmoid(a, np.empty_like(a))

    def value(self, a, t):
        t = t.reshape(a.shape)
        softplus = np.logaddexp(0.0, a)
        return float((softplus - t * a).sum() / a.shape[0])

    def value_and_delta(self, a, t):
        loss = self.value(a, t)
        _sigmoid(a, out=a)
        a -= t.reshape(a.shape)
        a *= 1.0 / a.shape[0]
        return loss


class SoftmaxCrossEntropy(Loss):
    """E = -ln y_t for the true class t, softmax output; targets are integer labels."""

    name = "softmax_ce"

    def output(self, a):
        e = np.exp(a - a.max(axis=1, keepdims=True))
        e /= e.sum(axis=1, keepdims=True)
        return e

    def _log_normaliser(self, a):
        m = a.max(axis=1, keepdims=True)
        return m, np.exp(a - m)

    def value(self, a, t):
        m, e = self._log_normaliser(a)
        rows = np.arange(a.shape[0])
        logp = a[rows, t] - m[:, 0] - np.log(e.sum(axis=1))
        return float(-logp.sum() / a.shape[0])

    def value_and_delta(self, a, t):
        rows = np.arange(a.shape[0])
        m = a.max(axis=1, keepdims=True)
        a -= m  # now every entry <= 0: exp cannot overflow
        true_logit = a[rows, t]
        np.exp(a, out=a)
        s = a.sum(axis=1, keepdims=True)
        loss = float((np.log(s[:, 0]) - true_logit).sum() / a.shape[0])
        a /= s
        a[rows, t] -= 1.0
        a *= 1.0 / a.shape[0]
        return loss


LOSSES: dict[str, type[Loss]] = {
    cls.name: cls for cls in (SumOfSquares, BinaryCrossEntropy, SoftmaxCrossEntropy)
}


def loss(name: str) -> Loss:
    try:
        return LOSSES[name]()
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None


def gradient_buffer(grad, n_params: int, dtype, dropout: float, rng):
    """The flat gradient a step writes into (a new one when ``grad`` is None), after
    checking the step's dropout: in [0, 1), and with a random generator when used."""
    if dropout and rng is None:
        raise ConfigError("dropout needs a random generator")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    return np.empty(n_params, dtype=dtype) if grad is None else grad
