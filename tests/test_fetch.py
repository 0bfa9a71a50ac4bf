"""Downloading MNIST for real users, against HTTP servers on 127.0.0.1 (never the internet)."""

import gzip
import http.server
import shutil
import threading
from contextlib import contextmanager
from functools import partial

import pytest

from psgd.data import mnist
from psgd.errors import DownloadError


@contextmanager
def serve(folder):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def mirrors(data_dir, tmp_path):
    """Three mirror folders: good files, truncated files, files with corrupted content."""
    good, short, bad = (tmp_path / n for n in ("good", "short", "bad"))
    for folder in (good, short, bad):
        folder.mkdir()
    for name in mnist.FILES.values():
        src = mnist.find(data_dir, name)
        shutil.copy(src, good / (name + ".gz"))
        raw = src.read_bytes()
        (short / (name + ".gz")).write_bytes(raw[: len(raw) // 2])
        content = bytearray(gzip.decompress(raw))
        content[-1] ^= 0xFF
        (bad / (name + ".gz")).write_bytes(gzip.compress(bytes(content), compresslevel=1))
    return good, short, bad


def test_fetch_skips_bad_mirrors_and_verifies(mirrors, tmp_path):
    good, short, bad = mirrors
    dest = tmp_path / "cache"
    with serve(short) as u_short, serve(bad) as u_bad, serve(good) as u_good:
        log = []
        folder = mnist.fetch(dest, mirrors=[u_short, u_bad, u_good], log=log.append)
    assert folder == dest / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(n + ".gz" for n in mnist.FILES.values())
    assert all(u_good in line for line in log) and len(log) == 4
    assert mnist.load(dest)["test_labels"].shape == (10000,)


def test_fetch_replaces_a_corrupt_cached_file_and_keeps_good_ones(mirrors, tmp_path):
    good, _, _ = mirrors
    dest = tmp_path / "cache" / "mnist"
    dest.mkdir(parents=True)
    for name in mnist.FILES.values():
        shutil.copy(good / (name + ".gz"), dest)
    (dest / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with serve(good) as url:
        log = []
        mnist.fetch(dest.parent, mirrors=[url], log=log.append)
    assert len(log) == 1 and "t10k-labels" in log[0]
    mnist.load(dest.parent)


def test_fetch_failure_names_every_mirror_and_leaves_no_partial_file(mirrors, tmp_path):
    _, short, bad = mirrors
    dest = tmp_path / "cache"
    with serve(short) as u_short, serve(bad) as u_bad:
        dead = "http://127.0.0.1:9/"  # the discard port: nothing listens
        with pytest.raises(DownloadError) as err:
            mnist.fetch(dest, mirrors=[u_short, u_bad, dead], timeout=5)
    text = str(err.value)
    assert u_short in text and u_bad in text and dead in text and "by hand" in text
    assert list((dest / "mnist").iterdir()) == []
