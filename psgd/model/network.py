"""A multi-layer perceptron on one flat parameter vector (PRML ch. 5), pure numpy.

    y(x, w) = h_L(W_L ... h_1(W_1 x + b_1) ... + b_L)

Weight matrices are stored as ``(fan_in, fan_out)`` so that a minibatch ``X`` of shape
``(B, fan_in)`` goes forward as ``X @ W + b`` with no transposes. The network owns no
parameters: every method takes the flat vector, so the same object serves a worker
computing gradients, the server holding the weights and an evaluator reading a snapshot.

Backpropagation costs O(W) per example: one matrix product forward and two back per
layer (one for the first layer, whose input needs no error signal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import functions
from ..errors import ConfigError
from .layout import Layout

EVAL_CHUNK = 4096  # rows per forward pass when evaluating a whole data set
INIT_CHUNK = 1 << 20  # random values drawn at a time by init_range (8 MB of float64)


@dataclass(frozen=True)
class ModelSpec:
    """What defines a network; travels in the server's welcome so workers build the same one.

    ``sizes`` are the layer widths from input to output, e.g. ``(784, 256, 256, 10)``.
    ``arch`` (empty for an MLP) is a convolutional stack in the syntax of
    :mod:`psgd.model.arch`; then ``sizes`` are the flat input width and the dense widths
    (``(784, 120, 84, 10)`` for LeNet-5), what the data checks compare with.
    ``factory`` (``package.module:callable``) names a user's model; it stays in this
    process's config and never goes on the wire (see :meth:`wire_dict`).
    """

    sizes: tuple[int, ...] = (784, 256, 256, 10)
    hidden: str = "relu"
    loss: str = "softmax_ce"
    dtype: str = "float32"
    arch: str = ""
    factory: str = ""

    def __post_init__(self):
        if len(self.sizes) < 2 or any(int(n) <= 0 for n in self.sizes):
            raise ConfigError(f"layer sizes must be two or more positive integers, got {self.sizes}")
        if self.arch and self.factory:
            raise ConfigError("a model is built in (--arch) or the user's (--model module:factory), not both")
        if self.arch:
            from .arch import canonical, dense_sizes  # arch imports nothing from here

            if self.arch != canonical(self.arch) or tuple(self.sizes) != dense_sizes(self.arch):
                raise ConfigError(f"model description is inconsistent: arch {self.arch!r} with sizes {self.sizes}")
        functions.activation(self.hidden)
        functions.loss(self.loss)
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}")

    @classmethod
    def from_arch(cls, arch: str, hidden: str = "relu", loss: str = "softmax_ce", dtype: str = "float32") -> "ModelSpec":
        """A convolutional network's description from an architecture string."""
        from .arch import canonical, dense_sizes

        return cls(dense_sizes(arch), hidden, loss, dtype, arch=canonical(arch))

    def to_dict(self) -> dict:
        d = {"sizes": list(self.sizes), "hidden": self.hidden, "loss": self.loss, "dtype": self.dtype}
        if self.arch:
            d["arch"] = self.arch
        if self.factory:
            d["factory"] = self.factory
        return d

    def wire_dict(self) -> dict:
        """What a server tells its workers: no module names (a worker loads a user's model
        from its own --model option; the server never tells anyone what code to run)."""
        d = self.to_dict()
        if d.pop("factory", None):
            d["user"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        try:
            return cls(tuple(int(n) for n in d["sizes"]), str(d["hidden"]), str(d["loss"]), str(d["dtype"]),
                       str(d.get("arch", "")), str(d.get("factory", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed model description: {exc!r}") from None


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"784,256,10"`` -> ``(784, 256, 10)``, with a clear error for anything else."""
    try:
        sizes = tuple(int(part) for part in text.replace("-", ",").split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"layer sizes must look like 784,256,10; got {text!r}") from None
    ModelSpec(sizes)  # validates
    return sizes


class _Workspace:
    """Activation buffers for one batch size, reused from step to step (no allocation)."""

    def __init__(self, sizes, batch, dtype):
        hidden = sizes[1:-1]
        self.a = [np.empty((batch, n), dtype) for n in sizes[1:]]  # pre-activations
        self.h = [np.empty((batch, n), dtype) for n in hidden]  # h(a), before dropout
        self.delta = [np.empty((batch, n), dtype) for n in hidden]  # dE/da
        self.mask = [np.empty((batch, n), dtype) for n in hidden]  # dropout: 0 or 1/(1-p)
        self.thinned = [np.empty((batch, n), dtype) for n in hidden]  # h * mask


class MLP:
    """Forward pass, error and gradient of a multi-layer perceptron.

    Shapes: ``X`` is ``(B, sizes[0])``; targets ``T`` are ``(B,)`` integer labels for
    ``softmax_ce`` and ``(B, sizes[-1])`` (or ``(B,)`` when there is one output) otherwise.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.sizes = tuple(spec.sizes)
        self.dtype = np.dtype(spec.dtype)
        self.hidden = functions.activation(spec.hidden)
        self.loss_fn = functions.loss(spec.loss)
        shapes = []
        for i, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:]), start=1):
            shapes += [(f"W{i}", (n_in, n_out)), (f"b{i}", (n_out,))]
        self.layout = Layout.from_shapes(shapes)
        self.n_layers = len(self.sizes) - 1
        self._workspaces: dict[int, _Workspace] = {}

    # --- parameters -------------------------------------------------------------------

    @property
    def n_params(self) -> int:
        return self.layout.size

    def init_params(self, seed: int = 0) -> np.ndarray:
        """A fresh flat parameter vector: He-normal weights for ReLU, Glorot-uniform
        otherwise, zero biases. The same seed gives the same vector on every machine."""
        return self.init_range(seed, 0, self.n_params)

    def init_range(self, seed: int, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """``init_params(seed)[lo:hi]`` (into ``out``, shape ``(hi - lo,)``, if given),
        without the whole vector: the random stream is drawn in chunks of INIT_CHUNK
        values, in the same order (a Generator's stream does not depend on how the draws
        are split), and only the part inside ``[lo, hi)`` is kept. Memory: the range plus
        one chunk, where the whole layer's float64 draw of a 100M-parameter model took 0.5 GB.
        """
        out = np.empty(hi - lo, self.dtype) if out is None else out
        out[...] = 0  # the biases
        rng = np.random.default_rng(seed)
        slots = {s.name: s for s in self.layout.slots}
        for i, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:]), start=1):
            slot = slots[f"W{i}"]
            if slot.offset >= hi:
                break  # nothing later is kept: no need to draw it
            relu = self.spec.hidden == "relu" and i < self.n_layers
            limit = np.sqrt(6.0 / (n_in + n_out))
            for a in range(0, slot.size, INIT_CHUNK):
                b = min(a + INIT_CHUNK, slot.size)
                w = rng.standard_normal(b - a) * np.sqrt(2.0 / n_in) if relu else rng.uniform(-limit, limit, b - a)
                first, last = max(slot.offset + a, lo), min(slot.offset + b, hi)
                if first < last:
                    out[first - lo:last - lo] = w[first - slot.offset - a:last - slot.offset - a]
        return out

    def weight_mask(self) -> np.ndarray:
        """1 for weight-matrix entries, 0 for biases: where L2 weight decay applies."""
        return self.weight_mask_range(0, self.n_params)

    def weight_mask_range(self, lo: int, hi: int) -> np.ndarray:
        """``weight_mask()[lo:hi]``, built for the range alone."""
        return self.layout.mask(lambda name: name.startswith("W"), self.dtype, lo, hi)

    def _weights(self, params):
        views = self.layout.views(params)
        return [(views[f"W{i}"], views[f"b{i}"]) for i in range(1, self.n_layers + 1)]

    # --- forward ----------------------------------------------------------------------

    def _check_input(self, X):
        if X.ndim != 2 or X.shape[1] != self.sizes[0]:
            raise ConfigError(f"input has shape {X.shape}; the network takes (batch, {self.sizes[0]})")

    def preactivations(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Output-layer pre-activations ``(B, K)`` for inputs ``X`` ``(B, D)``, no dropout."""
        self._check_input(X)
        h = X
        layers = self._weights(params)
        for i, (W, b) in enumerate(layers):
            a = h @ W
            a += b
            h = self.hidden.forward(a, a) if i < len(layers) - 1 else a
        return a

    def forward(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        """The network output y ``(B, K)``: probabilities for the classifiers."""
        return self.loss_fn.output(self.preactivations(params, X))

    def evaluate(self, params: np.ndarray, X: np.ndarray, T: np.ndarray) -> tuple[float, float | None]:
        """Mean error and accuracy over a whole data set, in chunks.

        Accuracy is the fraction of correct labels for ``softmax_ce``, of correct 0/1
        outputs (threshold 0.5) for ``bce``, and ``None`` for regression."""
        total_loss, correct = 0.0, 0
        n = X.shape[0]
        for start in range(0, n, EVAL_CHUNK):
            x, t = X[start:start + EVAL_CHUNK], T[start:start + EVAL_CHUNK]
            a = self.preactivations(params, x)
            total_loss += self.loss_fn.value(a, t) * x.shape[0]
            if self.spec.loss == "softmax_ce":
                correct += int((a.argmax(axis=1) == t).sum())
            elif self.spec.loss == "bce":
                correct += int(((a > 0) == (t.reshape(a.shape) > 0.5)).all(axis=1).sum())
        accuracy = correct / n if self.loss_fn.classification else None
        return total_loss / n, accuracy

    # --- gradient ---------------------------------------------------------------------

    def loss_and_grad(
        self,
        params: np.ndarray,
        X: np.ndarray,
        T: np.ndarray,
        grad: np.ndarray | None = None,
        dropout: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> tuple[float, np.ndarray]:
        """Mean error over the minibatch and its gradient by backpropagation.

        The gradient is a flat vector of the layout (written into ``grad`` when given, so a
        worker can compute straight into a send buffer). ``dropout`` is the probability of
        dropping each hidden unit (inverted dropout: kept units are scaled by 1/(1-p)); it
        needs ``rng``. The reported error is that of the thinned network.
        """
        self._check_input(X)
        B = X.shape[0]
        grad = functions.gradient_buffer(grad, self.n_params, self.dtype, dropout, rng)
        ws = self._workspace(B)
        layers = self._weights(params)
        gviews = self._weights(grad)
        last = self.n_layers - 1

        # forward: a[i] = h[i-1] @ W + b; h[i] = act(a[i]), thinned by dropout
        inputs = [X]
        h = X
        for i, (W, b) in enumerate(layers):
            a = ws.a[i]
            np.matmul(h, W, out=a)
            a += b
            if i == last:
                break
            h = self.hidden.forward(a, ws.h[i])
            if dropout:
                mask = ws.mask[i]
                rng.random(out=mask, dtype=self.dtype.type)
                np.greater_equal(mask, dropout, out=mask)
                mask *= 1.0 / (1.0 - dropout)
                h = np.multiply(h, mask, out=ws.thinned[i])
            inputs.append(h)

        loss = self.loss_fn.value_and_delta(ws.a[last], T)
        delta = ws.a[last]

        # backward: dW = h[i-1].T @ delta, db = sum(delta), delta[i-1] = (delta @ W.T) * act'
        for i in range(last, -1, -1):
            W, _ = layers[i]
            gW, gb = gviews[i]
            np.matmul(inputs[i].T, delta, out=gW)
            np.sum(delta, axis=0, out=gb)
            if i == 0:
                break
            prev = ws.delta[i - 1]
            np.matmul(delta, W.T, out=prev)
            if dropout:
                prev *= ws.mask[i - 1]
            self.hidden.scale_by_derivative(prev, ws.a[i - 1], ws.h[i - 1])
            delta = prev
        return loss, grad

    def _workspace(self, batch: int) -> _Workspace:
        ws = self._workspaces.get(batch)
        if ws is None:
            if len(self._workspaces) > 8:  # many odd batch sizes: keep memory bounded
                self._workspaces.clear()
            ws = self._workspaces[batch] = _Workspace(self.sizes, batch, self.dtype)
        return ws
