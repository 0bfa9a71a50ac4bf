"""psgd simulate: the clock, the timings, and whole simulated runs on a small data set.

Every run here goes through the real ServerState (the simulator has no server rules of its
own); the data set is a small synthetic .npz so each run takes well under a second.
"""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from psgd.cli import cli
from psgd.config import TrainConfig
from psgd.coordinator.report import Run, comparison, text_report
from psgd.data import shard_indices
from psgd.data.prepared import prepare_data
from psgd.errors import ConfigError
from psgd.metrics import StalenessHistogram
from psgd.model.network import ModelSpec
from psgd.model.optim import OptimizerSpec
from psgd.model.schedules import ScheduleSpec
from psgd.simulate import Dist, EventQueue, SimSpec, Simulator, simulate, staleness_tv
from psgd.simulate.calibrate import measured_spec
from psgd.simulate.engine import shards_of


def make_blobs(folder, n: int) -> str:
    """3 separable classes in 12 dimensions, n examples."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2.0, (3, 12))
    y = rng.integers(0, 3, n)
    X = centers[y] + rng.normal(0, 1.0, (n, 12))
    path = folder / f"blobs{n}.npz"
    np.savez(path, X=X.astype(np.float32), y=y)
    return str(path)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return make_blobs(tmp_path_factory.mktemp("sim"), 3000)


def config(blobs, tmp_path=None, **kw) -> TrainConfig:
    base = dict(model=ModelSpec((12, 16, 3)), data=blobs, batch_size=16, epochs=2, workers=8, evals_per_epoch=4,
                out_dir=str(tmp_path) if tmp_path else None)
    base.update(kw)
    return TrainConfig(**base)


def run(cfg, spec=SimSpec()):
    sim = Simulator(prepare_data(cfg), spec, say=lambda text: None)
    return sim, sim.finish(sim.run())


# --- the clock and the timings -------------------------------------------------------------

def test_dist_parse_and_means():
    assert Dist.parse("2ms") == Dist("constant", 0.002)
    assert Dist.parse("exp:40us") == Dist("exponential", 40e-6)
    assert Dist.parse("lognormal:1.5s:0.2") == Dist("lognormal", 1.5, 0.2)
    rng = np.random.default_rng(1)
    for d in (Dist("exponential", 0.01), Dist("lognormal", 0.01, 0.5)):
        assert np.mean([d.sample(rng) for _ in range(20000)]) == pytest.approx(0.01, rel=0.05)
    for bad in ("fast", "-1ms", "exp:", "gauss:2ms", "lognormal:2ms:x", "exp:1ms:2", "nan"):
        with pytest.raises(ConfigError):
            Dist.parse(bad)


def test_event_queue_orders_by_time_then_by_scheduling():
    q = EventQueue()
    for t, name in ((2.0, "c"), (1.0, "a"), (2.0, "d"), (1.0, "b")):
        q.schedule(t, name)
    assert [q.pop()[1] for _ in range(4)] == ["a", "b", "c", "d"]


def test_shards_match_the_workers_shards():
    parts = shards_of(1000, 7, 3)
    for s in range(7):
        assert np.array_equal(parts[s], shard_indices(1000, s, 7, 3))


# --- whole runs ----------------------------------------------------------------------------

def digest(summary, out):
    weights = np.load(out / "weights.npz")
    h = hashlib.sha256()
    for k in sorted(weights.files):
        h.update(weights[k].tobytes())
    return h.hexdigest(), (out / "metrics.jsonl").read_text()


def test_same_seed_same_run_bit_for_bit(blobs, tmp_path):
    """Stragglers, deaths and comebacks, lognormal timings, ssp: twice the same, to the bit."""
    spec = SimSpec(compute=Dist("lognormal", 0.002, 0.5), delay=Dist("exponential", 1e-4), stragglers=2,
                   mtbf_s=0.05, downtime=Dist("exponential", 0.01))
    results = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        _, summary = run(config(blobs, out, consistency="ssp"), spec)
        results.append(digest(summary, out) + (summary["staleness_histogram"], summary["simulation"]["deaths"]))
    assert results[0] == results[1]
    assert results[0][3] > 0  # workers did die and come back
    other = tmp_path / "seed1"
    _, summary = run(config(blobs, other, consistency="ssp", seed=1), spec)
    assert digest(summary, other)[0] != results[0][0]


def test_run_directory_reads_as_a_run(blobs, tmp_path):
    sim, summary = run(config(blobs, tmp_path / "a"))
    r = Run(tmp_path / "a")
    assert r.summary["virtual_time"] and r.summary["simulated"]
    assert r.staleness().total == summary["updates"] == sim.store.version
    assert len(r.records) >= 8 and all(rec["virtual_time"] for rec in r.records)
    assert sorted(r.summary["per_worker"]) == sorted(f"worker-{i}" for i in range(8))
    assert sum(w["pushes"] for w in r.summary["per_worker"].values()) == summary["updates"]
    text = "\n".join(text_report(r))
    assert "virtual seconds" in text and "worker-7" in text
    run(config(blobs, tmp_path / "b", workers=2))
    table = comparison([r, Run(tmp_path / "b")])
    assert table[1].startswith("a*") and "simulated" in table[-1]
    assert summary["test_accuracy"] > 0.8


@pytest.mark.parametrize("consistency", ["async", "ssp", "sync"])
@pytest.mark.parametrize("rule", ["none", "divide", "dynsgd", "dcasgd"])
def test_every_gate_and_rule_trains(blobs, consistency, rule):
    cfg = config(blobs, consistency=consistency, staleness_rule=rule,
                 optimizer=OptimizerSpec("sgd") if rule == "dcasgd" else OptimizerSpec())
    sim, summary = run(cfg, SimSpec(stragglers=1))
    hist = summary["staleness"]
    assert summary["updates"] > 0 and summary["test_accuracy"] > 0.7
    if consistency == "sync":
        assert hist["max"] == 0 and summary["updates"] * 8 == hist["count"]  # one update per round of 8
    elif consistency == "ssp":
        assert summary["ssp_max_lead"] <= cfg.ssp_bound
    else:
        assert hist["mean"] > 3  # 8 workers, one straggler: about 7 other pushes between fetch and push


def test_pushes_are_the_servers(blobs):
    """The stores' counters, not the simulator's, say what was applied: every push went through the door."""
    # (no outlier guard here: on these separable blobs, converged, an honest stale push's norm
    # is thousands of times the median, and this test counts the staleness bound's refusals)
    sim, summary = run(config(blobs, max_staleness=2, outlier_k=0))
    assert sim.state.errors["too_stale"] > 0 and sim.counts["refused"] == sim.state.errors["too_stale"]
    assert summary["staleness"]["max"] <= 2


def test_dead_workers_data_is_handed_over_over_zmq_leases(blobs):
    cfg = config(blobs, transport="zmq", lease_s=0.01, epochs=3)
    spec = SimSpec(mtbf_s=0.02, downtime=Dist("constant", 0.05))
    sim, summary = run(cfg, spec)
    assert sim.counts["deaths"] > 0 and sim.counts["returns"] > 0
    assert any(r.expired for r in sim.state.members.workers.values())
    assert summary["stop_reason"] == "epochs"


def test_ten_thousand_workers_fit(tmp_path):
    """10,000 workers (a real server refuses beyond 4,096) of a small model: runs and says so."""
    cfg = config(make_blobs(tmp_path, 25_000), workers=10_000, batch_size=4, epochs=0.1, model=ModelSpec((12, 4, 3)))
    sim, summary = run(cfg, SimSpec(compute=Dist("exponential", 0.002)))
    assert summary["updates"] > 100 and len(summary["per_worker"]) > 100
    assert summary["simulation"]["staleness_mean"] > 64 == summary["staleness"]["p50"]  # beyond the histogram's cap
    assert any("4096 workers" in line for line in summary["report"])


def test_memory_limit_and_bad_settings_refused(blobs):
    data = prepare_data(config(blobs, workers=1000))
    with pytest.raises(ConfigError, match="MB"):
        Simulator(data, SimSpec(memory_limit_mb=0.5))
    with pytest.raises(ConfigError, match="multiple"):
        Simulator(prepare_data(config(blobs, n_fetch=3, n_push=2)))
    with pytest.raises(ConfigError, match="10000"):
        Simulator(prepare_data(config(blobs, workers=10_001)))
    with pytest.raises(ConfigError, match="at least one example"):
        Simulator(prepare_data(config(blobs, workers=5000)))


def test_n_push_windows(blobs):
    sim, summary = run(config(blobs, n_fetch=4, n_push=2))
    assert summary["examples"] >= 2 * 16 * summary["updates"] * 0.9


def test_cli_simulate_and_bad_timing(blobs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(cli, ["simulate", "--data", blobs, "--layers", "12,16,3", "--workers", "4", "--epochs", "1",
                              "--batch-size", "16", "--compute", "exp:1ms", "--stragglers", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["simulation"]["spec"]["compute"]["kind"] == "exponential"
    res = runner.invoke(cli, ["simulate", "--data", blobs, "--layers", "12,16,3", "--compute", "soon", "--out", str(out)])
    assert res.exit_code == 2 and "not a time" in res.output and "Traceback" not in res.output


def test_staleness_tv():
    a, b = StalenessHistogram(), StalenessHistogram()
    for v in (0, 1, 1, 2):
        a.add(v)
    assert staleness_tv(a, a) == 0
    for v in (5, 6):
        b.add(v)
    assert staleness_tv(a, b) == 1


def test_shared_cores_lower_staleness(blobs):
    """8 workers on 2 cores compute two at a time and read their weights when they get one:
    fewer pushes land between a worker's read and its push than with a core each."""
    spec = SimSpec(compute=Dist("constant", 0.002), delay=Dist("constant", 1e-5))
    _, own = run(config(blobs), spec)
    _, shared = run(config(blobs), SimSpec(compute=spec.compute, delay=spec.delay, cores=2))
    assert shared["staleness"]["mean"] < own["staleness"]["mean"] - 0.5
    assert shared["train_time"] > 3 * own["train_time"]  # and the run takes 4 times as long


