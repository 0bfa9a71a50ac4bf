"""Many real worker processes on one server: 64 of them, from one `psgd worker --count 64`.

Long (about a minute on 2 cores: 64 Python processes start, load their data shard and push);
CI runs it with `pytest -m long`. The issue it answers: psgd had been run with at most 4
workers, and an outside client's first crack came at 250.
"""

import os
import time
from pathlib import Path

import pytest

from psgd.wire.client import ParameterClient

pytestmark = pytest.mark.long

WORKERS = 64
STEPS = 20


def _server_resources(pid: int) -> tuple[int, int]:
    """(resident MB, open file descriptors) of a live process."""
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    return rss_kb // 1024, len(os.listdir(f"/proc/{pid}/fd"))


def test_64_worker_processes_each_push_and_every_push_is_accounted_for(procs):
    server, endpoint = procs.start_server("--data-shards", str(WORKERS), "--layers", "784,16,10",
                                          "--batch-size", "32", "--epochs", "1000", "--lease", "120")
    rss_before, fds_before = _server_resources(server.pid)
    group = procs.start("worker", "--connect", endpoint, "--count", str(WORKERS), "--max-steps", str(STEPS),
                        "--name", "w", log="workers")
    client = ParameterClient(endpoint, "test")
    try:
        peak = (rss_before, fds_before)
        while group.poll() is None:  # the server's memory and descriptors while all 64 are connected
            rss, fds = _server_resources(server.pid)
            peak = (max(peak[0], rss), max(peak[1], fds))
            assert client.stats()["phase"] == "running"  # and it keeps answering a monitor meanwhile
            time.sleep(0.5)
        assert group.returncode == 0, procs.log("workers")[-3000:]
        stats = client.stats(workers=True)
        records = list(stats["workers"].values())
        print(f"server: {rss_before} MB and {fds_before} fds before the workers, peak {peak[0]} MB and "
              f"{peak[1]} fds with {WORKERS} connected; {stats['version']} updates")
        assert sorted(r["name"] for r in records) == sorted(f"w-{i}" for i in range(WORKERS))
        assert all(r["pushes"] >= 1 for r in records)  # every worker pushed
        # every push is accounted for: applied (a version each) or refused, never lost
        assert all(r["pushes"] + r["refused"] == STEPS for r in records), [(r["name"], r["pushes"], r["refused"]) for r in records]
        assert sum(r["pushes"] for r in records) == stats["version"] == sum(stats["staleness"]["counts"])
        assert sum(r["refused"] for r in records) == sum(stats["errors"].values())
        assert not any(r["connected"] for r in records)  # each said goodbye
        assert peak[1] - fds_before <= 2 * WORKERS + 16  # a doorbell each, at most: no descriptor leaks per push
        client.control({"type": "shutdown"})
        assert server.wait(30) == 0
    finally:
        client.close()
