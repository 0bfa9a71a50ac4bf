"""How many BLAS threads a worker computes with: the host's cores shared among the workers
running on it, unless told otherwise.

Each worker process registers itself in a per-user folder of the host's temporary
directory (a file named after its pid) and counts the live ones: with W workers on a host
of C cores, each takes max(1, C // W) threads. Workers started together may each count
the others late, so a worker looks again every REBALANCE_S and changes its thread count
(threadpoolctl changes a loaded BLAS's threads at run time). Without this, two hand-started
workers and a server on 2 cores each ran every BLAS thread and went 10x slower
(3.3k against 33.6k examples/s).

Told otherwise: ``--threads N``, or OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS
in the environment (``psgd train`` gives each of its workers one thread that way).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

REBALANCE_S = 5.0
THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def host_cores() -> int:
    """The cores this process may run on (its affinity mask, as a container's cpuset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ThreadShare:
    """This worker's share of the host's cores. ``threads``: fixed by the caller (None:
    share). Call :meth:`rebalance` now and then; :meth:`close` at exit."""

    def __init__(self, threads: int | None = None, folder: Path | None = None, cores: int | None = None):
        self.cores = cores or host_cores()
        self.folder = folder or Path(tempfile.gettempdir()) / f"psgd-workers-{os.getuid()}"
        self.fixed, self.why = threads, "--threads"
        if threads is None:
            for var in THREAD_ENV:
                value = os.environ.get(var, "")
                if value.isdigit() and int(value) > 0:
                    self.fixed, self.why = int(value), f"{var}={value}"
                    break
        self.mark: Path | None = None
        if self.fixed is None:
            try:
                self.folder.mkdir(mode=0o700, exist_ok=True)
                self.mark = self.folder / str(os.getpid())
                self.mark.touch()
            except OSError:
                self.mark = None  # cannot count the others: this worker alone, as far as it knows
        self.threads = 0
        self._limiter = None
        self._looked = float("-inf")

    def workers_here(self) -> int:
        """Live workers on this host that share cores (this one included); dead ones' marks go."""
        if self.mark is None:
            return 1
        live = 0
        for entry in self.folder.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                os.kill(int(entry.name), 0)
                live += 1
            except ProcessLookupError:
                entry.unlink(missing_ok=True)
            except PermissionError:
                live += 1  # alive, another user's
        return max(live, 1)

    def rebalance(self, force: bool = False) -> str | None:
        """Set the BLAS threads to this worker's share; returns a line saying what changed, or None."""
        now = time.monotonic()
        if not force and now - self._looked < REBALANCE_S:
            return None
        self._looked = now
        if self.fixed is not None:
            threads, why = self.fixed, self.why
        else:
            workers = self.workers_here()
            threads = max(1, self.cores // workers)
            why = f"{self.cores} cores / {workers} worker{'s' if workers != 1 else ''} on this host"
        if threads == self.threads:
            return None
        self.threads = threads
        self._limit(threads)
        return f"{threads} BLAS thread{'s' if threads != 1 else ''} ({why})"

    def _limit(self, threads: int) -> None:
        from threadpoolctl import threadpool_limits
        self._limiter = threadpool_limits(threads, user_api="blas")

    def close(self) -> None:
        if self.mark is not None:
            self.mark.unlink(missing_ok=True)
            self.mark = None
