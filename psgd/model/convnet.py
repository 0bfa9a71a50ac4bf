"""A convolutional network (e.g. LeNet-5) on one flat parameter vector, pure numpy.

Built from an architecture string (:mod:`psgd.model.arch`); the same interface as the
MLP (:mod:`psgd.model.interface`), so the server, its shards, checkpoints and the wire
see one flat vector and nothing else. Inputs arrive as rows ``(B, C*H*W)`` (a data set's
flat images) or as ``(B, C, H, W)``; either is reshaped, not copied.
"""

from __future__ import annotations

from math import prod

import numpy as np

from . import arch as arch_mod
from . import functions
from ..errors import ConfigError
from .layers import Conv2D, Dense, Pool2D
from .layout import Layout
from .network import EVAL_CHUNK, ModelSpec


class ConvNet:
    """Forward pass, error and gradient of a stack of convolutions, poolings and dense layers.

    Shapes: ``X`` is ``(B, C*H*W)`` or ``(B, C, H, W)``; targets as for the MLP.
    Parameters are named ``L{i}.W``/``L{i}.b`` for the i-th layer that has weights:
    convolutions ``(F, C, k, k)``, dense layers ``(fan_in, fan_out)``.
    """

    def __init__(self, spec: ModelSpec):
        if not spec.arch:
            raise ConfigError("a convolutional network needs an architecture string")
        self.spec = spec
        self.dtype = np.dtype(spec.dtype)
        self.hidden = functions.activation(spec.hidden)
        self.loss_fn = functions.loss(spec.loss)
        self.input_shape, tokens = arch_mod.parse(spec.arch)
        self.layers: list = []
        shape: tuple[int, ...] = self.input_shape
        for t in tokens:
            if isinstance(t, arch_mod.ConvToken):
                layer = Conv2D(shape, t.filters, t.k, t.padding)
            elif isinstance(t, arch_mod.PoolToken):
                layer = Pool2D(shape, t.kind)
            else:
                layer = Dense(prod(shape), t.units)
            self.layers.append(layer)
            shape = layer.out_shape
        self.first_dense = next(i for i, layer in enumerate(self.layers) if isinstance(layer, Dense))
        named, self._slots = [], []  # _slots[i]: names of layer i's parameters (or ())
        n = 0
        for layer in self.layers:
            if layer.params:
                n += 1
                named += [(f"L{n}.{p}", s) for p, s in layer.params]
                self._slots.append(tuple(f"L{n}.{p}" for p, _ in layer.params))
            else:
                self._slots.append(())
        self.layout = Layout.from_shapes(named)
        self.sizes = spec.sizes
        self._workspaces: dict[int, list] = {}

    # --- parameters -------------------------------------------------------------------

    @property
    def n_params(self) -> int:
        return self.layout.size

    def init_params(self, seed: int = 0) -> np.ndarray:
        """He-normal weights for ReLU (Glorot-uniform otherwise, and for the output layer),
        zero biases; fan-in of a convolution is C*k*k. Same seed, same vector everywhere."""
        rng = np.random.default_rng(seed)
        flat = np.zeros(self.n_params, dtype=self.dtype)
        views = self.layout.views(flat)
        last = len(self.layers) - 1
        for i, (layer, names) in enumerate(zip(self.layers, self._slots)):
            if not names:
                continue
            W = views[names[0]]
            fan_out = W.shape[0] * prod(W.shape[2:]) if isinstance(layer, Conv2D) else W.shape[1]
            if self.spec.hidden == "relu" and i < last:
                W[...] = rng.standard_normal(W.shape) * np.sqrt(2.0 / layer.fan_in)
            else:
                limit = np.sqrt(6.0 / (layer.fan_in + fan_out))
                W[...] = rng.uniform(-limit, limit, W.shape)
        return flat

    def weight_mask(self) -> np.ndarray:
        """1 for weights, 0 for biases: where L2 weight decay applies."""
        return self.layout.mask(lambda name: name.endswith(".W"), self.dtype)

    def _views(self, flat):
        views = self.layout.views(flat)
        return [tuple(views[n] for n in names) for names in self._slots]

    # --- forward ----------------------------------------------------------------------

    def _as_cnhw(self, X):
        """``(C, N, H, W)`` for the first layer: a view when C is 1, else one transpose."""
        C, H, W = self.input_shape
        if X.ndim == 2 and X.shape[1] == C * H * W or X.ndim == 4 and X.shape[1:] == (C, H, W):
            x = X.reshape(X.shape[0], C, H, W)
            return x.reshape(1, X.shape[0], H, W) if C == 1 else np.ascontiguousarray(x.transpose(1, 0, 2, 3))
        raise ConfigError(f"input has shape {X.shape}; the network takes (batch, {C * H * W}) or (batch, {C}, {H}, {W})")

    def _workspace(self, batch: int) -> list:
        ws = self._workspaces.get(batch)
        if ws is None:
            if len(self._workspaces) > 8:  # many odd batch sizes: keep memory bounded
                self._workspaces.clear()
            ws = []
            for layer in self.layers:
                w = layer.workspace(batch, self.dtype)
                if not isinstance(layer, Pool2D):
                    w["h"] = np.empty((layer.out_shape[0], batch) + layer.out_shape[1:], self.dtype) \
                        if isinstance(layer, Conv2D) else np.empty((batch, layer.out_shape[0]), self.dtype)
                    w["mask"] = np.empty_like(w["h"]) if isinstance(layer, Dense) else None
                ws.append(w)
            if self.first_dense > 0:  # the flatten, both ways
                prev = self.layers[self.first_dense - 1].out_shape
                ws[self.first_dense]["flat"] = np.empty((batch, prod(prev)), self.dtype)
                ws[self.first_dense]["unflat"] = np.empty((prev[0], batch) + prev[1:], self.dtype)
            self._workspaces[batch] = ws
        return ws

    def _forward(self, params, X, ws, dropout=0.0, rng=None):
        """Run every layer; returns the inputs each layer saw and the output pre-activation."""
        weights = self._views(params)
        x = self._as_cnhw(X)
        B = X.shape[0]
        inputs = []
        last = len(self.layers) - 1
        for i, (layer, w, lw) in enumerate(zip(self.layers, weights, ws)):
            if i == self.first_dense and i > 0:  # (C, N, H, W) -> (N, C*H*W), PyTorch's flatten order
                flat = lw["flat"][:B]
                np.copyto(flat.reshape((B, x.shape[0]) + x.shape[2:]), x.transpose(1, 0, 2, 3))
                x = flat
            inputs.append(x)
            if isinstance(layer, Pool2D):
                x = layer.forward(x, lw)
                continue
            a = layer.forward(w, x, lw)
            if i == last:
                return inputs, a
            x = self.hidden.forward(a, lw["h"])
            if dropout and isinstance(layer, Dense):
                mask = lw["mask"]
                rng.random(out=mask, dtype=self.dtype.type)
                np.greater_equal(mask, dropout, out=mask)
                mask *= 1.0 / (1.0 - dropout)
                x = x * mask  # rare path (dropout on), allocation accepted
        raise AssertionError("unreachable: the last layer is dense")

    def preactivations(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Output pre-activations ``(B, K)`` (a fresh array), no dropout."""
        _, a = self._forward(params, X, self._workspace(X.shape[0]))
        return a.copy()

    def forward(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        return self.loss_fn.output(self.preactivations(params, X))

    def evaluate(self, params: np.ndarray, X: np.ndarray, T: np.ndarray) -> tuple[float, float | None]:
        """Mean error and accuracy over a whole data set, in chunks."""
        total_loss, correct = 0.0, 0
        n = X.shape[0]
        chunk = min(EVAL_CHUNK, 1024)  # convolution workspaces are large per example
        for start in range(0, n, chunk):
            x, t = X[start:start + chunk], T[start:start + chunk]
            _, a = self._forward(params, x, self._workspace(x.shape[0]))
            total_loss += self.loss_fn.value(a, t) * x.shape[0]
            if self.spec.loss == "softmax_ce":
                correct += int((a.argmax(axis=1) == t).sum())
            elif self.spec.loss == "bce":
                correct += int(((a > 0) == (t.reshape(a.shape) > 0.5)).all(axis=1).sum())
        return total_loss / n, (correct / n if self.loss_fn.classification else None)

    # --- gradient ---------------------------------------------------------------------

    def loss_and_grad(self, params, X, T, grad=None, dropout: float = 0.0, rng=None):
        """Mean error over the minibatch and its gradient (flat, into ``grad`` when given).
        ``dropout`` thins the hidden dense layers (inverted dropout; needs ``rng``)."""
        grad = functions.gradient_buffer(grad, self.n_params, self.dtype, dropout, rng)
        ws = self._workspace(X.shape[0])
        inputs, a = self._forward(params, X, ws, dropout, rng)
        loss = self.loss_fn.value_and_delta(a, T)
        delta = a
        weights, grads = self._views(params), self._views(grad)
        for i in range(len(self.layers) - 1, -1, -1):
            layer, lw = self.layers[i], ws[i]
            if isinstance(layer, Pool2D):
                delta = layer.backward(delta, lw)
            elif isinstance(layer, Dense):
                delta = layer.backward(weights[i], grads[i], inputs[i], delta, lw, need_dx=i > 0)
            else:
                delta = layer.backward(weights[i], grads[i], delta, lw, need_dx=i > 0)
            if i == 0:
                break
            if i == self.first_dense:  # (N, C*H*W) -> (C, N, H, W)
                unflat = lw["unflat"]
                np.copyto(unflat, delta.reshape((unflat.shape[1], unflat.shape[0]) + unflat.shape[2:]).transpose(1, 0, 2, 3))
                delta = unflat
            below = self.layers[i - 1]
            if not isinstance(below, Pool2D):  # through the activation of the layer below
                if dropout and isinstance(below, Dense):
                    delta *= ws[i - 1]["mask"]
                self.hidden.scale_by_derivative(delta, ws[i - 1]["a"], ws[i - 1]["h"])
        return loss, grad
