"""MNIST loading and verification, .npz data, splits, shards, minibatches, augmentation."""

import gzip
import shutil

import numpy as np
import pytest

from psgd import data

from psgd.data import mnist
from psgd.errors import DataError


def test_mnist_loads_verified_with_the_right_shapes(mnist):
    train, test = mnist
    assert train.X.shape == (60000, 784) and test.X.shape == (10000, 784)
    assert train.X.dtype == np.float32 and 0.0 <= train.X.min() and train.X.max() == 1.0
    assert set(np.unique(train.y)) == set(range(10)) and train.n_classes == 10
    assert np.bincount(test.y).tolist()[:2] == [980, 1135]  # the well-known class counts


def copy_mnist(data_dir, dest):
    (dest / "mnist").mkdir(parents=True)
    for name in mnist.FILES.values():
        shutil.copy(mnist.find(data_dir, name), dest / "mnist" / (name + ".gz"))
    return dest


def test_uncompressed_files_are_accepted(data_dir, tmp_path):
    for name in ("t10k-labels-idx1-ubyte",):
        content = mnist.read_verified(mnist.find(data_dir, name), name)
        (tmp_path / name).write_bytes(content)
        assert mnist.find(tmp_path, name) == tmp_path / name
        assert mnist.parse_idx(mnist.read_verified(tmp_path / name, name), name).shape == (10000,)


def test_truncated_file_is_refused_with_a_clear_message(data_dir, tmp_path):
    copy_mnist(data_dir, tmp_path)
    path = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated or corrupt"):
        mnist.load(tmp_path)


def test_corrupted_content_is_refused_even_in_a_valid_gzip(data_dir, tmp_path):
    copy_mnist(data_dir, tmp_path)
    path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[100] ^= 1  # one flipped label bit
    path.write_bytes(gzip.compress(bytes(content), compresslevel=1))
    with pytest.raises(DataError, match="SHA-256"):
        mnist.load(tmp_path)


def test_wrong_file_is_refused(data_dir, tmp_path):
    copy_mnist(data_dir, tmp_path)
    shutil.copy(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", tmp_path / "mnist" / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="not that of the original train-labels"):
        mnist.load(tmp_path)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match="psgd fetch"):
        mnist.load(tmp_path)


def test_idx_header_must_match_the_data():
    good = b"\0\0\x08\x01" + (3).to_bytes(4, "big") + b"\1\2\3"
    assert mnist.parse_idx(good, "x").tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="IDX header"):
        mnist.parse_idx(good[:-1], "x")
    with pytest.raises(DataError, match="not an IDX"):
        mnist.parse_idx(b"PK\3\4junk", "x")


def test_shards_are_disjoint_and_cover_everything():
    for n, k in [(100, 3), (60000, 7), (5, 5)]:
        parts = [data.shard_indices(n, i, k, seed=1) for i in range(k)]
        joined = np.concatenate(parts)
        assert len(joined) == n and set(joined.tolist()) == set(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert all(np.array_equal(p, data.shard_indices(n, i, k, seed=1)) for i, p in enumerate(parts))
    with pytest.raises(DataError):
        data.shard_indices(10, 3, 3)


def test_validation_split_is_seeded_and_disjoint(mnist):
    train, _ = mnist
    small = train.subset(np.arange(1000))
    rest, held = data.split(small, 100, seed=4)
    rest2, held2 = data.split(small, 100, seed=4)
    assert len(rest) == 900 and len(held) == 100 and np.array_equal(held.X, held2.X)
    rows = {r.tobytes() for r in held.X}
    assert not any(r.tobytes() in rows for r in rest.X[:200] if r.any())


def test_minibatches_cover_each_epoch_once():
    X = np.arange(10, dtype=np.float32).reshape(10, 1)
    T = np.arange(10)
    it = data.Minibatches(X, T, 4, seed=0)
    seen = []
    for _ in range(it.batches_per_epoch):
        x, t = next(it)
        assert np.array_equal(x[:, 0], t)
        seen += t.tolist()
    assert sorted(seen) == list(range(10)) and it.epoch == 0
    next(it)
    assert it.epoch == 1


def test_random_shift_moves_images_by_at_most_two_pixels():
    rng = np.random.default_rng(0)
    img = np.zeros((1, 28, 28), np.float32)
    img[0, 14, 14] = 1.0
    X = np.repeat(img.reshape(1, 784), 200, axis=0)
    out = data.random_shift(X, (28, 28), rng).reshape(200, 28, 28)
    pos = np.array([np.unravel_index(o.argmax(), (28, 28)) for o in out])
    assert (out.sum(axis=(1, 2)) == 1).all()
    assert np.abs(pos - 14).max() == 2 and len({tuple(p) for p in pos}) == 25


def test_npz_classification_and_regression(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", X=rng.random((50, 3)), y=rng.integers(0, 4, 50))
    train, test = data.load(str(tmp_path / "c.npz"))
    assert train.n_classes == 4 and len(train) + len(test) == 50 and len(test) == 5
    np.savez(tmp_path / "r.npz", X=rng.random((40, 2)), y=rng.random(40), X_test=rng.random((10, 2)), y_test=rng.random(10))
    train, test = data.load(str(tmp_path / "r.npz"))
    assert train.n_classes == 0 and train.n_outputs == 1 and len(test) == 10
    assert train.targets_for("sse").shape == (40, 1)
    np.savez(tmp_path / "bad.npz", X=rng.random((5, 2)))
    with pytest.raises(DataError, match="'X' and 'y'"):
        data.load(str(tmp_path / "bad.npz"))
    with pytest.raises(DataError, match="unknown data set"):
        data.load("imagenet")
