"""The simulator against real local clusters (long: each real run takes 10-30 seconds).

A real run of N workers on MNIST (784-64-10, 2 epochs), then ``psgd simulate`` fed with
the times that run measured (psgd.simulate.calibrate): each worker's timing trace (every
push window's compute and every push's round trip, in order, psgd.worker.timing), split
where the server met the push (psgd.server.pushtimes), replayed from when the worker
first read the weights; the simulation stops at the update whose weights the real run
evaluated last. The issue's bar: staleness histograms within total-variation distance
0.15, test accuracy within 1 point.

What that checks: the replay gives the simulation the real run's timeline, so what is
left to differ is the simulator's own model of a worker's cycle (when it reads the
weights, when its push changes them, how staleness is counted) and the server's rules
run on its clock (tests/test_simulate.py checks the replay itself against a timeline
worked out by hand: the same histogram, exactly). It does not check that the simulator
predicts staleness from distributions of times: fed the same measured times in a
shuffled order, or lognormal times around each worker's means, it missed the bar in 4
and 8 of 9 runs (scripts/validate_simulate.py prints all three; README, "Does it match
real runs?").

Measured on the 2-core development machine, shared with other work (load average
6.4-8.1), three real runs per size (scripts/validate_simulate.py --repeats 3), replayed:
TV 0.003, 0.002, 0.000 at 2 workers, 0.000, 0.001, 0.005 at 4 and 0.009, 0.007, 0.003
at 8; mean staleness within 0.03; accuracy gaps 0.08, 0.05, 0.28, 0.10, 0.07, 0.26,
0.18, 0.13 and 0.12 points. Two rounds of this file's tests: TV at most 0.007, gaps at
most 0.49 points, and the constant-rate replay's weights equal to the bit both times.

Of 11 rounds of this file's tests with a 1-point bound, 9 passed; in one a 2-worker
replay missed it by 1.29 points (TV 0.001, 95.22% real against 96.51%): the real
coordinator sets the rate when it polls (every 20 ms or more), so during the warm-up the
real rate lagged the schedule the simulation followed after every update, and the test
accuracy of a 2-epoch async run moves by a point or more within a few dozen updates. The
server's push log now keeps the rate each update was applied at and the replay applies
it: six replays after that (2, 4, 8 workers, twice each, load average 2.9-3.9) ended at
the real run's test accuracy to the hundredth of a point (gaps 0.00), TV 0.001-0.007.

So TV is asserted at the issue's bar, 0.15, mean staleness within 0.1, and the accuracy
gap within the issue's 1 point.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

pytestmark = pytest.mark.long


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_a_simulation_fed_a_real_runs_timings_matches_its_staleness_and_accuracy(workers, tmp_path, data_dir,
                                                                                 monkeypatch):
    from validate_simulate import validate
    monkeypatch.setenv("PSGD_DATA_DIR", str(data_dir))
    result = validate(workers, 2.0, folder=tmp_path)["replay"]
    print(result)
    assert result["tv"] <= 0.15
    assert abs(result["real_staleness"]["mean"] - result["sim_staleness"]["mean"]) <= 0.1
    assert result["accuracy_gap"] <= 0.01


def test_a_replay_of_a_real_run_at_a_constant_rate_ends_where_it_did(tmp_path, data_dir, monkeypatch):
    """4 workers at a constant rate, one BLAS thread each: nothing differs between the real
    run and its replay but the clock. The replay ended with the real run's very weights in
    the runs that wrote this test, but not always: in clean CI runs they were 5.4e-7 and
    0.018 apart (the second, a pair of adjacent pushes applied in the other order). What
    holds: the same staleness histogram and the same test accuracy within 0.2 points."""
    from validate_simulate import validate
    monkeypatch.setenv("PSGD_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PSGD_THREADS", "1")  # the simulator computes one gradient at a time, on one thread
    result = validate(4, 2.0, folder=tmp_path, extra=["--warmup", "0", "--schedule", "constant"])["replay"]
    print(result)
    assert result["tv"] <= 0.05
    assert result["accuracy_gap"] <= 0.002


def test_psgd_simulate_replays_a_kept_run_and_says_how_close_it_came(procs, tmp_path):
    """The operator's way (no script): psgd train --keep-timings, then psgd simulate
    --replay RUN_DIR, which writes RUN_DIR-replay and prints one comparison line."""
    import re
    real = tmp_path / "real"
    train = procs.start("train", "--workers", "2", "--layers", "784,64,10", "--epochs", "1", "--keep-timings",
                        "--out", str(real), log="train")
    assert train.wait(180) == 0, procs.log("train")
    replay = procs.start("simulate", "--replay", str(real), log="replay", extra_env={"OPENBLAS_NUM_THREADS": "1"})
    assert replay.wait(180) == 0, procs.log("replay")
    line = re.search(r"replay of .*: staleness mean ([\d.]+) real, ([\d.]+) simulated \(total-variation distance "
                     r"([\d.]+)\); test accuracy ([\d.]+)% real, ([\d.]+)% simulated", procs.log("replay"))
    assert line, procs.log("replay")
    real_mean, sim_mean, tv, real_acc, sim_acc = map(float, line.groups())
    assert tv <= 0.15 and abs(real_mean - sim_mean) <= 0.1 and abs(real_acc - sim_acc) <= 1.0, line.group(0)
    assert (tmp_path / "real-replay" / "summary.json").exists()
