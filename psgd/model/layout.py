"""The parameter layout: how one flat vector is cut into named arrays.

Every parameter of a model lives in a single contiguous 1-D vector. A :class:`Layout`
lists ``(name, shape, offset)`` for each array, so the model works on numpy views into
the vector while the server, the wire and the optimizer see only the vector (or a
contiguous range of it, for a shard).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class Slot:
    """One named array inside the flat vector: ``flat[offset:offset + size]`` reshaped."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Layout:
    """An ordered, gap-free list of slots; ``size`` is the length of the flat vector."""

    slots: tuple[Slot, ...]

    @classmethod
    def from_shapes(cls, named_shapes: list[tuple[str, tuple[int, ...]]]) -> "Layout":
        slots, offset = [], 0
        for name, shape in named_shapes:
            slot = Slot(name, tuple(int(d) for d in shape), offset)
            slots.append(slot)
            offset = slot.end
        return cls(tuple(slots))

    @property
    def size(self) -> int:
        return self.slots[-1].end if self.slots else 0

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Return ``{name: view}`` into ``flat`` (shape ``(size,)``); writes go to ``flat``."""
        if flat.ndim != 1 or flat.shape[0] != self.size:
            raise ConfigError(f"flat vector has shape {flat.shape}, layout needs ({self.size},)")
        return {s.name: flat[s.offset:s.end].reshape(s.shape) for s in self.slots}

    def mask(self, selected, dtype=np.float32, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """A flat vector of 1 over the slots whose name ``selected(name)`` accepts, else 0
        (e.g. where L2 weight decay applies: weights, not biases); only its range
        ``[lo, hi)`` (default: all), so a server shard never builds the whole vector."""
        hi = self.size if hi is None else hi
        mask = np.zeros(hi - lo, dtype)
        for slot in self.slots:
            if selected(slot.name) and slot.end > lo and slot.offset < hi:
                mask[max(slot.offset, lo) - lo:min(slot.end, hi) - lo] = 1
        return mask

    def to_wire(self) -> list[list]:
        """A msgpack-friendly form: ``[[name, [dims...], offset], ...]``."""
        return [[s.name, list(s.shape), s.offset] for s in self.slots]

    @classmethod
    def from_wire(cls, rows) -> "Layout":
        try:
            slots = tuple(Slot(str(n), tuple(int(d) for d in shape), int(off)) for n, shape, off in rows)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"malformed layout: {exc}") from None
        expected = 0
        for s in slots:
            if s.offset != expected or any(d <= 0 for d in s.shape):
                raise ConfigError(f"layout slot {s.name} is out of place or empty")
            expected = s.end
        return cls(slots)


def shard_range(n_params: int, shard: int, num_shards: int) -> tuple[int, int]:
    """``[start, end)`` of server shard ``shard`` of ``num_shards``: contiguous, nearly equal
    ranges that together cover the whole vector in order."""
    if not 0 <= shard < num_shards:
        raise ConfigError(f"server shard {shard} is not in 0..{num_shards - 1}")
    if num_shards > n_params:
        raise ConfigError(f"{num_shards} server shards for {n_params} parameters")
    return n_params * shard // num_shards, n_params * (shard + 1) // num_shards
