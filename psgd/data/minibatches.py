"""Minibatches of a data set, reshuffled every epoch, with seeded augmentation."""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .augment import DistortionSpec, distort


class Minibatches:
    """Endless seeded minibatches, reshuffled every epoch, gathered into reused buffers.

    ``next()`` returns ``(X, T)`` views that stay valid until the following call. The last
    batch of an epoch may be smaller; ``epoch`` counts completed passes.
    """

    def __init__(self, X: np.ndarray, T: np.ndarray, batch_size: int, seed: int = 0,
                 augment_shape: tuple[int, int] | None = None, distortion: DistortionSpec | None = None,
                 image_shape: tuple[int, int] | None = None):
        """``augment_shape``: random 2-pixel shifts of images of that shape; ``distortion``:
        random affine warps and noise (:mod:`psgd.data.augment`) of images of ``image_shape``."""
        if batch_size <= 0:
            raise DataError(f"batch size must be > 0, got {batch_size}")
        self.X, self.T, self.batch_size = X, T, min(batch_size, len(X))
        self.rng = np.random.default_rng(seed)
        self.augment_shape = augment_shape
        if distortion is not None and distortion.active and image_shape is None:
            raise DataError("distortions need image data (MNIST); this data set's rows are not images")
        self.distortion = distortion if distortion is not None and distortion.active else None
        self.image_shape = image_shape
        self.epoch = 0
        self._order = self.rng.permutation(len(X))
        self._pos = 0
        self._xbuf = np.empty((self.batch_size, X.shape[1]), X.dtype)
        self._tbuf = np.empty((self.batch_size,) + T.shape[1:], T.dtype)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pos >= len(self._order):
            self.epoch += 1
            self._order = self.rng.permutation(len(self.X))
            self._pos = 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += len(idx)
        x, t = self._xbuf[:len(idx)], self._tbuf[:len(idx)]
        np.take(self.X, idx, axis=0, out=x)
        np.take(self.T, idx, axis=0, out=t)
        if self.augment_shape is not None:
            x[...] = random_shift(x, self.augment_shape, self.rng)
        if self.distortion is not None:
            distort(x, self.image_shape, self.distortion, self.rng)
        return x, t

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.X) // self.batch_size)


def random_shift(X: np.ndarray, shape: tuple[int, int], rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
    """Each image (a row of ``X``) moved by up to ``max_shift`` pixels in x and y, zero-filled."""
    B = X.shape[0]
    H, W = shape
    p = max_shift
    padded = np.zeros((B, H + 2 * p, W + 2 * p), X.dtype)
    padded[:, p:p + H, p:p + W] = X.reshape(B, H, W)
    dy = rng.integers(0, 2 * p + 1, B)
    dx = rng.integers(0, 2 * p + 1, B)
    rows = (dy[:, None] + np.arange(H))[:, :, None]
    cols = (dx[:, None] + np.arange(W))[:, None, :]
    return padded[np.arange(B)[:, None, None], rows, cols].reshape(B, H * W)
