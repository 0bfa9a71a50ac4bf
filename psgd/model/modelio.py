"""Saved weights: an .npz with the flat vector, its layout and the model description.

Written atomically (temporary file, fsync, rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import atomic_write, read_npz
from .layout import Layout
from .interface import build_model
from .network import ModelSpec


def save_model(path: Path, spec: ModelSpec, params: np.ndarray, **extra) -> None:
    layout = build_model(spec).layout
    meta = {"model": spec.to_dict(), "layout": layout.to_wire(), **extra}
    atomic_write(path, lambda f: np.savez(f, params=params, meta=np.array(json.dumps(meta))))


def load_model(path: Path) -> tuple[ModelSpec, np.ndarray, dict]:
    """``(spec, params, meta)`` from a file written by :func:`save_model`."""
    arrays = read_npz(Path(path), "model file")
    try:
        params = arrays["params"]
        meta = json.loads(str(arrays["meta"]))
    except (ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a psgd model file ({exc!r})") from None
    spec = ModelSpec.from_dict(meta["model"])
    net = build_model(spec)
    if Layout.from_wire(meta["layout"]) != net.layout or params.shape != (net.n_params,):
        raise DataError(f"{path}: weights do not match the model they describe")
    return spec, params.astype(net.dtype, copy=False), meta
