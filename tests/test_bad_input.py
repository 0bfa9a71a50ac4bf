"""Bad input an operator can give psgd: data with NaN, unreadable data files, config files
with unknown settings. Each is refused when read, in one line that says what and where."""

import io
import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from psgd.cli import cli
from psgd.config import TrainConfig
from psgd.data import load
from psgd.errors import ConfigError, DataError
from psgd.model.network import ModelSpec


def one_line_error(args, data_dir=None) -> str:
    """Run ``psgd ARGS`` in-process; it must exit 2 with one line and no traceback."""
    env = {"PSGD_DATA_DIR": str(data_dir)} if data_dir else {}
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


# --- non-finite data --------------------------------------------------------------------

def test_nan_in_the_data_is_refused_at_load_naming_the_array_and_first_bad_row(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.random((200, 3))
    X[57, 2] = np.nan
    X[120, 0] = np.inf
    np.savez(tmp_path / "nan.npz", X=X, y=rng.integers(0, 2, 200))
    with pytest.raises(DataError, match=r"array X holds non-finite values \(nan in row 57; 2 rows in all\)"):
        load(str(tmp_path / "nan.npz"))
    # real targets and the test arrays are checked too
    np.savez(tmp_path / "y.npz", X=rng.random((50, 3)), y=rng.random(50), X_test=rng.random((9, 3)),
             y_test=np.where(np.arange(9) == 4, -np.inf, 0.0))
    with pytest.raises(DataError, match=r"array y_test holds non-finite values \(-inf in row 4"):
        load(str(tmp_path / "y.npz"))
    # float64 values beyond float32's range would become inf on the way in
    np.savez(tmp_path / "big.npz", X=np.where(np.arange(30).reshape(10, 3) == 13, 1e300, 1.0), y=np.arange(10) % 2)
    with pytest.raises(DataError, match=r"array X holds non-finite values \(inf in row 4"):
        load(str(tmp_path / "big.npz"))


def test_train_on_nan_data_stops_before_training_with_one_line(tmp_path):
    """Before: --workers 0 trained to 'test loss nan' and exited 0."""
    X = np.random.default_rng(1).random((300, 4))
    X[11, 1] = np.nan
    np.savez(tmp_path / "d.npz", X=X, y=np.arange(300) % 3)
    out = one_line_error(["train", "--workers", "0", "--data", str(tmp_path / "d.npz"), "--layers", "4,8,3",
                          "--out", str(tmp_path / "run")])
    assert "array X" in out and "row 11" in out
    assert not (tmp_path / "run" / "summary.json").exists()


# --- unreadable data files --------------------------------------------------------------

def corrupted_versions(good: bytes):
    """Truncations at many points, flipped bytes, and files that are not .npz at all."""
    for cut in (0, 1, 10, 30, 100, len(good) // 3, len(good) // 2, len(good) - 22, len(good) - 1):
        yield f"truncated to {cut} bytes", good[:cut]
    for at in (40, len(good) // 2, len(good) - 30):
        flipped = bytearray(good)
        flipped[at] ^= 0xFF
        yield f"byte {at} flipped", bytes(flipped)
    yield "text", b"X,y\n1,2\n"
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    yield "an .npy", buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("X.npy", b"not an array")
    yield "a zip of junk", buf.getvalue()


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_every_unreadable_data_file_is_one_data_error(tmp_path, compressed):
    """Before: a truncated .npz raised zipfile.BadZipFile, a 56-line traceback from the CLI."""
    rng = np.random.default_rng(2)
    good = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(good, X=rng.random((100, 5)), y=rng.integers(0, 3, 100))
    path = tmp_path / "d.npz"
    for what, content in corrupted_versions(good.getvalue()):
        path.write_bytes(content)
        try:
            load(str(path))
        except DataError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc), (what, exc)
        else:  # a flipped byte in padding may leave the arrays whole: then they must be right
            assert what.startswith("byte"), what


def test_train_on_a_truncated_npz_says_so_in_one_line(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", X=rng.random((300, 4)), y=rng.integers(0, 3, 300))
    content = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(content[:len(content) // 2])
    out = one_line_error(["train", "--workers", "0", "--data", str(tmp_path / "d.npz"), "--layers", "4,8,3"])
    assert "d.npz is not a readable .npz" in out and "truncated" in out
    out = one_line_error(["train", "--workers", "0", "--data", str(tmp_path)])  # a folder
    assert "unknown data set" in out or "not a file" in out


def test_evaluate_on_a_truncated_weights_file_says_so_in_one_line(tmp_path, data_dir):
    (tmp_path / "weights.npz").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    out = one_line_error(["evaluate", str(tmp_path / "weights.npz")], data_dir)
    assert "weights.npz" in out


# --- config files -----------------------------------------------------------------------

def test_a_config_file_with_an_unknown_key_names_it_the_file_and_close_settings(tmp_path, data_dir):
    """Before: TrainConfig.__init__() got an unexpected keyword argument 'bogus_key'."""
    cfg = TrainConfig().to_dict()
    for key, where, suggestion in [("bach_size", None, "'batch_size'"), ("lr", None, "'schedule.lr'"),
                                   ("warmpu", "schedule", "'schedule.warmup'"), ("bogus_key", None, "--help"),
                                   ("layers", None, "'model.sizes'")]:
        bad = json.loads(json.dumps(cfg))
        (bad[where] if where else bad)[key] = 1
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(bad))
        out = one_line_error(["train", "--config", str(path), "--workers", "0"], data_dir)
        name = f"{where}.{key}" if where else key
        assert f"{path}: unknown setting '{name}'" in out and suggestion in out, out
    with pytest.raises(ConfigError, match="must be an object"):
        TrainConfig.from_dict({"schedule": 3}, "x.json")
    # a file may leave settings out: they keep their defaults
    partial = TrainConfig.from_dict({"epochs": 2, "model": {"sizes": [4, 8, 3]}, "schedule": {"lr": 0.3}})
    assert partial.epochs == 2 and partial.model.sizes == (4, 8, 3) and partial.model.hidden == "relu"
    assert partial.schedule.lr == 0.3 and partial.schedule.name == TrainConfig().schedule.name
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


# --- small data sets --------------------------------------------------------------------

def spirals(path, n_per_class=500, classes=3, seed=0):
    """Interleaved spiral arms in 2-D: 1,500 examples, 1,350 of them for training."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.1, 1.0, (classes, n_per_class))
    angle = 4.0 * t + (2 * np.pi / classes) * np.arange(classes)[:, None]
    X = np.stack([t * np.cos(angle), t * np.sin(angle)], -1).reshape(-1, 2) + 0.02 * rng.standard_normal((classes * n_per_class, 2))
    np.savez(path, X=X, y=np.repeat(np.arange(classes), n_per_class))
    return path


def test_a_small_data_set_trains_with_the_defaults_fitted_to_its_size(tmp_path, data_dir):
    """Before: 'cannot hold out 5000 of 1350 examples'; and the 500-update warm-up outlasted a
    short run (a 5-epoch run on 5,600 examples ended at 49% of the rate set)."""
    data = spirals(tmp_path / "spirals.npz")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--workers", "0", "--data", str(data), "--layers", "2,32,32,3",
                                      "--activation", "tanh", "--schedule", "constant", "--lr", "0.05",
                                      "--batch-size", "32", "--epochs", "5", "--out", str(out)], env={"PSGD_DATA_DIR": str(data_dir)})
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads((out / "config.json").read_text())
    assert saved["validation"] == 135  # a tenth of the 1,350 training examples
    updates = 5 * -(-1215 // 32)
    assert saved["schedule"]["warmup"] == -(-updates // 10)  # a tenth of the run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["lr"] == pytest.approx(0.05)  # warmed up well before the end
    # MNIST keeps what it had: 5,000 held out, 500 updates of warm-up
    mnist_default = TrainConfig().fitted_to(60000)
    assert (mnist_default.validation, mnist_default.schedule.warmup) == (5000, 500)
    # settings given explicitly stay as given
    explicit = TrainConfig(validation=7, schedule=TrainConfig().schedule.__class__(warmup=3)).fitted_to(1000)
    assert (explicit.validation, explicit.schedule.warmup) == (7, 3)


def test_a_validation_split_too_large_names_the_option(tmp_path, data_dir):
    data = spirals(tmp_path / "spirals.npz")
    out = one_line_error(["train", "--workers", "0", "--data", str(data), "--layers", "2,8,3", "--validation", "5000"],
                         data_dir)
    assert "--validation 5000" in out and "1350" in out


@pytest.mark.slow
def test_a_small_data_set_trains_on_a_cluster_with_the_defaults(procs, tmp_path):
    """The workers hold out the same fitted validation split as the coordinator: every
    training example is trained on, none of the validation set."""
    data = spirals(tmp_path / "spirals.npz")
    out = tmp_path / "run"
    proc = procs.start("train", "--workers", "2", "--data", str(data), "--layers", "2,32,32,3", "--activation", "tanh",
                       "--batch-size", "32", "--epochs", "3", "--out", str(out), log="train")
    assert proc.wait(120) == 0, procs.log("train")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] >= 3 and summary["failures"] == []
    assert json.loads((out / "config.json").read_text())["validation"] == 135


def test_a_servers_description_is_a_config_though_its_model_carries_a_fingerprint():
    """The standalone coordinator builds its config from the server's describe reply, whose
    model also carries wire-only keys; those are not unknown settings."""
    from psgd.server.state import ServerState
    from psgd.wire.protocol import decode, encode
    config = TrainConfig(model=ModelSpec((6, 5, 3)), epochs=3)
    header, _ = ServerState(config).handle(decode(encode({"type": "describe", "seq": 1, "sender": "t"}, [])))
    assert "fingerprint" in header["config"]["model"]
    assert TrainConfig.from_description(header["config"]) == config
    with pytest.raises(ConfigError, match="unknown setting 'model.bogus'"):
        TrainConfig.from_description({**header["config"], "model": {**header["config"]["model"], "bogus": 1}})


def test_a_bad_value_from_the_environment_names_the_variable():
    result = CliRunner().invoke(cli, ["train", "--workers", "1"], env={"PSGD_EPOCHS": "abc"})
    assert result.exit_code == 2
    assert "PSGD_EPOCHS" in result.output and "'abc' is not a valid float" in result.output
    result = CliRunner().invoke(cli, ["train", "--workers", "1", "--epochs", "abc"], env={"PSGD_EPOCHS": "2"})
    assert result.exit_code == 2 and "PSGD_EPOCHS" not in result.output  # typed, so not named
