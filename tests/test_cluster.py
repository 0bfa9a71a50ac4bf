"""Whole clusters as real processes on 127.0.0.1: training, a killed worker, Ctrl-C.

Each test bounds its time and, pass or fail, reaps every process it started (found by a
marker in their environment) and checks that none was left behind.
"""

import json
import re
import signal
import time

import numpy as np
import pytest

from cluster_util import shm_segments
from psgd.wire.transport import Client

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("transport", ["shm", "zmq"])
def test_server_and_three_workers_train_mnist(procs, tmp_path, transport):
    """psgd train --workers 3 on full MNIST for 5 epochs reaches 95% test accuracy, both push paths.
    (After 4 epochs async runs ended between 94.95% and 97.5%: too near the bar.)"""
    out = tmp_path / "run"
    proc = procs.start("train", "--workers", "3", "--epochs", "5", "--transport", transport,
                       "--out", str(out), log="train")
    assert proc.wait(240) == 0, procs.log("train")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95, summary
    assert summary["worker_transports"] == [transport]
    assert summary["updates"] >= 5 * 55000 // 128 and summary["failures"] == []
    assert summary["staleness"]["count"] == summary["updates"]
    assert "test accuracy" in procs.log("train") and "staleness mean" in procs.log("train")


@pytest.mark.parametrize("transport,servers", [("shm", 1), ("shm", 2), ("zmq", 2)])
def test_an_overlapping_worker_pushes_each_gradient_one_update_old_and_trains(procs, tmp_path, transport, servers):
    """--overlap, one worker: every push but the first was computed while the previous one
    was applied, so its staleness is exactly 1 (none is 0, none 2: the two gradient buffers
    alternate, and at most one push is in flight), over one server's shared memory (two
    segments), two shards' (each range copied into that shard's segment of the slot) and
    ZeroMQ (views of two whole-vector buffers). Momentum 0.5: 0.9 with a one-step delay is
    on the edge of stable (README, "Overlap")."""
    out = tmp_path / "run"
    proc = procs.start("train", "--workers", "1", "--servers", str(servers), "--epochs", "1", "--overlap",
                       "--layers", "784,64,10", "--momentum", "0.5", "--transport", transport,
                       "--evals-per-epoch", "1", "--out", str(out), log="train")
    assert proc.wait(180) == 0, procs.log("train")
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["staleness_histogram"]["counts"]
    assert summary["worker_transports"] == [transport] and summary["errors"] == {}
    assert counts[0] == 1 and counts[1] == summary["updates"] - 1 and summary["staleness"]["max"] == 1, summary
    assert summary["test_accuracy"] >= 0.85, summary


def test_a_worker_killed_mid_run_does_not_stop_the_run(procs):
    server, endpoint = procs.start_server("--data-shards", "3", "--max-updates", "900", "--epochs", "100")
    workers = [procs.start("worker", "--connect", endpoint, "--name", f"w{i}", log=f"w{i}",
                           extra_env={"OPENBLAS_NUM_THREADS": "1"}) for i in range(3)]
    client = Client(endpoint, "test", server_wait=10)
    deadline = time.monotonic() + 60
    while client.request({"type": "stats"})["stats"]["version"] < 150:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    workers[1].send_signal(signal.SIGKILL)
    killed_at = client.request({"type": "stats"})["stats"]["version"]
    client.close()
    assert server.wait(120) == 0, procs.log("server")
    assert workers[1].wait(5) == -signal.SIGKILL
    for i in (0, 2):
        assert workers[i].wait(30) == 0, procs.log(f"w{i}")
        assert "worker done" in procs.log(f"w{i}")
    assert "server stopped at version 9" in procs.log("server")  # 900 or a few more
    assert killed_at < 900


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["INT", "TERM", "KILL"])
def test_stopping_train_leaves_no_process_behind(procs, tmp_path, sig):
    """Ctrl-C, a polite kill, or SIGKILL (no clean-up at all: the children's parent-death
    signal must take them down) of the launcher leaves no server or worker running."""
    proc = procs.start("train", "--workers", "2", "--epochs", "50", "--out", str(tmp_path / "run"), log="train")
    deadline = time.monotonic() + 60
    while "epoch" not in procs.log("train"):
        assert proc.poll() is None, procs.log("train")
        assert time.monotonic() < deadline, procs.log("train")
        time.sleep(0.1)
    assert len(procs.marked_pids()) == 4  # launcher, server, two workers
    proc.send_signal(sig)
    assert proc.wait(30) != 0
    deadline = time.monotonic() + 10
    while procs.marked_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert procs.marked_pids() == []


