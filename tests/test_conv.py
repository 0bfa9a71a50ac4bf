"""Convolutional layers and networks: gradients against finite differences, the layers
against naive loops, architecture strings, and the conv net through psgd's interface."""

import numpy as np
import pytest

from psgd.errors import ConfigError
from psgd.model import arch
from psgd.model.convnet import ConvNet
from psgd.model.gradcheck import CONV_ARCHS, TOLERANCE, check_conv
from psgd.model.interface import build_model, fingerprint
from psgd.model.layers import Conv2D, Pool2D
from psgd.model.network import ModelSpec


@pytest.mark.parametrize("stack", CONV_ARCHS)
@pytest.mark.parametrize("hidden", ["tanh", "relu"])
def test_backprop_matches_finite_differences(stack, hidden):
    result = check_conv(stack, hidden)
    assert result.relative_error < TOLERANCE, result


def naive_conv(x, W, b, pad):
    """x (N, C, H, W), W (F, C, k, k): the definition, loop by loop."""
    N, C, H, Wd = x.shape
    F, _, k, _ = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    Ho, Wo = H + 2 * pad - k + 1, Wd + 2 * pad - k + 1
    out = np.zeros((N, F, Ho, Wo))
    for n in range(N):
        for f in range(F):
            for y in range(Ho):
                for z in range(Wo):
                    out[n, f, y, z] = (xp[n, :, y:y + k, z:z + k] * W[f]).sum() + b[f]
    return out


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_convolution_is_the_definition(padding):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 6))
    W, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    layer = Conv2D((3, 7, 6), 4, 3, padding)
    ws = layer.workspace(2, np.float64)
    a = layer.forward((W, b), np.ascontiguousarray(x.transpose(1, 0, 2, 3)), ws)
    expected = naive_conv(x, W, b, 1 if padding == "same" else 0)
    np.testing.assert_allclose(a.transpose(1, 0, 2, 3), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_is_the_definition(kind):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 6, 4))  # (C, N, H, W)
    layer = Pool2D((3, 6, 4), kind)
    out = layer.forward(x, layer.workspace(2, np.float64))
    windows = x.reshape(3, 2, 3, 2, 2, 2)
    expected = windows.max(axis=(3, 5)) if kind == "max" else windows.mean(axis=(3, 5))
    np.testing.assert_allclose(out, expected)


def test_workspaces_are_reused_from_step_to_step():
    net = ConvNet(ModelSpec.from_arch("1x8x8,conv3x3x2same,pool2,5,3"))
    p = net.init_params(0)
    X, T = np.random.default_rng(0).random((4, 64), np.float32), np.array([0, 1, 2, 0])
    g = np.empty_like(p)
    loss1, _ = net.loss_and_grad(p, X, T, g)
    cols = net._workspace(4)[0]["cols"]
    g1 = g.copy()
    loss2, _ = net.loss_and_grad(p, X, T, g)
    assert net._workspace(4)[0]["cols"] is cols and loss1 == loss2
    np.testing.assert_array_equal(g, g1)


def test_lenet5_layout_and_interface():
    spec = ModelSpec.from_arch(arch.named("lenet5"))
    assert spec.sizes == (784, 120, 84, 10)
    net = build_model(spec)
    shapes = [s.shape for s in net.layout.slots]
    assert shapes == [(6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (400, 120), (120,), (120, 84), (84,), (84, 10), (10,)]
    assert net.n_params == 61706
    np.testing.assert_array_equal(net.init_params(3), net.init_params(3))
    X = np.random.default_rng(0).random((5, 784), np.float32)
    assert net.forward(net.init_params(0), X.reshape(5, 1, 28, 28)).shape == (5, 10)
    loss, acc = net.evaluate(net.init_params(0), X, np.zeros(5, np.int64))
    assert loss > 0 and 0 <= acc <= 1
    avg = ModelSpec.from_arch(arch.named("lenet5", "avg"), "tanh")
    assert "avgpool2" in avg.arch and fingerprint(build_model(avg), avg) != fingerprint(net, spec)


def test_spec_round_trips_through_dicts():
    spec = ModelSpec.from_arch("conv5x5x6same,avgpool2,conv5x5x16,pool2,120,84,10", "tanh")
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert "factory" not in ModelSpec(factory="m:f").wire_dict() and ModelSpec(factory="m:f").wire_dict()["user"]


@pytest.mark.parametrize("bad", ["conv5x3x6,10", "pool3,10", "conv5x5x6,pool2", "120,conv3x3x2,10", "fc10", ""])
def test_bad_architecture_strings_say_what_is_wrong(bad):
    with pytest.raises(ConfigError):
        ModelSpec.from_arch(bad)


def test_layers_that_do_not_fit_are_refused():
    with pytest.raises(ConfigError, match="even"):
        ModelSpec.from_arch("1x7x7,pool2,10") and ConvNet(ModelSpec.from_arch("1x7x7,pool2,10"))
    with pytest.raises(ConfigError, match="does not fit"):
        ConvNet(ModelSpec.from_arch("1x4x4,conv5x5x2,10"))


@pytest.mark.parametrize("args, message", [
    (["--model", "lenet5", "--arch", "10"], "not both"),
    (["--model", "lenet6"], "unknown model 'lenet6'"),
    (["--arch", "conv5x5x6,pool3,10"], "'pool3'"),
    (["--distort-rotate", "-5"], "distortion rotate"),
])
def test_bad_model_options_end_with_one_line_errors(args, message, tmp_path):
    from click.testing import CliRunner

    from psgd.cli import cli
    result = CliRunner().invoke(cli, ["train", "--workers", "0", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_a_conv_spec_round_trips_through_a_config_file(tmp_path):
    from psgd.cli import build_config, cli
    cmd = cli.commands["train"]
    ctx = cmd.make_context("train", ["--model", "lenet5", "--pool", "avg", "--activation", "tanh", "--workers", "0",
                                     "--distort-rotate", "10"])
    config = build_config(ctx, **ctx.params)
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    ctx = cmd.make_context("train", ["--config", str(path), "--epochs", "2"])
    again = build_config(ctx, **ctx.params)
    assert again.model == config.model and again.distort == config.distort and again.model.hidden == "tanh"


def test_a_conv_net_defaults_to_its_own_rate_unless_one_is_given(monkeypatch):
    """The MLP's default 0.1 diverged LeNet-5 (11% in epoch 2); 0.03 reached 99.04%."""
    from click.testing import CliRunner

    import psgd.cli as cli_mod
    seen = []
    real = cli_mod.build_config

    def spy(ctx, **kw):
        seen.append(real(ctx, **kw).schedule.lr)
        raise SystemExit(0)

    monkeypatch.setattr(cli_mod, "build_config", spy)
    for args in (["--model", "lenet5"], ["--model", "lenet5", "--lr", "0.05"], ["--layers", "784,10"]):
        CliRunner().invoke(cli_mod.cli, ["train", "--workers", "0", *args])
    assert seen == [cli_mod.CONV_DEFAULT_LR, 0.05, 0.1]
