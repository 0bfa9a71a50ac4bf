"""Server checkpoints: weights, optimizer state and counters, written atomically.

A checkpoint is ``checkpoint-<version>.npz`` in the checkpoint folder: the flat parameters,
each optimizer state array, and a JSON ``meta`` (version, examples, learning rate, the
run's configuration, and the SHA-256 of every array). It is written to a temporary file,
fsynced and renamed, so a crash leaves either the old file or the new one, never half.
Reading checks every digest, so a corrupt or truncated file is refused with a message
and the next older one is used.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import atomic_write

KEEP = 3  # checkpoints kept; older ones are removed after each write
PATTERN = "checkpoint-*.npz"


def _digest(a: np.ndarray) -> str:
    # hashed in place through the buffer protocol: tobytes() would copy a whole range
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


def write(folder: Path, version: int, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write one checkpoint (``arrays`` must include ``params``); prune old ones."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full_meta = {**meta, "version": version, "digests": {k: _digest(v) for k, v in arrays.items()}}
    path = folder / f"checkpoint-{version:012d}.npz"
    atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(full_meta)), **arrays))
    prune(folder, KEEP)
    return path


def prune(folder: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints (after a write that failed for want of
    space: all but the newest, to make room for the next)."""
    for old in sorted(Path(folder).glob(PATTERN))[:-keep]:
        old.unlink(missing_ok=True)


def read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, meta)`` of one checkpoint, every array checked against its digest."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            arrays = {k: f[k] for k in f.files if k != "meta"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); it is corrupt or truncated") from None
    digests = meta.get("digests", {})
    if "params" not in arrays or set(digests) != set(arrays):
        raise DataError(f"checkpoint {path} is incomplete")
    for name, a in arrays.items():
        if _digest(a) != digests[name]:
            raise DataError(f"checkpoint {path}: array {name!r} does not match its digest; the file is corrupt")
    return arrays, meta


def newest_valid(folder: Path, say=None) -> tuple[dict[str, np.ndarray], dict, Path] | None:
    """The newest checkpoint that reads back whole, saying why any newer one was refused;
    None if the folder holds none."""
    for path in sorted(Path(folder).glob(PATTERN), reverse=True):
        try:
            arrays, meta = read(path)
            return arrays, meta, path
        except DataError as exc:
            if say:
                say(f"psgd server: refusing {exc}")
    return None
