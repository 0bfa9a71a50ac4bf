"""A worker's BLAS threads: its share of the host's cores, unless told otherwise."""

import os
import subprocess
import sys

import numpy  # noqa: F401  (loads the BLAS whose threads are shared)
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from psgd.worker.threads import ThreadShare


def blas_threads() -> int:
    return min(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")


@pytest.fixture
def no_thread_env(monkeypatch):
    """No thread variables; and the test process's BLAS threads as they were, afterwards."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    before = blas_threads()
    yield
    threadpool_limits(before, user_api="blas")


def test_the_cores_are_shared_among_the_live_workers_of_the_host(tmp_path, no_thread_env):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / str(sleeper.pid)).touch()  # another live worker
        (tmp_path / "999999999").touch()  # a dead one's mark: not counted, and removed
        share = ThreadShare(folder=tmp_path, cores=8)
        assert share.workers_here() == 2 and not (tmp_path / "999999999").exists()
        said = share.rebalance(force=True)
        assert share.threads == 4 and said == "4 BLAS threads (8 cores / 2 workers on this host)"
        assert blas_threads() == 4
        sleeper.kill()
        sleeper.wait()
        assert share.rebalance(force=True) == "8 BLAS threads (8 cores / 1 worker on this host)"
        assert share.rebalance(force=True) is None  # nothing changed, nothing said
        share.close()
        assert not (tmp_path / str(os.getpid())).exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_never_fewer_than_one_thread_and_an_explicit_choice_wins(tmp_path, no_thread_env, monkeypatch):
    many = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    try:
        for p in many:
            (tmp_path / str(p.pid)).touch()
        assert ThreadShare(folder=tmp_path, cores=2).rebalance(force=True).startswith("1 BLAS thread (2 cores / 4 workers")
        assert ThreadShare(3, folder=tmp_path, cores=2).rebalance(force=True) == "3 BLAS threads (--threads)"
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        share = ThreadShare(folder=tmp_path, cores=16)
        assert share.rebalance(force=True) == "2 BLAS threads (OMP_NUM_THREADS=2)" and share.mark is None
    finally:
        for p in many:
            p.kill()
            p.wait()


def test_an_oversubscribed_cluster_nices_its_workers_to_leave_the_server_half_the_machine():
    """All workers together weigh about one nice-0 process per core (CFS: 1.25x per level)."""
    from psgd.launch import worker_nice
    assert worker_nice(3, cores=2) == 5  # the floor: just above the cores
    assert worker_nice(64, cores=2) == 16 and worker_nice(256, cores=2) == 19  # the ceiling
    for workers in (8, 16, 64):
        weight = workers * 1024 / 1.25 ** worker_nice(workers, cores=2)
        assert weight <= 2 * 1024 < weight * 1.25  # one step less would weigh more than the 2 cores