def test_pause_holds_worker_pushes_over_real_sockets(procs):
    """While paused the server answers the monitor but holds every worker's push (both paths)."""
    server, endpoint = procs.start_server("--data-shards", "2", "--epochs", "100")
    workers = [procs.start("worker", "--connect", endpoint, "--transport", t, log=f"w-{t}",
                           extra_env={"OPENBLAS_NUM_THREADS": "1"}) for t in ("shm", "zmq")]
    client = Client(endpoint, "test", server_wait=10)
    deadline = time.monotonic() + 60
    # both workers pushing (on a loaded machine one may still be loading its data at 50 updates)
    while sum(w["pushes"] > 0 for w in client.request({"type": "stats", "workers": True})["workers"]) < 2 \
            or client.request({"type": "stats"})["stats"]["version"] < 50:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client.request({"type": "pause"})
    frozen = client.request({"type": "stats"})["stats"]["version"]
    time.sleep(0.5)
    assert client.request({"type": "pull"})["version"] == frozen
    assert client.request({"type": "stats"})["stats"]["version"] == frozen
    client.request({"type": "resume"})
    time.sleep(0.5)
    reply = client.request({"type": "stats", "workers": True})
    assert reply["stats"]["version"] > frozen
    assert sorted(w["transport"] for w in reply["workers"]) == ["shm", "zmq"]
    client.request({"type": "shutdown"})
    client.close()
    assert server.wait(30) == 0
    assert all(w.wait(30) == 0 for w in workers)


@pytest.mark.parametrize("consistency", ["sync", "ssp", "async"])
def test_consistency_models_hold_over_real_processes_with_a_slow_worker(procs, tmp_path, consistency):
    """One worker 4x slower: sync never applies a stale gradient and paces both workers alike;
    ssp with bound 2 never lets the fast worker lead by more than 2 clocks; async lets the fast
    worker run, and the report flags the slow one as a straggler."""
    out = tmp_path / "run"
    proc = procs.start("train", "--workers", "2", "--epochs", "1", "--consistency", consistency,
                       "--ssp-bound", "2", "--slow-worker", "4", "--out", str(out), log="train")
    assert proc.wait(240) == 0, procs.log("train")
    summary = json.loads((out / "summary.json").read_text())
    pushes = [w["pushes"] for w in summary["per_worker"].values()]
    if consistency == "sync":
        assert summary["staleness"]["max"] == 0
        assert max(pushes) - min(pushes) <= 1  # a barrier every round
        assert summary["updates"] * 2 == pytest.approx(sum(pushes), abs=2)
    elif consistency == "ssp":
        assert summary["ssp_max_lead"] <= 2
        assert max(pushes) - min(pushes) <= 3  # the bound, plus the push in flight
    else:
        assert max(pushes) > 2 * min(pushes)
    assert summary["test_accuracy"] >= 0.85
    report = procs.start("report", str(out), log="report")
    assert report.wait(60) == 0, procs.log("report")
    text = procs.log("report")
    assert "where the time went" in text and "staleness: mean" in text and "worker-1" in text
    # sync and ssp pace everyone to the slowest, so only async shows unequal rates
    assert ("STRAGGLER" in text) == (consistency == "async")
    assert (out / "plots" / "staleness.png").exists() and (out / "plots" / "worker_throughput.png").exists()


