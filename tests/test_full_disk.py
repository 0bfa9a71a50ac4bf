"""A full disk: a write that fails is reported and the run goes on, keeping what it had
(issue 17, item 4). A real full disk: a small tmpfs, which needs root to mount; skipped
without it."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from click.testing import CliRunner

from psgd.cli import cli
from psgd.config import TrainConfig
from psgd.coordinator.rundir import RunRecorder
from psgd.model.network import ModelSpec


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs; ``fill()`` takes every free byte, ``free()`` gives them back."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")

    class Disk:
        path = disk
        filler = disk / "filler"

        def fill(self):
            with open(self.filler, "ab", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass

        def free(self):
            self.filler.unlink(missing_ok=True)

    yield Disk()
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_run_directory_writes_that_fail_are_said_once_and_retried_at_the_end(small_disk):
    said = []
    config = TrainConfig(model=ModelSpec((4, 8, 3)), out_dir=str(small_disk.path / "run"))
    small_disk.fill()
    recorder = RunRecorder(config, say=said.append)  # config.json and metrics.jsonl cannot be written
    for i in range(3):
        recorder.record({"updates": i, "val_accuracy": 0.5})
    assert len(said) == 2 and all("No space left on device" in s and "training goes on" in s for s in said), said
    small_disk.free()  # space again: the end writes everything, the early records included
    summary = recorder.finish(np.zeros(4 * 8 + 8 + 8 * 3 + 3, np.float32), {"test_loss": 1.0})
    assert summary["unwritten"] == [] and len(summary["write_failures"]) >= 2
    run = small_disk.path / "run"
    assert [json.loads(line)["updates"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert json.loads((run / "summary.json").read_text())["unwritten"] == []
    assert (run / "config.json").exists() and (run / "weights.npz").exists()
    assert not [p for p in run.iterdir() if p.suffix == ".tmp"]  # no half files


def test_a_run_on_a_full_disk_trains_then_says_what_it_could_not_write(small_disk, tmp_path):
    """Before: the first write's OSError ended the run with a traceback, before training."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=rng.random((400, 4)), y=rng.integers(0, 3, 400))
    small_disk.fill()
    result = CliRunner().invoke(cli, ["train", "--workers", "0", "--data", str(tmp_path / "d.npz"), "--layers", "4,8,3",
                                      "--epochs", "2", "--out", str(small_disk.path / "run")])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "test accuracy" in result.output  # it trained to the end
    assert "could not write config.json, metrics.jsonl, summary.json, weights.npz" in result.output
    assert "No space left on device" in result.output and "Traceback" not in result.output


def wait_for(proc, log, text, timeout=60):
    deadline = time.monotonic() + timeout
    while text not in log():
        assert proc.poll() is None and time.monotonic() < deadline, log()
        time.sleep(0.1)


@pytest.mark.slow
def test_a_server_whose_checkpoint_fails_says_so_keeps_the_last_good_one_and_trains_on(small_disk, procs):
    """Before: the server died with three chained tracebacks ending in ENOSPC, and workers and
    coordinator said only "lost the server". The run directory (logs, checkpoints) is on a
    2 MiB disk that fills up after the first checkpoint and is freed again later."""
    out = small_disk.path / "run"
    proc = procs.start("train", "--workers", "2", "--layers", "784,64,10", "--epochs", "1000", "--out", str(out),
                       log="train", own_group=True)
    ckpt = out / "checkpoints"
    deadline = time.monotonic() + 60
    while not list(ckpt.glob("checkpoint-*.npz")):
        assert proc.poll() is None and time.monotonic() < deadline, procs.log("train")
        time.sleep(0.1)
    small_disk.fill()
    wait_for(proc, lambda: procs.log("train"), "cannot write its checkpoint")
    kept = sorted(ckpt.glob("checkpoint-*.npz"))
    assert kept and not list(ckpt.glob("*.tmp")), "the newest good checkpoint stays, no half file"
    from psgd.server.checkpoint import read
    read(kept[-1])  # whole
    small_disk.free()
    wait_for(proc, lambda: procs.log("train"), "writes checkpoints again")
    os.killpg(proc.pid, signal.SIGINT)  # a warm stop: everything written
    assert proc.wait(60) == 130, procs.log("train")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint_failures"] >= 1 and summary["failures"] == []
    assert "checkpoint writes failed" in procs.log("train")
    server_log = (out / "logs" / "server.log").read_text()
    assert "No space left on device" in server_log and "Traceback" not in server_log, server_log
    assert "lost the server" not in procs.log("train")
