"""The co-located fast path: weights and gradients in shared memory (the doorbell that
announces a gradient is psgd.wire.doorbell).

Moving a megabyte through the kernel per step costs as much as the step's compute on a
small machine, so a worker on the server's own machine does not send its gradient: it
computes it straight into a shared segment it owns, then rings the server over a Unix
socket with 16 bytes. The server applies that gradient with the same code as a network
push and answers with 16 bytes. The worker then copies the weights out of the server's
shared segment under a sequence lock (a writer makes the counter odd while it writes),
so it never reads a half-applied update.

Segments are files in /dev/shm mapped with mmap (no multiprocessing resource tracker,
which would unlink segments it did not create). Linux only; elsewhere psgd uses ZeroMQ.
"""

from __future__ import annotations

import mmap
import os
import secrets
import shutil
import tempfile
import time

import numpy as np

from ..errors import TransportError

SHM_DIR = "/dev/shm"
HEADER_BYTES = 64  # u64 words: [0] sequence counter, [1] version, [2] nonce
SEQ, VERSION, NONCE = 0, 1, 2

SEQLOCK_SPINS = 1000  # quick retries (a write takes ~0.2 ms) before the reader starts sleeping
SEQLOCK_TIMEOUT_S = 60.0  # a write still unfinished after this: the server is stuck


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def new_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


DOORBELL_PREFIX = "psgd-doorbell-"  # + pid + "-": the folder of a server's Unix socket


def doorbell_dir() -> str:
    """A new private folder for this server's doorbell socket, named after its pid."""
    return tempfile.mkdtemp(prefix=f"{DOORBELL_PREFIX}{os.getpid()}-")


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return False


def reap_stale(prefix: str = "psgd-") -> list[str]:
    """Remove what a server or worker killed with SIGKILL could not: shared-memory segments
    and doorbell folders whose creator (the pid in the name) is dead. Returns their names."""
    removed = []
    if os.path.isdir(SHM_DIR):
        for name in os.listdir(SHM_DIR):
            parts = name.split("-")
            if name.startswith(prefix) and len(parts) >= 4 and parts[-2].isdigit() and _dead(int(parts[-2])):
                try:
                    os.unlink(os.path.join(SHM_DIR, name))
                    removed.append(name)
                except OSError:
                    pass
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        pid = name[len(DOORBELL_PREFIX):].split("-")[0]
        if name.startswith(DOORBELL_PREFIX) and pid.isdigit() and _dead(int(pid)):
            shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
            removed.append(name)
    return removed


class Segment:
    """A named shared-memory file holding a small u64 header and one flat array."""

    def __init__(self, name: str, size: int, dtype, create: bool):
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        self.dtype = np.dtype(dtype)
        nbytes = HEADER_BYTES + size * self.dtype.itemsize
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise TransportError(f"shared memory {self.path}: {exc.strerror}") from None
        try:
            if create:
                os.ftruncate(fd, nbytes)
            elif os.fstat(fd).st_size != nbytes:
                raise TransportError(f"shared memory {self.path} has {os.fstat(fd).st_size} bytes, expected {nbytes}")
            self._map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.header = np.frombuffer(self._map, np.uint64, HEADER_BYTES // 8)
        self.array = np.frombuffer(self._map, self.dtype, size, offset=HEADER_BYTES)

    @classmethod
    def create(cls, prefix: str, size: int, dtype) -> "Segment":
        seg = cls(new_name(prefix), size, dtype, create=True)
        seg.header[NONCE] = int.from_bytes(secrets.token_bytes(7), "little")
        return seg

    @classmethod
    def attach(cls, name: str, size: int, dtype) -> "Segment":
        if "/" in name or name.startswith("."):
            raise TransportError(f"bad shared memory name {name!r}")
        return cls(name, size, dtype, create=False)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.header = self.array = None
        try:
            self._map.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process


class SeqlockWriter:
    """The server side: ``with writer: update the array in place`` bumps the version."""

    def __init__(self, segment: Segment):
        self.header = segment.header

    def __enter__(self):
        self.header[SEQ] += np.uint64(1)  # odd: a write is in progress

    def __exit__(self, *exc):
        self.header[VERSION] += np.uint64(1)
        self.header[SEQ] += np.uint64(1)  # even again

    def set_version(self, version: int) -> None:
        self.header[SEQ] += np.uint64(1)
        self.header[VERSION] = np.uint64(version)
        self.header[SEQ] += np.uint64(1)


def read_consistent(segment: Segment, out: np.ndarray, timeout_s: float = SEQLOCK_TIMEOUT_S,
                    writer_alive=None) -> int:
    """Copy the segment's array into ``out`` as of one version; return that version.

    A write takes a fraction of a millisecond, but with more processes than cores the
    server can be descheduled in the middle of one for tens of milliseconds: after a burst
    of quick retries the reader sleeps between tries, and gives up only after ``timeout_s``
    (a server that never finishes its write is stuck, or stopped). ``writer_alive()``, if
    given, is asked while the reader sleeps: a server killed mid-write leaves the lock odd
    for good, and its readers should rejoin its successor now, not a minute later."""
    header = segment.header
    deadline = None
    spins = 0
    while True:
        before = int(header[SEQ])
        if not before & 1:
            version = int(header[VERSION])
            np.copyto(out, segment.array)
            if int(header[SEQ]) == before:
                return version
        spins += 1
        if spins < SEQLOCK_SPINS:
            os.sched_yield()  # let the writer (maybe on this very core) finish
            continue
        now = time.monotonic()
        if writer_alive is not None and not writer_alive():
            raise TransportError("the server died in the middle of a write (its doorbell closed)")
        if deadline is None:
            deadline = now + timeout_s
        elif now >= deadline:
            raise TransportError(f"could not read a consistent copy of the weights in {timeout_s:g} s "
                                 "(is the server stuck mid-write?)")
        time.sleep(0.0005)
