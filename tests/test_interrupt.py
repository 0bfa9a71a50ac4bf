"""Stopping a local run the way an operator does: Ctrl-C at the terminal (once: warm; twice:
cold), and a launcher killed outright, then resumed. Real processes; a Ctrl-C is SIGINT to
the launcher's whole process group, as a terminal sends it."""

import json
import os
import signal
import time

import pytest

pytestmark = pytest.mark.slow

SMALL = ["--workers", "2", "--layers", "784,64,10", "--evals-per-epoch", "4"]


def start_and_wait_for_an_evaluation(procs, out, *args, log="train"):
    proc = procs.start("train", *SMALL, *args, "--out", str(out), log=log, own_group=True)
    deadline = time.monotonic() + 90
    while "epoch" not in procs.log(log):
        assert proc.poll() is None and time.monotonic() < deadline, procs.log(log)
        time.sleep(0.05)
    return proc


def ctrl_c(proc):
    os.killpg(proc.pid, signal.SIGINT)


def checkpoint_versions(folder):
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("checkpoint-*.npz"))


def test_a_first_ctrl_c_stops_warm_in_seconds_with_everything_written(procs, tmp_path):
    """Before: the server took the terminal's SIGINT and then the launcher's SIGTERM for a
    second signal ("exiting now"): no final checkpoint, no weights.npz, no summary.json."""
    out = tmp_path / "run"
    proc = start_and_wait_for_an_evaluation(procs, out, "--epochs", "50")
    time.sleep(0.5)
    t0 = time.monotonic()
    ctrl_c(proc)
    assert proc.wait(60) == 130, procs.log("train")
    took = time.monotonic() - t0
    print(f"a warm stop took {took:.2f} s")
    assert took < 8, procs.log("train")  # about 1.5 s on an idle 2-core machine
    log = procs.log("train")
    assert f"resume with: psgd train --resume {out}" in log and "test accuracy" in log, log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and summary["updates"] > 0
    assert (out / "weights.npz").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["updates"] <= summary["updates"]  # the final evaluation is recorded
    # the final checkpoint holds at least every update the summary counts
    assert checkpoint_versions(out / "checkpoints")[-1] >= summary["updates"]
    server_log = (out / "logs" / "server.log").read_text()
    assert "SIGINT" not in server_log and "SIGTERM" not in server_log and "exiting now" not in server_log, server_log
    assert "Traceback" not in log


def test_a_second_ctrl_c_stops_cold_and_the_servers_still_checkpoint(procs, tmp_path):
    out = tmp_path / "run"
    proc = start_and_wait_for_an_evaluation(procs, out, "--epochs", "50")
    t0 = time.monotonic()
    ctrl_c(proc)
    time.sleep(0.05)
    ctrl_c(proc)
    assert proc.wait(30) == 130, procs.log("train")
    assert time.monotonic() - t0 < 10
    assert "stopped at once" in procs.log("train") and "Traceback" not in procs.log("train")
    assert not (out / "summary.json").exists()
    assert checkpoint_versions(out / "checkpoints"), "the server's own stop (its first signal) checkpoints"
    assert "exiting now" not in (out / "logs" / "server.log").read_text()


