"""The model interface: what psgd calls on a model, and how it builds one from a spec.

Any object with these members trains on psgd's parameter server; the built-in
:class:`~psgd.model.network.MLP` and :class:`~psgd.model.convnet.ConvNet` are two, and
:class:`psgd.torch.TorchModel` wraps a PyTorch module as a third.

``layout``  (:class:`~psgd.model.layout.Layout`)
    Names, shapes and offsets of the arrays inside the one flat parameter vector.
``n_params`` (int), ``dtype`` (numpy dtype, float32 or float64)
    The flat vector's length and type; the server, its shards and the wire use only these.
``init_params(seed) -> ndarray (n_params,)``
    Fresh weights; the same seed must give the same vector on every machine.
``weight_mask() -> ndarray (n_params,)``
    1 where L2 weight decay applies (weights), 0 elsewhere (biases).
``loss_and_grad(params, X, T, grad, dropout=0.0, rng=None) -> (float, grad)``
    Mean error over the minibatch ``X`` (B, D) float rows with targets ``T`` ((B,) integer
    labels for classifiers), and its gradient written into the given flat buffer ``grad``
    (n_params,) -- a worker's send buffer, so write in place, do not rebind.
``evaluate(params, X, T) -> (mean error, accuracy or None)``
    Over a whole data set (chunk it if memory matters); accuracy is a fraction in [0, 1].

Optional: ``description`` (str), folded into the fingerprint, e.g. the module's repr.
``init_range(seed, lo, hi, out=None)``, ``weight_mask_range(lo, hi)``: the two above for
the range ``[lo, hi)`` alone, so a server shard of a large model never builds the whole
vector (without them it is built and sliced; see :func:`init_range`).

A user's model is named ``package.module:factory``: a callable taking no arguments that
returns such an object. Each process that computes (worker, the coordinator evaluating,
``--workers 0``) imports it from its own ``--model`` option or config; the server builds
it once too, for the initial weights and the weight-decay mask, from its own config. The
server tells workers only the layout and a fingerprint (:func:`fingerprint`); a worker
whose model does not match refuses to join.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys

from ..errors import ConfigError
from .layout import Layout
from .network import MLP, ModelSpec

REQUIRED = ("layout", "n_params", "dtype", "init_params", "weight_mask", "loss_and_grad", "evaluate")


def build_model(spec: ModelSpec):
    """The model a spec describes: an MLP, a ConvNet, or the user's factory's object."""
    if spec.factory:
        return load_user_model(spec.factory)
    if spec.arch:
        from .convnet import ConvNet

        return ConvNet(spec)
    return MLP(spec)


def load_user_model(factory: str):
    """Import ``package.module:callable``, call it, and check the result is a psgd model."""
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--model {factory!r}: a user model is named package.module:factory")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: a module in the working directory is found
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--model {factory}: cannot import {module_name} ({exc})") from None
    make = getattr(module, attr, None)
    if not callable(make):
        raise ConfigError(f"--model {factory}: {module_name} has no callable {attr!r}")
    model = make()
    missing = [name for name in REQUIRED if not hasattr(model, name)]
    if missing:
        raise ConfigError(f"--model {factory}: the object it returns lacks {', '.join(missing)} "
                          f"(see psgd/model/interface.py)")
    if not isinstance(model.layout, Layout) or model.layout.size != model.n_params:
        raise ConfigError(f"--model {factory}: layout must be a psgd Layout of n_params entries")
    return model


def init_range(model, seed: int, lo: int, hi: int, out=None):
    """The model's initial weights ``[lo, hi)`` (into ``out`` if given): a server shard's
    share. A model with its own ``init_range`` (the MLP) draws them without building the
    whole vector; any other builds it and keeps the range."""
    own = getattr(model, "init_range", None)
    if own is not None:
        return own(seed, lo, hi, out)
    whole = model.init_params(seed)
    if out is None:
        return whole[lo:hi].copy()  # a copy: the whole vector goes now
    out[...] = whole[lo:hi]
    return out


def weight_mask_range(model, lo: int, hi: int):
    """``model.weight_mask()[lo:hi]``, built for the range alone where the model can."""
    own = getattr(model, "weight_mask_range", None)
    return own(lo, hi) if own is not None else model.weight_mask()[lo:hi].copy()


def fingerprint(model, spec: ModelSpec | None = None) -> str:
    """A short hash of what must agree between a server and its workers: the layout, the
    built-in description (without any module name) or the model's own ``description``."""
    what = {"layout": model.layout.to_wire(), "dtype": str(model.dtype),
            "description": getattr(model, "description", type(model).__qualname__)}
    if spec is not None and not spec.factory:
        what["spec"] = spec.wire_dict()
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def check_welcome(model, spec: ModelSpec, welcome_model: dict, welcome_layout, who: str = "worker") -> None:
    """Refuse (ConfigError, one line) a model that is not the one the server trains."""
    theirs = welcome_model.get("fingerprint")
    ours = fingerprint(model, spec)
    if Layout.from_wire(welcome_layout) != model.layout or (theirs is not None and theirs != ours):
        kind = "user model" if welcome_model.get("user") else "model"
        raise ConfigError(f"this {who}'s model (fingerprint {ours}, {model.n_params} parameters) is not the "
                          f"server's {kind} (fingerprint {theirs}); start the {who} with the run's --model")
