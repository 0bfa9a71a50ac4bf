"""psgd.torch: a torch.nn.Module as a psgd model, its gradient against plain PyTorch, and
a torch CNN through a real local cluster. Skipped where PyTorch is not installed."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install 'psgd[torch]' to run these")
nn = torch.nn
F = torch.nn.functional

from psgd.model.interface import fingerprint  # noqa: E402
from psgd.torch import TorchModel  # noqa: E402

TINY_CNN = '''
import torch.nn as nn
import torch.nn.functional as F
from psgd.torch import TorchModel


def make():
    net = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    return TorchModel(net, F.cross_entropy, input_shape=(1, 28, 28))
'''


def tiny():
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    return TorchModel(net, F.cross_entropy, input_shape=(1, 8, 8))


def test_parameters_are_views_of_the_flat_vector_and_gradients_land_in_the_flat_gradient():
    model = tiny()
    params = model.init_params(0)
    np.testing.assert_array_equal(params, tiny().init_params(0))  # seeded: same on every process
    assert model.layout.size == params.size == sum(p.numel() for p in model.module.parameters())
    rng = np.random.default_rng(1)
    X, T = rng.random((6, 64), np.float32), rng.integers(0, 5, 6)
    grad = np.full(model.n_params, np.nan, np.float32)
    loss, out = model.loss_and_grad(params, X, T, grad)
    assert out is grad and np.isfinite(grad).all()
    first = next(model.module.parameters())
    assert first.data_ptr() == params.__array_interface__["data"][0]
    params[0] += 1.0  # psgd writes the flat vector: the module sees it at once
    assert float(first.detach().reshape(-1)[0]) == pytest.approx(float(params[0]))
    params[0] -= 1.0

    reference = tiny().module  # plain PyTorch on a copy of the same weights
    with torch.no_grad():
        for p, slot in zip(reference.parameters(), model.layout.slots):
            p.copy_(torch.from_numpy(params[slot.offset:slot.end].reshape(slot.shape)))
    ref_loss = F.cross_entropy(reference(torch.from_numpy(X).reshape(6, 1, 8, 8)), torch.from_numpy(T))
    ref_loss.backward()
    expected = np.concatenate([p.grad.numpy().ravel() for p in reference.parameters()])
    assert loss == pytest.approx(float(ref_loss.detach()))
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    model.loss_and_grad(params, X, T, grad)  # a second step does not accumulate into the first
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    _, acc = model.evaluate(params, X, T)
    assert 0 <= acc <= 1
    mask = model.weight_mask()
    assert mask.sum() == 3 * 9 + 48 * 5  # weights only
    assert fingerprint(model) == fingerprint(tiny()) != fingerprint(TorchModel(nn.Linear(64, 5), F.cross_entropy))


@pytest.mark.slow
def test_a_torch_cnn_trains_on_a_local_cluster(procs, tmp_path):
    (tmp_path / "tiny_torch_cnn.py").write_text(TINY_CNN)
    procs.env["PYTHONPATH"] = str(tmp_path)
    out = tmp_path / "run"
    train = procs.start("train", "--workers", "2", "--model", "tiny_torch_cnn:make", "--epochs", "2", "--lr", "0.05",
                        "--validation", "1000", "--out", str(out), log="train")
    assert train.wait(400) == 0, procs.log("train")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95 and summary["failures"] == [], summary  # 1 epoch: 92.4-95.5%
