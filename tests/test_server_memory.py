"""A server shard's memory is its range's, never the whole model's: weights, optimizer
state and a bounded number of pushes in flight (the optimizer's scratch is one block;
real processes, the kernel's own peak: VmHWM in /proc/PID/status)."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from psgd.model.layout import shard_range
from psgd.model.network import MLP, ModelSpec, parse_sizes
from psgd.wire.transport import Client, max_reply_bytes

LAYERS = "784,4096,4096,10"  # 20.0M parameters: shard 0 of 2 holds 10.0M (40 MB)
IN_FLIGHT = 2  # one push being received and one pull reply being sent, a copy each
CHECKPOINT_BUFFER_MB = 16  # numpy writes a checkpoint's arrays through a 16 MiB buffer
SLACK_MB = 24  # the allocator's and the sockets' own, beyond a bare process


def _peak_kb(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in text.splitlines() if line.startswith("VmHWM")).split()[1])


def _bare_kb() -> int:
    """A Python process with a server's imports and nothing else."""
    code = ("import psgd.server.loop, psgd.cli, pathlib; print(next(l for l in pathlib.Path('/proc/self/status')"
            ".read_text().splitlines() if l.startswith('VmHWM')).split()[1])")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _train(endpoint: str, size: int, pushes: int) -> int:
    """Push ``pushes`` gradients of this shard's range, each asking for the weights back."""
    client = Client(endpoint, "memory-test")
    try:
        welcome = client.request({"type": "hello", "worker": "memory-test", "transport": "zmq"})
        wid, version = welcome["worker_id"], welcome["version"]
        client.limit_messages(max_reply_bytes(size))  # its replies carry the range's weights
        grad = np.full(size, 1e-3, np.float32)
        for _ in range(pushes):
            reply = client.request({"type": "push", "worker_id": wid, "base_version": version, "examples": 128,
                                    "want_params": True}, [grad], [0])
            assert reply.type == "ack", reply.header
            version = reply["version"]
        client.request({"type": "bye", "worker_id": wid})
        return version
    finally:
        client.close()


def _stop_and_read_peak(proc) -> int:
    """SIGTERM (a clean stop: the final checkpoint), reading the peak until it exits."""
    proc.terminate()
    peak = 0
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            peak = _peak_kb(proc.pid)  # it only grows: the last reading is the peak
        except (OSError, StopIteration):
            break  # exiting
        time.sleep(0.05)
    assert proc.wait(30) == 0
    return peak


def test_a_shard_holds_its_range_and_no_more_through_checkpoints_and_a_resume(procs, tmp_path):
    """Before the server built only its range, a shard of this model drew the whole
    vector and the largest layer in float64 at start (its peak was 249 MB before the first
    push, against 99 MB now, for a 38 MB range), kept a scratch vector of the range's size
    and copied its weights at every checkpoint: 330 MB in all, here."""
    lo, hi = shard_range(MLP(ModelSpec(parse_sizes(LAYERS))).n_params, 0, 2)
    range_mb = (hi - lo) * 4 / 2**20
    bound_mb = _bare_kb() / 1024 + range_mb * (1 + 1 + IN_FLIGHT) + CHECKPOINT_BUFFER_MB + SLACK_MB  # weights, velocity
    ckpt = tmp_path / "ckpt"
    args = ["--layers", LAYERS, "--shard", "0", "--num-shards", "2", "--lr", "1e-6", "--schedule", "constant",
            "--checkpoint-dir", str(ckpt), "--checkpoint-every-updates", "2"]
    peaks = []
    for leg, extra in enumerate(([], ["--resume"])):
        proc, endpoint = procs.start_server(*args, *extra, name=f"server-{leg}")
        version = _train(endpoint, hi - lo, 6)
        assert version == 6 * (leg + 1)  # the resumed server went on from its checkpoint
        peaks.append(_stop_and_read_peak(proc) / 1024)
    print(f"range {range_mb:.0f} MB: peak {peaks[0]:.0f} MB, resumed {peaks[1]:.0f} MB, bound {bound_mb:.0f} MB")
    assert "resumed from" in procs.log("server-1")
    assert max(peaks) <= bound_mb, f"peaks {peaks} MB over the bound {bound_mb:.0f} MB"
