"""The outlier guard: refuse a push whose gradient is far larger than the run's recent ones.

A push whose squared gradient norm exceeds ``k**2`` times the median squared norm of the
last ``window`` accepted pushes is refused with the code ``outlier`` (comparing squares
is comparing norms: the median commutes with squaring, and no square root is taken).
The guard judges only after ``warmup`` accepted pushes: before that it has nothing to
compare with, and every push is accepted.

A yardstick can go stale: after a rollback (the caller calls :meth:`restart`), or when the
run itself moved to where honest gradients are larger. The sign of the latter is that
every connected worker has been refused since the last accepted push, RESTART_STREAK
pushes in a row: then the guard starts its warm-up again rather than stall the run for
good. One honest worker's accepted push breaks the streak, so workers that send only
outliers cannot bring this about while an honest one trains.

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
RESTART_STREAK = 10  # outliers in a row, from every connected worker, that make the yardstick stale


class OutlierGuard:
    """``k``: how many times the running median norm a push may reach (None or 0: the
    guard is off and accepts everything); ``window``: how many accepted pushes the median
    runs over; ``warmup``: accepted pushes before it judges at all."""

    def __init__(self, k: float | None = DEFAULT_K, window: int = DEFAULT_WINDOW, warmup: int = WARMUP):
        self.on = bool(k)
        self.k2 = float(k) ** 2 if k else 0.0
        self.window = window
        self.warmup = min(warmup, window)
        self.restarts = 0  # warm-ups begun again (a stale yardstick, or a rollback)
        self._streak = 0  # outliers since the last accepted push
        self._refused_workers: set = set()  # ... and whose they were
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

    def restart(self) -> None:
        """Forget the yardstick and warm up again (the weights were replaced)."""
        self._order.clear()
        self._sorted.clear()
        self._streak = 0
        self._refused_workers.clear()
        self.restarts += 1

    def admit(self, norm2: float, worker=None, workers_connected: int = 1) -> None:
        """Accept a push of this squared gradient norm from ``worker`` (it then counts
        towards the median), or raise ProtocolError ``outlier`` (it does not count).
        ``workers_connected``: how many workers the server has now (see RESTART_STREAK)."""
        if not self.on:
            return
        median = self.median_norm2() if self.judging else None
        if median and norm2 > self.k2 * median:  # (a median of zero, all-zero gradients, is no yardstick)
            self._streak += 1
            self._refused_workers.add(worker)
            if self._streak < RESTART_STREAK or len(self._refused_workers) < workers_connected:
                ratio = (norm2 / median) ** 0.5
                raise ProtocolError("outlier", f"gradient norm is {ratio:.3g} x the median of the last "
                                               f"{len(self._sorted)} accepted pushes, the bound is "
                                               f"{self.k2 ** 0.5:g} x: not applied")
            self.restart()  # every worker refused, again and again: the run moved, not the workers
        self._streak = 0
        self._refused_workers.clear()
        self._order.append(norm2)
        insort(self._sorted, norm2)
        if len(self._order) > self.window:
            del self._sorted[bisect_left(self._sorted, self._order.popleft())]

    def to_dict(self) -> dict:
        median = self.median_norm2()
        return {"on": self.on, "k": self.k2 ** 0.5, "window": self.window, "warmup": self.warmup,
                "judging": self.judging, "restarts": self.restarts, "median_norm": median ** 0.5 if median is not None else None}
