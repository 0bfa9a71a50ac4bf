"""Counters the server keeps and the launcher reports: staleness histogram, worker records."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STALENESS_CAP = 64  # exact counts for 0..CAP-1, one overflow bucket beyond


@dataclass
class StalenessHistogram:
    """Exact counts per staleness value below ``cap``; larger values share the last bucket."""

    cap: int = STALENESS_CAP
    counts: list[int] = field(default_factory=list)
    max_seen: int = 0

    def __post_init__(self):
        if not self.counts:
            self.counts = [0] * (self.cap + 1)

    def add(self, staleness: int) -> None:
        self.counts[min(staleness, self.cap)] += 1
        self.max_seen = max(self.max_seen, staleness)

    def merge(self, other: "StalenessHistogram") -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.max_seen = max(self.max_seen, other.max_seen)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def mean(self) -> float:
        """Mean, counting the overflow bucket at ``cap`` (a lower bound when it is not empty)."""
        n = self.total
        return sum(i * c for i, c in enumerate(self.counts)) / n if n else 0.0

    def quantile(self, q: float) -> int:
        n = self.total
        if not n:
            return 0
        rank, seen = q * (n - 1), 0
        for value, c in enumerate(self.counts):
            seen += c
            if seen > rank:
                return value
        return self.cap

    def summary(self) -> dict:
        return {"mean": self.mean(), "p50": self.quantile(0.5), "p99": self.quantile(0.99), "max": self.max_seen,
                "count": self.total, "cap": self.cap}

    @staticmethod
    def text(summary: dict) -> str:
        """"p50 P, p99 Q, max M" of a summary: a quantile in the shared top bucket prints as
        ">= cap" (its value is only known to be at least that); max is exact."""
        cap = summary.get("cap", STALENESS_CAP)
        q = {k: (f">={cap}" if summary[k] >= cap else str(summary[k])) for k in ("p50", "p99")}
        return f"p50 {q['p50']}, p99 {q['p99']}, max {summary['max']}"

    def to_dict(self) -> dict:
        return {"cap": self.cap, "counts": list(self.counts), "max": self.max_seen}

    @classmethod
    def from_dict(cls, d: dict) -> "StalenessHistogram":
        return cls(int(d["cap"]), [int(c) for c in d["counts"]], int(d["max"]))


FLAG_AFTER_OUTLIERS = 3  # a worker refused as an outlier this often is flagged in status and report


@dataclass
class WorkerRecord:
    """What the server knows of one worker."""

    worker_id: int
    name: str
    data_shards: list[int]  # the data shards it trains on; more when it adopts a lost worker's
    transport: str
    joined: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    pushes: int = 0
    examples: int = 0
    refused: int = 0
    outliers: int = 0  # pushes the outlier guard refused; FLAG_AFTER_OUTLIERS of them flag the worker
    staleness: StalenessHistogram = field(default_factory=StalenessHistogram)
    connected: bool = True  # False once it said bye, hung up, or its lease ran out
    expired: bool = False  # its lease ran out: a push from it is refused until it says hello again
    data_generation: int = 0  # goes up whenever data_shards changes, so the worker asks for them
    # The seq of its last push over ZeroMQ that was taken, and that push's (version, staleness)
    # once known: the same seq again is a retry after a lost ack, answered with it, applied once.
    last_push: int | None = None
    last_ack: tuple[int, int] | None = None
    # Codecs agreed in its hello (psgd.wire.codecs), and payload bytes of its pushes and pulls
    push_codec: str = "none"
    pull_codec: str = "none"
    bytes_pushed: int = 0
    bytes_pulled: int = 0
    timing: dict | None = None  # its latest time totals (psgd.worker.timing), as it reported them

    @property
    def flagged(self) -> bool:
        """Refused as an outlier again and again: a faulty (or hostile) worker."""
        return self.outliers >= FLAG_AFTER_OUTLIERS

    def to_dict(self, now: float) -> dict:
        # A worker that left worked until it was last seen: its rate is over that span, not
        # one that keeps falling for as long as the run outlives it.
        alive_for = max((now if self.connected else self.last_seen) - self.joined, 1e-9)
        return {"worker_id": self.worker_id, "name": self.name, "data_shards": list(self.data_shards),
                "data_generation": self.data_generation, "transport": self.transport,
                "pushes": self.pushes, "examples": self.examples, "refused": self.refused,
                "outliers": self.outliers, "flagged": self.flagged,
                "examples_per_s": self.examples / alive_for, "last_seen_s_ago": now - self.last_seen,
                "connected": self.connected, "expired": self.expired, "staleness": self.staleness.to_dict(),
                "push_codec": self.push_codec, "pull_codec": self.pull_codec,
                "bytes_pushed": self.bytes_pushed, "bytes_pulled": self.bytes_pulled,
                "timing": self.timing}


def time_shares(timing: dict | None) -> dict | None:
    """A worker's time totals (docs/protocol.md, "timing") as shares of its wall time (0..1)
    per phase, plus ``accounted`` (their sum, 1 when the phases tile the wall time). None
    without a report, or before any time passed."""
    if not timing or not timing.get("wall"):
        return None
    wall = float(timing["wall"])
    out = {phase: float(seconds) / wall for phase, seconds in timing.items() if phase != "wall"}
    out["accounted"] = sum(out.values())
    return out
