"""The outlier guard: refuse a push whose gradient is far larger than the run's recent ones.

A push whose squared gradient norm exceeds ``k**2`` times the median squared norm of the
last ``window`` accepted pushes is refused with the code ``outlier`` (comparing squares
is comparing norms: the median commutes with squaring, and no square root is taken).
The guard judges only after ``warmup`` accepted pushes: before that it has nothing to
compare with, and every push is accepted.

It guards against faults and crude attacks (a bit flip, a loss scaled by 1e6, a worker
whose weights diverged); a malicious worker sending plausible gradients passes it. That
needs Byzantine-robust aggregation, which psgd does not claim (docs/security.md).

Pure: no numpy, no clock, no sockets. The squared norm comes from the store's check of
the push (one pass over the gradient, already made there); each push costs the guard a
binary search and an insertion into a list of ``window`` floats.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import deque

from ..errors import ProtocolError

DEFAULT_K = 10.0  # honest minibatch gradients of one run stay within a few times their median
DEFAULT_WINDOW = 100  # accepted pushes whose median is the yardstick
WARMUP = 20  # accepted pushes before the guard judges (at most the window)


class OutlierGuard:
    """``k``: how many times the running median norm a push may reach (None or 0: the
    guard is off and accepts everything); ``window``: how many accepted pushes the median
    runs over; ``warmup``: accepted pushes before it judges at all."""

    def __init__(self, k: float | None = DEFAULT_K, window: int = DEFAULT_WINDOW, warmup: int = WARMUP):
        self.on = bool(k)
        self.k2 = float(k) ** 2 if k else 0.0
        self.window = window
        self.warmup = min(warmup, window)
        self._order: deque[float] = deque()  # accepted squared norms, oldest first
        self._sorted: list[float] = []  # the same, sorted: the median is its middle

    @property
    def judging(self) -> bool:
        return self.on and len(self._sorted) >= self.warmup

    def median_norm2(self) -> float | None:
        """The median squared norm of the accepted pushes in the window (None: none yet)."""
        s = self._sorted
        if not s:
            return None
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])

    def admit(self, norm2: float) -> None:
        """Accept a push of this squared gradient norm (it then counts towards the median),
        or raise ProtocolError ``outlier`` (it does not count)."""
        if not self.on:
            return
        median = self.median_norm2() if self.judging else None
        if median:  # (a median of zero, all-zero gradients, is no yardstick)
            if norm2 > self.k2 * median:
                ratio = (norm2 / median) ** 0.5
                raise ProtocolError("outlier", f"gradient norm is {ratio:.3g} x the median of the last "
                                               f"{len(self._sorted)} accepted pushes, the bound is "
                                               f"{self.k2 ** 0.5:g} x: not applied")
        self._order.append(norm2)
        insort(self._sorted, norm2)
        if len(self._order) > self.window:
            del self._sorted[bisect_left(self._sorted, self._order.popleft())]

    def to_dict(self) -> dict:
        median = self.median_norm2()
        return {"on": self.on, "k": self.k2 ** 0.5, "window": self.window, "warmup": self.warmup,
                "judging": self.judging, "median_norm": median ** 0.5 if median is not None else None}
