"""Starting real psgd processes for tests, and making sure none outlives its test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

SHM = Path("/dev/shm")


class Processes:
    """Popen wrapper that tags every child with a marker in its environment, so that a
    test can find (and kill) anything it started, grandchildren included."""

    def __init__(self, tmp_path: Path, data_dir: Path):
        self.tmp = tmp_path
        self.marker = uuid.uuid4().hex
        self.env = dict(os.environ, PSGD_DATA_DIR=str(data_dir), PSGD_TEST_MARKER=self.marker)
        self.procs: list[subprocess.Popen] = []

    def start(self, *args, log: str, extra_env: dict | None = None, prefix: list[str] = (),
              own_group: bool = False) -> subprocess.Popen:
        """``psgd ARGS`` with output to LOG.log; ``prefix`` runs it through e.g. ``ip netns exec NS``
        (which execs it: the pid is psgd's own). ``own_group``: in a process group of its own,
        as a shell starts a foreground job, so that ``os.killpg(proc.pid, SIGINT)`` is a Ctrl-C."""
        out = open(self.tmp / f"{log}.log", "w")
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "psgd", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**self.env, **(extra_env or {})},
                                process_group=0 if own_group else None)
        out.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def start_server(self, *args, name="server") -> tuple[subprocess.Popen, str]:
        ready = self.tmp / f"{name}.ready"
        proc = self.start("server", "--bind", "tcp://127.0.0.1:0", "--ready-file", str(ready), *args, log=name)
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, self.log(name)
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return proc, json.loads(ready.read_text())["endpoint"]

    def marked_pids(self) -> list[int]:
        """Live processes (any depth) that carry this test's marker."""
        pids = []
        needle = f"PSGD_TEST_MARKER={self.marker}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes():
                    stat = (entry / "stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] != "Z":
                        pids.append(int(entry.name))
            except OSError:
                pass
        return pids

    def cleanup(self) -> list[int]:
        """Kill whatever is still running; return the pids that were left behind."""
        left = self.marked_pids()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return left


def _creator_dead(name: str) -> bool:
    """Segments and doorbell folders carry their creator's pid (psgd-weights-PID-xxxx,
    psgd-doorbell-PID-xxxx). Only a dead creator's can be a leak: a live one may belong to
    another psgd run on this machine (another test session, a user's run)."""
    pid = name.split("-")[2]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def shm_segments() -> set[str]:
    """psgd's shared-memory segments whose creator has exited."""
    return {p.name for p in SHM.glob("psgd-*") if _creator_dead(p.name)} if SHM.is_dir() else set()


def doorbell_dirs() -> set[str]:
    """psgd's doorbell folders whose server has exited."""
    import tempfile
    return {p.name for p in Path(tempfile.gettempdir()).glob("psgd-doorbell-*") if _creator_dead(p.name)}
