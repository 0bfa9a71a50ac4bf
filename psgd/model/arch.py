"""Architecture strings: a whole layer stack in one readable, comma-separated line.

    1x28x28,conv5x5x6same,pool2,conv5x5x16,pool2,120,84,10

=================  ==============================================================
token              meaning
=================  ==============================================================
``CxHxW``          the input: C channels of H x W (optional, first; default 1x28x28)
``conv5x5x6``      6 filters of 5x5, stride 1, 'valid' padding, then the activation
``conv5x5x6same``  the same with 'same' padding (the image keeps its size)
``pool2``          2x2 max pooling, stride 2 (also ``maxpool2``)
``avgpool2``       2x2 average pooling, stride 2
``120``            a dense layer of 120 units; the stack is flattened before the first
=================  ==============================================================

The activation (``--activation``) follows every convolution and every hidden dense
layer; the last token must be a dense layer, the output, read by the loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

from ..errors import ConfigError

DEFAULT_INPUT = (1, 28, 28)

# LeCun et al. 1998, for 28x28 MNIST: C1 keeps 28x28 ('same', as LeNet-5's 32x32 input
# with a 'valid' C1 gives), S2 14x14, C3 10x10, S4 5x5, then C5 (120), F6 (84), output.
LENET5 = "conv5x5x6same,{pool}2,conv5x5x16,{pool}2,120,84,10"
NAMED = {"lenet5": LENET5}

_CONV = re.compile(r"conv(\d+)x(\d+)x(\d+)(same|valid)?$")
_POOL = re.compile(r"(max|avg)?pool2$")
_INPUT = re.compile(r"(\d+)x(\d+)x(\d+)$")


@dataclass(frozen=True)
class ConvToken:
    k: int
    filters: int
    padding: str


@dataclass(frozen=True)
class PoolToken:
    kind: str


@dataclass(frozen=True)
class DenseToken:
    units: int


def named(name: str, pool: str = "max") -> str:
    """The architecture string of a named network, e.g. ``lenet5`` with max or avg pooling."""
    if name not in NAMED:
        raise ConfigError(f"unknown model {name!r}; built in: mlp, {', '.join(NAMED)}")
    if pool not in ("max", "avg"):
        raise ConfigError(f"pooling must be max or avg, got {pool!r}")
    return NAMED[name].format(pool="pool" if pool == "max" else "avgpool")


def parse(text: str) -> tuple[tuple[int, int, int], list]:
    """``(input_shape, tokens)`` of an architecture string, or a ConfigError saying which
    token is wrong."""
    parts = [p.strip().lower() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ConfigError("an architecture needs at least an output layer, e.g. conv5x5x6,pool2,10")
    shape = DEFAULT_INPUT
    m = _INPUT.match(parts[0])
    if m:
        shape = tuple(int(g) for g in m.groups())
        parts = parts[1:]
    tokens = []
    for part in parts:
        if (m := _CONV.match(part)):
            kh, kw, f = int(m[1]), int(m[2]), int(m[3])
            if kh != kw or kh <= 0 or f <= 0:
                raise ConfigError(f"{part!r}: convolutions are square, e.g. conv5x5x6")
            tokens.append(ConvToken(kh, f, m[4] or "valid"))
        elif (m := _POOL.match(part)):
            tokens.append(PoolToken(m[1] or "max"))
        elif part.isdigit() and int(part) > 0:
            tokens.append(DenseToken(int(part)))
        else:
            raise ConfigError(f"architecture token {part!r} is none of CxHxW, convKxKxF[same], pool2, "
                              f"avgpool2 or a layer width (see psgd/model/arch.py)")
    if any(d <= 0 for d in shape):
        raise ConfigError(f"input shape {shape} must be positive")
    if not tokens or not isinstance(tokens[-1], DenseToken):
        raise ConfigError(f"architecture {text!r} must end with a dense output layer, e.g. ...,10")
    seen_dense = False
    for t in tokens:
        if isinstance(t, DenseToken):
            seen_dense = True
        elif seen_dense:
            raise ConfigError(f"architecture {text!r}: convolutions and pooling must come before dense layers")
    return shape, tokens


def canonical(text: str) -> str:
    """One spelling per architecture, with its input shape: what config.json stores."""
    shape, tokens = parse(text)
    out = ["x".join(map(str, shape))]
    for t in tokens:
        if isinstance(t, ConvToken):
            out.append(f"conv{t.k}x{t.k}x{t.filters}" + ("same" if t.padding == "same" else ""))
        elif isinstance(t, PoolToken):
            out.append("pool2" if t.kind == "max" else "avgpool2")
        else:
            out.append(str(t.units))
    return ",".join(out)


def dense_sizes(text: str) -> tuple[int, ...]:
    """``(input width, dense widths...)``: what data checks compare with the data set."""
    shape, tokens = parse(text)
    return (prod(shape),) + tuple(t.units for t in tokens if isinstance(t, DenseToken))
