"""The simulator's clock and its workers' timings, pure and seeded.

Virtual time is a float of seconds. :class:`EventQueue` orders events by time, and events
at the same time by the order they were scheduled (a sequence number breaks every tie),
so a run never depends on how Python compares the events' payloads: the same seed gives
the same order, bit for bit.

A timing is a distribution of seconds (:class:`Dist`): ``constant``, ``exponential`` or
``lognormal`` (a mean and the deviation sigma of its logarithm), written on the command
line as ``2ms``, ``exp:2ms`` or ``lognormal:2ms:0.5``.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import asdict, dataclass

from ..errors import ConfigError

DISTRIBUTIONS = ("constant", "exponential", "lognormal")
_SHORT = {"const": "constant", "constant": "constant", "exp": "exponential", "exponential": "exponential",
          "lognormal": "lognormal", "lognorm": "lognormal"}
_PER_SECOND = {"s": 1.0, "ms": 1e3, "us": 1e6, "": 1.0}  # divide by it: 40us is exactly 4e-05


def parse_seconds(text: str) -> float:
    """``2ms`` -> 0.002; ``0.5`` (seconds), ``40us``, ``1.5s``."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(s|ms|us|)\s*", text)
    try:
        value = float(m.group(1)) / _PER_SECOND[m.group(2)] if m else float("nan")
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{text!r} is not a time >= 0 (examples: 2ms, 40us, 0.5s, 0.001)")
    return value


@dataclass(frozen=True)
class Dist:
    """A distribution of durations in seconds with mean ``mean``."""

    kind: str = "constant"
    mean: float = 0.0
    sigma: float = 0.5  # lognormal only: deviation of log(duration)

    def __post_init__(self):
        if self.kind not in DISTRIBUTIONS:
            raise ConfigError(f"unknown distribution {self.kind!r}: one of {', '.join(DISTRIBUTIONS)}")
        if not (math.isfinite(self.mean) and self.mean >= 0):
            raise ConfigError(f"a duration's mean must be >= 0 seconds, not {self.mean}")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ConfigError(f"lognormal sigma must be >= 0, not {self.sigma}")

    @classmethod
    def parse(cls, text: str) -> "Dist":
        """``2ms`` (constant), ``exp:2ms``, ``lognormal:2ms:0.5`` (mean, sigma of the log)."""
        parts = str(text).split(":")
        if len(parts) == 1:
            return cls("constant", parse_seconds(parts[0]))
        kind = _SHORT.get(parts[0].strip().lower())
        if kind is None or len(parts) > (3 if kind == "lognormal" else 2):
            raise ConfigError(f"cannot read the timing {text!r}: write 2ms, exp:2ms or lognormal:2ms:0.5")
        if kind == "lognormal" and len(parts) == 3:
            try:
                sigma = float(parts[2])
            except ValueError:
                raise ConfigError(f"cannot read the timing {text!r}: sigma {parts[2]!r} is not a number") from None
            return cls(kind, parse_seconds(parts[1]), sigma)
        return cls(kind, parse_seconds(parts[1]))

    def scaled(self, factor: float) -> "Dist":
        return Dist(self.kind, self.mean * factor, self.sigma)

    def sample(self, rng) -> float:
        """One duration (seconds) drawn with ``rng`` (a numpy Generator)."""
        if self.kind == "constant" or self.mean == 0:
            return self.mean
        if self.kind == "exponential":
            return float(rng.exponential(self.mean))
        mu = math.log(self.mean) - self.sigma ** 2 / 2  # so that the mean is self.mean
        return float(rng.lognormal(mu, self.sigma))

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        mean = f"{self.mean * 1e3:g}ms"
        return {"constant": mean, "exponential": f"exp:{mean}"}.get(self.kind, f"lognormal:{mean}:{self.sigma:g}")


class EventQueue:
    """Events ``(time, kind, worker, generation)`` in time order, ties in scheduling order."""

    def __init__(self):
        self._heap: list = []
        self._seq = 0

    def schedule(self, time: float, kind: str, worker: int = -1, generation: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time, self._seq, kind, worker, generation))

    def pop(self) -> tuple[float, str, int, int]:
        time, _, kind, worker, generation = heapq.heappop(self._heap)
        return time, kind, worker, generation

    def __len__(self) -> int:
        return len(self._heap)
