"""Runs that heal: a diverging run rolls every server back to its last validated weights
and goes on at a lower rate, instead of stopping (--on-divergence rollback)."""

import json

import numpy as np
import pytest

from psgd.model.network import MLP, ModelSpec

pytestmark = [pytest.mark.slow, pytest.mark.long]

# Sum-of-squares on one-hot MNIST targets at rate 1, momentum 0.9, no warm-up, two workers:
# the weights blow up within the first epoch (3 runs of 3); with rollback the runs ended at
# test loss 0.38-0.45, from 1.84 at the start.
DIVERGING = ("--workers", "2", "--layers", "784,64,10", "--loss", "sse", "--lr", "1", "--epochs", "2",
             "--evals-per-epoch", "4", "--seed", "3", "--warmup", "0")


def test_a_diverging_run_stops_without_rollback_and_heals_with_it(procs, tmp_path, mnist):
    plain = procs.start("train", *DIVERGING, "--out", str(tmp_path / "plain"), log="plain")
    assert plain.wait(180) == 2, procs.log("plain")
    assert "training diverged" in procs.log("plain") and "Traceback" not in procs.log("plain")

    healed = procs.start("train", *DIVERGING, "--on-divergence", "rollback", "--out", str(tmp_path / "healed"),
                         log="healed")
    assert healed.wait(180) == 0, procs.log("healed")
    summary = json.loads((tmp_path / "healed" / "summary.json").read_text())
    rollbacks = summary["rollbacks"]
    assert 1 <= len(rollbacks) <= 3 and "rolled back to the weights validated at update" in procs.log("healed")
    assert all(r["to_update"] < r["at_update"] for r in rollbacks)
    assert [r["lr"] for r in rollbacks] == pytest.approx([0.3 ** (k + 1) for k in range(len(rollbacks))])
    # the examples each rollback threw away were trained again: 2 epochs kept, whenever it came
    discarded = sum(r["examples_discarded"] for r in rollbacks)
    n_train = summary["examples"] / summary["epochs"]  # 55,000: the validation set is held out
    assert discarded > 0 and summary["examples"] >= 2 * n_train + discarded, (summary["examples"], rollbacks)
    assert "the run trains the" in procs.log("healed")
    kept = (summary["examples"] - discarded) / n_train
    assert f"examples trained again, so {kept:.2f} of the {summary['epochs']:.2f} epochs" in procs.log("healed")
    report = procs.start("report", str(tmp_path / "healed"), "--no-plots", log="report")
    assert report.wait(60) == 0 and "examples trained again" in procs.log("report")
    # the healed run trained: its test loss is well below that of the weights it started from
    _, test = mnist
    net = MLP(ModelSpec((784, 64, 10), loss="sse"))
    start_loss, _ = net.evaluate(net.init_params(3), test.X, test.targets_for("sse"))
    assert np.isfinite(summary["test_loss"]) and summary["test_loss"] < 0.6 * start_loss, (summary, start_loss)
