"""Layers of a convolutional network: 2-D convolution, 2x2 pooling, flatten and dense.

Activations inside a convolutional stack are kept **channel-first across the batch**,
``(C, N, H, W)``, not ``(N, C, H, W)``: with that order im2col is one strided copy
whose innermost run is a contiguous image row, and a convolution is one matrix product
``W (F, C*k*k) @ cols (C*k*k, N*Ho*Wo) -> (F, N*Ho*Wo)``, whose result is already
``(F, N, Ho, Wo)``, the next layer's input, with no transpose. The network converts its
``(N, C, H, W)`` input once (a free reshape when C is 1, as for MNIST) and flattens back
to ``(N, C*H*W)`` in (C, H, W) order before the first dense layer, PyTorch's order.

Each layer owns no parameters (the flat vector does). A layer states its parameter
shapes, allocates its workspace for one batch size once (``workspace(batch)``), and
then runs ``forward`` and ``backward`` into that workspace: no allocation per step.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..errors import ConfigError


class Layer:
    """``in_shape``/``out_shape`` are per example, in the layer's own order (``(C, H, W)``
    for images, ``(D,)`` for vectors)."""

    params: tuple[tuple[str, tuple[int, ...]], ...] = ()
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def workspace(self, batch: int, dtype) -> dict:
        return {}


class Conv2D(Layer):
    """``F`` filters of ``k x k`` over ``C`` channels, stride 1, 'valid' or 'same' padding.

    Parameters: ``W`` ``(F, C, k, k)`` (PyTorch's order) and ``b`` ``(F,)``. Input and
    output are ``(C, N, H, W)`` and ``(F, N, Ho, Wo)``.
    """

    def __init__(self, in_shape, filters: int, k: int, padding: str = "valid"):
        C, H, W = in_shape
        if padding not in ("valid", "same"):
            raise ConfigError(f"padding must be 'valid' or 'same', got {padding!r}")
        if padding == "same" and k % 2 == 0:
            raise ConfigError(f"'same' padding needs an odd kernel, got {k}x{k}")
        self.pad = (k - 1) // 2 if padding == "same" else 0
        self.k, self.filters, self.padding = k, filters, padding
        Ho, Wo = H + 2 * self.pad - k + 1, W + 2 * self.pad - k + 1
        if Ho <= 0 or Wo <= 0:
            raise ConfigError(f"a {k}x{k} 'valid' convolution does not fit a {H}x{W} image")
        self.in_shape, self.out_shape = (C, H, W), (filters, Ho, Wo)
        self.params = (("W", (filters, C, k, k)), ("b", (filters,)))
        self.fan_in = C * k * k

    def workspace(self, batch, dtype):
        C, H, W = self.in_shape
        F, Ho, Wo = self.out_shape
        p, k = self.pad, self.k
        ws = {
            "cols": np.empty((C, k, k, batch, Ho, Wo), dtype),  # im2col, rows (c, i, j)
            "a": np.empty((F, batch, Ho, Wo), dtype),  # pre-activation
            "dcols": np.empty((C, k, k, batch, Ho, Wo), dtype),
            "dx": np.empty((C, batch, H, W), dtype),
        }
        if p:  # zero borders written once, interiors copied in each step
            ws["xp"] = np.zeros((C, batch, H + 2 * p, W + 2 * p), dtype)
            ws["dxp"] = np.empty((C, batch, H + 2 * p, W + 2 * p), dtype)
        return ws

    def _padded(self, x, ws):
        if not self.pad:
            return x
        p = self.pad
        xp = ws["xp"]
        xp[:, :, p:-p, p:-p] = x
        return xp

    def _im2col(self, xp, cols):
        """``cols[c, i, j, n, y, x] = xp[c, n, y + i, x + j]``: one strided copy."""
        C, N, Hp, Wp = xp.shape
        _, k, _, _, Ho, Wo = cols.shape
        s = xp.strides
        windows = as_strided(xp, (C, k, k, N, Ho, Wo), (s[0], s[2], s[3], s[1], s[2], s[3]), writeable=False)
        np.copyto(cols, windows)

    def forward(self, w, x, ws):
        """``x`` ``(C, N, H, W)`` -> pre-activation ``(F, N, Ho, Wo)`` (a workspace array)."""
        W, b = w
        cols = ws["cols"]
        self._im2col(self._padded(x, ws), cols)
        F = self.filters
        a = ws["a"]
        np.matmul(W.reshape(F, -1), cols.reshape(self.fan_in, -1), out=a.reshape(F, -1))
        a += b[:, None, None, None]
        return a

    def backward(self, w, g, delta, ws, need_dx: bool):
        """``delta`` = dE/da ``(F, N, Ho, Wo)``; writes dE/dW, dE/db into ``g`` and returns
        dE/dx ``(C, N, H, W)`` (or None when ``need_dx`` is false: the first layer)."""
        W, _ = w
        gW, gb = g
        F = self.filters
        d2 = delta.reshape(F, -1)
        cols2 = ws["cols"].reshape(self.fan_in, -1)
        np.matmul(d2, cols2.T, out=gW.reshape(F, -1))
        np.sum(d2, axis=1, out=gb)
        if not need_dx:
            return None
        dcols = ws["dcols"]
        np.matmul(W.reshape(F, -1).T, d2, out=dcols.reshape(self.fan_in, -1))
        # col2im: each kernel offset (i, j) adds one shifted image; k*k vectorised adds
        p, k = self.pad, self.k
        _, H, Wd = self.in_shape
        _, Ho, Wo = self.out_shape
        dxp = ws["dxp"] if p else ws["dx"]
        dxp.fill(0)
        for i in range(k):
            for j in range(k):
                dxp[:, :, i:i + Ho, j:j + Wo] += dcols[:, i, j]
        if p:
            np.copyto(ws["dx"], dxp[:, :, p:p + H, p:p + Wd])
        return ws["dx"]


class Pool2D(Layer):
    """Max or average pooling over 2x2 windows, stride 2: ``(C, N, H, W)`` -> ``(C, N, H/2, W/2)``.

    Max pooling sends the gradient to every input equal to its window's maximum; ties
    (measure zero for real inputs, except ReLU zeros, whose own derivative is 0) would
    share it."""

    def __init__(self, in_shape, kind: str = "max"):
        C, H, W = in_shape
        if kind not in ("max", "avg"):
            raise ConfigError(f"pooling must be max or avg, got {kind!r}")
        if H % 2 or W % 2:
            raise ConfigError(f"2x2 pooling needs an even image size, got {H}x{W}")
        self.kind = kind
        self.in_shape, self.out_shape = (C, H, W), (C, H // 2, W // 2)

    def workspace(self, batch, dtype):
        C, H, W = self.in_shape
        ws = {"out": np.empty((C, batch, H // 2, W // 2), dtype), "dx": np.empty((C, batch, H, W), dtype)}
        if self.kind == "max":
            ws["pair"] = np.empty((C, batch, H // 2, W // 2), dtype)
            ws["mask"] = [np.empty((C, batch, H // 2, W // 2), bool) for _ in range(4)]
        return ws

    @staticmethod
    def _corners(x):
        """The four strided views ``x[..., a::2, b::2]``: one per position in the window
        (elementwise ufuncs on these are far faster than a reduction over a 6-D reshape)."""
        return [x[:, :, a::2, b::2] for a in (0, 1) for b in (0, 1)]

    def forward(self, x, ws):
        """``x`` ``(C, N, H, W)`` -> ``(C, N, H/2, W/2)`` (a workspace array)."""
        c, out = self._corners(x), ws["out"]
        if self.kind == "max":
            np.maximum(c[0], c[1], out=out)
            np.maximum(c[2], c[3], out=ws["pair"])
            np.maximum(out, ws["pair"], out=out)
            for corner, mask in zip(c, ws["mask"]):
                np.equal(corner, out, out=mask)
        else:
            np.add(c[0], c[1], out=out)
            out += c[2]
            out += c[3]
            out *= 0.25
        return out

    def backward(self, delta, ws):
        """dE/d(output) ``(C, N, H/2, W/2)`` -> dE/d(input) ``(C, N, H, W)``."""
        for k, corner in enumerate(self._corners(ws["dx"])):
            if self.kind == "max":
                np.multiply(ws["mask"][k], delta, out=corner)
            else:
                np.multiply(delta, 0.25, out=corner)
        return ws["dx"]


class Dense(Layer):
    """``(N, D)`` -> ``(N, M)``: ``x @ W + b`` with ``W`` ``(D, M)``, as in the MLP."""

    def __init__(self, n_in: int, n_out: int):
        self.in_shape, self.out_shape = (n_in,), (n_out,)
        self.params = (("W", (n_in, n_out)), ("b", (n_out,)))
        self.fan_in = n_in

    def workspace(self, batch, dtype):
        return {"a": np.empty((batch, self.out_shape[0]), dtype), "dx": np.empty((batch, self.in_shape[0]), dtype)}

    def forward(self, w, x, ws):
        W, b = w
        a = ws["a"][:x.shape[0]]
        np.matmul(x, W, out=a)
        a += b
        return a

    def backward(self, w, g, x, delta, ws, need_dx: bool):
        W, _ = w
        gW, gb = g
        np.matmul(x.T, delta, out=gW)
        np.sum(delta, axis=0, out=gb)
        if not need_dx:
            return None
        return np.matmul(delta, W.T, out=ws["dx"][:delta.shape[0]])
