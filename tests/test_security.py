"""CURVE: a server with keys talks only to the clients whose public keys it was given."""

import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq.auth

from psgd.config import TrainConfig
from psgd.errors import TransportError
from psgd.model.network import ModelSpec
from psgd.wire.transport import Client, client_keys, server_keys, write_keypair

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
    _, monitor_secret = write_keypair(allowed / "control", "monitor")  # it ends the run: a control key
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
    assert "CURVE: accepting 2 client keys" in (out / "logs" / "server.log").read_text()
    assert "(1 control, 1 worker)" in (out / "logs" / "server.log").read_text()


# --- safe defaults: where a plaintext server listens ---------------------------------------

@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.0.0.2:0", True), ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True), ("tcp://lo:5555", True), ("ipc:///tmp/psgd.sock", True),
    ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False), ("tcp://10.0.0.5:5555", False),
    ("tcp://eth0:5555", False), ("tcp://server:5555", False), ("tcp://127.0.0.1;10.0.0.5:5555", False),
])
def test_which_endpoints_count_as_loopback(endpoint, loopback):
    from psgd.server.exposure import is_loopback
    assert is_loopback(endpoint) is loopback


def test_the_bind_defaults_to_loopback_without_curve_and_to_every_interface_with_it():
    from psgd.errors import ConfigError
    from psgd.server.exposure import resolve_bind
    assert resolve_bind(None, curve=False, insecure=False) == ("tcp://127.0.0.1:5555", None)
    assert resolve_bind(None, curve=True, insecure=False) == ("tcp://*:5555", None)
    assert resolve_bind("tcp://*:6000", curve=True, insecure=False) == ("tcp://*:6000", None)
    with pytest.raises(ConfigError, match="refusing to listen on tcp://\\*:6000 in plaintext"):
        resolve_bind("tcp://*:6000", curve=False, insecure=False)
    bind, warning = resolve_bind("tcp://*:6000", curve=False, insecure=True)
    assert bind == "tcp://*:6000" and "anyone who can reach this port" in warning


def test_a_server_started_with_its_defaults_listens_on_loopback_only():
    """In-process, as `psgd server` builds it: the default endpoint is 127.0.0.1:5555 (if
    another run holds that port, the bind error names the address it tried)."""
    from psgd.server.loop import Server, ServerOptions
    try:
        server = Server(TrainConfig(model=ModelSpec((784, 32, 10))), ServerOptions(shared_memory=False))
    except TransportError as exc:
        assert "tcp://127.0.0.1:5555" in str(exc)
    else:
        try:
            assert server.endpoint == "tcp://127.0.0.1:5555"
        finally:
            server.close()


def _server_cli(procs, tmp_path, *args, env=None):
    ready = tmp_path / "ready.json"
    proc = procs.start("server", "--layers", LAYERS, "--epochs", "1000", "--no-shm", "--ready-file", str(ready), *args,
                       log="server", extra_env=env)
    deadline = time.monotonic() + 30
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, ready


def test_a_plaintext_server_on_every_interface_needs_insecure_and_then_warns(procs, tmp_path):
    proc, ready = _server_cli(procs, tmp_path, "--bind", "tcp://0.0.0.0:0")
    assert proc.wait(30) == 2 and not ready.exists()
    out = procs.log("server")
    assert "refusing to listen on tcp://0.0.0.0:0 in plaintext" in out and "--insecure" in out
    assert len(out.strip().splitlines()) == 1  # one line, no traceback

    proc, ready = _server_cli(procs, tmp_path, "--bind", "tcp://0.0.0.0:0", env={"PSGD_INSECURE": "1"})
    assert ready.exists(), procs.log("server")
    assert json.loads(ready.read_text())["endpoint"].startswith("tcp://0.0.0.0:")
    proc.terminate()
    assert proc.wait(30) == 0
    out = procs.log("server")
    assert "WARNING: listening on tcp://0.0.0.0:0 in plaintext" in out
    assert "push any gradient into them" in out and "end it" in out
    from psgd.cli import server  # PSGD_INSECURE=1 above is --insecure: the same option
    assert next(p for p in server.params if p.name == "insecure").opts == ["--insecure"]


