"""The coordinator's pure parts: straggler flags, the per-worker summary."""

from psgd.coordinator.loop import per_worker, stragglers
from psgd.metrics import StalenessHistogram


def test_stragglers_are_workers_far_below_the_others():
    assert stragglers({"a": 40.0, "b": 15.0}) == ["b"]
    assert stragglers({"a": 40.0, "b": 30.0}) == []
    assert stragglers({"a": 40.0, "b": 42.0, "c": 39.0, "d": 10.0}) == ["d"]
    assert stragglers({"a": 40.0}) == [] and stragglers({}) == []


def record(name, pushes, staleness, connected, transport="shm", shards=(0,)):
    hist = StalenessHistogram()
    for s in staleness:
        hist.add(s)
    return {"name": name, "pushes": pushes, "examples": 128 * pushes, "refused": 0, "transport": transport,
            "connected": connected, "data_shards": list(shards), "examples_per_s": 1000.0 * pushes,
            "staleness": hist.to_dict()}


def test_a_worker_that_joined_twice_is_one_row_with_all_its_pushes():
    """A worker that said hello again (a reconnect, a lease that ran out) has two server
    records under one name: the summary adds them up, so the rows still account for every
    update, and keeps the latest record's state."""
    rows = per_worker([record("a", 3, [0, 1, 1], connected=False, transport="zmq"),
                       record("b", 2, [0, 0], connected=True, shards=(1,)),
                       record("a", 1, [4], connected=True, shards=(0, 2))])
    assert sorted(rows) == ["a", "b"]
    a = rows["a"]
    assert a["pushes"] == 4 and a["examples"] == 512 and a["records"] == 2
    assert a["connected"] and a["transport"] == "shm" and a["data_shards"] == [0, 2]
    assert a["staleness"]["count"] == 4 and a["staleness"]["max"] == 4
    assert rows["b"]["pushes"] == 2 and rows["b"]["records"] == 1
    assert sum(r["pushes"] for r in rows.values()) == 6


def test_a_staleness_quantile_in_the_shared_top_bucket_prints_as_at_least_the_cap():
    hist = StalenessHistogram(cap=8)
    for s in [0] * 10 + [3] * 80 + [40] * 10:  # 40 lands in the bucket for 8 and beyond
        hist.add(s)
    summary = hist.summary()
    assert (summary["p50"], summary["p99"], summary["max"]) == (3, 8, 40)
    assert StalenessHistogram.text(summary) == "p50 3, p99 >=8, max 40"


def test_a_departed_workers_rate_is_over_the_time_it_was_there():
    from psgd.metrics import WorkerRecord
    record = WorkerRecord(1, "w", [0], "zmq", joined=100.0, last_seen=110.0, examples=5000)
    assert record.to_dict(now=110.0)["examples_per_s"] == 500.0
    record.connected = False  # it left at 110 s: an hour later its rate is still what it did
    assert record.to_dict(now=3710.0)["examples_per_s"] == 500.0


def test_divergence_advice_leaves_out_what_the_run_already_did():
    from psgd.config import TrainConfig
    from psgd.coordinator.loop import divergence_advice
    from psgd.model.schedules import ScheduleSpec
    assert divergence_advice(TrainConfig()) == "lower --lr, or --on-divergence rollback"  # dynsgd and warm-up: defaults
    assert divergence_advice(TrainConfig(on_divergence="rollback")) == "lower --lr, or a smaller --rollback-factor"
    bare = TrainConfig(schedule=ScheduleSpec(warmup=0), staleness_rule="divide", workers=2)
    assert divergence_advice(bare) == ("lower --lr, add --warmup, use --staleness-rule dynsgd, "
                                       "or --on-divergence rollback")


def test_the_rollback_line_says_how_many_epochs_the_weights_kept():
    from psgd.coordinator.report import rollback_line
    rollbacks = [{"at_update": 227, "to_update": 118, "lr": 0.3, "examples_discarded": 14464}]
    assert rollback_line(rollbacks, 125_400, 55_000) == (
        "1 rollback (at update 227 to 118, rate 0.3): 14464 examples trained again, so 2.02 of the 2.28 epochs "
        "trained were kept")
