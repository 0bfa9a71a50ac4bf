"""Update rules and learning-rate schedules, against hand-computed values."""

import numpy as np
import pytest

from psgd.errors import ConfigError
from psgd.model.optim import OptimizerSpec, make_optimizer
from psgd.model.schedules import Constant, Diminishing, Plateau, ScheduleSpec, StepDecay, Warmup


def run(spec, steps, lr=0.1, mask=None):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(6)
    grads = [rng.standard_normal(6) for _ in range(steps)]
    opt = make_optimizer(spec, 6, np.float64, mask)
    out = w.copy()
    for g in grads:
        g_before = g.copy()
        opt.step(out, g, lr)
        assert np.array_equal(g, g_before), "the gradient buffer must not be written"
    return w, grads, out, opt


def test_sgd():
    w, grads, out, _ = run(OptimizerSpec("sgd"), 3)
    np.testing.assert_allclose(out, w - 0.1 * sum(grads))


def test_classical_momentum():
    w, grads, out, _ = run(OptimizerSpec("momentum", momentum=0.9), 3)
    v = np.zeros(6)
    for g in grads:
        v = 0.9 * v - 0.1 * g
        w = w + v
    np.testing.assert_allclose(out, w)


def test_nesterov_momentum():
    w, grads, out, _ = run(OptimizerSpec("nesterov", momentum=0.8), 4)
    v = np.zeros(6)
    for g in grads:
        v = 0.8 * v - 0.1 * g
        w = w + 0.8 * v - 0.1 * g
    np.testing.assert_allclose(out, w)


def test_adagrad_per_element():
    w, grads, out, _ = run(OptimizerSpec("adagrad"), 3)
    h = np.zeros(6)
    for g in grads:
        h += g * g
        w = w - 0.1 * g / (np.sqrt(h) + 1e-8)
    np.testing.assert_allclose(out, w)


def test_weight_decay_is_the_gradient_of_an_l2_penalty_on_weights_only():
    mask = np.array([1, 1, 1, 0, 0, 1.0])
    w, grads, out, _ = run(OptimizerSpec("sgd", weight_decay=0.01), 1, mask=mask)
    # d/dw of 0.5 * 0.01 * sum(mask * w^2) is 0.01 * mask * w
    np.testing.assert_allclose(out, w - 0.1 * (grads[0] + 0.01 * mask * w))


def test_adam_two_steps_by_hand():
    """Two steps of Adam worked out on paper for one element: g1 = 1, g2 = -2, lr 0.1,
    b1 0.9, b2 0.999. Step 1: m = 0.1, v = 0.001, m^ = 1, v^ = 1: w moves by -0.1 (minus a
    hair for eps). Step 2: m = 0.09 - 0.2 = -0.11, v = 0.000999 + 0.004 = 0.004999,
    m^ = -0.11 / 0.19, v^ = 0.004999 / 0.001999: w moves by +0.1 * (0.11/0.19) / sqrt(2.50075...)."""
    opt = make_optimizer(OptimizerSpec("adam"), 1, np.float64)
    w = np.array([0.5])
    opt.step(w, np.array([1.0]), 0.1)
    np.testing.assert_allclose(w, [0.5 - 0.1 * 1 / (1 + 1e-8)], rtol=0, atol=1e-15)
    opt.step(w, np.array([-2.0]), 0.1)
    m_hat, v_hat = -0.11 / 0.19, 0.004999 / 0.001999
    np.testing.assert_allclose(w, [0.5 - 0.1 / (1 + 1e-8) - 0.1 * m_hat / (np.sqrt(v_hat) + 1e-8)], rtol=1e-12)
    assert opt.steps == 2 and opt.m[0] == pytest.approx(-0.11) and opt.v[0] == pytest.approx(0.004999)


