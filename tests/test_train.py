"""The single-process trainer and the CLI around it, on real data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from psgd.cli import cli
from psgd.config import TrainConfig
from psgd.model.network import ModelSpec
from psgd.model.optim import OptimizerSpec
from psgd.model.schedules import ScheduleSpec
from psgd.trainer import train_single


def test_identity_sse_network_fits_a_noisy_sine(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-np.pi, np.pi, 2000)
    y = np.sin(x) + 0.05 * rng.standard_normal(2000)
    xt = np.linspace(-np.pi, np.pi, 200)
    np.savez(tmp_path / "sine.npz", X=x.reshape(-1, 1), y=y.reshape(-1, 1), X_test=xt.reshape(-1, 1), y_test=np.sin(xt).reshape(-1, 1))
    config = TrainConfig(
        model=ModelSpec((1, 32, 32, 1), "tanh", "sse"), optimizer=OptimizerSpec("momentum", 0.9),
        schedule=ScheduleSpec("constant", 0.05, warmup=0), data=str(tmp_path / "sine.npz"), batch_size=32,
        epochs=150, validation=200, out_dir=str(tmp_path / "run"),
    )
    summary = train_single(config)
    # mean of 1/2 (y - sin x)^2 on clean targets: an RMS error below 0.05 against noise of 0.05
    assert summary["test_loss"] < 0.5 * 0.05 ** 2
    assert summary["test_accuracy"] is None


def test_sigmoid_bce_network_separates_two_digits(mnist, tmp_path):
    train, test = mnist
    pick = lambda d: d.subset(np.flatnonzero((d.y == 3) | (d.y == 5)))  # noqa: E731
    tr, te = pick(train), pick(test)
    np.savez(tmp_path / "35.npz", X=tr.X, y=(tr.y == 5).astype(np.int64), X_test=te.X, y_test=(te.y == 5).astype(np.int64))
    config = TrainConfig(
        model=ModelSpec((784, 32, 1), "sigmoid", "bce"), schedule=ScheduleSpec("constant", 0.1),
        data=str(tmp_path / "35.npz"), epochs=10, validation=1000,
    )
    summary = train_single(config)
    assert summary["test_accuracy"] >= 0.97, summary


def run_psgd(*args, data_dir, timeout=600):
    env = dict(os.environ, PSGD_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, "-m", "psgd", *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_default_training_reaches_98_percent_and_says_so(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_psgd("train", "--workers", "0", "--out", str(out), data_dir=data_dir)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.98, summary
    assert f"test accuracy {summary['test_accuracy']:.2%}" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 14 and records[-1]["epoch"] == pytest.approx(14.0)
    assert json.loads((out / "config.json").read_text())["model"]["sizes"] == [784, 256, 256, 10]
    evaluated = run_psgd("evaluate", str(out / "weights.npz"), data_dir=data_dir)
    assert f"accuracy {summary['test_accuracy']:.2%}" in evaluated.stdout


@pytest.mark.long
def test_784_800_10_reaches_lecuns_1_6_percent(data_dir):
    """All 60,000 training images, no distortions; dropout 0.5 on the hidden layer. Long: 16
    epochs of an 800-unit layer in one process (about a minute alone on 2 cores, over three
    under load): the default suite's slowest test by far, and a check of the model, which
    the long set runs once per CI run all the same."""
    config = TrainConfig(model=ModelSpec((784, 800, 10)), data_dir=str(data_dir), epochs=16, validation=0,
                         dropout=0.5, schedule=ScheduleSpec("step", 0.1, every=2500, factor=0.2))
    summary = train_single(config)
    assert 1.0 - summary["test_accuracy"] <= 0.016, summary


def test_bad_options_end_with_one_line_errors(tmp_path, data_dir):
    runner = CliRunner()
    env = {"PSGD_DATA_DIR": str(data_dir)}
    cases = [
        (["train", "--layers", "784,32,3", "--out", str(tmp_path)], "do not fit mnist"),
        (["train", "--data", str(tmp_path / "none.npz")], "does not exist"),
        (["train", "--layers", "784,x,10"], "layer sizes"),
        (["evaluate", str(tmp_path / "none.npz")], "does not exist"),
        (["train", "--data-dir", str(tmp_path / "empty")], "psgd fetch"),
        # a malformed address is refused before any socket waits on it
        (["worker", "--connect", "tcp://127.0.0.1"], "cannot connect to 'tcp://127.0.0.1'"),
        (["worker", "--connect", "tcp://127.0.0.1:5555,nonsense"], "cannot connect to 'nonsense'"),
        (["coordinator", "--connect", "localhost:5555"], "an address looks like tcp://HOST:PORT"),
        (["status", "--connect", " , "], "no server address given"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, args, env=env)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_options_come_from_env_and_config_file(tmp_path, data_dir):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=rng.random((300, 4)), y=rng.integers(0, 3, 300))
    base = TrainConfig(model=ModelSpec((4, 8, 3)), data=str(tmp_path / "d.npz"), epochs=1, validation=30, batch_size=16)
    (tmp_path / "run.json").write_text(base.to_json())
    result = CliRunner().invoke(cli, ["train", "--config", str(tmp_path / "run.json"), "--out", str(tmp_path / "out")],
                                env={"PSGD_EPOCHS": "2"})
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["epochs"] == 2.0 and saved["batch_size"] == 16 and saved["model"]["sizes"] == [4, 8, 3]


def test_gradcheck_command_passes():
    result = CliRunner().invoke(cli, ["gradcheck"])
    assert result.exit_code == 0 and "all 25 combinations pass" in result.output  # 15 MLP, 10 conv
    assert "conv3x3x3same" in result.output and "avgpool2" in result.output


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_learns_in_one_process_from_the_cli(mnist, tmp_path, optimizer):
    """--workers 0 with Adam: two digits of MNIST, 3 epochs of 2,000 images, from the CLI."""
    train, test = mnist
    pick = lambda d, n: d.subset(np.flatnonzero((d.y == 3) | (d.y == 5))[:n])  # noqa: E731
    tr, te = pick(train, 2000), pick(test, 1000)
    np.savez(tmp_path / "35.npz", X=tr.X, y=(tr.y == 5).astype(np.int64), X_test=te.X, y_test=(te.y == 5).astype(np.int64))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--workers", "0", "--data", str(tmp_path / "35.npz"), "--layers", "784,32,2",
                                      "--optimizer", optimizer, "--lr", "0.003", "--beta2", "0.99", "--weight-decay",
                                      "0.0001", "--epochs", "3", "--validation", "200", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())["optimizer"]
    assert saved["name"] == optimizer and saved["beta2"] == 0.99
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] >= 0.9  # chance is 0.5