def test_measured_spec_reads_a_clusters_logs(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for i, (joined, steps, compute, comm) in enumerate((("10:00:01.500", 100, 0.2, 0.6), ("10:00:00.250", 50, 0.2, 0.2))):
        (logs / f"worker-{i}.log").write_text(
            f"{joined} worker INFO worker-{i} joined 1 server shard(s) at version 0: data shards [{i}] of 2\n"
            f"worker done: {steps} steps, {steps - 1} pushes, 999 examples, mean staleness 0.5, "
            f"compute {compute} s, communication {comm} s, 0 reconnects\n")
    spec = measured_spec(tmp_path, sigma=0.2, before_apply=0.25)
    assert spec.worker_compute == pytest.approx((0.002, 0.004))
    assert spec.worker_start == pytest.approx((1.25, 0.0))
    trip = (0.6 / 99 + 0.2 / 49) / 2
    assert spec.delay.mean == pytest.approx(trip / 4) and spec.reply_delay.mean == pytest.approx(trip * 3 / 4)
    with pytest.raises(Exception, match="no worker logs"):
        measured_spec(tmp_path / "nothing")


# --- measured timing traces, and their replay -------------------------------------------

def _trace_file(path, laps, clock_start=100.0, max_laps=1000):
    """A worker's trace of ``laps`` [(phase, seconds)], as psgd worker writes it."""
    from psgd.worker.timing import StepTimer, TimingTrace
    now = [clock_start]
    timer = StepTimer(clock=lambda: now[0], trace=TimingTrace(max_laps))
    timer.start()
    for phase, seconds in laps:
        now[0] += seconds
        timer.lap(phase)
    timer.trace.save(path)
    return timer.trace


def test_a_timing_trace_keeps_every_lap_in_order_and_is_bounded(tmp_path):
    from psgd.worker.timing import read_trace
    laps = [("pull", 0.001), ("batch", 0.0005), ("compute", 0.002), ("push", 0.003), ("other", 0.0001)]
    _trace_file(tmp_path / "w.npz", laps)
    t = read_trace(tmp_path / "w.npz")
    assert t["phase"] == ["start"] + [p for p, _ in laps] and t["clock_start"] == 100.0 and t["dropped"] == 0
    assert t["end"] == pytest.approx(np.cumsum([0.0] + [s for _, s in laps]))
    bounded = _trace_file(tmp_path / "b.npz", laps * 10, max_laps=4)
    assert bounded.n == 4 and bounded.dropped == 47  # the start mark and 50 laps: the first 4 kept, 47 counted
    assert read_trace(tmp_path / "b.npz")["phase"] == ["start", "pull", "batch", "compute"]
    assert (tmp_path / "b.npz").stat().st_size < 2000
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(Exception, match="bad.npz"):
        read_trace(tmp_path / "bad.npz")


def test_push_times_say_whose_push_was_applied_when_from_which_weights_and_are_bounded(tmp_path):
    from psgd.server.pushtimes import PushTimes, read_push_times
    now = iter([1.0, 2.0, 3.0, 4.0])
    times = PushTimes(max_pushes=3, clock=lambda: next(now))
    for name, version, base in (("worker-1", 1, 0), ("worker-0", 2, 0), ("worker-1", 3, 1), ("worker-0", 4, 2)):
        times.add(name, version, base)
    assert times.dropped == 1
    times.save(tmp_path / "server.npz")
    log = read_push_times(tmp_path / "server.npz")
    assert {k: list(v) for k, v in log.times.items()} == {"worker-1": [1.0, 3.0], "worker-0": [2.0]}
    assert list(log.bases["worker-1"]) == [0, 1] and log.version_time == {1: 1.0, 2: 2.0, 3: 3.0}
    assert log.version_lr == {}  # no rates were given: none are kept


def test_push_times_keep_the_rate_each_update_was_applied_at_and_calibrate_replays_it(tmp_path):
    from psgd.server.pushtimes import PushTimes, read_push_times
    from psgd.simulate.calibrate import _rate_trace
    times = PushTimes()
    times.add("worker-0", 1, 0, lr=0.01)
    times.add("worker-1", 1, 0, refused=True)  # a refusal has no rate
    times.add("worker-1", 2, 0, lr=0.02)
    times.add("worker-0", 4, 1, lr=0.04)  # version 3 was made elsewhere (a rollback's set_params)
    times.save(tmp_path / "server.npz")
    log = read_push_times(tmp_path / "server.npz")
    assert log.version_lr == {1: 0.01, 2: 0.02, 4: 0.04}
    trace = _rate_trace(log)
    assert trace[:2] == (0.01, 0.02) and np.isnan(trace[2]) and trace[3] == 0.04
    # a log written before rates were kept replays the schedule, as before
    z = dict(np.load(tmp_path / "server.npz"))
    del z["lr"]
    np.savez(tmp_path / "old.npz", **z)
    assert read_push_times(tmp_path / "old.npz").version_lr == {} and _rate_trace(read_push_times(tmp_path / "old.npz")) == ()


def test_a_rate_trace_replaces_the_schedule_where_it_is_known(blobs):
    """Rates 0 for the first 40 updates: the weights do not move, then the schedule takes
    over (NaN, and beyond the trace's end); the recorded rates say so."""
    cfg = config(blobs, workers=2, schedule=ScheduleSpec("constant", warmup=0))
    frozen, _ = run(cfg, SimSpec(lr_trace=(0.0,) * 40 + (float("nan"),) * 5))
    plain, _ = run(cfg)
    assert frozen.store.version == plain.store.version
    assert not np.array_equal(frozen.store.params, plain.store.params)
    stuck, _ = run(dataclasses.replace(cfg, max_updates=40), SimSpec(lr_trace=(0.0,) * 40))
    fresh = Simulator(prepare_data(cfg), SimSpec(), say=lambda text: None)
    assert stuck.store.version == 40 and np.array_equal(stuck.store.params, fresh.store.params)
    with pytest.raises(ConfigError, match="rate trace"):
        SimSpec(lr_trace=(-1.0,))


def _push_log(folder, applies):
    """The server's push times: ``applies`` [(clock time, worker name, version, base
    version[, refused])]."""
    from psgd.server.pushtimes import PushTimes
    clock = iter([t for t, *_ in applies])
    server = PushTimes(clock=lambda: next(clock))
    for _, name, version, base, *refused in applies:
        server.add(name, version, base, *refused)
    server.save(folder / "server.npz")


def test_measured_spec_replays_traces_split_at_the_servers_apply(tmp_path):
    from psgd.server.pushtimes import read_push_times
    from psgd.simulate.calibrate import trace_windows
    from psgd.worker.timing import read_trace
    timing = tmp_path / "timing"
    # worker-0 starts at clock 100: pull 1 ms, then two pushes; worker-1 at clock 100.5, one push
    laps0 = [("pull", 0.001), ("batch", 0.0005), ("compute", 0.002), ("push", 0.002), ("other", 0.0001),
             ("batch", 0.0004), ("compute", 0.002), ("push", 0.003), ("other", 0.0001)]
    _trace_file(timing / "worker-0.npz", laps0, clock_start=100.0)
    _trace_file(timing / "worker-1.npz", [("pull", 0.002), ("batch", 0.001), ("compute", 0.004), ("push", 0.001)],
                clock_start=100.5)
    _push_log(timing, [(100.0045, "worker-0", 1, 0), (100.0090, "worker-0", 2, 1), (100.5075, "worker-1", 3, 2)])
    cycle = trace_windows(read_trace(timing / "worker-0.npz"), read_push_times(timing / "server.npz"), "worker-0")
    assert cycle.compute == pytest.approx([0.0025, 0.0025]) and cycle.trip == pytest.approx([0.002, 0.003])
    assert cycle.there == pytest.approx([0.001, 0.001]) and cycle.first_read == pytest.approx(0.001)
    assert trace_windows(read_trace(timing / "worker-0.npz")).there == [None, None]  # no server times: not measured
    spec = measured_spec(tmp_path)
    flat = lambda traces: [t for trace in traces for t in trace]  # noqa: E731
    assert flat(spec.worker_compute_trace) == pytest.approx([0.0025, 0.0025, 0.005])
    assert flat(spec.worker_there_trace) == pytest.approx([0.001, 0.001, 0.0005])
    assert spec.worker_start == pytest.approx((0.0, 0.501)) and spec.start_holding_weights  # first reads
    assert spec.server.mean == 0.0 and spec.replay == "ordered"
    # a worker that joined late and was still computing its first window when the run ended
    _trace_file(timing / "worker-2.npz", [("pull", 0.001), ("batch", 0.001), ("compute", 0.1)], clock_start=100.9)
    spec = measured_spec(tmp_path)
    assert spec.worker_compute_trace[2] == pytest.approx((0.101,)) and spec.worker_start[2] == pytest.approx(0.9)
    assert spec.worker_trip_trace[2] == pytest.approx((((0.002 + 0.003) / 2 + 0.001) / 2,))
    # a worker that never joined (the run ended while it started) starts a minute after the run's end
    (tmp_path / "config.json").write_text(json.dumps({"workers": 4}))
    (tmp_path / "summary.json").write_text(json.dumps({"wall_time": 5.0}))
    spec = measured_spec(tmp_path)
    assert len(spec.worker_compute_trace) == 4 and spec.worker_start[3] == 65.0
    (timing / "server.npz").unlink()  # without the server's times: the fixed fraction
    assert measured_spec(tmp_path, before_apply=0.25).worker_there_trace == ()


def test_a_read_the_workers_clock_put_after_a_later_apply_moves_before_it(tmp_path):
    """worker-0 read version 1 (its own push) but looked at the clock only after worker-1's
    push made version 2: its read moves to just before that apply, the way back shortens
    and the next window's compute grows by as much."""
    from psgd.server.pushtimes import read_push_times
    from psgd.simulate.calibrate import READ_BEFORE_S, trace_windows
    from psgd.worker.timing import read_trace
    laps = [("pull", 0.001), ("compute", 0.002), ("push", 0.004), ("compute", 0.002), ("push", 0.002)]
    _trace_file(tmp_path / "worker-0.npz", laps, clock_start=0.0)  # reads at 0.001 and 0.007
    _push_log(tmp_path, [(0.004, "worker-0", 1, 0), (0.0055, "worker-1", 2, 0), (0.010, "worker-0", 3, 1)])
    cycle = trace_windows(read_trace(tmp_path / "worker-0.npz"), read_push_times(tmp_path / "server.npz"), "worker-0")
    early = 0.007 - (0.0055 - READ_BEFORE_S)
    assert cycle.trip == pytest.approx([0.004 - early, 0.002]) and cycle.compute == pytest.approx([0.002, 0.002 + early])
    assert cycle.there == pytest.approx([0.001, 0.001])


def _oracle_staleness(starts, computes, theres, backs, pushes: int) -> list[int]:
    """The staleness of the first ``pushes`` applies of a timeline the traces imply, worked
    out by hand: a worker reads at its start, computes, its push is applied after the way
    there, it reads again after the way back; a push's staleness is the applies between
    its worker's read and its own."""
    applies = []  # (apply time, read time)
    for i, start in enumerate(starts):
        t = start
        for k in range(pushes):
            at = t + computes[i][k % len(computes[i])] + theres[i][k % len(theres[i])]
            applies.append((at, t))
            t = at + backs[i][k % len(backs[i])]
    applies.sort()
    times = [a for a, _ in applies]
    return [int(np.searchsorted(times, a) - np.searchsorted(times, r)) for a, r in applies[:pushes]]


def test_an_ordered_replay_reproduces_the_measured_timelines_staleness(blobs):
    """Three workers with irregular measured times (cycled: the traces are shorter than the
    run): the simulation's staleness histogram is the one the timeline implies, exactly."""
    rng = np.random.default_rng(3)
    n = 3
    computes = tuple(tuple(rng.uniform(0.5e-3, 4e-3, 37)) for _ in range(n))
    trips = tuple(tuple(rng.uniform(0.2e-3, 3e-3, 29)) for _ in range(n))
    theres = tuple(tuple(t * f for t, f in zip(trip, rng.uniform(0, 1, len(trip)))) for trip in trips)
    starts = (0.0, 0.0013, 0.0021)
    spec = SimSpec(worker_compute_trace=computes, worker_trip_trace=trips, worker_there_trace=theres,
                   worker_start=starts, start_holding_weights=True)
    # no outlier guard: a refused push leaves the timeline (its worker pulls afresh)
    sim, summary = run(config(blobs, workers=n, outlier_k=0), spec)
    assert sim.counts["refused"] == 0
    backs = [[t - w for t, w in zip(trip, there)] for trip, there in zip(trips, theres)]
    expected = StalenessHistogram()
    for s in _oracle_staleness(starts, computes, theres, backs, summary["updates"]):
        expected.add(s)
    got = StalenessHistogram.from_dict(summary["staleness_histogram"])
    assert got.counts == expected.counts and summary["staleness"]["max"] >= 2
    shuffled, _ = run(config(blobs, workers=n), SimSpec(**{**spec.__dict__, "replay": "shuffled"}))
    for w, times in zip(shuffled.workers, computes):  # the same times, in another order
        assert sorted(w.compute_trace.times) == sorted(times) and w.compute_trace.times != list(times)
    with pytest.raises(ConfigError, match="compute traces for 3 workers"):
        run(config(blobs, workers=n), SimSpec(worker_compute_trace=computes[:2]))
    with pytest.raises(ConfigError, match="same length"):
        SimSpec(worker_trip_trace=trips, worker_there_trace=theres[:2])
    with pytest.raises(ConfigError, match="replay"):
        SimSpec(replay="backwards")


def test_an_apply_the_server_clocked_after_a_read_that_saw_it_moves_before_that_read(tmp_path):
    """worker-1 read version 2 at 0.0050, but the server's clock put that apply at 0.0052
    (descheduled between the apply and the clock): the apply moves to just before the
    read, and the versions before it with it when they were clocked later still."""
    from psgd.server.pushtimes import read_push_times
    from psgd.simulate.calibrate import READ_BEFORE_S, settle_applies
    _push_log(tmp_path, [(0.0040, "worker-0", 1, 0), (0.0052, "worker-0", 2, 1), (0.0060, "worker-1", 2, 0, True),
                         (0.0090, "worker-1", 3, 2)])
    log = settle_applies(read_push_times(tmp_path / "server.npz"), [(0.0050, 2), (0.0030, 0), (0.0080, None)])
    assert log.version_time == pytest.approx({1: 0.0040, 2: 0.0050 - READ_BEFORE_S, 3: 0.0090})
    assert list(log.times["worker-0"]) == pytest.approx([0.0040, 0.0050 - READ_BEFORE_S])
    assert list(log.times["worker-1"]) == pytest.approx([0.0060, 0.0090])  # a refusal keeps its time
    assert list(log.refused["worker-1"]) == [True, False]
