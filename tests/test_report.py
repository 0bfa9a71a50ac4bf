"""psgd report on run directories: text, comparison, plots, and the no-matplotlib path."""

import sys

import numpy as np
import pytest
from click.testing import CliRunner

from psgd.cli import cli
from psgd.config import TrainConfig
from psgd.model.network import ModelSpec
from psgd.trainer import train_single


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=rng.random((400, 5)), y=(rng.random(400) > 0.5).astype(np.int64))
    made = []
    for name, lr in (("slow", 0.01), ("fast", 0.1)):
        cfg = TrainConfig(model=ModelSpec((5, 8, 2)), data=str(tmp_path / "d.npz"), epochs=3, validation=40,
                          out_dir=str(tmp_path / name), evals_per_epoch=2)
        cfg = cfg.with_(schedule=cfg.schedule.__class__("constant", lr))
        train_single(cfg)
        made.append(tmp_path / name)
    return made


def test_single_run_report_and_plots(runs):
    result = CliRunner().invoke(cli, ["report", str(runs[0])])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "test accuracy" in out and "where the time went: start-up" in out and "one process" in out
    pngs = sorted(p.name for p in (runs[0] / "plots").iterdir())
    assert pngs == ["learning_rate.png", "val_accuracy.png", "val_loss.png"]
    assert all((runs[0] / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_runs_side_by_side(runs, tmp_path):
    result = CliRunner().invoke(cli, ["report", *map(str, runs), "--plots-dir", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    table = result.output.split("\n\n")[-1]
    assert "to 98%" in table and "slow" in table and "fast" in table
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000


def test_without_matplotlib_the_text_still_comes_and_says_how_to_get_plots(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = CliRunner().invoke(cli, ["report", str(runs[1])])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "pip install 'psgd[plot]'" in result.output
    assert not (runs[1] / "plots").exists()


def test_a_directory_that_is_not_a_run_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a finished psgd run" in result.output
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "typo")])
    assert result.exit_code == 2 and "no such run directory" in result.output
