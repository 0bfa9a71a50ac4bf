"""Random distortions of images, per minibatch: affine warps with bilinear interpolation,
and additive Gaussian noise (the "rotating, stretching, adding noise" of LeCun et al.).

Every image of a minibatch gets its own random rotation, scaling along each axis, shear
and translation, drawn from the worker's seeded generator, and all of them are warped at
once: one set of source coordinates ``(B, H*W, 2)``, four gathers and a weighted sum, no
loop over images or pixels. Pixels that map from outside the image are 0 (background).

Coordinates are ``(row, column)`` about the image centre. An output pixel ``p`` reads the
input at ``M @ p - t``; with ``M`` a rotation by +90 degrees this is ``np.rot90`` (a
counter-clockwise turn as displayed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class DistortionSpec:
    """Amounts of each distortion; 0 turns it off. Each image draws uniformly from
    ``[-amount, +amount]`` (noise: a normal with this standard deviation)."""

    rotate: float = 0.0  # degrees
    scale: float = 0.0  # relative, per axis: 0.15 stretches each axis by a factor in [0.85, 1.15]
    shear: float = 0.0  # shear factor (x moves by shear * y)
    shift: float = 0.0  # pixels, per axis
    noise: float = 0.0  # standard deviation of additive Gaussian noise, in pixel units (MNIST: 0..1)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not (value >= 0 and np.isfinite(value)):
                raise ConfigError(f"distortion {name} must be a finite amount >= 0, got {value}")
        if self.scale >= 1:
            raise ConfigError(f"distortion scale must be below 1 (a factor in [1 - s, 1 + s]), got {self.scale}")

    @property
    def active(self) -> bool:
        return any(asdict(self).values())

    @property
    def warps(self) -> bool:
        return bool(self.rotate or self.scale or self.shear or self.shift)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DistortionSpec":
        try:
            return cls(**{k: float(v) for k, v in (d or {}).items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"malformed distortion settings: {exc}") from None


def rotation(degrees) -> np.ndarray:
    """``(..., 2, 2)`` matrices on (row, column) vectors; +90 degrees is np.rot90."""
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    return np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)


def random_affine(spec: DistortionSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(M (n, 2, 2), t (n, 2))``: a random rotation x shear x axis scaling, and a shift."""
    M = rotation(rng.uniform(-spec.rotate, spec.rotate, n))
    shear = np.zeros((n, 2, 2))
    shear[:, 0, 0] = shear[:, 1, 1] = 1.0
    shear[:, 1, 0] = rng.uniform(-spec.shear, spec.shear, n)  # column moves with the row
    scale = 1.0 + rng.uniform(-spec.scale, spec.scale, (n, 2))
    M = M @ shear * (1.0 / scale)[:, None, :]  # read the source at 1/scale: the image grows by scale
    t = rng.uniform(-spec.shift, spec.shift, (n, 2))
    return M, t


def warp(images: np.ndarray, M: np.ndarray, t: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear affine warp of ``images`` ``(B, H, W)``: ``out[b, p] = images[b, M[b] @ p - t[b]]``
    with ``p`` relative to the centre; zero outside. Returns ``(B, H, W)``."""
    B, H, W = images.shape
    cy, cx = (H - 1) / 2.0, (W - 1) / 2.0
    gy = (np.arange(H) - cy).repeat(W)[None, :]  # (1, P), row of each output pixel
    gx = np.tile(np.arange(W) - cx, H)[None, :]
    # source coordinates (B, P); elementwise products beat einsum at this shape
    sy = M[:, 0, 0, None] * gy + M[:, 0, 1, None] * gx + (cy - t[:, 0, None])
    sx = M[:, 1, 0, None] * gy + M[:, 1, 1, None] * gx + (cx - t[:, 1, None])
    # Round away float noise (rot90's cos is 6e-17, not 0): exact pixels stay exact.
    np.round(sy, 9, out=sy)
    np.round(sx, 9, out=sx)
    y0, x0 = np.floor(sy), np.floor(sx)
    wy, wx = sy - y0, sx - x0
    y0, x0 = y0.astype(np.intp), x0.astype(np.intp)
    flat = images.reshape(B, H * W)
    result = np.zeros((B, H * W), np.float64)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y, x = y0 + dy, x0 + dx
        weight = (wy if dy else 1 - wy) * (wx if dx else 1 - wx)
        weight *= (y >= 0) & (y < H) & (x >= 0) & (x < W)  # outside the image: background 0
        index = np.clip(y, 0, H - 1) * W + np.clip(x, 0, W - 1)
        result += np.take_along_axis(flat, index, axis=1) * weight
    if out is None:
        out = np.empty_like(images)
    out.reshape(B, H * W)[...] = result
    return out


def distort(X: np.ndarray, shape: tuple[int, int], spec: DistortionSpec, rng: np.random.Generator) -> None:
    """Distort the rows of ``X`` ``(B, H*W)`` (images of ``shape``) in place."""
    if not spec.active:
        return
    B = X.shape[0]
    images = X.reshape(B, *shape)
    if spec.warps:
        M, t = random_affine(spec, B, rng)
        warp(images, M, t, out=images)
    if spec.noise:
        X += (spec.noise * rng.standard_normal(X.shape)).astype(X.dtype)
