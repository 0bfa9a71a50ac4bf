"""Shared fixtures: where MNIST lives, and small helpers every layer of tests uses."""

import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A shell that starts pytest in the background (`pytest &` in a script) makes it ignore
# SIGINT, and an ignored signal stays ignored across exec: the psgd processes the tests
# start would then never see the Ctrl-C that some tests send. Take SIGINT back, so that
# children start with its default action, as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def mnist_data_dir() -> Path:
    """$PSGD_DATA_DIR if set (CI points it at ../shared/datasets), else ../shared/datasets."""
    env = os.environ.get("PSGD_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = mnist_data_dir()
    if not any((d / sub / "train-images-idx3-ubyte.gz").exists() for sub in ("mnist", ".")):
        pytest.fail(f"MNIST not found under {d}: set PSGD_DATA_DIR to the folder holding mnist/")
    return d


@pytest.fixture(scope="session")
def mnist(data_dir):
    from psgd.data import load_mnist
    return load_mnist(data_dir)


@pytest.fixture
def procs(tmp_path, data_dir):
    """Starts real psgd processes; after the test, none may be left, nor any shared memory
    segment or doorbell folder that was not there before."""
    from cluster_util import Processes, doorbell_dirs, shm_segments
    p = Processes(tmp_path, data_dir)
    shm_before, doorbells_before = shm_segments(), doorbell_dirs()
    yield p
    left = p.cleanup()
    assert not left, f"processes left behind: {left}"
    assert shm_segments() <= shm_before, "shared-memory segments left behind"
    assert doorbell_dirs() <= doorbells_before, "doorbell folders left behind"