def test_adam_and_adamw_against_a_reference_loop():
    mask = np.array([1, 1, 1, 0, 0, 1.0])
    for name in ("adam", "adamw"):
        spec = OptimizerSpec(name, weight_decay=0.01, beta1=0.8, beta2=0.99, adam_eps=1e-6)
        w, grads, out, opt = run(spec, 3, lr=0.1, mask=mask)
        m = v = np.zeros(6)
        for t, g in enumerate(grads, start=1):
            if name == "adam":
                g = g + 0.01 * mask * w  # L2 on the gradient
            else:
                w = w - 0.1 * 0.01 * mask * w  # decoupled: the weights decay apart from the moments
            m = 0.8 * m + 0.2 * g
            v = 0.99 * v + 0.01 * g * g
            w = w - 0.1 * (m / (1 - 0.8 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-6)
        np.testing.assert_allclose(out, w, rtol=1e-12)
        assert opt.steps == 3


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adagrad", "adam", "adamw"])
def test_state_restores_exactly(name):
    spec = OptimizerSpec(name, weight_decay=0.01)
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(5).astype(np.float32) for _ in range(6)]
    w1 = np.ones(5, np.float32)
    a = make_optimizer(spec, 5)
    for g in grads[:3]:
        a.step(w1, g, 0.05)
    b = make_optimizer(spec, 5)
    b.load_state(a.state())
    w2 = w1.copy()
    for g in grads[3:]:
        a.step(w1, g, 0.05)
        b.step(w2, g, 0.05)
    assert np.array_equal(w1, w2)


def test_bad_optimizer_specs():
    with pytest.raises(ConfigError, match="unknown optimizer"):
        OptimizerSpec("rmsprop")
    with pytest.raises(ConfigError, match="momentum"):
        OptimizerSpec("momentum", momentum=1.5)
    with pytest.raises(ConfigError, match="betas"):
        OptimizerSpec("adam", beta2=1.0)
    with pytest.raises(ConfigError, match="step count"):
        make_optimizer(OptimizerSpec("adam"), 3).load_state({"m": np.zeros(3), "v": np.zeros(3), "step": np.zeros(2)})


def test_schedules():
    assert Constant(0.3)(10**6) == 0.3
    d = Diminishing(1.0, tau=100)
    assert d(0) == 1.0 and d(100) == 0.5 and d(300) == 0.25
    s = StepDecay(1.0, every=10, factor=0.5)
    assert [s(k) for k in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    w = Warmup(Constant(1.0), steps=4)
    assert [w(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_plateau_drops_when_and_only_when_validation_error_stalls():
    p = Plateau(1.0, factor=0.5, patience=2, threshold=0.0)
    for err in [0.5, 0.4, 0.3, 0.2, 0.1]:  # improving: never drops
        p.observe(err)
    assert p(0) == 1.0
    p.observe(0.1)  # one stall
    assert p(0) == 1.0
    p.observe(0.15)  # second stall in a row: drop
    assert p(0) == 0.5
    p.observe(0.09)  # improvement resets the count
    p.observe(0.09)
    assert p(0) == 0.5
    p.observe(0.2)
    assert p(0) == 0.25
    q = Plateau(1.0, factor=0.5, patience=2)
    q.load_state(p.state())
    assert q(0) == 0.25 and q.best == p.best


def test_schedule_spec_builds_each_kind():
    assert isinstance(ScheduleSpec("plateau", 0.1, warmup=0).build(), Plateau)
    assert isinstance(ScheduleSpec("constant", 0.1, warmup=10).build(), Warmup)
    with pytest.raises(ConfigError):
        ScheduleSpec("cosine")


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "adam", "adamw", "delayed_nesterov"])
def test_a_step_in_blocks_is_the_whole_vector_update_bit_for_bit(monkeypatch, name):
    """The rules are elementwise, so updating BLOCK elements at a time (for the cache, and
    a scratch of one block) changes no bit: blocks of 7 against one block for everything."""
    import psgd.model.optim as optim
    rng = np.random.default_rng(3)
    n = 100
    mask = (rng.random(n) < 0.8).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(5)]
    results = []
    for block in (n, 7):
        monkeypatch.setattr(optim, "BLOCK", block)
        opt = make_optimizer(OptimizerSpec(name, 0.9, weight_decay=0.01, nesterov_every=2), n, np.float32, mask)
        w = np.linspace(-1, 1, n, dtype=np.float32)
        for i, g in enumerate(grads):
            opt.step(w, g, 0.05 * (i + 1))
        results.append((w, opt.state()))
    (w1, s1), (w7, s7) = results
    assert np.array_equal(w1, w7)
    assert all(np.array_equal(s1[k], s7[k]) for k in s1)