def test_standalone_coordinator_ends_a_cluster_and_writes_the_run(procs, tmp_path):
    """psgd server + 2 psgd worker + psgd coordinator as separate processes, as on a cluster."""
    server, endpoint = procs.start_server("--data-shards", "2", "--epochs", "100", "--schedule", "plateau")
    out = tmp_path / "run"
    # three epochs: the workers train while the coordinator loads its data, and CI runs
    # found them past one epoch (1.06, 1.24) at its first look, whichever started first
    coord = procs.start("coordinator", "--connect", endpoint, "--epochs", "3", "--evals-per-epoch", "2",
                        "--out", str(out), log="coordinator")
    workers = [procs.start("worker", "--connect", endpoint, log=f"w{i}", extra_env={"OPENBLAS_NUM_THREADS": "1"})
               for i in range(2)]
    assert coord.wait(120) == 0, procs.log("coordinator")
    assert server.wait(30) == 0 and all(w.wait(30) == 0 for w in workers)
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["stop_reason"] == "epochs" and summary["epochs"] >= 3.0 and len(records) >= 2
    assert summary["staleness"]["count"] == summary["updates"]  # the histogram accounts for every push
    assert sum(w["pushes"] for w in summary["per_worker"].values()) == summary["updates"]
    assert json.loads((out / "config.json").read_text())["schedule"]["name"] == "plateau"
    assert (out / "weights.npz").exists() and "test accuracy" in procs.log("coordinator")


def test_a_server_whose_own_budget_ends_the_run_waits_for_its_coordinator(procs, tmp_path):
    """psgd server --max-updates under a standalone coordinator: the server keeps answering
    until the coordinator has evaluated the final weights and said shutdown, so the run is
    written rather than lost ("lost the server")."""
    server, endpoint = procs.start_server("--data-shards", "1", "--epochs", "1000", "--layers", "784,32,10",
                                          "--max-updates", "300")
    out = tmp_path / "run"
    coord = procs.start("coordinator", "--connect", endpoint, "--out", str(out), log="coordinator")
    client = Client(endpoint, "test", server_wait=20)
    deadline = time.monotonic() + 60
    # The worker starts once the coordinator has set the rate: a run that ended before any
    # coordinator came is one no coordinator can write.
    while not client.request({"type": "stats"})["stats"]["coordinated"]:
        assert time.monotonic() < deadline, procs.log("coordinator")
        time.sleep(0.05)
    client.close()
    worker = procs.start("worker", "--connect", endpoint, log="w", extra_env={"OPENBLAS_NUM_THREADS": "1"})
    assert coord.wait(60) == 0, procs.log("coordinator")
    assert server.wait(30) == 0 and worker.wait(30) == 0, procs.log("server")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "updates" and summary["updates"] == 300
    assert summary["test_accuracy"] > 0.5 and (out / "weights.npz").exists()


def test_psgd_status_shutdown_ends_the_run_and_the_coordinator_still_writes_it(procs, tmp_path):
    """An operator's `psgd status --shutdown` mid-run: the workers stop, and the coordinator
    evaluates the final weights and writes the run (it used to lose the server and write
    nothing)."""
    server, endpoint = procs.start_server("--data-shards", "1", "--epochs", "1000", "--layers", "784,32,10")
    out = tmp_path / "run"
    coord = procs.start("coordinator", "--connect", endpoint, "--out", str(out), log="coordinator")
    client = Client(endpoint, "test", server_wait=20)
    deadline = time.monotonic() + 90
    while not client.request({"type": "stats"})["stats"]["coordinated"]:  # the coordinator first, as the README says
        assert time.monotonic() < deadline and coord.poll() is None, procs.log("coordinator")
        time.sleep(0.05)
    worker = procs.start("worker", "--connect", endpoint, log="w", extra_env={"OPENBLAS_NUM_THREADS": "1"})
    while client.request({"type": "stats"})["stats"]["version"] < 200:  # training, under the coordinator
        assert time.monotonic() < deadline and coord.poll() is None, procs.log("coordinator")
        time.sleep(0.1)
    client.close()
    status = procs.start("status", "--connect", endpoint, "--shutdown", log="status")
    assert status.wait(60) == 0 and "told the server to end the run" in procs.log("status")
    assert coord.wait(60) == 0, procs.log("coordinator") + procs.log("server")
    assert server.wait(30) == 0 and worker.wait(30) == 0, procs.log("server")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "server stop" and summary["updates"] >= 200
    assert summary["test_accuracy"] > 0.5 and (out / "weights.npz").exists()


