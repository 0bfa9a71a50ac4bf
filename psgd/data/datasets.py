"""Data sets in memory: loading, validation split, sharding.

A :class:`Dataset` is inputs ``X`` (N, D) float32 and targets ``y``: integer class labels
(N,) for classification, or reals (N, K) for regression. Everything here is seeded and
deterministic, so every worker of a cluster derives the same split and the same shards.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import mnist
from ..errors import DataError
from ..files import read_npz

NPZ_TEST_FRACTION = 0.1  # held out as the test set of an .npz that brings none


@dataclass(frozen=True)
class Dataset:
    """``X`` float32; or, for a data set shared by the workers of a machine (see
    :func:`load_mnist`), raw values (a read-only uint8 memory map) that :meth:`subset`
    turns into float32 times ``x_scale``, for the chosen rows only."""

    X: np.ndarray
    y: np.ndarray
    n_classes: int = 0  # 0 for real-valued targets
    image_shape: tuple[int, int] | None = None  # (H, W) when rows are images, for augmentation
    name: str = ""
    x_scale: float | None = None  # set: X holds raw values, to be scaled into float32 rows

    def __len__(self) -> int:
        return self.X.shape[0]

    @property
    def n_inputs(self) -> int:
        return self.X.shape[1]

    @property
    def n_outputs(self) -> int:
        return self.n_classes if self.n_classes else (1 if self.y.ndim == 1 else self.y.shape[1])

    def n_outputs_for(self, loss: str) -> int:
        """Output units a network needs: one 0/1 unit for two classes under ``bce``."""
        return 1 if loss == "bce" and self.n_classes == 2 else self.n_outputs

    def subset(self, index: np.ndarray) -> "Dataset":
        """These rows, as float32 (a raw data set's rows are scaled here, and only these)."""
        if self.x_scale is None:
            return replace(self, X=self.X[index], y=self.y[index])
        X = self.X[index].reshape(len(index), -1).astype(np.float32)
        X *= np.float32(self.x_scale)
        return replace(self, X=X, y=np.asarray(self.y[index], np.int64), x_scale=None)

    def targets_for(self, loss: str) -> np.ndarray:
        """Targets in the form the loss wants: labels for softmax_ce, (N, K) floats otherwise."""
        if loss == "softmax_ce":
            if not self.n_classes:
                raise DataError(f"{self.name}: softmax_ce needs class labels, the data has real targets")
            return self.y
        if self.n_classes:
            if loss == "bce" and self.n_classes == 2:
                return self.y.astype(self.X.dtype).reshape(-1, 1)
            # bce over K classes, or sse: one-hot targets (Bishop's sum-of-squares classifier)
            return np.eye(self.n_classes, dtype=self.X.dtype)[self.y]
        y = self.y.astype(self.X.dtype)
        return y.reshape(-1, 1) if y.ndim == 1 else y


def load(name: str, data_dir: Path | None = None, seed: int = 0, shared: bool = False) -> tuple[Dataset, Dataset]:
    """``(train, test)`` for ``"mnist"`` or the path of an ``.npz`` with arrays X and y.
    ``shared``: MNIST stays raw and memory-mapped (see :func:`load_mnist`); take rows with
    :meth:`Dataset.subset`."""
    if name == "mnist":
        return load_mnist(data_dir, shared)
    path = Path(name)
    if path.suffix == ".npz" or path.is_file():
        return load_npz(path, seed)
    raise DataError(f"unknown data set {name!r}: give 'mnist' or the path of an .npz file with arrays X and y")


def load_mnist(data_dir: Path | None = None, shared: bool = False) -> tuple[Dataset, Dataset]:
    """MNIST with pixels scaled to [0, 1], images flattened to 784 columns. ``shared``: the
    pixels stay uint8 in a read-only memory map that every process of the machine shares,
    scaled into float32 only for the rows a worker takes (``subset``): a worker then holds
    its data shard, not the whole training set."""
    raw = mnist.load(data_dir, shared)

    def make(images, labels):
        if shared:
            return Dataset(images.reshape(images.shape[0], -1), labels, 10, (28, 28), "mnist", x_scale=1.0 / 255.0)
        X = images.reshape(images.shape[0], -1).astype(np.float32)
        X *= 1.0 / 255.0
        return Dataset(X, labels.astype(np.int64), 10, (28, 28), "mnist")

    return make(raw["train_images"], raw["train_labels"]), make(raw["test_images"], raw["test_labels"])


def load_npz(path: Path, seed: int = 0) -> tuple[Dataset, Dataset]:
    """An ``.npz`` with ``X`` (N, D) and ``y``: integer labels (N,) or real targets (N,) / (N, K).

    With ``X_test`` and ``y_test`` those are the test set; otherwise a seeded 10% is held out."""
    arrays = read_npz(path, "data file")
    for key in ("X", "y"):
        if key not in arrays:
            raise DataError(f"{path}: needs arrays 'X' and 'y', has {sorted(arrays)}")

    def make(x_key, y_key):
        X, y = np.asarray(arrays[x_key]), np.asarray(arrays[y_key])
        if X.ndim == 1:
            X = X.reshape(-1, 1)
        if X.ndim != 2 or len(X) != len(y) or not np.issubdtype(X.dtype, np.number):
            raise DataError(f"{path}: {x_key} must be numeric (N, D) with one {y_key} per row; "
                            f"got {x_key} {X.shape} {X.dtype}, {y_key} {y.shape}")
        if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
            raise DataError(f"{path}: {y_key} must be numeric (class labels or real targets), not {y.dtype}")
        with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused just below
            X = np.ascontiguousarray(X, dtype=np.float32)
        refuse_non_finite(X, f"{path}: array {x_key}")
        if np.issubdtype(y.dtype, np.integer):
            if y.ndim != 1 or (len(y) and y.min() < 0):
                raise DataError(f"{path}: integer {y_key} must be class labels 0..K-1, shape (N,)")
            return Dataset(X, y.astype(np.int64), int(y.max()) + 1 if len(y) else 0, None, path.name)
        with np.errstate(over="ignore"):
            y = np.asarray(y, np.float32)
        refuse_non_finite(y, f"{path}: array {y_key}")
        return Dataset(X, y, 0, None, path.name)

    train = make("X", "y")
    if "X_test" in arrays and "y_test" in arrays:
        test = make("X_test", "y_test")
        if train.n_classes:
            test = replace(test, n_classes=max(train.n_classes, test.n_classes))
            train = replace(train, n_classes=test.n_classes)
        return train, test
    return split(train, max(1, int(len(train) * NPZ_TEST_FRACTION)), seed)


def refuse_non_finite(a: np.ndarray, what: str) -> None:
    """Raise DataError naming ``what`` and its first row holding NaN or an infinity (checked
    when the data is loaded: one such value turns every weight it reaches into NaN)."""
    finite = np.isfinite(a)
    if finite.all():
        return
    bad = ~finite.reshape(len(a), -1).all(axis=1) if a.ndim > 1 else ~finite
    row = int(np.argmax(bad))
    n_rows = int(bad.sum())
    value = a[row] if a.ndim == 1 else a[row][~np.isfinite(a[row])][0]
    raise DataError(f"{what} holds non-finite values ({value} in row {row}; {n_rows} row{'s' if n_rows != 1 else ''} "
                    f"in all): remove or impute them before training")


def split(data: Dataset, n_held_out: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(rest, held_out)``: a seeded random ``n_held_out`` rows set apart (e.g. validation)."""
    rest, held_out = split_rows(len(data), n_held_out, seed)
    return data.subset(rest), data.subset(held_out)


def split_rows(n: int, n_held_out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The row numbers of :func:`split`'s ``(rest, held_out)``, each ascending."""
    if not 0 < n_held_out < n:
        raise DataError(f"cannot hold out {n_held_out} of {n} examples")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_held_out:]), np.sort(order[:n_held_out])


def shard_indices(n: int, shard: int, num_shards: int, seed: int = 0) -> np.ndarray:
    """Rows of shard ``shard`` of ``num_shards``: disjoint, nearly equal, together all of 0..n-1."""
    if not 0 <= shard < num_shards:
        raise DataError(f"shard {shard} is not in 0..{num_shards - 1}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(np.array_split(order, num_shards)[shard])
