"""The live view of a run: the snapshot the coordinator keeps, Prometheus /metrics (parsed
with prometheus_client's own parser), the dashboard's HTTP server, and one real local run
watched from outside: scraped during and after, and loaded in a real headless Chromium.

The browser test needs Debian's ``chromium``: CI (which sets CI=true and installs it in
.ci/run) fails without it; elsewhere the test skips, saying so.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from psgd.coordinator.dashboard import Dashboard, parse_address
from psgd.coordinator.exporter import exposition, registry_for
from psgd.coordinator.live import LiveRun, snapshot_of_run_dir
from psgd.errors import ConfigError
from psgd.metrics import STALENESS_CAP

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


# --- the snapshot and the exporter, in-process ------------------------------------------

def _record(worker_id, name, examples, pushes, stale_counts=None, timing=None, connected=True):
    counts = [0] * (STALENESS_CAP + 1)
    for value, n in (stale_counts or {}).items():
        counts[value] = n
    return {"worker_id": worker_id, "name": name, "examples": examples, "pushes": pushes, "refused": 0,
            "connected": connected, "staleness": {"cap": STALENESS_CAP, "counts": counts, "max": max(stale_counts or [0])},
            "timing": timing}


def _fed_run():
    now = [100.0]
    live = LiveRun("r", {"workers": 2, "model": {"sizes": [4, 3]}}, clock=lambda: now[0])
    counts = [0] * (STALENESS_CAP + 1)
    counts[0], counts[1], counts[5], counts[STALENESS_CAP] = 10, 4, 2, 1
    live.on_stats({"version": 17, "examples": 1700, "lr": 0.05, "bytes_in": 1000, "bytes_out": 5000,
                   "errors": {"too_stale": 3}, "workers_connected": 2,
                   "staleness": {"cap": STALENESS_CAP, "counts": counts, "max": 70}})
    live.on_workers({"1": _record(1, "a", 100, 1), "2": _record(2, "b", 100, 1)})
    now[0] += 2.0
    live.on_workers({"1": _record(1, "a", 1100, 11, {0: 10}, {"wall": 4.0, "compute": 3.0, "push": 1.0}),
                     "2": _record(2, "b", 300, 3, {2: 3}, {"wall": 4.0, "compute": 1.0, "sleep": 3.0})})
    live.on_eval({"time": 1.0, "updates": 17, "lr": 0.05, "val_loss": 0.5, "val_accuracy": 0.8, "epoch": 0.1})
    return live


def test_a_live_run_keeps_worker_lanes_rates_and_stragglers():
    snap = _fed_run().snapshot()
    a, b = snap["workers"]["a"], snap["workers"]["b"]
    assert a["examples_per_s"] == 500.0 and b["examples_per_s"] == 100.0
    assert a["series"] == [[2.0, 500.0, 0.0]] and b["series"] == [[2.0, 100.0, 2.0]]
    assert b["straggler"] and not a["straggler"]
    assert b["time_shares"]["sleep"] == 0.75 and a["time_shares"]["accounted"] == 1.0
    assert snap["phase"] == "training" and snap["updates"] == 17 and snap["val_accuracy"] == 0.8


def test_metrics_follow_prometheus_conventions_and_say_what_the_run_says():
    live = _fed_run()
    text = exposition(registry_for(live.snapshot)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, family in families.items():
        assert name.startswith("psgd_"), name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), name
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("psgd_updates_applied_total", ())] == 17
    assert value[("psgd_examples_total", ())] == 1700
    assert value[("psgd_received_bytes_total", ())] == 1000 and value[("psgd_sent_bytes_total", ())] == 5000
    assert value[("psgd_refused_pushes_total", (("code", "too_stale"),))] == 3
    assert value[("psgd_refused_pushes_total", (("code", "bad_field"),))] == 0
    # the staleness histogram: cumulative, exact, the overflow bucket only in +Inf
    assert families["psgd_push_staleness"].type == "histogram"
    assert value[("psgd_push_staleness_bucket", (("le", "0.0"),))] == 10
    assert value[("psgd_push_staleness_bucket", (("le", "4.0"),))] == 14
    assert value[("psgd_push_staleness_bucket", (("le", "6.0"),))] == 16
    assert value[("psgd_push_staleness_bucket", (("le", "63.0"),))] == 16
    assert value[("psgd_push_staleness_bucket", (("le", "+Inf"),))] == 17 == value[("psgd_push_staleness_count", ())]
    assert value[("psgd_push_staleness_sum", ())] == 4 + 10 + STALENESS_CAP
    assert value[("psgd_learning_rate", ())] == 0.05 and value[("psgd_validation_accuracy", ())] == 0.8
    assert ("psgd_test_accuracy", ()) not in value  # not known before the end: no made-up sample
    assert value[("psgd_run_phase", (("phase", "training"),))] == 1
    assert value[("psgd_run_phase", (("phase", "finished"),))] == 0
    assert value[("psgd_workers_alive", ())] == 2
    assert value[("psgd_worker_examples_per_second", (("worker", "b"),))] == 100
    assert value[("psgd_worker_pushes_total", (("worker", "a"),))] == 11
    assert value[("psgd_worker_straggler", (("worker", "b"),))] == 1
    assert value[("psgd_worker_time_seconds_total", (("phase", "sleep"), ("worker", "b")))] == 3.0
    assert value[("psgd_worker_time_ratio", (("phase", "compute"), ("worker", "a")))] == 0.75


@pytest.mark.parametrize("text, expected", [
    ("8050", ("127.0.0.1", 8050)), ("0", ("127.0.0.1", 0)), ("0.0.0.0:9108", ("0.0.0.0", 9108)),
    (":9000", ("127.0.0.1", 9000)), ("[::1]:8051", ("::1", 8051)), ("localhost", ("localhost", 8050)),
])
def test_a_dashboard_address_is_host_port_or_a_port_on_localhost(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("bad", ["host:port", "1.2.3.4:70000", "a:-1"])
def test_a_bad_dashboard_address_is_one_clear_error(bad):
    with pytest.raises(ConfigError, match="port"):
        parse_address(bad)


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.status, reply.headers.get("Content-Type"), reply.read()


def test_the_server_answers_page_data_and_metrics_and_sends_nan_as_null():
    live = _fed_run()
    live.on_eval({"time": 2.0, "updates": 20, "lr": 0.05, "val_loss": float("nan"), "val_accuracy": 0.1})
    board = Dashboard(lambda: [live.snapshot()], ("127.0.0.1", 0))
    try:
        status, kind, body = _get(board.url)
        assert status == 200 and kind.startswith("text/html") and b"/api/runs" in body
        assert b"http://" not in body and b"https://" not in body  # nothing from elsewhere: it works offline
        status, kind, body = _get(board.url + "api/runs")
        runs = json.loads(body)  # strict JSON: NaN would not parse in a browser
        assert runs[0]["val_loss"] is None and runs[0]["updates"] == 17
        status, kind, body = _get(board.url + "metrics")
        assert kind.startswith("text/plain") and b"psgd_updates_applied_total 17.0" in body
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(board.url + "nothing")
        assert err.value.code == 404
    finally:
        board.close()


def test_a_dashboard_on_a_taken_port_is_one_clear_error():
    board = Dashboard(lambda: [], ("127.0.0.1", 0))
    try:
        with pytest.raises(ConfigError, match="cannot serve the dashboard"):
            Dashboard(lambda: [], ("127.0.0.1", board.httpd.server_address[1]))
    finally:
        board.close()


# --- a real run, scraped and watched in a real browser ----------------------------------

@pytest.fixture
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI=true but chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    return path


def _browse(chromium, url, screenshot: Path) -> str:
    """The page as a real browser rendered it (its scripts ran), and a screenshot of it."""
    profile = tempfile.mkdtemp(prefix="psgd-chromium-")
    try:
        done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=4000",
                               "--window-size=1400,1000", f"--screenshot={screenshot}", "--dump-dom", url],
                              capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    keep = os.environ.get("PSGD_SCREENSHOT_DIR")  # where a person (or CI) wants to look at them
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / screenshot.name)
    return done.stdout


def _page_values(dom: str, run: str | None = None) -> dict:
    """``data-metric`` -> ``data-value`` of one run's section (the first, or the named one)."""
    body = dom.split("<script")[0]  # the rendered page, not the script that wrote it
    sections = re.split(r'<section class="run" ', body)[1:]
    if run is not None:
        sections = [s for s in sections if f'data-run="{run}"' in s]
    section = sections[0]
    values = dict(re.findall(r'data-metric="(\w+)" data-value="([^"]*)"', section))
    values["phase"] = re.search(r'data-phase="(\w+)"', section).group(1)
    values["lanes"] = re.findall(r'data-worker="([^"]+)" data-pushes="(\d+)"', section)
    values["shares"] = [float(x) for x in re.findall(r'data-share="([^"]+)"', section)]
    return values