def test_a_coordinator_that_comes_late_counts_rates_only_over_what_it_watched(procs, tmp_path):
    """Workers that started before the coordinator trained unwatched: their updates are in
    the totals but not in the rates (an operator saw "54921.7k examples/s" from 3,654 earlier
    updates over 0.01 s), and the report says how many came before."""
    server, endpoint = procs.start_server("--data-shards", "1", "--epochs", "1000", "--layers", "784,32,10")
    worker = procs.start("worker", "--connect", endpoint, log="w", extra_env={"OPENBLAS_NUM_THREADS": "1"})
    client = Client(endpoint, "test", server_wait=20)
    deadline = time.monotonic() + 90
    while client.request({"type": "stats"})["stats"]["version"] < 1000:
        assert time.monotonic() < deadline and worker.poll() is None, procs.log("w")
        time.sleep(0.1)
    client.close()
    out = tmp_path / "run"
    coord = procs.start("coordinator", "--connect", endpoint, "--epochs", "1", "--out", str(out), log="coordinator")
    assert coord.wait(90) == 0, procs.log("coordinator")
    assert server.wait(30) == 0 and worker.wait(30) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates_before_watched"] >= 1000 and summary["updates"] >= summary["updates_before_watched"]
    watched = summary["updates"] - summary["updates_before_watched"]
    assert summary["pushes_per_s"] * summary["train_time"] == pytest.approx(watched, abs=1)
    assert "before this coordinator saw the run" in procs.log("coordinator")


