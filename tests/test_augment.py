"""Random distortions: identity at zero, exact quarter turns, seeded, vectorised."""

import numpy as np
import pytest

from psgd.data.augment import DistortionSpec, distort, random_affine, rotation, warp
from psgd.data.minibatches import Minibatches
from psgd.errors import ConfigError, DataError


def test_zero_distortion_is_the_identity():
    rng = np.random.default_rng(0)
    images = rng.random((6, 9, 7))
    M, t = random_affine(DistortionSpec(), 6, rng)
    np.testing.assert_array_equal(warp(images, M, t), images)
    X = images.reshape(6, -1).astype(np.float32)
    before = X.copy()
    distort(X, (9, 7), DistortionSpec(), rng)
    np.testing.assert_array_equal(X, before)


@pytest.mark.parametrize("quarter_turns", [0, 1, 2, 3, -1, 5])
def test_rotation_by_multiples_of_90_degrees_is_rot90(quarter_turns):
    images = np.random.default_rng(1).random((3, 8, 8))
    out = warp(images, rotation(np.full(3, 90.0 * quarter_turns)), np.zeros((3, 2)))
    np.testing.assert_allclose(out, np.rot90(images, quarter_turns, axes=(1, 2)), atol=1e-12)


def test_integer_shift_moves_pixels_and_fills_with_background():
    images = np.arange(2 * 5 * 5, dtype=float).reshape(2, 5, 5)
    out = warp(images, np.tile(np.eye(2), (2, 1, 1)), np.array([[1.0, 0.0], [0.0, -2.0]]))
    np.testing.assert_array_equal(out[0, 1:], images[0, :-1])
    np.testing.assert_array_equal(out[0, 0], 0)
    np.testing.assert_array_equal(out[1, :, :-2], images[1, :, 2:])


def test_distortions_are_seeded_and_change_images():
    X = np.random.default_rng(2).random((16, 784)).astype(np.float32)
    spec = DistortionSpec(rotate=15, scale=0.15, shear=0.3, shift=2, noise=0.1)
    a, b = X.copy(), X.copy()
    distort(a, (28, 28), spec, np.random.default_rng(5))
    distort(b, (28, 28), spec, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, X)


def test_minibatches_distort_image_data_only():
    X = np.random.default_rng(3).random((10, 16)).astype(np.float32)
    T = np.arange(10)
    batches = Minibatches(X, T, 4, 0, None, DistortionSpec(rotate=10), (4, 4))
    x, _ = next(batches)
    assert x.shape == (4, 16)
    with pytest.raises(DataError, match="image"):
        Minibatches(X, T, 4, 0, None, DistortionSpec(noise=0.1), None)


@pytest.mark.parametrize("bad", [dict(rotate=-1), dict(scale=1.5), dict(noise=float("nan"))])
def test_bad_amounts_are_refused(bad):
    with pytest.raises(ConfigError):
        DistortionSpec(**bad)


def test_a_misspelt_distortion_setting_is_named():
    from psgd.config import TrainConfig
    with pytest.raises(ConfigError, match="distort.rotate"):
        TrainConfig.from_dict({"distort": {"rotat": 5}})
    assert TrainConfig.from_dict({"distort": {"rotate": 5}}).distort == DistortionSpec(rotate=5)
