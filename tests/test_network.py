"""The network: gradients against finite differences, stability, layout, initialisation."""

from itertools import product

import numpy as np
import pytest

from psgd.model import functions
from psgd.errors import ConfigError
from psgd.model.gradcheck import EPSILON, TOLERANCE, check, random_problem
from psgd.model.network import MLP, ModelSpec, parse_sizes


@pytest.mark.parametrize("hidden,loss", list(product(functions.ACTIVATIONS, functions.LOSSES)))
def test_backprop_matches_central_differences(hidden, loss):
    result = check(hidden, loss, sizes=(6, 5, 4, 3), batch=9, seed=3)
    assert result.relative_error < TOLERANCE, result


def test_deeper_network_gradient():
    assert check("tanh", "softmax_ce", sizes=(4, 6, 5, 5, 4, 3)).relative_error < TOLERANCE


@pytest.mark.parametrize("hidden", list(functions.ACTIVATIONS))
def test_dropout_gradient_is_that_of_the_thinned_network(hidden):
    """With the same random generator state the same units drop, so the reported loss is a
    deterministic function of the weights whose derivative backprop must give."""
    spec = ModelSpec((5, 7, 6, 3), hidden, "softmax_ce", "float64")
    net = MLP(spec)
    rng = np.random.default_rng(0)
    w = net.init_params(1) + 0.1 * rng.standard_normal(net.n_params)
    X, T = random_problem(spec, 8, rng)

    def loss_at(v):
        return net.loss_and_grad(v, X, T, dropout=0.4, rng=np.random.default_rng(42))[0]

    g = net.loss_and_grad(w, X, T, dropout=0.4, rng=np.random.default_rng(42))[1].copy()
    fd = np.empty_like(w)
    for i in range(w.size):
        e = np.zeros_like(w)
        e[i] = EPSILON
        fd[i] = (loss_at(w + e) - loss_at(w - e)) / (2 * EPSILON)
    assert np.linalg.norm(fd - g) / (np.linalg.norm(fd) + np.linalg.norm(g)) < TOLERANCE


@pytest.mark.parametrize("hidden,loss", list(product(functions.ACTIVATIONS, functions.LOSSES)))
def test_no_overflow_for_huge_preactivations(hidden, loss):
    spec = ModelSpec((3, 4, 2), hidden, loss, "float32")
    net = MLP(spec)
    w = net.init_params(0) * 1e4  # pre-activations of order 1e4 and beyond
    X = np.array([[1.0, -1.0, 2.0], [-3.0, 1.0, 0.5]], np.float32)
    T = np.array([0, 1]) if loss == "softmax_ce" else np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        assert np.abs(net.preactivations(w, X)).max() > 1e3
        value, grad = net.loss_and_grad(w, X, T)
        out = net.forward(w, X)
    assert np.isfinite(value) and np.isfinite(grad).all() and np.isfinite(out).all()


def test_stable_functions_at_extremes():
    a = np.array([-1e4, -50.0, 0.0, 50.0, 1e4])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = functions.Sigmoid().forward(a, np.empty_like(a))
        sp = functions.Softplus().forward(a, np.empty_like(a))
    assert s[0] == 0.0 and s[-1] == 1.0 and s[2] == 0.5
    assert sp[0] == 0.0 and sp[-1] == 1e4
    a2 = np.array([[1e4, -1e4, 0.0]])
    assert functions.SoftmaxCrossEntropy().value(a2, np.array([0])) == 0.0
    assert functions.SoftmaxCrossEntropy().value(a2, np.array([1])) == pytest.approx(2e4)


def test_layout_views_share_the_flat_vector():
    net = MLP(ModelSpec((784, 256, 256, 10)))
    assert [s.name for s in net.layout.slots] == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert net.n_params == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    flat = np.zeros(net.n_params, np.float32)
    views = net.layout.views(flat)
    views["b2"][:] = 7
    slot = net.layout.slots[3]
    assert (flat[slot.offset:slot.end] == 7).all() and flat.sum() == 7 * 256
    assert net.layout.from_wire(net.layout.to_wire()) == net.layout


def test_initialisation_is_seeded_and_scaled():
    relu = MLP(ModelSpec((784, 256, 10)))
    a, b, c = relu.init_params(5), relu.init_params(5), relu.init_params(6)
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    W1 = relu.layout.views(a)["W1"]
    assert W1.std() == pytest.approx(np.sqrt(2 / 784), rel=0.02)  # He
    assert (relu.layout.views(a)["b1"] == 0).all()
    tanh = MLP(ModelSpec((784, 256, 10), "tanh"))
    W1 = tanh.layout.views(tanh.init_params(0))["W1"]
    assert np.abs(W1).max() <= np.sqrt(6 / (784 + 256))  # Glorot uniform bound


def test_float32_and_float64_agree():
    spec64 = ModelSpec((20, 16, 5), "tanh", "softmax_ce", "float64")
    n64, n32 = MLP(spec64), MLP(ModelSpec((20, 16, 5), "tanh", "softmax_ce", "float32"))
    w = n64.init_params(0)
    X, T = random_problem(spec64, 32, np.random.default_rng(0))
    l64, g64 = n64.loss_and_grad(w, X, T)
    l32, g32 = n32.loss_and_grad(w.astype(np.float32), X.astype(np.float32), T)
    assert g32.dtype == np.float32
    assert l32 == pytest.approx(l64, rel=1e-5)
    np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-6)


def test_gradient_written_into_given_buffer_and_batch_sizes_mix():
    net = MLP(ModelSpec((10, 8, 3)))
    w = net.init_params(0)
    rng = np.random.default_rng(1)
    buf = np.empty(net.n_params, np.float32)
    for batch in (4, 7, 4):
        X = rng.random((batch, 10), dtype=np.float32)
        T = rng.integers(0, 3, batch)
        _, g = net.loss_and_grad(w, X, T, grad=buf)
        assert g is buf
        ref = MLP(net.spec).loss_and_grad(w, X, T)[1]
        np.testing.assert_array_equal(buf, ref)


def test_bad_specs_give_clear_errors():
    with pytest.raises(ConfigError, match="unknown activation"):
        ModelSpec((2, 3), hidden="swish")
    with pytest.raises(ConfigError, match="unknown loss"):
        ModelSpec((2, 3), loss="hinge")
    with pytest.raises(ConfigError, match="layer sizes"):
        parse_sizes("784,abc,10")
    with pytest.raises(ConfigError, match="two or more"):
        parse_sizes("784")
    assert parse_sizes("784-256-10") == (784, 256, 10)
    net = MLP(ModelSpec((4, 3, 2)))
    with pytest.raises(ConfigError, match="input has shape"):
        net.forward(net.init_params(0), np.zeros((2, 5), np.float32))