def test_four_workers_with_the_defaults_and_the_report_of_where_the_time_went(procs, tmp_path):
    """psgd train --workers 4, all defaults. Measured: 98.10-98.32% test accuracy in 11 runs on
    one machine, 97.76% once in CI on another; with the momentum rule 98.00% and 98.01% here,
    and 97.29% in one clean CI run whose validation accuracy dipped from 96.9% to 91.5%
    mid-run and recovered (staleness mean 1.95). Asynchronous runs vary with timing; 97%
    still tells working defaults from the unstable ones they replaced (88% and 11% without
    the staleness rule and warm-up)."""
    out = tmp_path / "run"
    proc = procs.start("train", "--workers", "4", "--out", str(out), "--keep-timings", log="train")
    assert proc.wait(300) == 0, procs.log("train")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # what a failure needs to be understood: the validation curve, staleness, who pushed how much
    seen = {"val_accuracy": [r["val_accuracy"] for r in records], "staleness": summary["staleness"],
            "pushes": {w: r["pushes"] for w, r in summary["per_worker"].items()}}
    assert summary["test_accuracy"] >= 0.97, (summary["test_accuracy"], seen)
    assert summary["epochs"] >= 14 and len(summary["per_worker"]) == 4 and summary["failures"] == []
    report = procs.start("report", str(out), "--no-plots", log="report")
    assert report.wait(60) == 0
    text = procs.log("report")
    assert "where the time went: start-up" in text and "training" in text and "evaluation" in text
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["server.log"] + [f"worker-{i}.log" for i in range(4)]
    # each step's timings, for psgd simulate to replay: every push a worker made, and the server's applies
    assert sorted(p.name for p in (out / "timing").iterdir()) == ["server.npz"] + [f"worker-{i}.npz" for i in range(4)]
    from psgd.server.pushtimes import read_push_times
    from psgd.simulate.calibrate import measured_spec
    applied = read_push_times(out / "timing" / "server.npz")
    pushes = [summary["per_worker"][f"worker-{i}"]["pushes"] for i in range(4)]
    assert [int((~applied.refused[f"worker-{i}"]).sum()) for i in range(4)] == pushes and sum(pushes) == summary["updates"]
    refused = [summary["per_worker"][f"worker-{i}"]["refused"] for i in range(4)]
    assert [int(applied.refused[f"worker-{i}"].sum()) for i in range(4)] == refused
    spec = measured_spec(out)
    trips = spec.worker_trip_trace  # a worker's refused pushes are round trips too
    assert all(len(t) >= p for t, p in zip(trips, pushes)), ([len(t) for t in trips], pushes)
    # the rate of every update, as the coordinator set it: the warm-up's rise, at most the run's 0.1
    rates = np.array(spec.lr_trace)
    assert len(rates) == summary["updates"] and np.isfinite(rates).all(), (len(rates), summary["updates"])
    assert 0 < rates[0] < rates.max() <= 0.1 * (1 + 1e-6), (rates[0], rates.max())


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_a_worker_waits_out_a_briefly_absent_server(procs, transport):
    """The server is frozen (SIGSTOP) for 7 s, longer than one request's timeout: the worker
    retries on a fresh socket (zmq) or keeps waiting on its doorbell (shm), then trains on."""
    server, endpoint = procs.start_server("--data-shards", "1", "--epochs", "100")
    worker = procs.start("worker", "--connect", endpoint, "--transport", transport, log="w",
                         extra_env={"OPENBLAS_NUM_THREADS": "1"})
    client = Client(endpoint, "test", server_wait=20)

    def version():
        return client.request({"type": "stats"})["stats"]["version"]

    deadline = time.monotonic() + 60
    while version() < 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.send_signal(signal.SIGSTOP)
    time.sleep(7)
    server.send_signal(signal.SIGCONT)
    before = version()
    time.sleep(1.0)
    assert version() > before + 20, procs.log("w")  # training again
    assert worker.poll() is None
    client.request({"type": "shutdown"})
    client.close()
    assert worker.wait(30) == 0 and server.wait(30) == 0