def test_a_server_refuses_a_secret_key_others_can_read(procs, tmp_path):
    _, server_secret = write_keypair(tmp_path, "server")
    (tmp_path / "allowed").mkdir()
    server_secret.chmod(0o644)
    proc, ready = _server_cli(procs, tmp_path, "--curve-secret-key", str(server_secret),
                              "--curve-allow", str(tmp_path / "allowed"))
    assert proc.wait(30) == 2 and not ready.exists()
    out = procs.log("server")
    assert f"the secret key {server_secret} has mode 0644" in out and f"chmod 600 {server_secret}" in out
    for mode in (0o640, 0o604, 0o660):
        server_secret.chmod(mode)
        with pytest.raises(TransportError, match="chmod 600"):
            server_keys(server_secret, tmp_path / "allowed")
    server_secret.chmod(0o600)
    assert server_keys(server_secret, tmp_path / "allowed") is not None
    server_secret.chmod(0o400)  # read-only for the owner (a Kubernetes Secret's defaultMode 0400) is fine
    assert server_keys(server_secret, tmp_path / "allowed") is not None


# --- roles: worker keys train, control keys steer --------------------------------------

def test_the_roles_split_the_messages_a_server_takes():
    from psgd.wire.protocol import CONTROL_MESSAGES, SERVER_TAKES, WORKER_MESSAGES
    assert WORKER_MESSAGES == {"hello", "heartbeat", "pull", "push", "bye", "stats"}
    assert CONTROL_MESSAGES == {"set_lr", "set_params", "pause", "resume", "shutdown", "describe"}
    assert WORKER_MESSAGES | CONTROL_MESSAGES == SERVER_TAKES


def test_allowed_keys_get_the_role_of_their_folder(tmp_path):
    from psgd.wire.transport import allowed_roles
    allowed = tmp_path / "allowed"
    w, _ = write_keypair(allowed, "w")
    c, _ = write_keypair(allowed / "control", "c")
    both, _ = write_keypair(allowed / "control", "both")
    (allowed / "both.key").write_text(both.read_text())  # in both folders: control wins
    roles = allowed_roles(allowed)
    key = lambda path: zmq.auth.load_certificate(str(path))[0]  # noqa: E731
    assert roles == {key(w): "worker", key(c): "control", key(both): "control"}


CONTROL_REQUESTS = [({"type": "set_lr", "lr": 5.0}, "set_lr"), ({"type": "pause"}, "pause"),
                    ({"type": "resume"}, "resume"), ({"type": "describe"}, "describe"),
                    ({"type": "shutdown"}, "shutdown")]