def _scrape(url) -> dict:
    _, _, body = _get(url + "metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def _wait_for(what, predicate, seconds, proc=None, log=""):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        assert proc is None or proc.poll() is None, f"the process ended while waiting for {what}:\n{log and log()}"
        assert time.monotonic() < deadline, f"no {what} within {seconds} s:\n{log and log()}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_live_run_scraped_and_watched_in_a_browser_matches_its_summary(procs, tmp_path, chromium):
    run = tmp_path / "run"
    train = procs.start("train", "--workers", "2", "--slow-worker", "3", "--epochs", "0.2", "--evals-per-epoch", "25",
                        "--validation", "2000", "--dashboard", "127.0.0.1:0", "--dashboard-hold", "120",
                        "--out", str(run), log="train", extra_env={"OPENBLAS_NUM_THREADS": "1"})
    log = lambda: procs.log("train")  # noqa: E731
    url = _wait_for("dashboard address", lambda: (re.findall(r"dashboard at (http://\S+/) ", log()) or [None])[0],
                    60, train, log)
    key = lambda name, **labels: (name, tuple(sorted(labels.items())))  # noqa: E731

    # During the run: counters only go up, the histogram counts every applied push, and
    # the page a browser renders sits between two scrapes.
    _wait_for("an evaluation", lambda: key("psgd_validation_accuracy") in _scrape(url), 90, train, log)
    before = _scrape(url)
    dom = _browse(chromium, url, tmp_path / "dashboard-live.png")
    after = _scrape(url)
    page = _page_values(dom)
    for name in ("psgd_updates_applied_total", "psgd_examples_total", "psgd_received_bytes_total"):
        assert before[key(name)] <= after[key(name)], name
    for scrape in (before, after):
        assert scrape[key("psgd_push_staleness_count")] == scrape[key("psgd_updates_applied_total")]
    assert before[key("psgd_updates_applied_total")] <= int(page["updates"]) <= after[key("psgd_updates_applied_total")]
    assert page["phase"] in ("training", "finished")

    # After it: the last scrape (the run is held on show) and the page say what the summary says.
    summary_file = run / "summary.json"
    _wait_for("the summary", summary_file.exists, 120, train, log)
    final = _wait_for("the finished phase", lambda: (m := _scrape(url))[key("psgd_run_phase", phase="finished")] == 1 and m,
                      30, train, log)
    summary = json.loads(summary_file.read_text())
    assert final[key("psgd_updates_applied_total")] == summary["updates"]
    assert final[key("psgd_examples_total")] == summary["examples"]
    assert final[key("psgd_received_bytes_total")] == summary["bytes_in"]
    assert final[key("psgd_sent_bytes_total")] == summary["bytes_out"]
    assert final[key("psgd_push_staleness_count")] == summary["staleness"]["count"]
    assert final[key("psgd_test_accuracy")] == summary["test_accuracy"]
    for code, n in summary["errors"].items():
        assert final[key("psgd_refused_pushes_total", code=code)] == n
    assert set(summary["per_worker"]) == {"worker-0", "worker-1"}
    for name, w in summary["per_worker"].items():
        assert final[key("psgd_worker_pushes_total", worker=name)] == w["pushes"]
        if w["time_shares"]:
            assert w["time_shares"]["accounted"] == pytest.approx(1.0, abs=0.05)
    dom = _browse(chromium, url, tmp_path / "dashboard-final.png")
    page = _page_values(dom)
    assert page["phase"] == "finished" and int(page["updates"]) == summary["updates"]
    assert float(page["test_accuracy"]) == summary["test_accuracy"]
    assert sorted(page["lanes"]) == sorted((n, str(w["pushes"])) for n, w in summary["per_worker"].items())
    train.send_signal(signal.SIGTERM)  # ends the hold
    train.wait(30)

    # psgd report --serve: finished runs side by side, the same page.
    shutil.copytree(run, tmp_path / "run-copy")
    report = procs.start("report", "--serve", "--address", "127.0.0.1:0", str(run), str(tmp_path / "run-copy"),
                         log="report")
    rlog = lambda: procs.log("report")  # noqa: E731
    rurl = _wait_for("the report's address", lambda: (re.findall(r"at (http://\S+/) ", rlog()) or [None])[0],
                     30, report, rlog)
    runs = json.loads(_get(rurl + "api/runs")[2])
    assert [r["name"] for r in runs] == ["run", "run-copy"] and all(not r["live"] for r in runs)
    dom = _browse(chromium, rurl, tmp_path / "report-serve.png")
    for name in ("run", "run-copy"):
        page = _page_values(dom, name)
        assert int(page["updates"]) == summary["updates"] and page["phase"] == "finished"
        assert len(page["lanes"]) == 2
    report.send_signal(signal.SIGTERM)
    assert report.wait(30) == 0


def test_a_server_serves_its_own_metrics_with_an_option(procs, tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    data = tmp_path / "small.npz"  # a small data set: the worker starts in a moment
    np.savez(data, X=rng.standard_normal((600, 20)).astype(np.float32), y=rng.integers(0, 3, 600))
    server, endpoint = procs.start_server("--data", str(data), "--layers", "20,16,3", "--validation", "100",
                                          "--data-shards", "1", "--epochs", "100000", "--metrics", "127.0.0.1:0")
    log = lambda: procs.log("server")  # noqa: E731
    url = _wait_for("the metrics address", lambda: (re.findall(r"dashboard at (http://\S+/) ", log()) or [None])[0],
                    30, server, log)
    worker = procs.start("worker", "--connect", endpoint, "--name", "w0", log="w0",
                         extra_env={"OPENBLAS_NUM_THREADS": "1"})
    key = lambda name, **labels: (name, tuple(sorted(labels.items())))  # noqa: E731
    seen = _wait_for("pushes on the server's /metrics",
                     lambda: (m := _scrape(url)).get(key("psgd_worker_pushes_total", worker="w0"), 0) > 0 and m,
                     60, server, log)
    assert seen[key("psgd_updates_applied_total")] >= seen[key("psgd_push_staleness_count")] > 0
    assert seen[key("psgd_workers_alive")] == 1
    server.send_signal(signal.SIGTERM)  # a clean stop: it tells the worker, which ends too
    assert server.wait(60) == 0, log()
    assert worker.wait(30) == 0, procs.log("w0")