def test_resume_after_a_sigkilled_launcher(procs, tmp_path):
    """A SIGKILLed launcher cleans up nothing: its server's ready file stays in RUN/logs.
    Before: psgd train --resume read it before the new server wrote its own and talked to
    the dead server's address ("lost the server: no answer from tcp://... for 10 s")."""
    out = tmp_path / "run"
    proc = start_and_wait_for_an_evaluation(procs, out, "--epochs", "2", log="first")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 20
    while procs.marked_pids():  # the children follow by their parent-death signal
        assert time.monotonic() < deadline, procs.marked_pids()
        time.sleep(0.1)
    stale = json.loads((out / "logs" / "server.ready.json").read_text())  # what the bug needs
    # The parent-death signal comes once per thread of the dead launcher: still one warm stop,
    # with its checkpoint, not "exiting now" at the second.
    first_server_log = (out / "logs" / "server.log").read_text()
    assert "exiting now" not in first_server_log and checkpoint_versions(out / "checkpoints"), first_server_log
    second = procs.start("train", "--resume", str(out), log="second")
    assert second.wait(120) == 0, procs.log("second") + (out / "logs" / "server.log").read_text()
    assert stale["endpoint"] not in (out / "logs" / "server.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] >= 2.0 and summary["stop_reason"] == "epochs"
    assert "resumed from" in (out / "logs" / "server.log").read_text()


def test_ctrl_c_stops_a_single_process_run_warm_too(procs, tmp_path):
    """--workers 0: before, Ctrl-C was click's 'Aborted!': no summary, no weights."""
    out = tmp_path / "run"
    proc = procs.start("train", "--workers", "0", "--layers", "784,64,10", "--evals-per-epoch", "4", "--epochs", "50",
                       "--out", str(out), log="train", own_group=True)
    deadline = time.monotonic() + 90
    while "epoch" not in procs.log("train"):
        assert proc.poll() is None and time.monotonic() < deadline, procs.log("train")
        time.sleep(0.05)
    ctrl_c(proc)
    assert proc.wait(30) == 130, procs.log("train")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted" and (out / "weights.npz").exists()
    assert "test accuracy" in procs.log("train") and "resume with" not in procs.log("train")


# --- Ctrl-C before anything was trained ---------------------------------------------------


def wait_for(condition, timeout, proc, log):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, log()
        time.sleep(0.02)


def test_a_ctrl_c_during_start_up_stops_everything_at_once_and_writes_no_run(procs, tmp_path):
    """Before: a Ctrl-C while the workers were starting wrote a 0-update run ("test accuracy
    8.19%", "workers pushed via " and nothing), suggested resuming it, and took 16-20 s: the
    server ended, and the workers, still saying hello, waited a minute for it until SIGKILL."""
    out = tmp_path / "run"
    proc = procs.start("train", *SMALL, "--epochs", "20", "--out", str(out), log="train", own_group=True)
    wait_for(lambda: (out / "logs" / "worker-1.log").exists(), 60, proc, lambda: procs.log("train"))
    time.sleep(0.3)  # the workers are starting, the coordinator waits for the first update
    t0 = time.monotonic()
    ctrl_c(proc)
    assert proc.wait(30) == 130, procs.log("train")
    took = time.monotonic() - t0
    print(f"a Ctrl-C at start-up took {took:.2f} s")
    log = procs.log("train")
    assert took < 6, log  # about 0.5 s on an idle 2-core machine
    assert "nothing was trained" in log and "resume with" not in log and "test accuracy" not in log, log
    assert "did not stop in time" not in log and "Traceback" not in log, log
    assert not (out / "summary.json").exists() and not (out / "weights.npz").exists()


def test_a_first_ctrl_c_before_the_launcher_takes_it_over_is_not_called_a_second(procs, tmp_path):
    proc = procs.start("train", *SMALL, "--out", str(tmp_path / "run"), log="train", own_group=True)
    time.sleep(0.3)  # still importing: Python's own Ctrl-C handling
    ctrl_c(proc)
    assert proc.wait(20) == 130, procs.log("train")
    log = procs.log("train")
    assert "interrupted" in log and "second Ctrl-C" not in log and "Traceback" not in log, log


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never says a word: a worker connects and
    waits for a server that does not answer. Yields (endpoint, how many connected)."""
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    accepted = []

    def connected() -> int:
        try:
            while True:
                accepted.append(listener.accept()[0])
        except (TimeoutError, socket.timeout):
            pass
        return len(accepted)

    yield f"tcp://127.0.0.1:{listener.getsockname()[1]}", connected
    for conn in accepted:
        conn.close()
    listener.close()


@pytest.mark.parametrize("count", [1, 2])
def test_the_first_ctrl_c_stops_a_worker_still_waiting_for_its_server(procs, silent_server, count):
    """Before: the first Ctrl-C was taken for a warm stop that the wait for the server never
    looked at; the worker waited its whole --server-wait (60 s), then said "no answer"."""
    endpoint, connected = silent_server
    proc = procs.start("worker", "--connect", endpoint, "--count", str(count), log="worker", own_group=True)
    wait_for(lambda: connected() >= count, 60, proc, lambda: procs.log("worker"))
    time.sleep(1.0)  # well into the hello
    t0 = time.monotonic()
    ctrl_c(proc)
    assert proc.wait(20) == 130, procs.log("worker")
    took = time.monotonic() - t0
    log = procs.log("worker")
    assert took < 3, (took, log)  # about 0.2 s
    assert "no answer" not in log and "WARNING" not in log and "Traceback" not in log, log
    assert log.count("before it joined the server") == count, log


def test_a_ctrl_c_while_a_worker_group_starts_is_a_warm_stop_not_a_failure(procs, silent_server):
    """Before: the group passed SIGTERM to workers still importing, which died of it:
    "WARNING worker i of 3 was killed by signal 15" three times and exit status 15."""
    endpoint, _ = silent_server
    proc = procs.start("worker", "--connect", endpoint, "--count", "3", log="group", own_group=True)
    wait_for(lambda: "started 3 workers" in procs.log("group"), 60, proc, lambda: procs.log("group"))
    t0 = time.monotonic()
    ctrl_c(proc)  # the workers are still importing: no handlers of their own yet
    assert proc.wait(20) == 130, procs.log("group")
    assert time.monotonic() - t0 < 3, procs.log("group")
    assert "WARNING" not in procs.log("group") and "Traceback" not in procs.log("group"), procs.log("group")
