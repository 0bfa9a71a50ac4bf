"""PyTorch modules as psgd models (``pip install 'psgd[torch]'``).

:class:`TorchModel` wraps a ``torch.nn.Module`` and a loss so that psgd sees the model
interface of :mod:`psgd.model.interface`: the module's parameters become views of psgd's
one flat parameter vector, and backward writes its gradients straight into psgd's flat
gradient buffer (on the CPU, ``torch.from_numpy`` shares the memory: nothing is copied).
Every psgd feature then applies unchanged: server shards, staleness rules, checkpoints.

On a GPU (``device="cuda"``) the flat vectors live on the device: each step copies the
weights in and the gradient out (the server and the wire stay on the CPU). That path is
written but has not been run on a GPU here.

A user's factory, for ``psgd train --model mypackage.mymodule:make``::

    import torch.nn as nn
    import torch.nn.functional as F
    from psgd.torch import TorchModel

    def make():
        net = nn.Sequential(nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
        return TorchModel(net, F.cross_entropy, input_shape=(1, 28, 28))
"""

from __future__ import annotations

from math import prod

import numpy as np

from .errors import ConfigError
from .model.layout import Layout

try:
    import torch
except ImportError:  # psgd works without torch; only this module needs it
    torch = None

EVAL_CHUNK = 2048


class TorchModel:
    """A ``torch.nn.Module`` and a loss ``loss(output, target) -> mean scalar`` as a psgd model.

    ``X`` rows ``(B, D)`` are reshaped to ``(B, *input_shape)`` (when given) before the
    module sees them; targets ``T`` go to the loss as they are (int64 labels for
    ``F.cross_entropy``). Outputs ``(B, K)``; accuracy is ``argmax == T``.
    """

    def __init__(self, module, loss, input_shape: tuple[int, ...] | None = None, device: str = "cpu",
                 classification: bool = True):
        if torch is None:
            raise ConfigError("psgd.torch needs PyTorch: pip install 'psgd[torch]'")
        self.module = module.to(device)
        self.loss = loss
        self.input_shape = tuple(input_shape) if input_shape else None
        self.device = torch.device(device)
        self.classification = classification
        named = [(name, tuple(p.shape)) for name, p in self.module.named_parameters()]
        if not named:
            raise ConfigError("the torch module has no parameters to train")
        self.layout = Layout.from_shapes(named)
        self.n_params = self.layout.size
        self._params = [p for _, p in self.module.named_parameters()]
        dtypes = {p.dtype for p in self._params}
        if dtypes - {torch.float32, torch.float64} or len(dtypes) > 1:
            raise ConfigError(f"the torch module's parameters must all be float32 or all float64, got {dtypes}")
        self.torch_dtype = dtypes.pop()
        self.dtype = np.dtype("float32" if self.torch_dtype == torch.float32 else "float64")
        self.description = f"torch {self.module!r} loss={getattr(loss, '__name__', repr(loss))}"
        self._bound = (None, None)  # (params address, grad address) the module's tensors view
        self._on_cpu = self.device.type == "cpu"
        if not self._on_cpu:
            self._flat = torch.empty(self.n_params, dtype=self.torch_dtype, device=self.device)
            self._gflat = torch.empty_like(self._flat)

    # --- the flat vector ----------------------------------------------------------------

    def _bind(self, params: np.ndarray, grad: np.ndarray | None) -> None:
        """Make every parameter (and its .grad) a view of the flat vectors. On the CPU they
        are psgd's own buffers; rebinding happens only when psgd hands over another one."""
        if self._on_cpu:
            key = (params.__array_interface__["data"][0], None if grad is None else grad.__array_interface__["data"][0])
            if key == self._bound:
                return
            flat = torch.from_numpy(params)
            gflat = torch.from_numpy(grad) if grad is not None else None
            self._bound = key
        else:
            flat, gflat = self._flat, self._gflat
        for p, slot in zip(self._params, self.layout.slots):
            p.data = flat[slot.offset:slot.end].view(slot.shape)
            p.grad = gflat[slot.offset:slot.end].view(slot.shape) if gflat is not None else None

    def _load(self, params: np.ndarray, grad: np.ndarray | None = None) -> None:
        if params.dtype != self.dtype or not params.flags.c_contiguous:
            raise ConfigError(f"parameters must be a contiguous {self.dtype} vector")
        self._bind(params, grad)
        if not self._on_cpu:
            self._flat.copy_(torch.from_numpy(params))

    def init_params(self, seed: int = 0) -> np.ndarray:
        """The module's own initialisation (``reset_parameters``), under ``torch.manual_seed(seed)``."""
        flat = np.zeros(self.n_params, self.dtype)
        self._bound = (None, None)
        self._load(flat)
        with torch.random.fork_rng(devices=[] if self._on_cpu else [self.device]):
            torch.manual_seed(seed)
            with torch.no_grad():
                for m in self.module.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
        if not self._on_cpu:
            flat[...] = self._flat.cpu().numpy()
        self._bound = (None, None)  # psgd owns ``flat`` now; do not keep writing into it
        return flat

    def weight_mask(self) -> np.ndarray:
        """1 for parameters of two or more dimensions (weights), 0 for biases and norms."""
        mask = np.zeros(self.n_params, self.dtype)
        for slot in self.layout.slots:
            if len(slot.shape) > 1:
                mask[slot.offset:slot.end] = 1
        return mask

    # --- computing ----------------------------------------------------------------------

    def _inputs(self, X: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(X, dtype=self.dtype))
        if self.input_shape is not None:
            if prod(x.shape[1:]) != prod(self.input_shape):
                raise ConfigError(f"input rows of {prod(x.shape[1:])} values do not fit the shape {self.input_shape}")
            x = x.reshape((x.shape[0],) + self.input_shape)
        return x.to(self.device)

    def _targets(self, T: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(T)).to(self.device)

    def loss_and_grad(self, params, X, T, grad=None, dropout: float = 0.0, rng=None):
        """Mean loss and its gradient, written into ``grad`` (the module's .grad tensors are
        views of it on the CPU). psgd's ``dropout`` is not used: put nn.Dropout in the module."""
        if grad is None:
            grad = np.empty(self.n_params, self.dtype)
        self._load(params, grad)
        if self._on_cpu:
            grad.fill(0)  # backward accumulates into the views
        else:
            self._gflat.zero_()
        self.module.train()
        loss = self.loss(self.module(self._inputs(X)), self._targets(T))
        loss.backward()
        if self._on_cpu:
            for p, slot in zip(self._params, self.layout.slots):
                if p.grad is not None and p.grad.data_ptr() != grad[slot.offset:].__array_interface__["data"][0]:
                    grad[slot.offset:slot.end] = p.grad.reshape(-1).numpy()  # torch replaced the view
                    p.grad = torch.from_numpy(grad)[slot.offset:slot.end].view(slot.shape)
        else:
            grad[...] = self._gflat.cpu().numpy()
        return float(loss.detach()), grad

    def evaluate(self, params, X, T):
        """Mean loss and accuracy (argmax) over a data set, in chunks, without gradients."""
        self._load(params)
        self.module.eval()
        total, correct, n = 0.0, 0, X.shape[0]
        with torch.no_grad():
            for start in range(0, n, EVAL_CHUNK):
                x, t = self._inputs(X[start:start + EVAL_CHUNK]), self._targets(T[start:start + EVAL_CHUNK])
                out = self.module(x)
                total += float(self.loss(out, t)) * x.shape[0]
                if self.classification:
                    correct += int((out.argmax(dim=1) == t).sum())
        return total / n, (correct / n if self.classification else None)
