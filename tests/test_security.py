"""CURVE: a server with keys talks only to the clients whose public keys it was given."""

import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from psgd.errors import TransportError
from psgd.wire.transport import Client, client_keys, write_keypair

LAYERS = "784,32,10"


def test_keygen_writes_a_public_and_a_private_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "psgd", "keygen", str(tmp_path), "--name", "server", "--name", "w1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("server", "w1"):
        assert (tmp_path / f"{name}.key").read_text().count("secret-key") == 0
        secret = tmp_path / f"{name}.key_secret"
        assert "secret-key" in secret.read_text() and secret.stat().st_mode & 0o777 == 0o600


def test_only_allowed_keys_get_answers_and_nothing_else_changes_anything(procs, tmp_path):
    server_public, server_secret = write_keypair(tmp_path / "server", "server")
    allowed = tmp_path / "allowed"
    _, monitor_secret = write_keypair(allowed, "monitor")
    _, worker_secret = write_keypair(allowed, "worker")
    _, stranger_secret = write_keypair(tmp_path / "strangers", "stranger")  # a valid key, not allowed
    for secret in (monitor_secret, worker_secret):  # the allowed folder keeps only public keys
        secret.rename(tmp_path / secret.name)
    server, endpoint = procs.start_server("--layers", LAYERS, "--epochs", "1000", "--curve-secret-key", str(server_secret),
                                          "--curve-allow", str(allowed))
    monitor = Client(endpoint, "monitor", server_wait=10, keys=client_keys(tmp_path / "monitor.key_secret", server_public))

    def snapshot():
        params = monitor.request({"type": "pull"}).arrays[0]
        return hashlib.sha256(params.tobytes()).hexdigest(), monitor.request({"type": "stats"})["stats"]

    before, stats = snapshot()
    assert stats["version"] == 0 and stats["workers_known"] == 0
    strangers = {"unknown key": client_keys(stranger_secret, server_public), "plaintext": None}
    grad = np.ones(784 * 32 + 32 + 32 * 10 + 10, np.float32)
    for what, keys in strangers.items():
        stranger = Client(endpoint, what, server_wait=2, request_timeout=0.5, keys=keys)
        with pytest.raises(TransportError, match="no answer"):
            stranger.request({"type": "hello", "worker": what, "transport": "zmq"})
        with pytest.raises(TransportError, match="no answer"):
            stranger.request({"type": "push", "worker_id": 0, "base_version": 0, "examples": 1}, [grad])
        with pytest.raises(TransportError, match="no answer"):
            stranger.request({"type": "shutdown"})
        stranger.close()
    after, stats = snapshot()
    assert after == before and stats["version"] == 0 and stats["workers_known"] == 0 and stats["errors"] == {}
    assert not stats["stopping"]

    worker = procs.start("worker", "--connect", endpoint, "--transport", "zmq", "--curve-key",
                         str(tmp_path / "worker.key_secret"), "--curve-server-key", str(server_public), log="w")
    deadline = time.monotonic() + 60
    while monitor.request({"type": "stats"})["stats"]["version"] < 50:
        assert worker.poll() is None and time.monotonic() < deadline, procs.log("w")
        time.sleep(0.1)
    monitor.request({"type": "shutdown"})
    monitor.close()
    assert worker.wait(30) == 0 and server.wait(30) == 0


def test_a_worker_without_keys_gives_up_on_a_curve_server_with_a_clear_error(procs, tmp_path):
    server_public, server_secret = write_keypair(tmp_path, "server")
    (tmp_path / "allowed").mkdir()
    server, endpoint = procs.start_server("--layers", LAYERS, "--epochs", "1000", "--curve-secret-key", str(server_secret),
                                          "--curve-allow", str(tmp_path / "allowed"))
    worker = procs.start("worker", "--connect", endpoint, "--server-wait", "2", log="w")
    assert worker.wait(60) == 2
    assert "no answer from" in procs.log("w")
    server.terminate()
    assert server.wait(30) == 0


def test_psgd_train_with_curve_runs_its_cluster_encrypted(procs, tmp_path):
    out = tmp_path / "run"
    proc = procs.start("train", "--curve", "--workers", "2", "--epochs", "2", "--layers", "784,64,10",
                       "--transport", "zmq", "--out", str(out), log="train")
    assert proc.wait(180) == 0, procs.log("train")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.9 and summary["failures"] == []
    assert "CURVE: accepting 1 client key" in (out / "logs" / "server.log").read_text()