def test_a_worker_gives_up_on_an_absent_server_with_a_clear_error(procs):
    import socket
    with socket.socket() as s:  # a port that nothing answers on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        worker = procs.start("worker", "--connect", f"tcp://127.0.0.1:{port}", "--server-wait", "2", log="w")
        assert worker.wait(30) == 2
    log = procs.log("w")
    assert "no answer from tcp://127.0.0.1:" in log and "for 2 s" in log and "Traceback" not in log


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_killed_and_resumed_from_its_checkpoint_workers_carry_on(procs, tmp_path):
    """SIGKILL the server mid-run and start it again with --resume on the same address: the
    workers rejoin by themselves and the run completes to its target (an update count the
    restarted server stops at). Updates lost = version at the kill - version restored, at
    most one interval's worth. One worker on each path: the zmq one notices by its request
    timing out, the shared-memory one by its doorbell closing."""
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    ckpt = tmp_path / "ckpt"
    server_args = ["server", "--bind", endpoint, "--data-shards", "2", "--epochs", "1000",
                   "--checkpoint-dir", str(ckpt), "--checkpoint-every", "0.5"]
    server = procs.start(*server_args, log="server1")
    workers = [procs.start("worker", "--connect", endpoint, "--transport", t, "--name", t, log=f"w-{t}",
                           extra_env={"OPENBLAS_NUM_THREADS": "1"}) for t in ("shm", "zmq")]

    def wait_for(client, ok, what, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            reply = client.request({"type": "stats", "workers": True})  # two workers: one page
            stats = {**reply["stats"], "workers": {str(r["worker_id"]): r for r in reply["workers"]}}
            if ok(stats):
                return stats
            assert time.monotonic() < deadline, f"{what}: {stats['version']} updates, workers {stats['workers']}"
            time.sleep(0.05)

    def both_pushing(stats):
        return sum(1 for w in stats["workers"].values() if w["pushes"] > 0) >= 2

    client = Client(endpoint, "test", server_wait=30)
    wait_for(client, lambda st: both_pushing(st) and st["version"] >= 600 and list(ckpt.glob("*.npz")),
             "training on the first server")
    v0, t0 = client.request({"type": "stats"})["stats"]["version"], time.monotonic()
    time.sleep(0.5)
    rate = (client.request({"type": "stats"})["stats"]["version"] - v0) / (time.monotonic() - t0)
    killed_at = client.request({"type": "stats"})["stats"]["version"]
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    target = killed_at + 2000  # a few seconds of training after the rejoin: enough to show it carries on
    server2 = procs.start(*server_args, "--resume", "--max-updates", str(target), log="server2")
    stats = wait_for(client, both_pushing, "both workers rejoining the restarted server")
    restored = int(re.search(r"resumed from .* at version (\d+)", procs.log("server2")).group(1))
    lost = killed_at - restored
    print(f"updates lost to the crash: {lost} (about {rate:.0f} updates/s, checkpoints every 0.5 s)")
    assert 0 <= lost <= rate * 0.5 * 1.5 + 20  # one interval's worth, with slack for timing
    assert stats["version"] > restored
    client.close()
    assert server2.wait(90) == 0, procs.log("server2")
    assert f"server stopped at version {target};" in procs.log("server2")
    for w, t in zip(workers, ("shm", "zmq")):
        assert w.wait(30) == 0, procs.log(f"w-{t}")
        assert re.search(r"[1-9]\d* reconnects", procs.log(f"w-{t}")), procs.log(f"w-{t}")
    # the killed server could not unlink its shared memory; the new one reaped it
    assert not [n for n in shm_segments() if f"-{server.pid}-" in n]


def test_an_interrupted_local_run_resumes_from_its_checkpoint(procs, tmp_path):
    """Ctrl-C a psgd train run in its third epoch (the server checkpoints as it stops), then
    psgd train --resume RUN_DIR finishes the budget from there, metrics appended."""
    out = tmp_path / "run"
    first = procs.start("train", "--workers", "2", "--epochs", "5", "--evals-per-epoch", "2", "--out", str(out),
                        log="first")
    deadline = time.monotonic() + 120
    while "epoch  2." not in procs.log("first"):
        assert first.poll() is None and time.monotonic() < deadline, procs.log("first")
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    assert first.wait(60) != 0
    records_before = (out / "metrics.jsonl").read_text().splitlines()
    assert list((out / "checkpoints").glob("checkpoint-*.npz"))
    second = procs.start("train", "--resume", str(out), log="second")
    assert second.wait(240) == 0, procs.log("second")
    assert "resumed from" in (out / "logs" / "server.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) > len(records_before) and records[0]["epoch"] < 1.5
    assert summary["epochs"] >= 5.0 and summary["test_accuracy"] >= 0.96
    assert records[len(records_before)]["epoch"] > 2.0  # the resumed part started where the first stopped


@pytest.mark.parametrize("transport", ["shm", "zmq"])
def test_downpour_n_fetch_and_n_push(procs, transport):
    """--n-push 4: one push per 4 steps carrying their summed gradient (4 x 128 examples);
    --n-fetch 2: fresh weights every 2 steps."""
    server, endpoint = procs.start_server("--data-shards", "1", "--epochs", "100")
    worker = procs.start("worker", "--connect", endpoint, "--transport", transport, "--max-steps", "40",
                         "--n-push", "4", "--n-fetch", "2", log="w", extra_env={"OPENBLAS_NUM_THREADS": "1"})
    assert worker.wait(60) == 0, procs.log("w")
    assert "40 steps, 10 pushes, 5120 examples" in procs.log("w")
    client = Client(endpoint, "test", server_wait=10)
    stats = client.request({"type": "stats"})["stats"]
    assert stats["version"] == 10 and stats["examples"] == 40 * 128
    client.request({"type": "shutdown"})
    client.close()
    assert server.wait(30) == 0
