"""The sequence lock on the shared weights: a reader never sees half a write, and waits out
a writer that was descheduled in the middle of one."""

import threading
import time

import numpy as np
import pytest

from psgd.wire import shm
from psgd.errors import TransportError

pytestmark = pytest.mark.skipif(not shm.available(), reason="no /dev/shm")

N = 100_000


@pytest.fixture
def segment():
    seg = shm.Segment.create("psgd-test", N, np.float32)
    yield seg
    seg.unlink()
    seg.close()


def test_a_reader_gets_one_whole_version(segment):
    writer = shm.SeqlockWriter(segment)
    with writer:
        segment.array[:] = 1.0
    out = np.empty(N, np.float32)
    assert shm.read_consistent(segment, out) == 1 and (out == 1.0).all()


def test_a_reader_waits_out_a_writer_descheduled_mid_write(segment):
    """The server holds the lock for 300 ms, as when it loses its core in the middle of an
    update (more processes than cores). The reader used to give up after ~10,000 yields,
    a few milliseconds; now it waits, and gets the finished write."""
    writer = shm.SeqlockWriter(segment)
    holding = threading.Event()

    def slow_write():
        with writer:
            segment.array[: N // 2] = 2.0
            holding.set()
            time.sleep(0.3)
            segment.array[N // 2:] = 2.0

    thread = threading.Thread(target=slow_write)
    thread.start()
    assert holding.wait(5)
    out = np.empty(N, np.float32)
    t0 = time.monotonic()
    version = shm.read_consistent(segment, out, timeout_s=10)
    waited = time.monotonic() - t0
    thread.join(5)
    assert version == 1 and (out == 2.0).all()  # the whole write, not half of it
    assert 0.1 < waited < 5


def test_a_writer_that_never_finishes_is_reported_after_the_timeout(segment):
    segment.header[shm.SEQ] += np.uint64(1)  # a write begun and never ended: a stuck server
    out = np.empty(N, np.float32)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="stuck mid-write"):
        shm.read_consistent(segment, out, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 5


def test_a_writer_killed_mid_write_is_noticed_through_its_doorbell_at_once(segment, tmp_path):
    """A server SIGKILLed mid-update leaves the lock odd for good: a chaos run's workers
    waited 60 s on it. Its doorbell closes with it, and the reader looks there."""
    import socket

    from psgd.wire.doorbell import DoorbellClient
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(tmp_path / "doorbell"))
    listener.listen(1)
    client = DoorbellClient(str(tmp_path / "doorbell"), 1, 2, ["grad"], timeout=5)
    server_end, _ = listener.accept()
    server_end.recv(4096)  # the handshake
    assert client.alive()
    segment.header[shm.SEQ] += np.uint64(1)  # the write the server never finished
    server_end.close()  # ... because it died
    listener.close()
    out = np.empty(N, np.float32)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="died in the middle of a write"):
        shm.read_consistent(segment, out, timeout_s=30, writer_alive=client.alive)
    assert time.monotonic() - t0 < 5 and not client.alive()
    client.close()