def test_every_control_message_from_a_worker_key_is_forbidden_and_changes_nothing(procs, tmp_path):
    server_public, server_secret = write_keypair(tmp_path / "server", "server")
    allowed = tmp_path / "allowed"
    _, worker_secret = write_keypair(allowed, "worker")
    _, control_secret = write_keypair(allowed / "control", "control")
    for secret in (worker_secret, control_secret):
        secret.rename(tmp_path / secret.name)
    server, endpoint = procs.start_server("--layers", LAYERS, "--epochs", "1000", "--curve-secret-key",
                                          str(server_secret), "--curve-allow", str(allowed))
    control = Client(endpoint, "control", server_wait=10, keys=client_keys(tmp_path / "control.key_secret", server_public))
    worker = Client(endpoint, "worker", server_wait=10, keys=client_keys(tmp_path / "worker.key_secret", server_public))

    def snapshot():
        params = control.request({"type": "pull"}).arrays[0]
        stats = control.request({"type": "stats"})["stats"]
        return hashlib.sha256(params.tobytes()).hexdigest(), stats

    before, stats_before = snapshot()
    n_params = 784 * 32 + 32 + 32 * 10 + 10
    requests = CONTROL_REQUESTS + [({"type": "set_params"}, "set_params")]
    for header, kind in requests:
        arrays = [np.zeros(n_params, np.float32)] if kind == "set_params" else []
        reply = worker.request(header, arrays)
        assert reply.type == "error" and reply["code"] == "forbidden", (kind, reply.header)
        assert f"may not send {kind!r}" in reply["message"] and "control" in reply["message"]
    after, stats = snapshot()
    assert after == before and stats["errors"] == {"forbidden": len(requests)}
    assert stats["lr"] == stats_before["lr"] and not stats["paused"] and not stats["stopping"]
    assert not stats["coordinated"] and stats["version"] == 0

    # the worker key does all a worker does
    welcome = worker.request({"type": "hello", "worker": "w", "transport": "zmq"})
    assert welcome.type == "welcome"
    wid = welcome["worker_id"]
    assert worker.request({"type": "heartbeat", "worker_id": wid}).type == "assignment"
    assert worker.request({"type": "pull", "worker_id": wid}).type == "params"
    ack = worker.request({"type": "push", "worker_id": wid, "base_version": 0, "examples": 1},
                         [np.full(n_params, 1e-3, np.float32)])
    assert ack.type == "ack" and ack["version"] == 1
    assert worker.request({"type": "stats"}).type == "stats_reply"
    assert worker.request({"type": "bye", "worker_id": wid}).type == "ok"

    # and the control key steers
    for header, kind in CONTROL_REQUESTS[:-1]:
        assert control.request(header).type in ("ok", "description"), kind
    assert control.request({"type": "stats"})["stats"]["lr"] == 5.0
    server_log_forbidden = "forbidden"
    assert control.request({"type": "shutdown"}).type == "ok"
    control.close()
    worker.close()
    assert server.wait(30) == 0
    assert server_log_forbidden in procs.log("server") and "a worker key may not send 'shutdown'" in procs.log("server")


def test_psgd_status_shutdown_needs_a_control_key(procs, tmp_path):
    server_public, server_secret = write_keypair(tmp_path / "server", "server")
    allowed = tmp_path / "allowed"
    _, worker_secret = write_keypair(allowed, "worker")
    _, control_secret = write_keypair(allowed / "control", "control")
    for secret in (worker_secret, control_secret):
        secret.rename(tmp_path / secret.name)
    server, endpoint = procs.start_server("--layers", LAYERS, "--epochs", "1000", "--curve-secret-key",
                                          str(server_secret), "--curve-allow", str(allowed))

    def status(key):
        return subprocess.run([sys.executable, "-m", "psgd", "status", "--connect", endpoint, "--shutdown",
                               "--curve-key", str(tmp_path / key), "--curve-server-key", str(server_public)],
                              capture_output=True, text=True, timeout=60)

    out = status("worker.key_secret")
    assert out.returncode == 2 and "a worker key may not send 'shutdown'" in out.stderr and server.poll() is None
    out = status("control.key_secret")
    assert out.returncode == 0 and "told the server to end the run" in out.stdout, out.stderr
    assert server.wait(30) == 0


def test_keygen_cluster_lays_out_both_roles_and_keeps_keys_already_there(tmp_path):
    def run():
        out = subprocess.run([sys.executable, "-m", "psgd", "keygen", str(tmp_path / "k"), "--cluster"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    text = run()
    k = tmp_path / "k"
    assert f"--curve-key {k / 'control.key_secret'}" in text
    for secret in ("server", "worker", "control"):
        assert (k / f"{secret}.key_secret").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (k / "allowed").rglob("*")) == ["control", "control.key", "worker.key"]
    from psgd.wire.transport import allowed_roles
    assert sorted(allowed_roles(k / "allowed").values()) == ["control", "worker"]
    from psgd.wire.transport import write_cluster_keys
    before = {p: p.read_text() for p in k.rglob("*.key*")}
    write_cluster_keys(k)  # a restarted recipe keeps its keys
    assert {p: p.read_text() for p in k.rglob("*.key*")} == before
