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


def test_shared_mnist_is_one_memory_map_and_a_workers_rows_match_the_in_memory_load(data_dir, tmp_path, monkeypatch):
    """256 workers held 256 decoded float32 copies of MNIST (17 GB at 48): the shared load
    maps the decompressed files read-only from the user's cache, and a worker's rows,
    scaled to float32 only there, are bit for bit the in-memory load's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train, _ = data.load("mnist", data_dir, 0)
    shared, _ = data.load("mnist", data_dir, 0, shared=True)
    owner = shared.X
    while owner is not None and not isinstance(owner, np.memmap):
        owner = owner.base
    assert owner is not None, "the shared pixels are not a memory map"
    assert shared.X.dtype == np.uint8 and not shared.X.flags.writeable
    cached = sorted(p.name for p in (tmp_path / "cache" / "psgd" / "decoded").iterdir())
    assert len(cached) == 4 and all(name.split("-")[-1] == mnist.CONTENT_SHA256[name.rsplit("-", 1)[0]][:16]
                                    for name in cached)
    rest, _ = data.split(train, 5000, 0)
    rows = data.split_rows(len(shared), 5000, 0)[0]
    shard = np.sort(data.shard_indices(len(rows), 2, 7, 0))
    mine, expected = shared.subset(rows[shard]), rest.subset(shard)
    assert mine.X.dtype == np.float32 and np.array_equal(mine.X, expected.X) and np.array_equal(mine.y, expected.y)


def test_a_corrupted_cache_file_is_not_trusted_but_rebuilt(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data.load("mnist", data_dir, 0, shared=True)
    name = mnist.FILES["train_labels"]
    cached = tmp_path / "cache" / "psgd" / "decoded" / f"{name}-{mnist.CONTENT_SHA256[name][:16]}"
    content = bytearray(cached.read_bytes())
    content[100] ^= 0xFF  # one label changed
    cached.write_bytes(bytes(content))
    train, _ = data.load("mnist", data_dir, 0, shared=True)
    reference, _ = data.load("mnist", data_dir, 0)
    assert np.array_equal(np.asarray(train.y), reference.y)
    assert mnist.read_verified(cached, name)  # the cache file was rewritten with the true content
