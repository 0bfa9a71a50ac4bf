"""Compressed vectors on the wire: pure numpy, no sockets. docs/protocol.md ("Codecs")
is the specification a third-party client implements; this module is psgd's.

A codec turns one float vector of ``size`` elements (a gradient, or a server shard's
weights) into a few raw little-endian array frames and back:

- ``none``: one frame, the vector itself (float32 or float64, the model's dtype).
- ``float16``: one ``<f2`` frame of ``size`` elements; encoders saturate at +-65504.
- ``int8``: linear 8-bit quantisation with one scale per block of INT8_BLOCK elements
  (the last block may be shorter): a ``<f4`` frame of ceil(size / INT8_BLOCK) scales,
  then an ``|i1`` frame of ``size`` codes. Element i decodes as code[i] * scale[i // B];
  an encoder picks scale = max|x| over the block / 127 and code = round(x / scale), so
  the error is at most scale / 2 per element.
- ``topk``: the k largest magnitudes: a ``<u4`` frame of k indices (strictly increasing,
  each < size), then a ``<f4`` frame of their k values; every other element is zero.
  k = max(1, ceil(fraction * size)) for an encoder; a decoder takes any 0 <= k <= size.

Decoding checks everything a frame could get wrong (count, dtypes, lengths, indices,
scales) and raises :class:`ProtocolError` with a stable code, writing nothing to ``out``
before the checks pass. A worker's :class:`PushEncoder` keeps *error feedback*: what a
lossy push did not carry is added to the next one, so no gradient mass is ever lost.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ProtocolError

CODECS = ("none", "float16", "int8", "topk")
INT8_BLOCK = 256  # elements per int8 scale: 1.6% overhead, error bounded by each block's own range
FLOAT16_MAX = 65504.0
# The frames each codec carries, in order, by dtype string ("none": the model's dtype, one frame).
FRAME_DTYPES = {"float16": ("<f2",), "int8": ("<f4", "|i1"), "topk": ("<u4", "<f4")}
DEFAULT_TOPK_FRACTION = 0.01


def topk_count(size: int, fraction: float) -> int:
    """How many elements a top-k encoder sends of ``size``: max(1, ceil(fraction * size)), at most size."""
    return min(size, max(1, math.ceil(fraction * size)))


def int8_blocks(size: int) -> int:
    return -(-size // INT8_BLOCK)


def encode(codec: str, x: np.ndarray, fraction: float = DEFAULT_TOPK_FRACTION) -> list[np.ndarray]:
    """The frames (contiguous 1-D arrays) that carry ``x`` in ``codec``."""
    if codec == "none":
        return [x]
    if codec == "float16":
        return [np.clip(x, -FLOAT16_MAX, FLOAT16_MAX).astype("<f2")]
    if codec == "int8":
        n, blocks = x.size, int8_blocks(x.size)
        padded = np.zeros(blocks * INT8_BLOCK, np.float32)
        padded[:n] = x
        padded = padded.reshape(blocks, INT8_BLOCK)
        scales = (np.abs(padded).max(axis=1) / 127.0).astype("<f4")
        safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
        codes = np.rint(padded / safe[:, None]).clip(-127, 127).astype(np.int8).reshape(-1)[:n]
        return [scales, codes]
    if codec == "topk":
        k = topk_count(x.size, fraction)
        idx = np.argpartition(np.abs(x), x.size - k)[x.size - k:] if k < x.size else np.arange(x.size)
        idx = np.sort(idx).astype("<u4")
        return [idx, x[idx].astype("<f4")]
    raise ValueError(f"unknown codec {codec!r}")


def decode(codec: str, arrays, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (the whole vector, its size the receiver's) from ``codec``'s frames and
    return it; raise ProtocolError, leaving ``out`` untouched, for frames that do not fit."""
    size = out.size
    if codec not in CODECS:
        raise ProtocolError("bad_field", f"unknown codec {codec!r}; psgd speaks {', '.join(CODECS)}")
    expected = FRAME_DTYPES.get(codec, (out.dtype.str,))
    if len(arrays) != len(expected):
        raise ProtocolError("bad_frames", f"a {codec} vector is {len(expected)} array frames, not {len(arrays)}")
    for i, (a, dtype) in enumerate(zip(arrays, expected)):
        if a.dtype.str != dtype or a.ndim != 1:
            raise ProtocolError("bad_array", f"{codec} frame {i} is {a.dtype.str} of shape {a.shape}, expected 1-D {dtype}")
    if codec in ("none", "float16"):
        if arrays[0].size != size:
            raise ProtocolError("bad_array", f"{codec} vector of {arrays[0].size} elements, expected {size}")
        out[...] = arrays[0]
        return out
    if codec == "int8":
        scales, codes = arrays
        if scales.size != int8_blocks(size) or codes.size != size:
            raise ProtocolError("bad_array", f"int8 vector of {scales.size} scales and {codes.size} codes; {size} "
                                             f"elements take {int8_blocks(size)} scales (blocks of {INT8_BLOCK})")
        if not np.isfinite(scales).all():
            raise ProtocolError("not_finite", "int8 scales hold NaN or Inf")
        if (scales < 0).any():
            raise ProtocolError("bad_array", "int8 scales must be >= 0")
        np.multiply(codes, np.repeat(scales, INT8_BLOCK)[:size], out=out, casting="unsafe")
        return out
    idx, values = arrays  # topk
    if idx.size != values.size or idx.size > size:
        raise ProtocolError("bad_array", f"top-k vector of {idx.size} indices and {values.size} values "
                                         f"(at most {size}, as many of each)")
    if idx.size and (int(idx[-1]) >= size or (idx.size > 1 and not (idx[1:] > idx[:-1]).all())):
        raise ProtocolError("bad_range", f"top-k indices must be strictly increasing and below {size}")
    out[...] = 0
    out[idx] = values
    return out


class PushEncoder:
    """A worker's encoder for one server shard's range, with error feedback: each push
    sends ``codec(g + residual)`` and keeps ``residual <- g + residual - decoded(sent)``,
    so over any run the sum of what was sent plus the residual is the sum of the
    gradients (Seide et al. 2014; Stich et al., "Sparsified SGD with memory", 2018)."""

    def __init__(self, codec: str, size: int, dtype, fraction: float = DEFAULT_TOPK_FRACTION):
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}")
        self.codec, self.fraction = codec, fraction
        plain = codec == "none"  # nothing is lost, nothing kept
        self.residual = np.zeros(0 if plain else size, dtype)
        self._sent = np.empty(0 if plain or codec == "topk" else size, dtype)

    def encode(self, grad: np.ndarray) -> list[np.ndarray]:
        """The frames of this push; ``grad`` is only read."""
        if self.codec == "none":
            return [grad]
        acc = self.residual
        acc += grad
        frames = encode(self.codec, acc, self.fraction)
        if self.codec == "topk":  # exact: what was sent is acc at those indices
            acc[frames[0]] -= frames[1].astype(acc.dtype)
        else:
            acc -= decode(self.codec, frames, self._sent)
        return frames


def payload_bytes(arrays) -> int:
    return sum(int(a.nbytes) for a in arrays)
