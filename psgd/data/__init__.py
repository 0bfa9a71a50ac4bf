"""Data: MNIST files, data sets, validation split, shards, minibatches, augmentation.

Pure numpy, no I/O but reading files. Everything is seeded and deterministic, so every
worker of a cluster derives the same split and the same shards.
"""

from .datasets import Dataset, load, load_mnist, load_npz, shard_indices, split, split_rows
from .minibatches import Minibatches, random_shift

__all__ = ["Dataset", "load", "load_mnist", "load_npz", "shard_indices", "split", "split_rows", "Minibatches", "random_shift"]
