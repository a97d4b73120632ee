"""experiments/observability.py's gate: a ridge readout of the run, fitted on train contexts."""

import numpy as np
import pytest

from tests.scripts import load_experiment


@pytest.fixture(scope="module")
def obs():
    return load_experiment("observability")


def contexts_data(rng, n_contexts, seeds, visible):
    """Gain of growing = +1 in half the contexts, -1 in the others, plus episode noise; the
    first feature shows the sign when `visible`, else every feature is noise."""
    sign = np.where(np.arange(n_contexts) % 2 == 0, 1.0, -1.0)
    context = np.repeat(np.arange(n_contexts), seeds)
    gain = np.repeat(sign, seeds) + rng.normal(0, 0.5, len(context))
    x = rng.normal(size=(len(context), 6))
    if visible:
        x[:, 0] = np.repeat(sign, seeds) + rng.normal(0, 0.3, len(context))
    return x, gain, context


@pytest.mark.parametrize("model", ["ridge", "kNN"])
@pytest.mark.parametrize("visible", [True, False])
def test_the_gate_recovers_what_the_run_shows_and_nothing_else(obs, model, visible):
    rng = np.random.default_rng(0)
    x_tr, g_tr, c_tr = contexts_data(rng, 24, 8, visible)
    x_te, g_te, _ = contexts_data(rng, 12, 8, visible)
    choose, fit = obs["MODELS"][model]
    param = choose(x_tr, g_tr, c_tr)  # cross-validated across contexts, never within one
    gate = obs["gate_gain"](fit(x_tr, g_tr, param)(x_te), g_te)
    best = obs["gate_gain"](np.sign(np.repeat([1.0, -1.0] * 6, 8)), g_te)  # told the context
    assert best.mean() == pytest.approx(0.5, abs=0.1)  # NoOp in the losing half: +1 there
    if visible:
        assert gate.mean() > 0.8 * best.mean()
    else:
        # Nothing to read: cross-validation smooths the fit hard, and the gate gains nothing.
        assert param >= {"ridge": 1000, "kNN": 20}[model]
        assert gate.mean() < 0.2 * best.mean()


def test_gate_gain_is_zero_where_it_grows_and_minus_the_gain_where_it_does_not(obs):
    gain = np.array([2.0, -1.0, 0.5])
    np.testing.assert_array_equal(obs["gate_gain"](np.array([1.0, -3.0, 0.0]), gain), [0, 1, -0.5])
